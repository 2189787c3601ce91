"""Stage 5, what a run folder says: the record reader and writer, reports, plots, compare, history."""
