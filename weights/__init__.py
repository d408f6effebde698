"""Weights on disk: our checkpoints, diffusers folders, the DDIM format; plain dicts in and out, no model classes."""
