"""Enter the reverse process part-way: x_t ~ q(x_t | x_0) at a paper step t, then back to x_0 with any sampler.

SDEdit, the shared latents of Fig. 7 and the interpolation of Fig. 8 all do this. The paper's t runs
1..T; the code's step is t - 1 (see diffusion.py). The reverse walk is the sampler's own, over its
timestep sequence cut to start at that step (sampling.options.timesteps_of(..., start=step)), so every
sampler, variance and class-conditional model works unchanged.
"""

import torch

from sampling.guidance import check_labels
from sampling.noise import draw_noise
from sampling.options import SampleOptions, timesteps_of


def code_step(model, t, what='t'):
    """The code step of the paper's t (1..T); a one-line ValueError for a t the model does not have."""
    if isinstance(t, bool) or int(t) != t or not 1 <= t <= model.timesteps:
        raise ValueError(f'{what} must be a whole number in 1..T={model.timesteps} (the paper\'s t), got {t}')
    return int(t) - 1


def strength_step(model, strength):
    """SDEdit's start: the paper's t = round(strength * T), at least 1, for strength in (0, 1]."""
    if not 0 < strength <= 1:
        raise ValueError(f'strength must be in (0, 1] (the fraction t/T of the chain to rerun), got {strength:g}')
    return max(1, round(strength * model.timesteps))


def encode(model, x_0, t, generator=None):
    """x_t = sqrt(a-bar_t) x_0 + sqrt(1 - a-bar_t) eps (Eq. 4) at the paper's t, eps drawn from `generator`."""
    step = torch.full((x_0.shape[0],), code_step(model, t), dtype=torch.long, device=x_0.device)
    return model.q_sample(x_0, step, draw_noise(x_0.shape, generator, x_0.device))


@torch.inference_mode()
def denoise_from(model, x_t, t, generator=None, labels=None, options=SampleOptions(), progress=False):
    """x_0 from x_t at the paper's t by the reverse process, in [-1, 1].

    options: the sampler's (SampleOptions); its `steps` count the whole chain's steps, of which those below t run.
    labels: the class of every image of a class-conditional model (None: unconditional).
    """
    resolved = options.resolve(model)
    labels = check_labels(labels, x_t.shape[0], model.num_classes, x_t.device)
    walk = timesteps_of(model, resolved, start=code_step(model, t))
    for _, x, _ in model.run_sampler(resolved, x_t.shape[0], x_t.device, generator, progress, x_T=x_t,
                                     labels=labels, timesteps=walk):
        pass
    return x
