"""Ancestral sampling, Ho et al. 2020, Algorithm 2, over all T steps or a respaced chain (Improved DDPM,
Nichol & Dhariwal 2021, section 4)."""

import torch
import torch.nn as nn

from sampling.noise import draw_noise


class OriginalSteps(nn.Module):
    """The network of a respaced chain: its step i is the original model's step `steps[i]`, its output
    converted to eps there (a mu-tilde prediction belongs to the original step, not to the chain's)."""

    def __init__(self, network, steps, to_eps):
        super().__init__()
        self.network, self.to_eps = network, to_eps   # to_eps: the original DDPM's eps_outputs
        self.register_buffer('steps', steps, persistent=False)
        # A class-conditional network stays one: guidance reads these.
        self.num_classes, self.null_class = getattr(network, 'num_classes', None), getattr(network, 'null_class', None)

    def forward(self, x_t, i, *labels):
        t = self.steps.to(i.device)[i]
        eps, nu = self.to_eps(self.network(x_t, t, *labels).float(), x_t, t)
        return eps if nu is None else torch.cat([eps, nu], dim=1)


def respaced(model, seq):
    """Improved DDPM, section 4: the DDPM over the increasing sub-sequence `seq` of the model's steps.

    Its betas are beta_i = 1 - a-bar_{S_i} / a-bar_{S_{i-1}} (float64, from the model's
    own schedule), so its a-bar_i equals the original a-bar_{S_i}; beta-tilde and the
    learned variance's interpolation (iDDPM Eq. 15) follow from these betas.
    """
    if model.variance == 'learned':
        raise ValueError(f"variance='learned' gives the variance of one of the T steps, not of a respaced chain's "
                         f"longer ones: sample with all {model.timesteps} steps, or with 'ddim' / 'dpm-solver'")
    seq = torch.as_tensor(seq)
    abar = torch.cumprod(1.0 - model.betas64, dim=0)[seq]
    betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    network = OriginalSteps(model.network, seq, model.eps_outputs)
    return type(model)(network, variance=model.variance, image_shape=model.image_shape, loss=model.loss_type,
                       betas=betas).to(model.betas.device)


def sample_ancestral(model, x_T, timesteps, cond, generator, clip_denoised):
    """Algorithm 2: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) (z = 0 at t = 1).

    `timesteps` (T-1 down to 0) are every step, or a contiguous tail of them, on the model's own chain;
    any other sub-sequence runs on its respaced chain, whose own step i is timesteps[-1 - i].
    Yields (t, x_{t-1}, x_0_pred) after every step, t the original step.
    """
    contiguous = all(a - b == 1 for a, b in zip(timesteps, timesteps[1:])) and timesteps[-1] == 0
    chain = model if contiguous else respaced(model, timesteps[::-1])
    x = x_T
    for i, step in enumerate(timesteps):
        index = step if contiguous else len(timesteps) - 1 - i
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        mean, _, log_var, x_0_pred = chain.p_mean_variance(x, t, clip_denoised, **(cond or {}))
        x = mean if index == 0 else mean + torch.exp(0.5 * log_var) * draw_noise(x.shape, generator, x.device)
        yield step, x, x_0_pred
