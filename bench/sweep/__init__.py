"""Stage 2, running the sweep: one torchrun job per cell, records as cells end, run-folder metadata."""
