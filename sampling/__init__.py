"""Sampling: the samplers, their options and registry, timestep sequences, generating images, the resumable store."""
