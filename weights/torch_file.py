"""The bottom of weights/: CheckpointError and torch.load with weights_only=True, with one-line errors.

Every reader of a torch file (our .pth checkpoints, a diffusers .bin) goes through `read_torch_file`,
so a file can never run code and a bad one is refused in words a user can act on.
"""

import os
import re

import torch


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint; the message says why and what to do."""


def read_torch_file(path, map_location='cpu', accept=None):
    """torch.load(path, weights_only=True) -> a dict; CheckpointError (one line) for an empty, unsafe or broken file.

    accept: a test for a non-dict object the caller reads itself (a DDIM ckpt.pth is a list).
    """
    if os.path.getsize(path) == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes); it was probably cut off while writing; '
                              f'use an earlier checkpoint')
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a usable checkpoint"
        raise CheckpointError(f'cannot load checkpoint {path}: {_load_failure_reason(e)}') from None
    if not isinstance(obj, dict) and not (accept and accept(obj)):
        raise CheckpointError(f'{path} is not a checkpoint (it holds a {type(obj).__name__}, not a dict)')
    return obj


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
