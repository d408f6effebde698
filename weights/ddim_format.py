"""The DDIM / pytorch_diffusion weight format: the paper's released weights, EMA included, in and out.

pesser/pytorch_diffusion converted the authors' TensorFlow checkpoints to PyTorch, and the codebases built
on DDPM (ermongroup/ddim, PNDM, DPM-Solver's DDPM experiments) read the same files: a flat state_dict of
one `Model` class. A DDIM-codebase training run saves ckpt.pth = [state_dict ('module.'-prefixed under
DataParallel), optimizer state, epoch, step, EMA shadow (only with `ema: True`)]. Both are recognised by
their keys (`to_checkpoint`), and our networks that the class can express are written as the flat dict
(`save_ddim`). Only names and shapes change; the arithmetic is the same (tests/test_ddim_format.py checks
both directions against diffusers' UNet2DModel):

    theirs (Model)                     ours (DDPM.network)
    temb.dense.0 / dense.1             time_embedding.mlp.0 / mlp.2
    down.i.block.j                     down.i.res.j   (temb_proj -> time_proj, nin_shortcut -> skip)
    down.i.attn.j                      down.i.attn.j  (q, k, v -> one 1x1 conv qkv; proj_out -> proj)
    down.i.downsample.conv             down.i.down.conv
    mid.block_1 / attn_1 / block_2     middle.res1 / attn / res2
    up.i (i = 0: the full-size level)  up.(L-1-i)     (ours lists the levels in the order they run)
    up.i.upsample.conv                 up.(L-1-i).up.conv
    conv_in, norm_out, conv_out        the same names

The weights fix every network option except the image size and dropout. Files loaded by path get 32 x 32
(override with image_size=) and the paper's CIFAR-10 diffusion: linear betas 1e-4..0.02, T = 1000, sigma_t^2 =
beta_t ('fixedlarge'). The named releases (RELEASES) carry what pytorch_diffusion's from_pretrained uses:
256 x 256 and sigma_t^2 = beta-tilde_t ('fixedsmall') for LSUN.
"""

import hashlib
import os
import re
import sys
import urllib.request
from collections import namedtuple

import torch
import torch.nn as nn

from model.Blocks import UNet
from runtime import atomic_write, closest, file_digest


class DDIMFormatError(ValueError):
    """A file or model that the DDIM format cannot carry; the message says why and what to do."""


# ----- the released files ---------------------------------------------------------------------

# Locations, file names and md5 sums as pytorch_diffusion's ckpt_util.py (and ermongroup/ddim's) list them;
# image size, sampling variance and dropout as its Diffusion.from_pretrained uses them.
Release = namedtuple('Release', 'file md5 url image_size variance dropout')
_SHARE = 'https://heibox.uni-heidelberg.de/f/{}/?dl=1'
RELEASES = {
    'cifar10': Release('diffusion_cifar10_model/model-790000.ckpt', '82ed3067fd1002f5cf4c339fb80c4669',
                       _SHARE.format('869980b53bf5416c8a28'), 32, 'beta', 0.1),
    'ema_cifar10': Release('ema_diffusion_cifar10_model/model-790000.ckpt', '1fa350b952534ae442b1d5235cce5cd3',
                           _SHARE.format('2e4f01e2d9ee49bab1d5'), 32, 'beta', 0.1),
    'lsun_bedroom': Release('diffusion_lsun_bedroom_model/model-2388000.ckpt', 'f70280ac0e08b8e696f42cb8e948ff1c',
                            _SHARE.format('f179d4f21ebc4d43bbfe'), 256, 'posterior', 0.0),
    'ema_lsun_bedroom': Release('ema_diffusion_lsun_bedroom_model/model-2388000.ckpt',
                                '1921fa46b66a3665e450e42f36c2720f', _SHARE.format('b95206528f384185889b'),
                                256, 'posterior', 0.0),
    'lsun_cat': Release('diffusion_lsun_cat_model/model-1761000.ckpt', 'bbee0e7c3d7abfb6e2539eaf2fb9987b',
                        _SHARE.format('fac870bd988348eab88e'), 256, 'posterior', 0.0),
    'ema_lsun_cat': Release('ema_diffusion_lsun_cat_model/model-1761000.ckpt', '646f23f4821f2459b8bafc57fd824558',
                            _SHARE.format('0701aac3aa69457bbe34'), 256, 'posterior', 0.0),
    'lsun_church': Release('diffusion_lsun_church_model/model-4432000.ckpt', 'eb619b8a5ab95ef80f94ce8a5488dae3',
                           _SHARE.format('2711a6f712e34b06b9d8'), 256, 'posterior', 0.0),
    'ema_lsun_church': Release('ema_diffusion_lsun_church_model/model-4432000.ckpt',
                               'fdc68a23938c2397caba4a260bc2445f', _SHARE.format('44ccb50ef3c6436db52e'),
                               256, 'posterior', 0.0),
}
CACHE_ENV = 'DDPM_WEIGHTS_DIR'   # where releases are kept; default: pytorch_diffusion's own cache folder
PAPER_DIFFUSION = dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')


