"""Stage 4, numbers from measurements: formulas, overlap from traces, roofline, loss check, and the
one place a cell's record is assembled (assemble.py) from a typed Measurement."""
