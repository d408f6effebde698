"""Weight formats: our checkpoints, diffusers folders, and the DDIM / pytorch_diffusion format."""
