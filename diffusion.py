"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv:2006.11239).

`DDPM` wraps any noise-prediction network eps_theta(x_t, t) with the noise
schedule, the forward process q(x_t | x_0), the training objective L_simple, the
reverse-process distribution p_theta(x_{t-1} | x_t) and the variational bound in
bits/dim. The samplers that walk the reverse chain (the paper's Algorithm 2,
DDIM, DPM-Solver++) are in sampling/. A class-conditional network
(`UNet(num_classes=...)`) adds classifier-free guidance (Ho & Salimans 2022,
arXiv:2207.12598) at the one place the samplers get eps from: `network_outputs`.

Options from Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672), each off
by default: the cosine schedule (`beta_schedule='cosine'`, their Eq. 17), learned
reverse variances (`learn_sigma=True`, Eq. 15) and the hybrid / VLB objectives
(`loss='hybrid'|'vlb'`, Eq. 16 and section 3.1). The paper's own ablations (its Table 2) are options
too: what the network predicts (`prediction='eps'|'x0'|'mu'|'v'`, converted to eps in one place,
`network_outputs`), a learned diagonal variance (`variance='learned'`) and the true bound as the loss;
and Min-SNR-gamma loss weighting (`min_snr_gamma`, Hang et al. 2023). This module knows nothing of files,
devices or command lines: checkpoint files are weights/'s, run-time choices runtime.py's; the architecture
tables are model/presets.py's.

Indexing: code step t = 0..T-1 is the paper's t = 1..T. So `betas[0]` is the
paper's beta_1, `alphas_cumprod[t]` is a-bar_{t+1}, and the sampler's last
step (code t = 0) is the paper's t = 1, which adds no noise.
"""

import importlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import sampling.guidance as guidance
import sampling.options as sampling_options
import sampling.timesteps as step_sequences
import weights.checkpoint as checkpoint_files   # a module name: its names that once lived here still warn
from metrics.likelihood import discretized_gaussian_log_likelihood, normal_kl  # noqa: F401 (also public here)
from model.presets import (DDPM_OPTIONS, LEGACY_DEFAULTS, MODEL_OPTIONS, UNET_OPTIONS,  # noqa: F401 (public here)
                           build_unet, model_kwargs)  # noqa: F401
from sampling.noise import draw_noise
from sampling.options import DEFAULTS   # the sampler options' defaults, declared once


# ----- the noise schedule ------------------------------------------------------------------------
# 'linear' is Ho et al. 2020's (beta_1 = 1e-4 .. beta_T = 0.02); 'cosine' is Improved DDPM's Eq. 17.
# Everything is computed in float64 (1 - a-bar_t is tiny at small t); DDPM stores float32 buffers.

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


def mean_buffers(betas):
    """The float64 coefficients of Eq. (11), mu_theta = (x_t - beta_t / sqrt(1 - a-bar_t) eps) / sqrt(alpha_t),
    with which 'mu' predictions convert to eps and back, and the SNR of Min-SNR weighting."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return {'sqrt_recip_alphas': (1.0 - betas).rsqrt(),                           # 1 / sqrt(alpha_t)
            'eps_coef': betas / (1.0 - alphas_cumprod).sqrt(),                     # beta_t / sqrt(1 - a-bar_t)
            'snr': alphas_cumprod / (1.0 - alphas_cumprod)}                        # SNR_t = a-bar_t / (1 - a-bar_t)