def cache_dir():
    """$DDPM_WEIGHTS_DIR, else $XDG_CACHE_HOME/diffusion_models_converted (pytorch_diffusion's, so its files count)."""
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.environ.get(CACHE_ENV) or os.path.join(cache, 'diffusion_models_converted')


def resolve(checkpoint):
    """A release name -> its file in the cache (downloaded once, md5 checked); any existing path unchanged.

    A bare word that is neither a file nor a release is refused here, naming the releases.
    """
    path = os.fspath(checkpoint)
    if os.path.exists(path):
        return path
    if path in RELEASES:
        return fetch_release(path)
    if os.sep not in path and '/' not in path and '.' not in path:
        raise DDIMFormatError(f'{path!r} is neither a file nor a known release{closest(path, RELEASES)}; '
                              f'releases: {", ".join(RELEASES)}')
    return path


def fetch_release(name, folder=None):
    """The path of release `name` under `folder` (default cache_dir()): downloaded if absent, md5 verified."""
    if name not in RELEASES:
        raise DDIMFormatError(f'unknown release {name!r}{closest(name, RELEASES)}; releases: {", ".join(RELEASES)}')
    release = RELEASES[name]
    path = os.path.join(folder or cache_dir(), *release.file.split('/'))
    if os.path.exists(path):
        got = file_md5(path)
        if got != release.md5:
            raise DDIMFormatError(f'{path} has md5 {got}, not {release.md5} of release {name} (a partial or '
                                  f'damaged copy?); delete it and run again to download it')
        return path
    print(f'downloading release {name} from {release.url} to {path}', file=sys.stderr)
    download(release.url, path, release.md5, name)
    return path


def file_md5(path):
    return file_digest(path, 'md5')


def download(url, path, md5, name):
    """Stream `url` to `path` through a temp file, kept only when its md5 is `md5`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.part{os.getpid()}'
    digest = hashlib.md5()
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as f:
                for block in iter(lambda: response.read(1 << 20), b''):
                    digest.update(block)
                    f.write(block)
        except (OSError, ValueError) as e:   # URLError, timeouts and refused connections are OSErrors
            reason = getattr(e, 'reason', None) or e
            raise DDIMFormatError(f'cannot download release {name} from {url} ({reason}); offline? download it '
                                  f'elsewhere and put it at {path} (md5 {md5})') from None
        if digest.hexdigest() != md5:
            raise DDIMFormatError(f'the download of release {name} has md5 {digest.hexdigest()}, not {md5} (cut '
                                  f'off, or changed at the source); nothing was kept; run again, or put a good '
                                  f'copy at {path}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def release_of(path):
    """The release whose file `path` is (by its place: <folder>/<release folder>/<file>), or None."""
    where = os.path.abspath(path).replace(os.sep, '/')
    return next((name for name, r in RELEASES.items() if where.endswith('/' + r.file)), None)


# ----- names ----------------------------------------------------------------------------------

# Our parameter names -> theirs, applied in order after the up levels are renumbered (ddim_names).
RENAMES = [
    (r'^time_embedding\.mlp\.0\.', 'temb.dense.0.'),
    (r'^time_embedding\.mlp\.2\.', 'temb.dense.1.'),
    (r'^middle\.res1\.', 'mid.block_1.'),
    (r'^middle\.res2\.', 'mid.block_2.'),
    (r'^middle\.attn\.', 'mid.attn_1.'),
    (r'^(down|up)\.(\d+)\.res\.', r'\1.\2.block.'),
    (r'^down\.(\d+)\.down\.', r'down.\1.downsample.'),
    (r'^up\.(\d+)\.up\.', r'up.\1.upsample.'),
    (r'\.time_proj\.', '.temb_proj.'),
    (r'\.skip\.', '.nin_shortcut.'),
    (r'(attn_1|attn\.\d+)\.proj\.', r'\1.proj_out.'),
]


def ddim_names(name, levels):
    """Our UNet parameter name -> the Model name(s) holding it (three, q k v, for an attention's fused qkv)."""
    name = re.sub(r'^up\.(\d+)\.', lambda m: f'up.{levels - 1 - int(m.group(1))}.', name)
    for pattern, replacement in RENAMES:
        name = re.sub(pattern, replacement, name)
    if '.qkv.' in name:
        return [name.replace('.qkv.', f'.{part}.') for part in ('q', 'k', 'v')]
    return [name]


def strip_module(state_dict):
    """Drop the 'module.' DataParallel puts in front of every name."""
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}


