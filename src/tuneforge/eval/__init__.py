"""Evaluation: generation, metrics, baselines and reports."""
