"""Noise schedules: the betas of a named schedule and every per-step quantity derived from them.

'linear' is Ho et al. 2020's (beta_1 = 1e-4 .. beta_T = 0.02); 'cosine' is Improved DDPM's
Eq. 17 (Nichol & Dhariwal 2021). Everything is computed in float64 (1 - a-bar_t is tiny at
small t); DDPM stores the results as float32 buffers named after their symbols.
"""

import math

import torch

BETA_SCHEDULES = ('linear', 'cosine')
COSINE_S = 0.008        # the offset s of iDDPM Eq. 17 (keeps beta_1 from being tiny)
MAX_BETA = 0.999        # iDDPM clips the cosine schedule's betas here: beta_T would be 1


def make_betas(beta_schedule, timesteps, beta_start=1e-4, beta_end=0.02):
    """The betas of a named schedule, float64 [T].

    'linear': Ho et al.'s beta_start..beta_end. 'cosine': iDDPM Eq. 17,
    a-bar_t = f(t) / f(0) with f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), so
    beta_t = 1 - a-bar_t / a-bar_{t-1}, clipped at 0.999 (beta_start/beta_end unused).
    """
    if beta_schedule == 'linear':
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if beta_schedule == 'cosine':
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + COSINE_S) / (1 + COSINE_S)
                      * math.pi / 2) ** 2
        return (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    raise ValueError(f'beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}')


def schedule_buffers(betas):
    """Every per-step quantity the model uses, from float64 betas (float64 because 1 - a-bar_t is tiny at small t)."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # log beta-tilde_t; beta-tilde_1 = 0, so its log borrows beta-tilde_2 (beta_1 when T = 1).
    first = posterior_variance[1:2] if len(betas) > 1 else betas[:1]
    return {
        'betas': betas,                                             # beta_t
        'alphas': alphas,                                           # alpha_t = 1 - beta_t
        'alphas_cumprod': alphas_cumprod,                           # a-bar_t = prod_{s<=t} alpha_s
        'alphas_cumprod_prev': alphas_cumprod_prev,                 # a-bar_{t-1}, with a-bar_0 = 1
        'sqrt_alphas_cumprod': alphas_cumprod.sqrt(),               # sqrt(a-bar_t)
        'sqrt_one_minus_alphas_cumprod': (1.0 - alphas_cumprod).sqrt(),  # sqrt(1 - a-bar_t)
        'sqrt_recip_alphas_cumprod': alphas_cumprod.rsqrt(),        # 1 / sqrt(a-bar_t)
        'sqrt_recipm1_alphas_cumprod': (1.0 / alphas_cumprod - 1.0).sqrt(),  # sqrt(1 / a-bar_t - 1)
        'posterior_variance': posterior_variance,                   # beta-tilde_t, Eq. (7)
        'posterior_log_variance_clipped': torch.log(torch.cat([first, posterior_variance[1:]])),
        'log_betas': betas.log(),                                   # log beta_t, the upper end of iDDPM Eq. 15
        # mu-tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t, Eq. (7)
        'posterior_mean_coef1': betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    }