# ----- reading --------------------------------------------------------------------------------

def is_state_dict(obj):
    """A Model state_dict: a dict of tensors named like the Model class (its time embedding gives it away)."""
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                        for k, v in obj.items())
            and 'temb.dense.0.weight' in strip_module(obj))


def is_training_checkpoint(obj):
    """A DDIM-codebase ckpt.pth: [state_dict, optimizer state, epoch, step(, EMA shadow)]."""
    return isinstance(obj, (list, tuple)) and len(obj) in (4, 5) and is_state_dict(obj[0])


def recognises(obj):
    return is_state_dict(obj) or is_training_checkpoint(obj)


def to_checkpoint(obj, path):
    """A loaded flat state_dict or ckpt.pth list -> one of our checkpoint dicts (weights, config, ...).

    A ckpt.pth without an EMA shadow gets `no_ema_note`, the line to say when EMA weights were asked for.
    """
    release = RELEASES.get(release_of(path))
    if is_training_checkpoint(obj):
        raw, shadow, epoch, step = obj[0], (obj[4] if len(obj) == 5 else None), obj[2], obj[3]
        if shadow is not None and not is_state_dict(shadow):
            raise DDIMFormatError(f'{path}: the fifth entry of this ckpt.pth is not an EMA shadow of the Model')
    else:
        raw, shadow, epoch, step = obj, None, None, None
    raw = strip_module(raw)
    unet = unet_options(raw, path, release.image_size if release else 32,
                        release.dropout if release else 0.1)
    with torch.device('meta'):   # only the names and shapes are needed here
        network = UNet(**unet)
    check_group_norms(network, path)
    ckpt = {'model_state_dict': from_ddim_state_dict(raw, network, path),
            'ema_state_dict': from_ddim_state_dict(strip_module(shadow), network, path) if shadow is not None else None,
            'config': {'arch': 'ddpm-paper', **unet, **PAPER_DIFFUSION,
                       'variance': release.variance if release else 'beta'},
            'epoch': epoch, 'step': step, 'source': os.path.abspath(path)}
    if is_training_checkpoint(obj) and shadow is None:
        ckpt['no_ema_note'] = f'{path} holds no EMA shadow (its run had ema: False); using its raw weights'
    return ckpt


