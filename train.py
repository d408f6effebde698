"""Train a DDPM on CIFAR-10 (or any image folder): `python train.py`, or `train_ddpm(...)` from Python.

Every option is a field of training/config.py's TrainConfig, with its default and one
line of help; `python train.py --help` lists them all, and the command line is generated
from those fields, so `python train.py --num_epochs 1 --device cpu` and
`train_ddpm(num_epochs=1, device='cpu')` are the same run. This file holds resuming and
the CLI; the loop itself is training.loop.TrainLoop.

Under `torchrun --nproc_per_node=N train.py ...` the same code trains with
DistributedDataParallel; batch_size is then the global batch, split across ranks.
"""

import argparse
import dataclasses
import datetime
import inspect
import os
import sys
import tempfile

import torch
import torch.distributed as torch_dist

from model.presets import DDPM_OPTIONS, LEGACY_DEFAULTS, UNET_OPTIONS
from runtime import Distributed, OneLineErrorParser, cli_text, plain
from training.config import DEFAULTS, FIELDS, OPTIONS, TrainConfig, suggestion
from training.loop import TrainLoop
from weights.checkpoint import CheckpointError, load_checkpoint


def train_ddpm(**kwargs):
    """Train a DDPM; returns its EMA model, the one every sample path uses (`model.sample(...)`).

    The keywords are TrainConfig's fields (training/config.py, one line of help each; also
    `python train.py --help`); an unknown one is a ValueError with the valid list.
    The raw (trained) weights are the checkpoint's model_state_dict:
    `DDPM.from_checkpoint('checkpoints/ddpm_latest.pth', ema=False)`. The returned
    model's `train_stats` says how the run ended (steps, skipped steps, stop reason).
    """
    config = TrainConfig.from_kwargs(kwargs)
    dist = Distributed(config.device)
    try:
        return _train(config, dist)
    finally:
        dist.close()


# help(train_ddpm) and editors show every keyword with its default, as when they were spelled out.
train_ddpm.__signature__ = inspect.Signature(
    [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
     for f in FIELDS])

MODEL_KEYS = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS + ('class_cond',)
# Training options added after checkpoints had been written, with the value those checkpoints were trained with.
TRAIN_LEGACY_DEFAULTS = {'class_cond': False}


# ----- resuming -----------------------------------------------------------------------------

def find_resume_checkpoint(resume, checkpoint_dir, say):
    """The checkpoint path to resume from, or None. 'latest' with no checkpoint starts fresh."""
    if resume is None:
        return None
    if resume == 'latest':
        path = os.path.join(checkpoint_dir, 'ddpm_latest.pth')
        if not os.path.exists(path):
            say(f'resume=latest: no checkpoint at {path}, starting a fresh run')
            return None
        return path
    if not os.path.exists(resume):
        raise FileNotFoundError(f'resume checkpoint not found: {resume} (pass an existing path, or --resume latest)')
    return resume


def merge_resumed_config(config, ckpt_config, say):
    """The config with a resumed run's model options (and seed, name, p_uncond) taken from its checkpoint,
    unless they were set differently now; a new TrainConfig, validated again."""
    changes, differ = {}, []
    for key in MODEL_KEYS + ('seed', 'run_name', 'p_uncond'):
        if key not in ckpt_config or key not in OPTIONS:   # (num_classes comes from the data, not an option)
            continue
        old, new = plain(ckpt_config[key]), plain(getattr(config, key))
        if new == plain(DEFAULTS[key]):
            changes[key] = tuple(old) if isinstance(old, list) else old
        elif old != new and key in MODEL_KEYS:
            differ.append(f'{key}: checkpoint {old!r}, requested {new!r}')
    if differ:
        raise CheckpointError('the resume checkpoint was trained with a different model config ('
                              + '; '.join(differ) + '); drop those options to continue it, or start a new run')
    merged = dataclasses.replace(config, **changes)
    for key in ('batch_size', 'dataset', 'image_size'):
        if key in ckpt_config and plain(ckpt_config[key]) != plain(getattr(merged, key)):
            say(f'note: {key} changed from {ckpt_config[key]!r} to {getattr(merged, key)!r}; the data order will '
                f'differ from the original run')
    return merged


