"""Editing with a trained DDPM: inpainting (RePaint), image-to-image (SDEdit), the paper's figures 6-8."""
