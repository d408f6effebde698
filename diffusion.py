"""Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv:2006.11239).

`DDPM` wraps any noise-prediction network eps_theta(x_t, t) with the forward
process q(x_t | x_0), the training objective L_simple and two samplers: the
paper's ancestral sampler (Algorithm 2) and DDIM (Song et al. 2020,
arXiv:2010.02502). It also evaluates the variational bound in bits/dim.

Indexing: code step t = 0..T-1 is the paper's t = 1..T. So `betas[0]` is the
paper's beta_1, `alphas_cumprod[t]` is a-bar_{t+1}, and the sampler's last
step (code t = 0) is the paper's t = 1, which adds no noise.
"""

import difflib
import inspect
import math
import os
import re

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

    def loss(self, x_0, t=None, noise=None):
        """L_simple, Eq. (14): E_{t, x_0, eps} ||eps - eps_theta(x_t, t)||^2 with t uniform (Algorithm 1)."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x_0.shape[0],), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        eps_pred = self.network(self.q_sample(x_0, t, noise), t)
        return F.mse_loss(eps_pred.float(), noise)

    def forward(self, x_0, t=None, noise=None):
        """The training loss, so that `model(x_0)` runs through DDP / torch.compile wrappers."""
        return self.loss(x_0, t, noise)

    # ----- reverse process ------------------------------------------------------------------

    def p_mean_variance(self, x_t, t, clip_denoised=True):
        """p_theta(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), with mu_theta from Eq. (11).

        mu_theta is written as the posterior mean mu-tilde_t(x_t, x_0_pred), which
        equals Eq. (11) exactly; clipping x_0_pred to [-1, 1] (as the paper's
        released sampler does) is applied before it is used.
        Returns (mean, variance, log_variance, x_0_pred).
        """
        eps_pred = self.network(x_t, t).float()
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
                           progress=True, clip_denoised=True, x_T=None):
        """Yield (t, x_t, x_0_pred) along the reverse chain from x_T ~ N(0, I), ending with t = -1 and x_0.

        See `sample` for the arguments; the samplers themselves are in samplers.py.
        """
        device = torch.device(device) if device is not None else self.betas.device
        yield from samplers.sample_loop(self, n, device, sampler, steps, eta, generator, progress, clip_denoised,
                                        x_T)

    def sample(self, n, device=None, sampler='ddpm', steps=None, eta=0.0, generator=None, progress=True,
               clip_denoised=True, x_T=None):
        """Draw n samples, shaped [n, C, H, W] with values in [-1, 1].

        Args:
            n: number of samples.
            device: where to run; defaults to where the model is. The model is
                moved there if it is elsewhere.
            sampler: 'ddpm', the paper's ancestral sampler over all T steps
                (Algorithm 2), or 'ddim' (Song et al. 2020) over `steps` steps.
            steps: DDIM steps (default T); the 'ddpm' sampler always runs T.
            eta: DDIM stochasticity; 0 is deterministic, 1 matches DDPM's posterior noise.
            generator: a torch.Generator; the same seed gives the same samples.
            progress: show a tqdm progress bar over the steps.
            clip_denoised: clip the predicted x_0 to [-1, 1] at every step, as the
                paper's sampler does.
            x_T: start from this noise instead of drawing it.
        """
        device = torch.device(device) if device is not None else self.betas.device
        self.to(device)
        was_training = self.training
        self.eval()
        try:
            for _, x, _ in self.sample_progressive(n, device, sampler, steps, eta, generator, progress,
                                                   clip_denoised, x_T):
                pass
        finally:
            self.train(was_training)
        return x

    # ----- the variational bound, in bits/dim -----------------------------------------------

    def vb_term_bpd(self, x_0, x_t, t):
        """One term of the variational bound, Eq. (5), in bits/dim, per image.

        For t > 1 (code t > 0): L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)).
        For t = 1 (code t = 0): L_0 = -log p_theta(x_0 | x_1), the discretised Gaussian decoder.
        """
        true_mean, _, true_logvar = self.q_posterior(x_0, x_t, t)
        mean, _, logvar, _ = self.p_mean_variance(x_t, t, clip_denoised=False)
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
        Keywords override the stored config.
        """
        return model_from_checkpoint(load_checkpoint(path, map_location=device), ema, device, source=path,
                                     **model_options)


def model_from_checkpoint(ckpt, ema=True, device='cpu', source='checkpoint', **model_options):
    """DDPM.from_checkpoint for a checkpoint dict already in memory (from load_checkpoint)."""
    valid = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS
    for key in model_options:
        if key not in valid:
            raise ValueError(f'unknown model option {key!r}{closest(key, valid)}; valid: {list(valid)}')
    stored = ckpt.get('config') or {}
    model = create_cifar10_ddpm(**model_kwargs({**stored, **model_options}))
    key = 'ema_state_dict' if ema and ckpt.get('ema_state_dict') is not None else 'model_state_dict'
    advice = None
    if not stored and not model_options:
        advice = ("it carries no config (a bare state_dict), so it was matched against the default "
                  "'base' model; pass the options it was trained with, e.g. "
                  "DDPM.from_checkpoint(path, arch='tiny') or DDPM.from_checkpoint(path, channels=(32, 64), "
                  "image_size=16)")
    load_model_state(model, ckpt[key], source=source, advice=advice)
    return model.to(device)


# ----- device, precision and layout (measured in bench/) ------------------------------------

def resolve_device(device):
    """The device to train on: the one asked for (checked), else CUDA, then MPS, then CPU."""
    mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'mps' if mps else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device='{device}' was asked for but CUDA is not available to this PyTorch; "
                         f"use --device cpu (or install a CUDA build of PyTorch)")
    if device.type == 'mps' and not mps:
        raise ValueError("device='mps' was asked for but MPS is not available; use --device cpu")
    return device


