"""Metrics: FID / Inception features, the discretised likelihood, bits/dim."""