def extract(a, t, shape):
    """Gather a[t] for a batch of steps t and shape it [B, 1, 1, ...] to broadcast against `shape`."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(shape) - 1)))


LOSSES = ('simple', 'hybrid', 'vlb')
HYBRID_LAMBDA = 0.001   # lambda of L_hybrid = L_simple + lambda L_vlb (iDDPM Eq. 16)
# What the network predicts (the paper's Table 2 compares mu-tilde and eps): eps (Eq. 11), x_0,
# mu-tilde_t (the TF code's 'xprev'), or v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, arXiv:2202.00512).
PREDICTIONS = ('eps', 'x0', 'mu', 'v')
# The reverse variance: fixed beta_t ('beta', the paper's CIFAR-10 choice) or beta-tilde_t ('posterior'),
# learned diagonal (the network outputs log sigma^2 itself, Table 2's "learned diagonal Sigma") or
# learned between the two fixed ones (iDDPM Eq. 15, also `learn_sigma=True`).
VARIANCES = ('beta', 'posterior', 'learned', 'learned_range')
LEARNED_VARIANCES = ('learned', 'learned_range')


def resolve_variance(variance, learn_sigma):
    """The variance kind of (variance, learn_sigma): learn_sigma=True is 'learned_range' (its older spelling)."""
    if variance not in VARIANCES:
        raise ValueError(f'variance must be one of {VARIANCES}, got {variance!r}')
    if learn_sigma and variance == 'posterior':
        raise ValueError(f"variance={variance!r} picks a fixed variance; drop it with learn_sigma=True")
    return 'learned_range' if learn_sigma and variance == 'beta' else variance


def check_model_options(timesteps, beta_start, beta_end, variance, beta_schedule, learn_sigma, loss,
                        prediction='eps', min_snr_gamma=None):
    """One clear ValueError for each impossible combination of DDPM options."""
    learned = resolve_variance(variance, learn_sigma) in LEARNED_VARIANCES
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f'beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}')
    if loss not in LOSSES:
        raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
    if prediction not in PREDICTIONS:
        raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')
    if timesteps < 1 or (beta_schedule == 'linear' and not 0 < beta_start <= beta_end < 1):
        raise ValueError('need timesteps >= 1 and 0 < beta_start <= beta_end < 1, got '
                         f'timesteps={timesteps}, beta_start={beta_start}, beta_end={beta_end}')
    if learned and loss == 'simple':
        raise ValueError(f"a learned variance (learn_sigma=True / variance={variance!r}) needs loss='hybrid' or "
                         f"loss='vlb': L_simple does not train the variance")
    if loss == 'hybrid' and not learned:
        raise ValueError("loss='hybrid' needs learn_sigma=True or a learned variance (its VLB term trains only "
                         "the variance)")
    if min_snr_gamma is not None and not (isinstance(min_snr_gamma, (int, float)) and min_snr_gamma > 0):
        raise ValueError(f'min_snr_gamma must be a positive number or None (off), got {min_snr_gamma!r}')
    if min_snr_gamma is not None and loss == 'vlb':
        raise ValueError("min_snr_gamma weights the MSE of loss='simple' or 'hybrid'; loss='vlb' has none: drop it")


class DDPM(nn.Module):
    """A diffusion model around `network(x_t, t) -> eps` with a linear (or cosine) beta schedule.

    Args:
        network: predicts the noise eps (or what `prediction` names) from (x_t, t), t a LongTensor [B] in
            0..T-1 (with a learned variance, [eps, nu] stacked on the channels: 2C channels).
        timesteps: T, the number of diffusion steps.
        beta_start, beta_end: the linear schedule's beta_1 and beta_T.
        variance: the fixed reverse-process variance sigma_t^2:
            'beta' (sigma_t^2 = beta_t, the paper's CIFAR-10 choice) or
            'posterior' (sigma_t^2 = beta-tilde_t); or learned: 'learned' (nu = log sigma_t^2)
            or 'learned_range' (iDDPM Eq. 15, the same as learn_sigma=True).
        image_shape: (C, H, W) of samples; read from the network's
            `in_channels` / `image_size` when it has them, else (3, 32, 32).
        beta_schedule: 'linear' (Ho et al.) or 'cosine' (iDDPM Eq. 17).
        learn_sigma: the network also outputs the variance (iDDPM Eq. 15).
        loss: 'simple' (L_simple, Eq. 14), 'hybrid' (iDDPM Eq. 16; needs
            learn_sigma) or 'vlb' (the variational bound itself).
        betas: float64 betas that replace the named schedule (T = len(betas)).
        prediction: what the network predicts: 'eps' (the paper's), 'x0', 'mu' (mu-tilde_t) or 'v'.
            Everything else reads eps through `network_outputs`, which converts.
        min_snr_gamma: Min-SNR-gamma weighting of the MSE (Hang et al. 2023, arXiv:2303.09556); None: off.
    """

    def __init__(self, network, timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                 image_shape=None, beta_schedule='linear', learn_sigma=False, loss='simple', betas=None,
                 prediction='eps', min_snr_gamma=None):
        super().__init__()
        check_model_options(timesteps, beta_start, beta_end, variance, beta_schedule, learn_sigma, loss, prediction,
                            min_snr_gamma)
        self.network = network
        self.variance, self.beta_schedule, self.loss_type = resolve_variance(variance, learn_sigma), beta_schedule, loss
        self.learn_sigma = self.variance in LEARNED_VARIANCES   # the network's output has the variance channels too
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma
        self.image_shape = tuple(image_shape) if image_shape is not None else (
            getattr(network, 'in_channels', 3), getattr(network, 'image_size', 32), getattr(network, 'image_size', 32))
        # `betas` (float64) overrides the named schedule: sampling.ancestral.respaced builds a shorter chain this way.
        self.betas64 = betas if betas is not None else make_betas(beta_schedule, timesteps, beta_start, beta_end)
        self.timesteps = len(self.betas64)
        # Derived from the constructor's arguments, so not part of the state_dict.
        for name, value in {**schedule_buffers(self.betas64), **mean_buffers(self.betas64)}.items():
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

    def eps_from_prediction(self, x_t, t, pred):
        """The eps that `pred` (what the network predicts, `prediction`) stands for at (x_t, t).

        x0: invert Eq. (4); v: eps = sigma_t x_t + alpha_t v (alpha_t = sqrt(a-bar_t), sigma_t = sqrt(1 - a-bar_t),
        alpha_t^2 + sigma_t^2 = 1); mu: invert Eq. (11), eps = (x_t - sqrt(alpha_t) mu) sqrt(1 - a-bar_t) / beta_t.
        """
        if self.prediction == 'eps':
            return pred
        if self.prediction == 'x0':
            return self.predict_eps_from_x0(x_t, t, pred)
        if self.prediction == 'v':
            return (extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
                    + extract(self.sqrt_alphas_cumprod, t, x_t.shape) * pred)
        return (x_t - pred / extract(self.sqrt_recip_alphas, t, x_t.shape)) / extract(self.eps_coef, t, x_t.shape)

    def prediction_from_eps(self, x_t, t, eps):
        """The inverse of `eps_from_prediction`: what the network would output for noise eps at (x_t, t)."""
        if self.prediction == 'eps':
            return eps
        if self.prediction == 'mu':   # Eq. (11)
            return extract(self.sqrt_recip_alphas, t, x_t.shape) * (x_t - extract(self.eps_coef, t, x_t.shape) * eps)
        x_0 = self.predict_x0_from_eps(x_t, t, eps)
        if self.prediction == 'x0':
            return x_0
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * eps
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_0)

    # ----- training -------------------------------------------------------------------------

    def loss(self, x_0, t=None, noise=None, reduction='mean', labels=None):
        """The training objective at steps t (default uniform, Algorithm 1) and noise eps (default N(0, I)).

        loss='simple': the MSE on what the network predicts, averaged over pixels: for eps
            L_simple, Eq. (14), ||eps - eps_theta(x_t, t)||^2; for mu ||mu-tilde_t - mu_theta||^2,
            for x0 and v the MSE on x_0 and v. With min_snr_gamma, weighted by `min_snr_weight`.
        loss='vlb': T * L_{t-1} in bits/dim, an unbiased estimate of the bound's
            sum over t for uniform t (iDDPM section 3.1).
        loss='hybrid': the MSE + lambda * T * L_{t-1} with lambda = 0.001 (iDDPM
            Eq. 16), the mean detached in the VLB term so that it trains only the variance.
        reduction='none' gives one value per image (for importance weights); 'mean' their mean.
        labels: class labels of a class-conditional network, the null class where a
        label was dropped (classifier-free guidance's joint training, Algorithm 1 of
        Ho & Salimans); None for an unconditional one.
        """
        if reduction not in ('mean', 'none'):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if t is None:
            t = torch.randint(0, self.timesteps, (x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        plain = self.prediction == 'eps' and self.min_snr_gamma is None
        if self.loss_type == 'simple' and reduction == 'mean' and plain:
            eps_pred = self.network(x_t, t) if labels is None else self.network(x_t, t, labels)
            return F.mse_loss(eps_pred.float(), noise)
        out = self.network(x_t, t) if labels is None else self.network(x_t, t, labels)
        pred, nu = self.split_outputs(out.float(), x_t)
        if self.loss_type != 'vlb':
            mse = (pred - self.training_target(x_0, x_t, t, noise)).pow(2).flatten(1).mean(1)
            if self.min_snr_gamma is not None:
                mse = mse * self.min_snr_weight(t)
        if self.loss_type == 'simple':
            per_image = mse
        # Trained on the unclipped bound (clip_denoised=False), as the paper's code does.
        elif self.loss_type == 'vlb':
            eps_pred = self.eps_from_prediction(x_t, t, pred)
            per_image = self.timesteps * self.vb_term_bpd(x_0, x_t, t, False, (eps_pred, nu))
        else:
            eps_detached = self.eps_from_prediction(x_t, t, pred.detach())
            per_image = mse + HYBRID_LAMBDA * self.timesteps * self.vb_term_bpd(x_0, x_t, t, False, (eps_detached, nu))
        return per_image.mean() if reduction == 'mean' else per_image

    def training_target(self, x_0, x_t, t, noise):
        """What the network should output at (x_t, t) for the x_0 and noise that made x_t (see `prediction`)."""
        if self.prediction == 'eps':
            return noise
        if self.prediction == 'x0':
            return x_0
        if self.prediction == 'mu':
            return self.q_posterior(x_0, x_t, t)[0]
        return (extract(self.sqrt_alphas_cumprod, t, x_0.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * x_0)

    def min_snr_weight(self, t):
        """Min-SNR-gamma (Hang et al. 2023), per image: the weight that makes the MSE on the prediction
        min(SNR_t, gamma) ||x_0 - x_0_pred||^2, SNR_t = a-bar_t / (1 - a-bar_t).

        ||eps - eps_pred||^2 = SNR_t ||x_0 - x_0_pred||^2, so eps gets min(SNR_t, gamma) / SNR_t (the paper's
        Eq. for eps), x0 min(SNR_t, gamma), v min(SNR_t, gamma) / (SNR_t + 1) (||v - v_pred||^2 =
        ||x_0 - x_0_pred||^2 / (1 - a-bar_t)), and mu min(SNR_t, gamma) / coef1_t^2 (mu-tilde is
        coef1_t x_0 + coef2_t x_t).
        """
        snr = self.snr[t]
        weight = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == 'eps':
            return weight / snr
        if self.prediction == 'v':
            return weight / (snr + 1)
        if self.prediction == 'mu':
            return weight / self.posterior_mean_coef1[t] ** 2
        return weight

    def forward(self, x_0, t=None, noise=None, reduction='mean', labels=None):
        """The training loss, so that `model(x_0)` runs through DDP / torch.compile wrappers."""
        return self.loss(x_0, t, noise, reduction, labels)

    # ----- reverse process ------------------------------------------------------------------

    @property
    def num_classes(self):
        """The classes of a class-conditional network; None when it is unconditional."""
        return getattr(self.network, 'num_classes', None)

    def network_outputs(self, x_t, t, labels=None, guidance_scale=0.0):
        """(eps_pred, nu) in float32: the noise prediction and, with a learned variance, the raw variance output
        (else None). Every sampler gets eps from here.

        labels None: eps_theta(x_t, t), which for a class-conditional network is its
        null class, i.e. the unconditional model. With labels c and guidance scale w,
        classifier-free guidance (Ho & Salimans 2022, Eq. 6):
            eps~ = (1 + w) eps_theta(x_t, t, c) - w eps_theta(x_t, t, null),
        both terms from ONE network call on the 2n-image batch [x_t; x_t], and nu from
        the conditional half; w = 0 is the conditional model alone (one call on n images).
        A network that predicts x0, mu or v has its output converted to eps (`eps_from_prediction`)
        before guidance, which is linear in eps and so in each of them.
        """
        if labels is None:
            if guidance_scale:
                raise ValueError(f'guidance_scale={guidance_scale:g} needs class labels to guide towards')
            return self.eps_outputs(self.network(x_t, t).float(), x_t, t)
        if not guidance_scale:
            return self.eps_outputs(self.network(x_t, t, labels).float(), x_t, t)
        null = torch.full_like(labels, self.network.null_class)
        out_cond, out_null = self.network(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                          torch.cat([labels, null])).float().chunk(2)
        (eps_cond, nu), (eps_null, _) = self.eps_outputs(out_cond, x_t, t), self.eps_outputs(out_null, x_t, t)
        return (1.0 + guidance_scale) * eps_cond - guidance_scale * eps_null, nu

    def eps_outputs(self, out, x_t, t):
        """The network's output as (eps_pred, nu), its prediction converted to eps."""
        pred, nu = self.split_outputs(out, x_t)
        return self.eps_from_prediction(x_t, t, pred), nu

    def split_outputs(self, out, x_t):
        """The network's output as (prediction, nu): nu is None unless a learned variance stacks it on the channels."""
        if not self.learn_sigma:
            return out, None
        if out.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(f'a learned variance needs a network with 2 x {x_t.shape[1]} output channels (eps and '
                             f'the variance), got {out.shape[1]}; build it with create_cifar10_ddpm(learn_sigma=True)')
        return out.chunk(2, dim=1)

    def predict_eps(self, x_t, t, labels=None, guidance_scale=0.0):
        """eps_theta(x_t, t) alone (guided, given labels and guidance_scale: see network_outputs): what
        deterministic samplers (DDIM) use, whatever else the network outputs."""
        return self.network_outputs(x_t, t, labels, guidance_scale)[0]

    def learned_log_variance(self, nu, t):
        """log sigma_t^2 from the network's nu: nu itself for variance='learned' (the paper's learned diagonal
        Sigma); else iDDPM Eq. 15: log Sigma = v log beta_t + (1 - v) log beta-tilde_t, with v = (nu + 1) / 2.

        The network's nu = 1 gives beta_t, nu = -1 beta-tilde_t (as in the paper's
        code); nu is not clipped, so the variance can leave that range.
        """
        if self.variance == 'learned':
            return nu
        v = (nu + 1) / 2
        return (v * extract(self.log_betas, t, nu.shape)
                + (1 - v) * extract(self.posterior_log_variance_clipped, t, nu.shape))

    def p_mean_variance(self, x_t, t, clip_denoised=True, outputs=None, labels=None, guidance_scale=0.0):
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), with mu_theta from Eq. (11).

        mu_theta is written as the posterior mean mu-tilde_t(x_t, x_0_pred), which
        equals Eq. (11) exactly; clipping x_0_pred to [-1, 1] (as the paper's
        released sampler does) is applied before it is used. sigma_t^2 is fixed
        (`variance`) or learned (iDDPM Eq. 15). `outputs` = (eps_pred, nu) skips
        the network call (the losses pass them, with eps_pred detached for L_hybrid).
        labels and guidance_scale: classifier-free guidance, see `network_outputs`.
        Returns (mean, variance, log_variance, x_0_pred).
        """
        eps_pred, nu = outputs if outputs is not None else self.network_outputs(x_t, t, labels, guidance_scale)
        x_0_pred = self.predict_x0_from_eps(x_t, t, eps_pred)
        if clip_denoised:
            x_0_pred = x_0_pred.clamp(-1.0, 1.0)
        mean, posterior_var, posterior_logvar = self.q_posterior(x_0_pred, x_t, t)
        if nu is not None:
            log_var = self.learned_log_variance(nu, t)
            return mean, log_var.exp(), log_var, x_0_pred
        if self.variance == 'posterior':
            return mean, posterior_var, posterior_logvar, x_0_pred
        # sigma_t^2 = beta_t; at t = 1 use beta-tilde_2's place as the paper's code does
        # (that step adds no noise when sampling, and the decoder uses it for bits/dim).
        var = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        return mean, extract(var, t, x_t.shape), extract(var.log(), t, x_t.shape), x_0_pred

    def ddim_timesteps(self, steps):
        """The DDIM sub-sequence tau of `steps` steps (see sampling.timesteps.ddim_timesteps)."""
        return step_sequences.ddim_timesteps(self.timesteps, steps)

    @torch.inference_mode()
    def sample_progressive(self, n, device=None, sampler=DEFAULTS.sampler, steps=DEFAULTS.steps, eta=DEFAULTS.eta,
                           generator=None, progress=True, clip_denoised=DEFAULTS.clip_denoised, x_T=None,
                           spacing=DEFAULTS.spacing, labels=None, guidance_scale=DEFAULTS.guidance_scale):
        """Yield (t, x_t, x_0_pred) along the reverse chain from x_T ~ N(0, I), ending with t = -1 and x_0.

        See `sample` for the arguments; the samplers themselves are in sampling/.
        """
        options = sampling_options.SampleOptions(sampler, steps, spacing, eta, clip_denoised, guidance_scale)
        yield from self.sample_progressive_with(options, n, device, generator, progress, x_T, labels)

    def run_sampler(self, options, n, device, generator=None, progress=False, x_T=None, labels=None, timesteps=None):
        """sample_progressive for resolved SampleOptions: (t, x_t, x_0_pred) after every step, then (-1, x_0, ...).

        timesteps: the code steps to visit (sampling.options.timesteps_of; default all of the options'); a walk
        that starts part-way (timesteps_of(..., start=t)) takes x_T = x_t at its first step.
        """
        if labels is None and options.guidance_scale:
            raise ValueError(f'guidance_scale={options.guidance_scale:g} needs class labels to guide towards')
        x = x_T.to(device) if x_T is not None else draw_noise((n, *self.image_shape), generator, device)
        cond = None if labels is None else {'labels': labels, 'guidance_scale': options.guidance_scale}
        timesteps = sampling_options.timesteps_of(self, options) if timesteps is None else timesteps
        chain = sampling_options.run_sampler(self, options, x, cond, generator, timesteps)
        if progress:
            from tqdm.auto import tqdm
            chain = tqdm(chain, total=len(timesteps), desc=f'sampling ({options.sampler}, {len(timesteps)} steps)',
                         leave=False)
        x_0_pred = None
        for step, x, x_0_pred in chain:
            yield step, x, x_0_pred
        yield -1, x.clamp(-1.0, 1.0), x_0_pred

    def sample(self, n, device=None, sampler=DEFAULTS.sampler, steps=DEFAULTS.steps, eta=DEFAULTS.eta, generator=None,
               progress=True, clip_denoised=DEFAULTS.clip_denoised, x_T=None, spacing=DEFAULTS.spacing, labels=None,
               guidance_scale=DEFAULTS.guidance_scale):
        """Draw n samples, shaped [n, C, H, W] with values in [-1, 1].

        Args:
            n: number of samples.
            device: where to run; defaults to where the model is. The model is
                moved there if it is elsewhere.
            sampler: 'ddpm', the paper's ancestral sampler over all T steps
                (Algorithm 2); 'ddim' (Song et al. 2020) or 'dpm-solver'
                (DPM-Solver++(2M), Lu et al. 2022) over `steps` steps.
            steps: network evaluations; None: the sampler's default in sampling.options.SAMPLERS
                (all T for 'ddpm', 100 for 'ddim', 20 for 'dpm-solver', at most T). For 'ddpm',
                fewer than T walk a respaced chain (Improved DDPM section 4, sampling.ancestral).
            eta: DDIM stochasticity; 0 is deterministic, 1 matches DDPM's posterior noise.
            generator: a torch.Generator; the same seed gives the same samples.
            progress: show a tqdm progress bar over the steps.
            clip_denoised: clip the predicted x_0 to [-1, 1] at every step, as the
                paper's sampler does; None: on for 'ddpm' and 'ddim', off for 'dpm-solver'.
            x_T: start from this noise instead of drawing it.
            spacing: which steps 'ddim' and 'dpm-solver' visit: 'uniform' or
                'quadratic' in t, or 'logsnr' (uniform in log-SNR); None: 'uniform'
                for 'ddim', 'logsnr' for 'dpm-solver' (sampling.timesteps.spaced_timesteps).
            labels: for a class-conditional model, the class of every sample (one int
                for all, or n); None samples unconditionally (the null class).
            guidance_scale: w of classifier-free guidance, eps~ = (1 + w) eps(c) - w eps(null);
                0 is the conditional model alone (see `network_outputs`).
        """
        options = sampling_options.SampleOptions(sampler, steps, spacing, eta, clip_denoised, guidance_scale)
        return self.sample_with(options, n, device, generator, progress, x_T, labels)

    def sample_with(self, options, n, device=None, generator=None, progress=True, x_T=None, labels=None):
        """`sample` with its sampler options as one SampleOptions (resolved here)."""
        device = torch.device(device) if device is not None else self.betas.device
        self.to(device)
        was_training = self.training
        self.eval()
        try:
            for _, x, _ in self.sample_progressive_with(options, n, device, generator, progress, x_T, labels):
                pass
        finally:
            self.train(was_training)
        return x

    @torch.inference_mode()
    def sample_progressive_with(self, options, n, device=None, generator=None, progress=True, x_T=None, labels=None):
        """`sample_progressive` with its sampler options as one SampleOptions (resolved here)."""
        device = torch.device(device) if device is not None else self.betas.device
        labels = guidance.check_labels(labels, n, self.num_classes, device)
        yield from self.run_sampler(options.resolve(self), n, device, generator, progress, x_T, labels)

    # ----- the variational bound, in bits/dim -----------------------------------------------

    def vb_term_bpd(self, x_0, x_t, t, clip_denoised=True, outputs=None):
        """One term of the variational bound, Eq. (5), in bits/dim (the mean over pixels, in bits), per image.

        For t > 1 (code t > 0): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)).
        For t = 1 (code t = 0): L_0 = -log p_theta(x_0 | x_1), the discretised Gaussian decoder.
        clip_denoised: p_theta's mean from the predicted x_0 clipped to [-1, 1], as the paper's
        released code evaluates the bound (its 3.70-3.75 bits/dim); both choices are valid bounds.
        `outputs`: the network's (eps_pred, nu) at (x_t, t), if already computed.
        """
        true_mean, _, true_logvar = self.q_posterior(x_0, x_t, t)
        mean, _, logvar, _ = self.p_mean_variance(x_t, t, clip_denoised=clip_denoised, outputs=outputs)
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
        `path` may also be a diffusers UNet2DModel or DDPMPipeline folder, a file in the DDIM /
        pytorch_diffusion format (image_size=32 unless given) or a release name such as 'ema_cifar10'.
        """
        ckpt = checkpoint_files.load_checkpoint(path, map_location=device)
        return model_from_checkpoint(ckpt, ema, device, source=path, **model_options)


