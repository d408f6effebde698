"""DDIM, Song et al. 2020 (arXiv:2010.02502), Eq. (12), over a sub-sequence tau of the steps."""

import torch

from sampling.noise import draw_noise


def sample_ddim(model, x_T, timesteps, cond, generator, clip_denoised, eta):
    """Eq. (12): x_prev = sqrt(a-bar_prev) x_0_pred + sqrt(1 - a-bar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - a-bar_prev) / (1 - a-bar_t)) sqrt(1 - a-bar_t / a-bar_prev) (Eq. 16).

    After the last step prev means a-bar = 1, i.e. x_0. With clip_denoised, x_0_pred is clipped to [-1, 1]
    and eps is the one the clipped x_0 implies, as in DDIM's code. Yields (t, x_prev, x_0_pred).
    """
    x = x_T
    for i, step in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        eps = model.predict_eps(x, t, **(cond or {}))
        x_0_pred = model.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)
            eps = model.predict_eps_from_x0(x, t, x_0_pred)
        abar_t = model.alphas_cumprod[step]
        abar_prev = model.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(abar_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x_prev = abar_prev.sqrt() * x_0_pred + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
        if eta > 0 and prev >= 0:
            x_prev = x_prev + sigma * draw_noise(x.shape, generator, x.device)
        x = x_prev
        yield step, x, x_0_pred
