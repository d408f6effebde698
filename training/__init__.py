"""Training: the loop and its parts (ablations.py: the paper's Table 2 runs)."""