# ----- building and loading -------------------------------------------------------------------

def create_cifar10_ddpm(arch='base', timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                        beta_schedule='linear', learn_sigma=False, loss='simple', prediction='eps', min_snr_gamma=None,
                        **unet_overrides):
    """The CIFAR-10 DDPM: a UNet of the named `arch` ('base', 'ddpm-paper' or 'tiny') inside a DDPM.

    Any UNet keyword (channels, num_res_blocks, time_emb_dim, attn_resolutions,
    num_heads, dropout, image_size, in_channels, downsample_padding) overrides the arch's value;
    a learned variance (learn_sigma=True, variance='learned' or 'learned_range') gives the UNet
    2 x in_channels outputs (the prediction and the variance).
    """
    unknown = set(unet_overrides) - set(UNET_OPTIONS)
    if unknown:
        raise ValueError(f'unknown U-Net option(s) {sorted(unknown)}; valid: {list(UNET_OPTIONS)}')
    if resolve_variance(variance, learn_sigma) in LEARNED_VARIANCES and 'out_channels' not in unet_overrides:
        unet_overrides['out_channels'] = 2 * unet_overrides.get('in_channels', 3)
    network = build_unet(arch, **unet_overrides)
    return DDPM(network, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end, variance=variance,
                beta_schedule=beta_schedule, learn_sigma=learn_sigma, loss=loss, prediction=prediction,
                min_snr_gamma=min_snr_gamma)


def model_from_checkpoint(ckpt, ema=True, device='cpu', source='checkpoint', **model_options):
    """DDPM.from_checkpoint for a checkpoint dict already in memory (weights.checkpoint.load_checkpoint's)."""
    config, state_dict, advice = checkpoint_files.checkpoint_parts(ckpt, ema, **model_options)
    model = create_cifar10_ddpm(**config)
    checkpoint_files.load_model_state(model, state_dict, source=source, advice=advice)
    return model.to(device)


# Names that lived here before weights/ and runtime.py existed; old imports keep working.
MOVED = {name: 'weights.checkpoint' for name in ('CheckpointError', 'load_checkpoint', 'save_checkpoint',
                                                 'clean_state_dict', 'load_model_state')}
MOVED.update({name: 'runtime' for name in ('resolve_device', 'cpu_has_native_bf16', 'amp_dtype', 'autocast',
                                           'use_channels_last', 'atomic_write', 'closest')})


def __getattr__(name):
    if name in MOVED:
        warnings.warn(f'diffusion.{name} has moved to {MOVED[name]}.{name}', DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
