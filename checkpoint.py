"""Checkpoints: safe loading, crash-safe saving, state-dict cleaning, and rebuilding a model from one.

A checkpoint is one dict `torch.save`d by train.py (model_state_dict, ema_state_dict,
optimizer_state_dict, epoch, step, config, ...) and is always loaded with
weights_only=True, so a file cannot run code. `DDPM.from_checkpoint(path)` is the
public way in; `model_from_checkpoint` does the work on a dict already loaded.
"""

import os
import re
import sys

import torch

from diffusion import DDPM_OPTIONS, LEGACY_DEFAULTS, UNET_OPTIONS, create_cifar10_ddpm, model_kwargs
from runtime import atomic_write, closest, use_channels_last
import weights.ddim_format as ddim_format


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why and what to do."""


def load_checkpoint(path, map_location='cpu'):
    """torch.load a checkpoint safely (weights_only=True) with one-line errors for bad files.

    A raw state_dict (a dict of tensors) is accepted and returned as
    {'model_state_dict': state_dict}; a diffusers folder is converted to the
    same dict, config included (diffusers_io.load_diffusers); so are the DDIM /
    pytorch_diffusion format (a Model state_dict or a DDIM ckpt.pth) and a release
    name such as 'ema_cifar10' (downloaded once; weights/ddim_format.py).
    """
    path = resolve_checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path} (check the path, or train one with python train.py)')
    if os.path.isdir(path):  # a diffusers UNet2DModel or DDPMPipeline folder
        from diffusers_io import load_diffusers
        return load_diffusers(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes); it was probably cut off while writing; '
                              f'use an earlier checkpoint')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise CheckpointError(f'cannot load checkpoint {path}: {_load_failure_reason(e)}') from None
    if ddim_format.recognises(ckpt):
        try:
            return ddim_format.to_checkpoint(ckpt, path)
        except ddim_format.DDIMFormatError as e:
            raise CheckpointError(str(e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)')
    if 'model_state_dict' not in ckpt:
        if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            return {'model_state_dict': ckpt}
        raise CheckpointError(f'{path} is not a DDPM checkpoint: it has no model_state_dict '
                              f'(keys: {sorted(ckpt)[:8]})')
    return ckpt


def resolve_checkpoint(path):
    """A release name of the DDIM format ('ema_cifar10', ...) -> its downloaded file; other paths unchanged."""
    try:
        return ddim_format.resolve(path)
    except ddim_format.DDIMFormatError as e:
        raise CheckpointError(str(e)) from None


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



def model_from_checkpoint(ckpt, ema=True, device='cpu', source='checkpoint', **model_options):
    """DDPM.from_checkpoint for a checkpoint dict already in memory (from load_checkpoint)."""
    valid = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS
    for key in model_options:
        if key not in valid:
            raise ValueError(f'unknown model option {key!r}{closest(key, valid)}; valid: {list(valid)}')
    stored = ckpt.get('config') or {}
    options = {**LEGACY_DEFAULTS, **stored, **model_options, **_keep_attention_levels(stored, model_options)}
    model = create_cifar10_ddpm(**model_kwargs(options))
    key = 'ema_state_dict' if ema and ckpt.get('ema_state_dict') is not None else 'model_state_dict'
    if ema:
        _say_when_ema_is_missing(ckpt)
    advice = None
    if not stored and not model_options:
        advice = ("it carries no config (a bare state_dict), so it was matched against the default "
                  "'base' model; pass the options it was trained with, e.g. "
                  "DDPM.from_checkpoint(path, arch='tiny') or DDPM.from_checkpoint(path, channels=(32, 64), "
                  "image_size=16)")
    load_model_state(model, ckpt[key], source=source, advice=advice)
    return model.to(device)


def _keep_attention_levels(stored, model_options):
    """With only image_size overridden, attention stays at the levels the weights have it (not at its pixels)."""
    old, new = stored.get('image_size'), model_options.get('image_size')
    if not (old and new) or 'attn_resolutions' in model_options or stored.get('attn_resolutions') is None:
        return {}
    return {'attn_resolutions': tuple(new * r // old for r in stored['attn_resolutions'])}


def _say_when_ema_is_missing(ckpt):
    """One line when EMA weights are wanted and a DDIM ckpt.pth has none (its loader wrote the line)."""
    if ckpt.get('ema_state_dict') is None and ckpt.get('no_ema_note'):
        print(ckpt['no_ema_note'], file=sys.stderr)


def load_model(checkpoint, ema=None, device='cpu', image_size=None):
    """Rebuild the model from a checkpoint's own config.

    ema: None uses the EMA weights when the checkpoint has them; True requires
    them; False uses the raw (training) weights.
    image_size: for weights that do not fix it (the DDIM format; default 32).
    Returns (model in eval mode, info dict for run metadata).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    ckpt = load_checkpoint(checkpoint, map_location='cpu')
    has_ema = ckpt.get('ema_state_dict') is not None
    if ema and not has_ema:
        raise CheckpointError(f'{checkpoint} has no EMA weights (ema_state_dict is empty); '
                              f'drop --ema, or pass --no-ema to sample with the raw weights')
    use_ema = has_ema if ema is None else bool(ema)
    if ema is None:
        _say_when_ema_is_missing(ckpt)
    info = {'checkpoint': os.path.abspath(checkpoint), 'ema': use_ema, 'step': ckpt.get('step'),
            'epoch': ckpt.get('epoch'), 'class_names': (ckpt.get('config') or {}).get('class_names')}
    options = {'image_size': image_size} if image_size else {}
    model = model_from_checkpoint(ckpt, ema=use_ema, device=device, source=checkpoint, **options).eval()
    if use_channels_last(None, torch.device(device), None):
        model.to(memory_format=torch.channels_last)   # faster convolutions (bench/)
    return model, info
