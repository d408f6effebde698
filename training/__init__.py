"""Training: the loop, its reports, FID during training, timestep sampling, the paper's Table 2 runs."""
