"""Metrics of samples and models (rate_distortion.py: the paper's Fig. 5)."""
