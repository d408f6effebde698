"""Inpainting with RePaint (Lugmayr et al. 2022, arXiv:2201.09865), for any trained DDPM.

The paper's Algorithm 1: walking down the chain, the known pixels of x_{t-1} are drawn from the
forward process, x_{t-1}^known ~ q(x_{t-1} | x_0) (Eq. 8), the unknown ones from the reverse step
x_{t-1}^unknown ~ p_theta(x_{t-1} | x_t) (Eq. 9), and the two are pasted together with the mask
(Eq. 10). Pasting alone leaves the unknown part out of tune with the known part, so RePaint
resamples: after every j steps down it goes j steps back up with the forward process
x_{t+1} ~ q(x_{t+1} | x_t) = N(sqrt(1 - beta_{t+1}) x_t, beta_{t+1} I) and comes down again, r - 1
times (section 4.2, "jump length" j and "resampling" r). Its defaults: a 250-step chain respaced
from the 1000 trained steps, j = 10, r = 10 (section 5), i.e. about 2,500 network evaluations.

The model is used only through p_mean_variance, q_sample and its betas, so a learned variance and
a class-conditional network (labels, classifier-free guidance) work as in the samplers.
"""

from dataclasses import dataclass

import torch

from sampling.guidance import check_labels
from sampling.ancestral import respaced
from sampling.noise import draw_noise
from sampling.options import DEFAULTS
from sampling.timesteps import ddim_timesteps


@dataclass(frozen=True)
class RePaint:
    """RePaint's schedule: a chain of `steps` steps (None: min(250, T)), jumps of `jump_length` (j) steps,
    each stretch walked `resamplings` (r) times; r = 1 is plain known-pixel replacement."""
    steps: int = None
    jump_length: int = 10
    resamplings: int = 10

    def check(self, timesteps):
        if self.steps is not None and not 1 <= self.steps <= timesteps:
            raise ValueError(f'steps must be in 1..T={timesteps}, got {self.steps}')
        if self.jump_length < 1 or self.resamplings < 1:
            raise ValueError(f'jump_length and resamplings must be at least 1, got {self.jump_length} '
                             f'and {self.resamplings}')


def repaint_walk(levels, jump_length, resamplings):
    """The levels the chain visits, from `levels` (pure noise) down to 0 (the image): after reaching a
    multiple L of j (0 < L <= levels - j), go back up to L + j and down again, r - 1 times in all."""
    jumps_left = {L: resamplings - 1 for L in range(1, levels - jump_length + 1, jump_length)}
    walk, level = [levels], levels
    while level > 0:
        level -= 1
        walk.append(level)
        if jumps_left.get(level, 0) > 0:
            jumps_left[level] -= 1
            walk.extend(range(level + 1, level + jump_length + 1))
            level += jump_length
    return walk


def reverse_step(chain, x, x_0, mask, level, generator, clip_denoised, cond):
    """Level -> level - 1: unknown pixels from p_theta(x_{t-1} | x_t), known ones from q(x_{t-1} | x_0)
    (x_0 itself at the end). One noise draw serves both: the mask picks disjoint pixels of it."""
    t = torch.full((x.shape[0],), level - 1, dtype=torch.long, device=x.device)
    mean, _, log_var, _ = chain.p_mean_variance(x, t, clip_denoised, **cond)
    if level == 1:   # the last step adds no noise (Algorithm 2 of Ho et al.)
        return mask * x_0 + (1 - mask) * mean
    z = draw_noise(x.shape, generator, x.device)
    known = chain.q_sample(x_0, t - 1, z)
    return mask * known + (1 - mask) * (mean + torch.exp(0.5 * log_var) * z)


def forward_step(chain, x, level, generator):
    """Level -> level + 1: x_{t+1} = sqrt(1 - beta_{t+1}) x_t + sqrt(beta_{t+1}) z (Ho et al. Eq. 2)."""
    beta = chain.betas[level]
    return torch.sqrt(1 - beta) * x + torch.sqrt(beta) * draw_noise(x.shape, generator, x.device)


@torch.inference_mode()
def inpaint(model, x_0, mask, generator=None, labels=None, schedule=RePaint(), clip_denoised=True,
            guidance_scale=DEFAULTS.guidance_scale, progress=False):
    """Fill the pixels of x_0 [B, C, H, W] (in [-1, 1]) where `mask` is 0; keep those where it is 1.

    mask: [B or 1, 1 or C, H, W] of 0s and 1s. labels: the class of every image of a class-conditional
    model (None: unconditional). With an empty mask and r = 1 this is the ancestral sampler
    (model.sample(sampler='ddpm', steps=schedule.steps)) drawing the same noise from `generator`.
    """
    schedule.check(model.timesteps)
    mask = check_mask(mask, x_0)
    labels = check_labels(labels, x_0.shape[0], model.num_classes, x_0.device)
    cond = {} if labels is None else {'labels': labels, 'guidance_scale': guidance_scale}
    levels = schedule.steps or min(250, model.timesteps)
    chain = model if levels == model.timesteps else respaced(model, ddim_timesteps(model.timesteps, levels))
    walk = repaint_walk(levels, schedule.jump_length, schedule.resamplings)
    x = draw_noise(x_0.shape, generator, x_0.device)
    pairs = list(zip(walk, walk[1:]))
    if progress:
        from tqdm.auto import tqdm
        pairs = tqdm(pairs, desc=f'inpainting (RePaint, {len(pairs)} steps)', leave=False)
    for level, nxt in pairs:
        if nxt < level:
            x = reverse_step(chain, x, x_0, mask, level, generator, clip_denoised, cond)
        else:
            x = forward_step(chain, x, level, generator)
    return x.clamp(-1.0, 1.0)


def check_mask(mask, x_0):
    """The mask as a float tensor of 0s and 1s that broadcasts against x_0, or a one-line ValueError."""
    mask = torch.as_tensor(mask, device=x_0.device).float()
    if mask.dim() != 4 or mask.shape[2:] != x_0.shape[2:] or mask.shape[0] not in (1, x_0.shape[0]) \
            or mask.shape[1] not in (1, x_0.shape[1]):
        raise ValueError(f'mask must be [1 or {x_0.shape[0]}, 1 or {x_0.shape[1]}, {x_0.shape[2]}, '
                         f'{x_0.shape[3]}] for images {list(x_0.shape)}, got {list(mask.shape)}')
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError('mask must hold only 0 (fill in) and 1 (keep)')
    return mask
