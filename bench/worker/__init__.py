"""Stage 3, one cell on every rank (python -m bench.worker): build, time, sample, profile, gather."""
