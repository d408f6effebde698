"""The reverse process: one sampler per function, each read against its paper.

    ddpm_step        Ho et al. 2020, Algorithm 2: ancestral sampling over all T steps, or over a uniform
                     sub-sequence of them with `steps` (`respaced`, Nichol & Dhariwal 2021 section 4)
    ddim_step        Song et al. 2020 (arXiv:2010.02502), Eq. (12): a sub-sequence tau of the steps
    dpm_solver_step  Lu et al. 2022 (arXiv:2211.01095), Algorithm 2, DPM-Solver++(2M): a second-order
                     multistep solver of the probability-flow ODE in its data-prediction form

`sample_loop` runs a sampler from x_T ~ N(0, I) down to x_0 and yields every
x_t on the way; `DDPM.sample` and `DDPM.sample_progressive` are its public
entry points. Each function takes the DDPM first and uses only its schedule
buffers, `model.p_mean_variance` (the ancestral step's mean and, fixed or learned,
variance) and `model.predict_eps(x_t, t)` (the deterministic samplers' noise prediction),
both read from `model.network_outputs`. `cond` holds the class labels and guidance
scale of a class-conditional model (None for an unconditional one) and is passed to
them as keywords, so classifier-free guidance reaches every sampler through that one place.

The fast samplers visit `steps` integer steps (the network is discrete-time),
chosen by `spaced_timesteps`: 'uniform' in t (DDIM's default), 'quadratic' in t
(DDIM's Appendix D.2 sequence for CIFAR-10) or 'logsnr', uniform in
lambda_t = log(sqrt(a-bar_t) / sqrt(1 - a-bar_t)) (DPM-Solver's default).
`steps` is the number of network evaluations, exactly.
"""

import math

import torch
import torch.nn as nn

SAMPLERS = ('ddpm', 'ddim', 'dpm-solver')
SPACINGS = ('uniform', 'quadratic', 'logsnr')
DEFAULT_DDIM_STEPS = 100   # the DDIM steps of sample.py, evaluate.py and the training grids
DEFAULT_DPM_SOLVER_STEPS = 20   # dpm-solver's steps when none are given
DEFAULT_SPACING = {'ddim': 'uniform', 'dpm-solver': 'logsnr'}   # 'ddpm' visits every step
CLIPS_BY_DEFAULT = {'ddpm': True, 'ddim': True, 'dpm-solver': False}   # x_0_pred clipped to [-1, 1]?


