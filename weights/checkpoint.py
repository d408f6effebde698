"""Checkpoints: safe loading, crash-safe saving, state-dict cleaning, and the parts a model is rebuilt from.

A checkpoint is one dict `torch.save`d by train.py (model_state_dict, ema_state_dict,
optimizer_state_dict, epoch, step, config, ...) and is always loaded with
weights_only=True, so a file cannot run code. `DDPM.from_checkpoint(path)` is the
public way in (diffusion.py builds the model from `checkpoint_parts`); nothing here
imports the DDPM, so the readers sit below diffusion.py in the import graph.
"""

import os
import sys

import torch

import weights.ddim_format as ddim_format
from model.presets import LEGACY_DEFAULTS, MODEL_OPTIONS, model_kwargs
from runtime import atomic_write, closest
from weights.diffusers_format import load_diffusers
from weights.torch_file import CheckpointError, read_torch_file


def load_checkpoint(path, map_location='cpu'):
    """torch.load a checkpoint safely (weights_only=True) with one-line errors for bad files.

    A raw state_dict (a dict of tensors) is accepted and returned as
    {'model_state_dict': state_dict}; a diffusers folder is converted to the
    same dict, config included (weights.diffusers_format.load_diffusers); so are the DDIM /
    pytorch_diffusion format (a Model state_dict or a DDIM ckpt.pth) and a release
    name such as 'ema_cifar10' (downloaded once; weights/ddim_format.py).
    """
    path = resolve_checkpoint(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint not found: {path} (check the path, or train one with python train.py)')
    if os.path.isdir(path):  # a diffusers UNet2DModel or DDPMPipeline folder
        return load_diffusers(path)
    ckpt = read_torch_file(path, map_location, accept=ddim_format.is_training_checkpoint)
    if ddim_format.recognises(ckpt):
        try:
            return ddim_format.to_checkpoint(ckpt, path)
        except ddim_format.DDIMFormatError as e:
            raise CheckpointError(str(e)) from None
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


def checkpoint_parts(ckpt, ema=True, **model_options):
    """A checkpoint dict -> (the keywords of create_cifar10_ddpm, the state_dict to load, advice for a mismatch).

    Keywords override the stored config; a config without a LEGACY_DEFAULTS key gets the old value.
    The EMA weights are taken when asked for and present. Plain dicts only: the caller builds the model.
    """
    for key in model_options:
        if key not in MODEL_OPTIONS:
            raise ValueError(f'unknown model option {key!r}{closest(key, MODEL_OPTIONS)}; '
                             f'valid: {list(MODEL_OPTIONS)}')
    stored = ckpt.get('config') or {}
    options = {**LEGACY_DEFAULTS, **stored, **model_options, **_keep_attention_levels(stored, model_options)}
    config = model_kwargs(options)
    key = 'ema_state_dict' if ema and ckpt.get('ema_state_dict') is not None else 'model_state_dict'
    if ema:
        say_when_ema_is_missing(ckpt)
    advice = None
    if not stored and not model_options:
        advice = ("it carries no config (a bare state_dict), so it was matched against the default "
                  "'base' model; pass the options it was trained with, e.g. "
                  "DDPM.from_checkpoint(path, arch='tiny') or DDPM.from_checkpoint(path, channels=(32, 64), "
                  "image_size=16)")
    return config, ckpt[key], advice


def _keep_attention_levels(stored, model_options):
    """With only image_size overridden, attention stays at the levels the weights have it (not at its pixels)."""
    old, new = stored.get('image_size'), model_options.get('image_size')
    if not (old and new) or 'attn_resolutions' in model_options or stored.get('attn_resolutions') is None:
        return {}
    return {'attn_resolutions': tuple(new * r // old for r in stored['attn_resolutions'])}


def say_when_ema_is_missing(ckpt):
    """One line when EMA weights are wanted and a DDIM ckpt.pth has none (its loader wrote the line)."""
    if ckpt.get('ema_state_dict') is None and ckpt.get('no_ema_note'):
        print(ckpt['no_ema_note'], file=sys.stderr)