def cpu_has_native_bf16():
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def amp_dtype(amp, device):
    """The autocast dtype (None: fp32). 'auto' is bf16 on CUDA and on CPUs with native bf16 (bench/)."""
    if amp == 'bf16':
        return torch.bfloat16
    if amp == 'auto' and (device.type == 'cuda' or (device.type == 'cpu' and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """Autocast to `dtype` on `device` (from amp_dtype); dtype None runs in fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def use_channels_last(channels_last, device, autocast_dtype):
    """channels_last=None picks the measured faster layout: NHWC, except CPU bf16 (NCHW was 1.17x faster)."""
    if device.type == 'mps':
        return False
    if channels_last is None:
        return not (device.type == 'cpu' and autocast_dtype is not None)
    return channels_last


# ----- building and loading -------------------------------------------------------------------

DDPM_OPTIONS = ('timesteps', 'beta_start', 'beta_end', 'variance')
UNET_OPTIONS = tuple(p for p in inspect.signature(UNet).parameters)


def create_cifar10_ddpm(arch='base', timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                        **unet_overrides):
    """The CIFAR-10 DDPM: a UNet of the named `arch` ('base', 'ddpm-paper' or 'tiny') inside a DDPM.

    Any UNet keyword (channels, num_res_blocks, time_emb_dim, attn_resolutions,
    num_heads, dropout, image_size, in_channels) overrides the arch's value.
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


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why and what to do."""


def load_checkpoint(path, map_location='cpu'):
    """torch.load a checkpoint safely (weights_only=True) with one-line errors for bad files.

    A raw state_dict (a dict of tensors) is accepted and returned as
    {'model_state_dict': state_dict}.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path} (check the path, or train one with python train.py)')
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes); it was probably cut off while writing; '
                              f'use an earlier checkpoint')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise CheckpointError(f'cannot load checkpoint {path}: {_load_failure_reason(e)}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)')
    if 'model_state_dict' not in ckpt:
        if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            return {'model_state_dict': ckpt}
        raise CheckpointError(f'{path} is not a DDPM checkpoint: it has no model_state_dict '
                              f'(keys: {sorted(ckpt)[:8]})')
    return ckpt


def _load_failure_reason(e):
    """Why torch.load(weights_only=True) failed, in words a user can act on."""
    text = str(e)
    unsafe = re.search(r'GLOBAL ([\w.]+)', text)  # 'Unsupported global: GLOBAL x.y' or '... GLOBAL x.y whose module'
    if unsafe:
        return (f'it asks to import {unsafe.group(1)}, which is not a tensor or plain type and could run code, '
                f'so it was refused (checkpoints are only loaded with weights_only=True)')
    if ('Unsupported operand' in text or 'magic number' in text or 'load key' in text
            or isinstance(e, (KeyError, EOFError, UnicodeDecodeError))):
        return ('it is not a file written by torch.save (plain pickle, text or other data), so it was not '
                'loaded; pass a .pth checkpoint written by train.py')
    if 'PytorchStreamReader' in text or 'zip archive' in text or 'central directory' in text:
        return ('the file is truncated or corrupted (an interrupted copy or save?); use an earlier checkpoint '
                'or copy it again')
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def atomic_write(path, write):
    """Call write(file) on a temp file next to `path`, fsync it, then rename it over `path`.

    A crash, kill -9 or full disk mid-write leaves the previous file intact;
    the temp file is removed on any failure.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def save_checkpoint(obj, path):
    """torch.save `obj` to `path` atomically (see atomic_write), then make the rename durable."""
    path = os.fspath(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:  # a full disk, a read-only folder, ...: say which file, keep the errno
        raise OSError(e.errno, f'could not write checkpoint {path} ({e.strerror or e}); '
                               f'the previous file, if any, is unchanged') from e
    folder = os.path.dirname(os.path.abspath(path))
    _fsync_dir(folder)
    _remove_stale_temps(folder, f'.{os.path.basename(path)}.tmp')
    return path


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(folder, prefix):
    """Delete temp files that a process killed mid-save (kill -9, power loss) left behind."""
    if os.name != 'posix':
        return
    for name in os.listdir(folder):
        pid = name[len(prefix):]
        if not (name.startswith(prefix) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the writer is still alive
        except ProcessLookupError:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass
        except OSError:  # alive but another user's (EPERM): leave it
            pass


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add; add 'network.' to a bare UNet's.

    Only whole name components are removed: '_orig_mod' anywhere (a compiled
    submodule), 'module' only in front (the DDP wrapper), so a layer whose own
    name contains 'module' keeps it.
    """
    out = {}
    for k, v in state_dict.items():
        parts = [p for p in k.split('.') if p != '_orig_mod']
        while len(parts) > 1 and parts[0] == 'module':
            parts = parts[1:]
        out['.'.join(parts)] = v
    if out and not any(k.startswith('network.') for k in out):
        out = {f'network.{k}': v for k, v in out.items()}
    return out


def load_model_state(model, state_dict, source='checkpoint', advice=None):
    """load_state_dict with a message naming the mismatched keys instead of a wall of text (then `advice`)."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for name, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong_shape)):
            if keys:
                parts.append(f'{len(keys)} {name} (e.g. {keys[0]})')
        advice = advice or ('rebuild the model from the checkpoint\'s own config with DDPM.from_checkpoint(path) '
                            'or pass the same arch/U-Net options it was trained with')
        raise CheckpointError(f'{source} does not match this model\'s architecture: {"; ".join(parts)}; {advice}')
    model.load_state_dict(state_dict)
    return model


def closest(name, options):
    """The valid option closest to a misspelled one, for 'did you mean' messages."""
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ''
