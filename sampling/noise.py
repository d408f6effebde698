"""The sampler's Gaussian noise, drawn so that a seed gives the same images on every device and batch size."""

import torch


def draw_noise(shape, generator, device):
    """N(0, I) drawn on the generator's device (CPU by default) and moved, so one seed gives the same
    samples on every device. A list of generators, one per image, draws each image's noise from its own
    generator, so an image's noise does not depend on the others in its batch (seeds per image)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f'{len(generator)} generators for a batch of {shape[0]}: pass one per image')
        # Stacked where the generators are, then moved once: one host-to-device copy per step, not one per image.
        return torch.stack([draw_noise(shape[1:], g, g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)