def check_output_dirs(config):
    """Fail before anything is created when checkpoint_dir or log_dir cannot be made (TrainLoop makes them)."""
    for key in ('checkpoint_dir', 'log_dir'):
        path = os.path.abspath(getattr(config, key))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f'{key}={getattr(config, key)!r} is a file, not a folder; pass --{key} <folder>')
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        try:   # write access as the process really has it (os.access says yes to root everywhere, even /proc)
            os.rmdir(tempfile.mkdtemp(dir=parent))
        except OSError as e:
            raise ValueError(f'{key}={getattr(config, key)!r} cannot be created ({e.strerror} in {parent}); pass '
                             f'--{key} <a folder you can write to>') from None


def _train(config, dist):
    """Resolve the resume checkpoint and the run name, then run the TrainLoop."""
    say = (lambda msg: print(msg)) if dist.is_main else (lambda msg: None)
    if dist.is_main:
        check_output_dirs(config)
    # Resume: find the checkpoint and take its model config before building anything.
    resume_path = find_resume_checkpoint(config.resume, config.checkpoint_dir, say)
    ckpt = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location='cpu')
        if 'optimizer_state_dict' not in ckpt or 'step' not in ckpt:
            raise CheckpointError(f'{resume_path} holds weights only (no optimizer state or step), so training '
                                  f'cannot resume from it; load it with DDPM.from_checkpoint instead')
        config = merge_resumed_config(config, {**TRAIN_LEGACY_DEFAULTS, **LEGACY_DEFAULTS,
                                               **(ckpt.get('config') or {})}, say)
    if dist.world_size > 1:
        check_ranks_agree(int(ckpt['step']) if ckpt is not None else -1, dist.device)
    if config.run_name is None:
        config = dataclasses.replace(config, run_name=datetime.datetime.now().strftime('ddpm_%Y%m%d-%H%M%S'))
    return TrainLoop(config, dist, ckpt, resume_path).run()


def check_ranks_agree(resume_step, device):
    """Every rank reads the checkpoint itself; a checkpoint_dir that not every node sees would let
    ranks start from different steps and silently diverge."""
    highest = torch.tensor([resume_step], device=device)
    lowest = highest.clone()
    torch_dist.all_reduce(highest, op=torch_dist.ReduceOp.MAX)
    torch_dist.all_reduce(lowest, op=torch_dist.ReduceOp.MIN)
    if highest.item() != lowest.item():
        raise ValueError(f'ranks disagree on where to resume (steps {lowest.item()} to {highest.item()}, -1 = no '
                         f'checkpoint): put checkpoint_dir on a disk every node sees, or copy the checkpoint to '
                         f'each node and pass --resume <path>')


# ----- command line -------------------------------------------------------------------------

def build_parser():
    """An argparse parser generated from TrainConfig's fields and their help."""
    # allow_abbrev=False: like train_ddpm's keywords, a flag is spelled out (--num_ep is an error, not --num_epochs).
    parser = OneLineErrorParser(description='Train a DDPM (Ho et al. 2020) on CIFAR-10 or an image folder.',
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in FIELDS:
        flag, default, help_text = f'--{f.name}', f.default, f.metadata['help']
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.type is tuple:
            # --attn_resolutions with no value means no attention; other tuples need at least one value.
            nargs = '*' if f.name == 'attn_resolutions' else '+'
            parser.add_argument(flag, nargs=nargs, type=int, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=f.type, default=default, help=help_text)
    parser.add_argument('--debug', action='store_true', help='show full tracebacks on errors')
    return parser


def config_from_argv(argv):
    """The TrainConfig that a train.py command line describes, validated, without training."""
    kwargs = vars(build_parser().parse_args(argv))
    kwargs.pop('debug')
    return TrainConfig.from_kwargs(kwargs)


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith('-')]
        name = (flags[0] if flags else unknown[0]).split('=', 1)[0]
        match = suggestion(name)
        hint = f' (did you mean --{match}?)' if match else ''
        parser.exit(2, f'error: unknown option {name}{hint}; valid options: '
                       f'{", ".join("--" + o for o in OPTIONS)}\n')
    kwargs = vars(args)
    debug = kwargs.pop('debug')
    try:
        train_ddpm(**kwargs)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as e:
        if debug:
            raise
        parser.exit(2, f'error: {cli_text(e)}\n')
    except torch.OutOfMemoryError:
        if debug:
            raise
        parser.exit(2, f'error: out of GPU memory at batch_size={kwargs["batch_size"]}; lower --batch_size '
                       f'(or keep it and raise --accum_steps)\n')
    except OSError as e:  # e.g. a full disk while saving a checkpoint (the previous one is kept)
        if debug:
            raise
        parser.exit(2, f'error: {e}\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
