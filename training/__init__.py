"""Training: the loop, its reports, FID during training, timestep sampling."""