def draw_noise(shape, generator, device):
    """N(0, I) drawn on the generator's device (CPU by default) and moved, so one seed gives the same
    samples on every device."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def half_log_snr(model):
    """lambda_t = log(alpha_t / sigma_t) of every step, float64 on the CPU, alpha_t = sqrt(a-bar_t) and
    sigma_t = sqrt(1 - a-bar_t) read from their own buffers (1 - a-bar_t loses digits near t = 0)."""
    return model.sqrt_alphas_cumprod.double().cpu().log() - model.sqrt_one_minus_alphas_cumprod.double().cpu().log()


def resolve_spacing(sampler, spacing, eta=0.0):
    """The spacing `sampler` uses: `spacing`, or its default (DEFAULT_SPACING; None for 'ddpm', which visits
    every step), after a one-line ValueError for a spacing or eta that does not apply to it."""
    if sampler not in SAMPLERS:
        raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f'spacing must be one of {SPACINGS}, got {spacing!r}')
    if sampler == 'ddpm' and spacing is not None:
        raise ValueError(f"the 'ddpm' sampler visits every step (or, respaced, uniform ones), so "
                         f"spacing={spacing!r} does not apply; spacing is for 'ddim' and 'dpm-solver'")
    if sampler == 'dpm-solver' and eta:
        raise ValueError(f"eta={eta:g} is DDIM's noise; 'dpm-solver' solves the deterministic ODE (use eta=0)")
    return spacing or DEFAULT_SPACING.get(sampler)


def resolve_clip(sampler, clip_denoised):
    """Whether `sampler` clips its predicted x_0 to [-1, 1]: `clip_denoised`, or None for its default."""
    return CLIPS_BY_DEFAULT[sampler] if clip_denoised is None else bool(clip_denoised)


def check_options(timesteps, sampler, steps, spacing=None, eta=0.0):
    """Raise a one-line ValueError for an unknown sampler or spacing, or steps outside 1..T."""
    resolve_spacing(sampler, spacing, eta)
    if steps is not None and not 1 <= steps <= timesteps:
        raise ValueError(f'steps must be between 1 and timesteps={timesteps}, got {steps}')


def spaced_timesteps(timesteps, steps, spacing='uniform', log_snr=None):
    """`steps` integer steps in 0..T-1, increasing and distinct, both ends included (one step: T-1 alone,
    where x_T ~ N(0, I) holds).

    The positions u_i (u_0 = 0, u_{S-1} = T-1) are uniform in t, quadratic in t (DDIM's tau_i = c i^2,
    over the whole range rather than the 0.8 T of DDIM's released code, so the chain starts at T-1), or
    uniform in lambda_t (`log_snr`, from `half_log_snr`), then rounded by `distinct_steps` (the crowded
    small-t end of 'quadratic' and 'logsnr' becomes 0, 1, 2, ...). Uniform spacing never collides, so it is
    exactly round(linspace(0, T-1, S)).
    """
    check_options(timesteps, 'ddim', steps, spacing)
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


def timestep_sequence(model, sampler, steps, spacing=None):
    """The steps a sampler visits, from T-1 down to 0, as a CPU LongTensor (spacing None: the sampler's)."""
    if sampler == 'ddpm' and steps in (None, model.timesteps):
        return torch.arange(model.timesteps - 1, -1, -1)
    spacing = spacing or DEFAULT_SPACING.get(sampler, 'uniform')   # a respaced 'ddpm' chain: uniform
    log_snr = half_log_snr(model) if spacing == 'logsnr' else None
    return spaced_timesteps(model.timesteps, steps, spacing, log_snr).flip(0)


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


def respaced(model, steps):
    """Improved DDPM, section 4: the DDPM over the sub-sequence S of `steps` uniform steps (as DDIM's tau).

    Its betas are beta_i = 1 - a-bar_{S_i} / a-bar_{S_{i-1}} (float64, from the model's
    own schedule), so its a-bar_i equals the original a-bar_{S_i}; beta-tilde and the
    learned variance's interpolation (iDDPM Eq. 15) follow from these betas.
    """
    if model.variance == 'learned':
        raise ValueError(f"variance='learned' gives the variance of one of the T steps, not of a respaced chain's "
                         f"longer ones: sample with all {model.timesteps} steps, or with 'ddim' / 'dpm-solver'")
    seq = ddim_timesteps(model.timesteps, steps)
    abar = torch.cumprod(1.0 - model.betas64, dim=0)[seq]
    betas = 1.0 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    network = OriginalSteps(model.network, seq, model.eps_outputs)
    return type(model)(network, variance=model.variance, image_shape=model.image_shape, loss=model.loss_type,
                       betas=betas).to(model.betas.device)


def ddpm_step(model, x_t, t, step, generator, clip_denoised, cond=None):
    """Algorithm 2, one step: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step."""
    mean, _, log_var, x_0_pred = model.p_mean_variance(x_t, t, clip_denoised, **(cond or {}))
    if step == 0:
        return mean, x_0_pred
    return mean + torch.exp(0.5 * log_var) * draw_noise(x_t.shape, generator, x_t.device), x_0_pred


def ddim_step(model, x_t, t, step, prev, eta, generator, clip_denoised, cond=None):
    """DDIM, Eq. (12) of Song et al.: step from t to prev (prev = -1 means a-bar = 1, i.e. x_0)."""
    eps = model.predict_eps(x_t, t, **(cond or {}))
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


def dpm_solver_coefficients(model, seq):
    """The schedule of DPM-Solver++(2M) along `seq` (T-1 down to 0) as Python floats, one (c_x, c_d, w) per step.

    Step i goes from s = seq[i] to t = seq[i + 1], or to a-bar = 1 (alpha = 1, sigma = 0, lambda = +inf)
    after the last: x_t = c_x x_s + c_d D with c_x = sigma_t / sigma_s, c_d = -alpha_t (e^{-h} - 1),
    h = lambda_t - lambda_s, and D = (1 + w) x_0_pred(s) - w x_0_pred(previous s), w = 1 / (2 r),
    r = h_previous / h. w = 0 (first order, D = x_0_pred) at the first step, which has no previous
    prediction, and at the last, where h is infinite; there the step is DDIM's last step, x_0 = x_0_pred.
    """
    lam = half_log_snr(model)[seq].tolist() + [math.inf]
    alpha = model.sqrt_alphas_cumprod.double().cpu()[seq].tolist() + [1.0]
    sigma = model.sqrt_one_minus_alphas_cumprod.double().cpu()[seq].tolist() + [0.0]
    h = [lam[i + 1] - lam[i] for i in range(len(seq))]
    coefs = []
    for i in range(len(seq)):
        last = i == len(seq) - 1
        c_d = 1.0 if last else -alpha[i + 1] * math.expm1(-h[i])
        w = 0.0 if i == 0 or last else h[i] / (2 * h[i - 1])
        coefs.append((sigma[i + 1] / sigma[i], c_d, w))
    return coefs


def dpm_solver_step(model, x_s, s, x_0_prev, coef, clip_denoised, cond=None):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, one step: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D
    with D = (1 + 1/(2r)) x_theta(x_s, s) - 1/(2r) x_theta(x_{s'}, s') from the previous step s' (see
    dpm_solver_coefficients). x_theta is the data prediction x_0_pred, clipped to [-1, 1] only if asked."""
    c_x, c_d, w = coef
    eps = model.predict_eps(x_s, s, **(cond or {}))
    x_0_pred = model.predict_x0_from_eps(x_s, s, eps)
    if clip_denoised:
        x_0_pred = x_0_pred.clamp(-1.0, 1.0)
    d = (1.0 + w) * x_0_pred - w * x_0_prev if w else x_0_pred
    return c_x * x_s + c_d * d, x_0_pred


def sample_loop(model, n, device, sampler='ddpm', steps=None, eta=0.0, generator=None, progress=True,
                clip_denoised=None, x_T=None, spacing=None, labels=None, guidance_scale=0.0):
    """Yield (t, x_t, x_0_pred) along the reverse chain from x_T ~ N(0, I), ending with t = -1 and x_0.

    steps None: all T for 'ddpm' and 'ddim', DEFAULT_DPM_SOLVER_STEPS for 'dpm-solver'; spacing None and
    clip_denoised None: the sampler's defaults (DEFAULT_SPACING, CLIPS_BY_DEFAULT). labels (a LongTensor
    [n] or None) and guidance_scale: classifier-free guidance, see DDPM.network_outputs.
    """
    if labels is None and guidance_scale:
        raise ValueError(f'guidance_scale={guidance_scale:g} needs class labels to guide towards')
    cond = None if labels is None else {'labels': labels, 'guidance_scale': guidance_scale}
    check_options(model.timesteps, sampler, steps, spacing, eta)
    clip_denoised = resolve_clip(sampler, clip_denoised)
    steps = steps or (DEFAULT_DPM_SOLVER_STEPS if sampler == 'dpm-solver' else model.timesteps)
    x = x_T.to(device) if x_T is not None else draw_noise((n, *model.image_shape), generator, device)
    seq = timestep_sequence(model, sampler, steps, spacing).tolist()
    coefs = dpm_solver_coefficients(model, seq) if sampler == 'dpm-solver' else None   # before the loop: no syncs in it
    # 'ddpm' over fewer than T steps walks a respaced chain, whose own step index runs K-1..0.
    chain = respaced(model, steps) if sampler == 'ddpm' and len(seq) < model.timesteps else model
    bar = seq
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(seq, desc=f'sampling ({sampler}, {len(seq)} steps)', leave=False)
    x_0_pred = None
    for i, step in enumerate(bar):
        index = step if chain is model else len(seq) - 1 - i
        t = torch.full((n,), index, device=device, dtype=torch.long)
        if sampler == 'ddpm':
            x, x_0_pred = ddpm_step(chain, x, t, index, generator, clip_denoised, cond)
        elif sampler == 'ddim':
            prev = seq[i + 1] if i + 1 < len(seq) else -1
            x, x_0_pred = ddim_step(model, x, t, step, prev, eta, generator, clip_denoised, cond)
        else:
            x, x_0_pred = dpm_solver_step(model, x, t, x_0_pred, coefs[i], clip_denoised, cond)
        yield step, x, x_0_pred
    yield -1, x.clamp(-1.0, 1.0), x_0_pred