def unet_options(sd, source, image_size, dropout):
    """Our UNet keyword arguments, read off the Model weights; DDIMFormatError for what ours cannot compute."""
    if 'logvar' in sd:
        raise DDIMFormatError(f"{source}: a learned per-step variance (logvar, model type 'bayesian') is not "
                              f"supported; our DDPM uses fixed variances")
    if any('.conv_shortcut.' in k for k in sd):
        raise DDIMFormatError(f'{source}: 3x3 shortcut convolutions (conv_shortcut) are not supported; our U-Net '
                              f'matches channels with 1x1 convolutions (nin_shortcut)')
    try:
        levels = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('down.'))
        num_res_blocks = 1 + max(int(k.split('.')[3]) for k in sd if k.startswith('down.0.block.'))
        channels = tuple(sd[f'down.{i}.block.0.conv1.weight'].shape[0] for i in range(levels))
        in_channels, ch = sd['conv_in.weight'].shape[1], sd['conv_in.weight'].shape[0]
        out_channels, time_emb_dim = sd['conv_out.weight'].shape[0], sd['temb.dense.0.weight'].shape[0]
    except (KeyError, ValueError, IndexError) as e:
        raise DDIMFormatError(f'{source}: an unknown layout, not the Model class of DDIM / pytorch_diffusion '
                              f'({type(e).__name__}: {e})') from None
    if levels > 1 and 'down.0.downsample.conv.weight' not in sd:
        raise DDIMFormatError(f'{source}: resamp_with_conv: False (average-pool downsampling, no upsampling conv) '
                              f'is not supported; our U-Net resamples with convolutions')
    if out_channels != in_channels:
        raise DDIMFormatError(f'{source}: out_ch={out_channels} with in_channels={in_channels} is not supported; '
                              f'our DDPM network predicts eps shaped like x_t')
    if sd['temb.dense.0.weight'].shape[1] != ch:
        raise DDIMFormatError(f'{source}: an unknown layout: the time embedding is not ch={ch} wide')
    attention = [f'down.{i}.attn.0.q.weight' in sd for i in range(levels)]
    return dict(in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks, time_emb_dim=time_emb_dim,
                attn_resolutions=tuple(image_size // 2 ** i for i, a in enumerate(attention) if a), num_heads=1,
                dropout=dropout, image_size=image_size, downsample_padding='same')


def check_group_norms(network, source):
    """The Model normalises with 32 groups everywhere; ours does only where channels are multiples of 32 (>= 64)."""
    groups = {m.num_groups for m in network.modules() if isinstance(m, nn.GroupNorm)}
    if groups != {32}:
        raise DDIMFormatError(f'{source}: the Model uses GroupNorm with 32 groups, but channels '
                              f'{list(network.config["channels"])} give our U-Net {sorted(groups)} groups (every '
                              f'level needs a multiple of 32, at least 64)')


def from_ddim_state_dict(theirs, network, source):
    """Model weights -> our `network.*` state_dict, shaped like `network` (a meta-device UNet will do)."""
    levels, ours, used = len(network.config['channels']), {}, set()
    for name, param in network.state_dict().items():
        names = ddim_names(name, levels)
        missing = [n for n in names if n not in theirs]
        if missing:
            raise DDIMFormatError(f'{source}: an unknown layout: weight {missing[0]} is missing '
                                  f'({len(theirs)} tensors in the file)')
        value = torch.cat([theirs[n] for n in names])
        if value.shape != param.shape:
            raise DDIMFormatError(f'{source}: an unknown layout: {names[0]} has shape '
                                  f'{tuple(theirs[names[0]].shape)}, expected {len(names)} x {tuple(param.shape)}')
        ours[f'network.{name}'] = value
        used.update(names)
    unexpected = sorted(set(theirs) - used)
    if unexpected:
        raise DDIMFormatError(f'{source}: an unknown layout: {len(unexpected)} weights the Model class does not '
                              f'have (e.g. {unexpected[0]})')
    return ours


# ----- writing --------------------------------------------------------------------------------

def check_exportable(model, what='this model'):
    """DDIMFormatError naming the first thing the Model class (or the DDIM codebase's config) cannot express."""
    network = getattr(model, 'network', None)
    if not isinstance(network, UNet):
        raise DDIMFormatError(f'only a DDPM around our UNet converts to the DDIM format, not {type(model).__name__}')
    o = network.config
    channels = list(o['channels'])
    problems = [
        (o.get('num_classes') is not None, f"it is class-conditional (num_classes={o.get('num_classes')})"),
        (model.learn_sigma or o['out_channels'] != o['in_channels'], 'it learns sigma (learn_sigma=True)'),
        (getattr(model, 'prediction', 'eps') != 'eps', f"it predicts {getattr(model, 'prediction', 'eps')}, not eps"),
        (o['num_heads'] != 1, f"its attention has num_heads={o['num_heads']}; the Model has one head"),
        (o['time_emb_dim'] != 4 * channels[0], f"time_emb_dim={o['time_emb_dim']}; the Model has 4 * ch"),
        (any(c % channels[0] for c in channels), f'channels {channels} are not whole multiples (ch_mult) of ch'),
        (o['downsample_padding'] != 'same', "downsample_padding='symmetric'; the Model pads bottom/right ('same')"),
        (model.beta_schedule != 'linear', f"beta_schedule={model.beta_schedule!r}; the DDIM codebase has linear"),
    ]
    for bad, why in problems:
        if bad:
            raise DDIMFormatError(f'{what} cannot be written in the DDIM format: {why}; nothing was written')
    check_group_norms(network, what)


def to_ddim_state_dict(network):
    """Our UNet's weights under the Model's names (the fused qkv split into q, k, v)."""
    levels, out = len(network.config['channels']), {}
    for name, value in network.state_dict().items():
        names = ddim_names(name, levels)
        for their_name, part in zip(names, value.chunk(len(names))):
            out[their_name] = part.detach().float().clone()   # a clone, so torch.save writes only this part
    return out


def ddim_config(model):
    """The DDIM codebase's config values that rebuild `model` (they are not stored in the weights file)."""
    o, channels = model.network.config, list(model.network.config['channels'])
    return {'model.ch': channels[0], 'model.ch_mult': [c // channels[0] for c in channels],
            'model.num_res_blocks': o['num_res_blocks'], 'model.attn_resolutions': list(o['attn_resolutions']),
            'model.dropout': o['dropout'], 'model.resamp_with_conv': True, 'model.var_type':
            {'beta': 'fixedlarge', 'posterior': 'fixedsmall'}[model.variance], 'data.image_size': o['image_size'],
            'diffusion.beta_schedule': 'linear', 'diffusion.beta_start': float(f'{model.betas[0].item():.7g}'),
            'diffusion.beta_end': float(f'{model.betas[-1].item():.7g}'),
            'diffusion.num_diffusion_timesteps': model.timesteps}


def save_ddim(model, path):
    """Write `model`'s network as a flat Model state_dict (what ermongroup/ddim loads with strict=True)."""
    check_exportable(model, what=f'{type(model).__name__}')
    tensors = to_ddim_state_dict(model.network)
    atomic_write(path, lambda f: torch.save(tensors, f))
    return path
