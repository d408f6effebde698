"""The reverse process: one sampler per function, each read against its paper.

    ddpm_step   Ho et al. 2020, Algorithm 2: ancestral sampling over all T steps
    ddim_step   Song et al. 2020 (arXiv:2010.02502), Eq. (12): a sub-sequence tau of the steps

`sample_loop` runs a sampler from x_T ~ N(0, I) down to x_0 and yields every
x_t on the way; `DDPM.sample` and `DDPM.sample_progressive` are its public
entry points. Each function takes the DDPM first and uses only its schedule
buffers and its noise predictor `model.network(x_t, t)`.
"""

import torch

SAMPLERS = ('ddpm', 'ddim')
DEFAULT_DDIM_STEPS = 100   # the DDIM steps of sample.py, evaluate.py and the training grids


def draw_noise(shape, generator, device):
    """N(0, I) drawn on the generator's device (CPU by default) and moved, so one seed gives the same
    samples on every device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def ddim_timesteps(timesteps, steps):
    """The DDIM sub-sequence tau: `steps` steps spread evenly over 0..T-1, both ends included.

    A single step is T-1 alone: the chain must start where x_T ~ N(0, I) holds.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f'steps must be between 1 and timesteps={timesteps}, got {steps}')
    if steps == 1:
        return torch.tensor([timesteps - 1])
    return torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().unique()


def timestep_sequence(timesteps, sampler, steps):
    """The steps a sampler visits, from T-1 down to 0, as a CPU LongTensor."""
    if sampler == 'ddpm':
        return torch.arange(timesteps - 1, -1, -1)
    return ddim_timesteps(timesteps, steps).flip(0)


def ddpm_step(model, x_t, t, step, generator, clip_denoised):
    """Algorithm 2, one step: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step."""
    mean, _, log_var, x_0_pred = model.p_mean_variance(x_t, t, clip_denoised)
    if step == 0:
        return mean, x_0_pred
    return mean + torch.exp(0.5 * log_var) * draw_noise(x_t.shape, generator, x_t.device), x_0_pred


def ddim_step(model, x_t, t, step, prev, eta, generator, clip_denoised):
    """DDIM, Eq. (12) of Song et al.: step from t to prev (prev = -1 means a-bar = 1, i.e. x_0)."""
    eps = model.network(x_t, t).float()
    x_0_pred = model.predict_x0_from_eps(x_t, t, eps)
    if clip_denoised:
        x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        eps = model.predict_eps_from_x0(x_t, t, x_0_pred)
    abar_t = model.alphas_cumprod[step]
    abar_prev = model.alphas_cumprod[prev] if prev >= 0 else torch.ones_like(abar_t)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    x_prev = abar_prev.sqrt() * x_0_pred + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
    if eta > 0 and prev >= 0:
        x_prev = x_prev + sigma * draw_noise(x_t.shape, generator, x_t.device)
    return x_prev, x_0_pred


def sample_loop(model, n, device, sampler='ddpm', steps=None, eta=0.0, generator=None, progress=True,
                clip_denoised=True, x_T=None):
    """Yield (t, x_t, x_0_pred) along the reverse chain from x_T ~ N(0, I), ending with t = -1 and x_0."""
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
    if sampler == 'ddpm' and steps not in (None, model.timesteps):
        raise ValueError(f"the 'ddpm' sampler runs all {model.timesteps} steps; for fewer steps use "
                         f"sampler='ddim', steps={steps} (eta=1.0 makes it stochastic)")
    x = x_T.to(device) if x_T is not None else draw_noise((n, *model.image_shape), generator, device)
    seq = timestep_sequence(model.timesteps, sampler, steps or model.timesteps).tolist()
    bar = seq
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(seq, desc=f'sampling ({sampler}, {len(seq)} steps)', leave=False)
    for i, step in enumerate(bar):
        t = torch.full((n,), step, device=device, dtype=torch.long)
        if sampler == 'ddpm':
            x, x_0_pred = ddpm_step(model, x, t, step, generator, clip_denoised)
        else:
            prev = seq[i + 1] if i + 1 < len(seq) else -1
            x, x_0_pred = ddim_step(model, x, t, step, prev, eta, generator, clip_denoised)
        yield step, x, x_0_pred
    yield -1, x.clamp(-1.0, 1.0), x_0_pred
