"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv:2006.11239).

`DDPM` wraps any noise-prediction network eps_theta(x_t, t) with the noise
schedule, the forward process q(x_t | x_0), the training objective L_simple, the
reverse-process distribution p_theta(x_{t-1} | x_t) and the variational bound in
bits/dim. The samplers that walk the reverse chain (the paper's Algorithm 2,
DDIM, DPM-Solver++) are in samplers.py. A class-conditional network
(`UNet(num_classes=...)`) adds classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598) at the one place the samplers get eps from: `predict_eps`. This module knows nothing of files, devices or
command lines: checkpoints are checkpoint.py's, run-time choices runtime.py's.

Indexing: code step t = 0..T-1 is the paper's t = 1..T. So `betas[0]` is the
paper's beta_1, `alphas_cumprod[t]` is a-bar_{t+1}, and the sampler's last
step (code t = 0) is the paper's t = 1, which adds no noise.
"""

import importlib
import inspect
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import samplers
from model.Blocks import UNet, build_unet


def extract(a, t, shape):
    """Gather a[t] for a batch of steps t and shape it [B, 1, 1, ...] to broadcast against `shape`."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The standard normal CDF through the tanh approximation the paper's code uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data x in [-1, 1] under N(mean, exp(log_scale)^2), Eq. (13).

    Each pixel value owns a bin of width 2/255 centred on it; the edge bins
    extend to -inf and +inf, so the 256 probabilities sum to one.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPM(nn.Module):
    """A diffusion model around `network(x_t, t) -> eps` with a linear beta schedule.

    Args:
        network: predicts the noise eps from (x_t, t), t a LongTensor [B] in 0..T-1.
        timesteps: T, the number of diffusion steps.
        beta_start, beta_end: the linear schedule's beta_1 and beta_T.
        variance: the reverse-process variance sigma_t^2 of the ancestral sampler:
            'beta' (sigma_t^2 = beta_t, the paper's CIFAR-10 choice) or
            'posterior' (sigma_t^2 = beta-tilde_t).
        image_shape: (C, H, W) of samples; read from the network's
            `in_channels` / `image_size` when it has them, else (3, 32, 32).
    """

    def __init__(self, network, timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                 image_shape=None):
        super().__init__()
        if variance not in ('beta', 'posterior'):
            raise ValueError(f"variance must be 'beta' or 'posterior', got {variance!r}")
        if timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError('need timesteps >= 1 and 0 < beta_start <= beta_end < 1, got '
                             f'timesteps={timesteps}, beta_start={beta_start}, beta_end={beta_end}')
        self.network = network
        self.timesteps = timesteps
        self.variance = variance
        self.image_shape = tuple(image_shape) if image_shape is not None else (
            getattr(network, 'in_channels', 3), getattr(network, 'image_size', 32), getattr(network, 'image_size', 32))

        # The schedule in float64 (1 - a-bar_t is tiny at small t), stored as float32.
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        schedule = {
            'betas': betas,                                             # beta_t
            'alphas': alphas,                                           # alpha_t = 1 - beta_t
            'alphas_cumprod': alphas_cumprod,                           # a-bar_t = prod_{s<=t} alpha_s
            'alphas_cumprod_prev': alphas_cumprod_prev,                 # a-bar_{t-1}, with a-bar_0 = 1
            'sqrt_alphas_cumprod': alphas_cumprod.sqrt(),               # sqrt(a-bar_t)
            'sqrt_one_minus_alphas_cumprod': (1.0 - alphas_cumprod).sqrt(),  # sqrt(1 - a-bar_t)
            'sqrt_recip_alphas_cumprod': alphas_cumprod.rsqrt(),        # 1 / sqrt(a-bar_t)
            'sqrt_recipm1_alphas_cumprod': (1.0 / alphas_cumprod - 1.0).sqrt(),  # sqrt(1 / a-bar_t - 1)
            'posterior_variance': posterior_variance,                   # beta-tilde_t, Eq. (7)
            # log beta-tilde_t; beta-tilde_1 = 0, so its log borrows beta-tilde_2.
            'posterior_log_variance_clipped': torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            # mu-tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t, Eq. (7)
            'posterior_mean_coef1': betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        # Derived from the constructor's arguments, so not part of the state_dict.
        for name, value in schedule.items():
            self.register_buffer(name, value.float(), persistent=False)

    # ----- forward process ------------------------------------------------------------------

    def q_sample(self, x_0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a-bar_t) x_0, (1 - a-bar_t) I), Eq. (4)."""
        if noise is None:
            noise = torch.randn_like(x_0)
        return (extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise)

    def q_posterior(self, x_0, x_t, t):
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0) = N(mu-tilde_t, beta-tilde_t I), Eqs. (6)-(7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def predict_x0_from_eps(self, x_t, t, eps):
        """Invert Eq. (4): x_0 = (x_t - sqrt(1 - a-bar_t) eps) / sqrt(a-bar_t)."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def predict_eps_from_x0(self, x_t, t, x_0):
        """The noise that takes x_0 to x_t: the inverse of `predict_x0_from_eps`."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_0)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # ----- training -------------------------------------------------------------------------

    def loss(self, x_0, t=None, noise=None, labels=None):
        """L_simple, Eq. (14): E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2 with t uniform (Algorithm 1).

        labels: class labels of a class-conditional network, the null class where a
        label was dropped (classifier-free guidance's joint training, Algorithm 1 of
        Ho & Salimans); None for an unconditional one.
        """
        if t is None:
            t = torch.randint(0, self.timesteps, (x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        eps_pred = self.network(x_t, t) if labels is None else self.network(x_t, t, labels)
        return F.mse_loss(eps_pred.float(), noise)

    def forward(self, x_0, t=None, noise=None, labels=None):
        """The training loss, so that `model(x_0)` runs through DDP / torch.compile wrappers."""
        return self.loss(x_0, t, noise, labels)

    # ----- reverse process ------------------------------------------------------------------

    @property
    def num_classes(self):
        """The classes of a class-conditional network; None when it is unconditional."""
        return getattr(self.network, 'num_classes', None)

    def class_labels(self, labels, n, device):
        """`labels` (None, one int, or n ints in 0..num_classes-1) as a LongTensor [n] on `device`, or None."""
        if labels is None:
            return None
        if self.num_classes is None:
            raise ValueError('this model is unconditional (trained without class_cond), so it takes no class '
                             'labels; drop labels / --class_label')
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1).expand(n)
        if labels.shape[0] != n or not bool(((labels >= 0) & (labels < self.num_classes)).all()):
            raise ValueError(f'need {n} class labels in 0..{self.num_classes - 1} (or one for all), got '
                             f'{labels.tolist()[:8]}')
        return labels

    def predict_eps(self, x_t, t, labels=None, guidance_scale=0.0):
        """The noise prediction every sampler uses, in float32.

        labels None: eps_theta(x_t, t), which for a class-conditional network is its
        null class, i.e. the unconditional model. With labels c and guidance scale w,
        classifier-free guidance (Ho & Salimans 2022, Eq. 6):
            eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null),
        both terms from ONE network call on the 2n-image batch [x_t; x_t]; w = 0 is the
        conditional model alone (one call on n images).
        """
        if labels is None:
            if guidance_scale:
                raise ValueError(f'guidance_scale={guidance_scale:g} needs class labels to guide towards')
            return self.network(x_t, t).float()
        if not guidance_scale:
            return self.network(x_t, t, labels).float()
        null = torch.full_like(labels, self.network.null_class)
        eps_cond, eps_uncond = self.network(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                            torch.cat([labels, null])).float().chunk(2)
        return (1.0 + guidance_scale) * eps_cond - guidance_scale * eps_uncond

    def p_mean_variance(self, x_t, t, clip_denoised=True, labels=None, guidance_scale=0.0):
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), with mu_theta from Eq. (11).

        mu_theta is written as the posterior mean mu-tilde_t(x_t, x_0_pred), which
        equals Eq. (11) exactly; clipping x_0_pred to [-1, 1] (as the paper's
        released sampler does) is applied before it is used.
        labels and guidance_scale: see `predict_eps`.
        Returns (mean, variance, log_variance, x_0_pred).
        """
        eps_pred = self.predict_eps(x_t, t, labels, guidance_scale)
        x_0_pred = self.predict_x0_from_eps(x_t, t, eps_pred)
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        mean, posterior_var, posterior_logvar = self.q_posterior(x_0_pred, x_t, t)
        if self.variance == 'posterior':
            return mean, posterior_var, posterior_logvar, x_0_pred
        # sigma_t^2 = beta_t; at t = 1 use beta-tilde_2's place as the paper's code does
        # (that step adds no noise when sampling, and the decoder uses it for bits/dim).
        var = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        return mean, extract(var, t, x_t.shape), extract(var.log(), t, x_t.shape), x_0_pred

    def ddim_timesteps(self, steps):
        """The DDIM sub-sequence tau of `steps` steps (see samplers.ddim_timesteps)."""
        return samplers.ddim_timesteps(self.timesteps, steps)

    @torch.inference_mode()
    def sample_progressive(self, n, device=None, sampler='ddpm', steps=None, eta=0.0, generator=None,
                           progress=True, clip_denoised=None, x_T=None, spacing=None, labels=None,
                           guidance_scale=0.0):
        """Yield (t, x_t, x_0_pred) along the reverse chain from x_T ~ N(0, I), ending with t = -1 and x_0.

        See `sample` for the arguments; the samplers themselves are in samplers.py.
        """
        device = torch.device(device) if device is not None else self.betas.device
        labels = self.class_labels(labels, n, device)
        yield from samplers.sample_loop(self, n, device, sampler, steps, eta, generator, progress, clip_denoised,
                                        x_T, spacing, labels, guidance_scale)

    def sample(self, n, device=None, sampler='ddpm', steps=None, eta=0.0, generator=None, progress=True,
               clip_denoised=None, x_T=None, spacing=None, labels=None, guidance_scale=0.0):
        """Draw n samples, shaped [n, C, H, W] with values in [-1, 1].

        Args:
            n: number of samples.
            device: where to run; defaults to where the model is. The model is
                moved there if it is elsewhere.
            sampler: 'ddpm', the paper's ancestral sampler over all T steps
                (Algorithm 2); 'ddim' (Song et al. 2020) or 'dpm-solver'
                (DPM-Solver++(2M), Lu et al. 2022) over `steps` steps.
            steps: network evaluations of 'ddim' (default T) and 'dpm-solver'
                (default samplers.DEFAULT_DPM_SOLVER_STEPS); 'ddpm' always runs T.
            eta: DDIM stochasticity; 0 is deterministic, 1 matches DDPM's posterior noise.
            generator: a torch.Generator; the same seed gives the same samples.
            progress: show a tqdm progress bar over the steps.
            clip_denoised: clip the predicted x_0 to [-1, 1] at every step, as the
                paper's sampler does; None: on for 'ddpm' and 'ddim', off for 'dpm-solver'.
            x_T: start from this noise instead of drawing it.
            spacing: which steps 'ddim' and 'dpm-solver' visit: 'uniform' or
                'quadratic' in t, or 'logsnr' (uniform in log-SNR); None: 'uniform'
                for 'ddim', 'logsnr' for 'dpm-solver' (samplers.spaced_timesteps).
            labels: for a class-conditional model, the class of every sample (one int
                for all, or n); None samples unconditionally (the null class).
            guidance_scale: w of classifier-free guidance, eps~ = (1 + w) eps(c) - w eps(null);
                0 is the conditional model alone (see `predict_eps`).
        """
        device = torch.device(device) if device is not None else self.betas.device
        self.to(device)
        was_training = self.training
        self.eval()
        try:
            for _, x, _ in self.sample_progressive(n, device, sampler, steps, eta, generator, progress,
                                                   clip_denoised, x_T, spacing, labels, guidance_scale):
                pass
        finally:
            self.train(was_training)
        return x

    # ----- the variational bound, in bits/dim -----------------------------------------------

    def vb_term_bpd(self, x_0, x_t, t, clip_denoised=True):
        """One term of the variational bound, Eq. (5), in bits/dim, per image.

        For t > 1 (code t > 0): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)).
        For t = 1 (code t = 0): L_0 = -log p_theta(x_0 | x_1), the discretised Gaussian decoder.
        clip_denoised: p_theta's mean from the predicted x_0 clipped to [-1, 1], as the paper's
        released code evaluates the bound (its 3.70-3.75 bits/dim); both choices are valid bounds.
        """
        true_mean, _, true_logvar = self.q_posterior(x_0, x_t, t)
        mean, _, logvar, _ = self.p_mean_variance(x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x_0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per image."""
        t = torch.full((x_0.shape[0],), self.timesteps - 1, device=x_0.device, dtype=torch.long)
        mean = extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
        logvar = extract(torch.log(1.0 - self.alphas_cumprod), t, x_0.shape)
        return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).mean(1) / math.log(2.0)

    # ----- checkpoints ----------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, ema=True, device='cpu', **model_options):
        """Rebuild a model from a checkpoint alone (its stored config), with EMA weights if asked and present.

        A checkpoint that carries no config (a bare state_dict) is rebuilt as the
        default 'base' model; pass the options it was trained with as keywords,
        e.g. `DDPM.from_checkpoint('weights.pth', channels=(32, 64), image_size=16)`.
        Keywords override the stored config. A config without downsample_padding
        (written before the option existed) gets the old 'symmetric' padding.
        `path` may also be a diffusers UNet2DModel or DDPMPipeline folder.
        """
        from checkpoint import load_checkpoint, model_from_checkpoint  # checkpoint.py builds on this module
        return model_from_checkpoint(load_checkpoint(path, map_location=device), ema, device, source=path,
                                     **model_options)


# ----- building and loading -------------------------------------------------------------------

DDPM_OPTIONS = ('timesteps', 'beta_start', 'beta_end', 'variance')
UNET_OPTIONS = tuple(p for p in inspect.signature(UNet).parameters)
# Options added after checkpoints had been written: a stored config without the key
# was trained with this value, not with the new default.
LEGACY_DEFAULTS = {'downsample_padding': 'symmetric'}


def create_cifar10_ddpm(arch='base', timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                        **unet_overrides):
    """The CIFAR-10 DDPM: a UNet of the named `arch` ('base', 'ddpm-paper' or 'tiny') inside a DDPM.

    Any UNet keyword (channels, num_res_blocks, time_emb_dim, attn_resolutions,
    num_heads, dropout, image_size, in_channels, downsample_padding) overrides the arch's value.
    """
    unknown = set(unet_overrides) - set(UNET_OPTIONS)
    if unknown:
        raise ValueError(f'unknown U-Net option(s) {sorted(unknown)}; valid: {list(UNET_OPTIONS)}')
    network = build_unet(arch, **unet_overrides)
    return DDPM(network, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end, variance=variance)


def model_kwargs(config):
    """The subset of a run's config that `create_cifar10_ddpm` takes (None means: the arch's default)."""
    keys = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
            if k in keys and v is not None}


# Names that lived here before checkpoint.py and runtime.py existed; old imports keep working.
MOVED = {name: 'checkpoint' for name in ('CheckpointError', 'load_checkpoint', 'save_checkpoint', 'clean_state_dict',
                                         'load_model_state', 'model_from_checkpoint')}
MOVED.update({name: 'runtime' for name in ('resolve_device', 'cpu_has_native_bf16', 'amp_dtype', 'autocast',
                                           'use_channels_last', 'atomic_write', 'closest')})


def __getattr__(name):
    if name in MOVED:
        warnings.warn(f'diffusion.{name} has moved to {MOVED[name]}.{name}', DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
