"""Offline data tools (`tuneforge data ...`) and the curation steps the pipeline runs:
clean, dedup, contamination, mix, augment, convert, stats, validate."""
