"""Which steps a sampler visits: `steps` integer steps of the T, spaced 'uniform' in t (DDIM's default),
'quadratic' in t (DDIM's Appendix D.2 sequence for CIFAR-10) or 'logsnr', uniform in
lambda_t = log(sqrt(a-bar_t) / sqrt(1 - a-bar_t)) (DPM-Solver's default). `steps` is the number of network
evaluations, exactly; steps = T with 'uniform' spacing is every step, T-1 down to 0.
"""

import torch

SPACINGS = ('uniform', 'quadratic', 'logsnr')


def half_log_snr(model):
    """lambda_t = log(alpha_t / sigma_t) of every step, float64 on the CPU, alpha_t = sqrt(a-bar_t) and
    sigma_t = sqrt(1 - a-bar_t) read from their own buffers (1 - a-bar_t loses digits near t = 0)."""
    return model.sqrt_alphas_cumprod.double().cpu().log() - model.sqrt_one_minus_alphas_cumprod.double().cpu().log()


def spaced_timesteps(timesteps, steps, spacing='uniform', log_snr=None):
    """`steps` integer steps in 0..T-1, increasing and distinct, both ends included (one step: T-1 alone,
    where x_T ~ N(0, I) holds).

    The positions u_i (u_0 = 0, u_{S-1} = T-1) are uniform in t, quadratic in t (DDIM's tau_i = c i^2,
    over the whole range rather than the 0.8 T of DDIM's released code, so the chain starts at T-1), or
    uniform in lambda_t (`log_snr`, from `half_log_snr`), then rounded by `distinct_steps` (the crowded
    small-t end of 'quadratic' and 'logsnr' becomes 0, 1, 2, ...). Uniform spacing never collides, so it is
    exactly round(linspace(0, T-1, S)).
    """
    if spacing not in SPACINGS:
        raise ValueError(f'spacing must be one of {SPACINGS}, got {spacing!r}')
    if not 1 <= steps <= timesteps:
        raise ValueError(f'steps must be between 1 and timesteps={timesteps}, got {steps}')
    if steps == 1:
        return torch.tensor([timesteps - 1])
    grid = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == 'uniform':   # (not grid * (T-1), whose rounding of the halves differs)
        u = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64)
    elif spacing == 'quadratic':
        u = grid ** 2 * (timesteps - 1)
    else:   # lambda_t falls with t: invert it by linear interpolation between the integer steps
        target = log_snr[0] + grid * (log_snr[-1] - log_snr[0])
        j = torch.searchsorted(-log_snr, -target).clamp(1, timesteps - 1)
        u = j - 1 + (log_snr[j - 1] - target) / (log_snr[j - 1] - log_snr[j])
    return distinct_steps(u, timesteps)


def distinct_steps(u, timesteps):
    """Round increasing positions u in [0, T-1] to distinct increasing integer steps: each to the nearest
    step, kept within reach of both ends, then moved up past the one before it where they collide."""
    i = torch.arange(len(u))
    n = torch.minimum(torch.maximum(u.round().long(), i), i + timesteps - len(u))   # room for the others
    return torch.cummax(n - i, 0).values + i   # n_i - i non-decreasing <=> n strictly increasing


def ddim_timesteps(timesteps, steps):
    """The DDIM sub-sequence tau: `steps` steps spread evenly over 0..T-1, both ends included."""
    return spaced_timesteps(timesteps, steps, 'uniform')


def timestep_sequence(model, steps, spacing='uniform'):
    """The `steps` steps a sampler visits, from T-1 down to 0, as a CPU LongTensor (all T when steps = T)."""
    log_snr = half_log_snr(model) if spacing == 'logsnr' else None
    return spaced_timesteps(model.timesteps, steps, spacing, log_snr).flip(0)
