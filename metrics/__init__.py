"""Metrics: FID / Inception features, the discretised likelihood, bits/dim, rate-distortion (Fig. 5)."""
