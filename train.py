"""Train a DDPM on CIFAR-10 (or any image folder): `python train.py`, or `train_ddpm(...)` from Python.

Every default lives once, in the signature of `train_ddpm`; the command line is
generated from it, so `python train.py --num_epochs 1 --device cpu` and
`train_ddpm(num_epochs=1, device='cpu')` are the same run. This file holds the
options, their checks, resuming and the CLI; the loop itself is training.loop.TrainLoop.

Under `torchrun --nproc_per_node=N train.py ...` the same code trains with
DistributedDataParallel; batch_size is then the global batch, split across ranks.
"""

import argparse
import datetime
import difflib
import functools
import inspect
import math
import os
import sys

import torch
import torch.distributed as torch_dist

from diffusion import BETA_SCHEDULES, LOSSES, PREDICTIONS, VARIANCES, check_model_options
from model.presets import DDPM_OPTIONS, LEGACY_DEFAULTS, UNET_OPTIONS
from runtime import AMP_CHOICES, DEFAULT_AMP, Distributed, OneLineErrorParser, closest, plain
from sampling.samplers import DEFAULT_DPM_SOLVER_STEPS, SAMPLERS
from training.loop import TrainLoop
from weights.checkpoint import CheckpointError, load_checkpoint


def checked_options(fn):
    """Make fn(**kwargs) reject unknown keys with a ValueError that lists the valid ones."""
    valid = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(**kwargs):
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise ValueError(f'unknown option {unknown[0]!r}{closest(unknown[0], valid)}; valid options: {valid}')
        return fn(**kwargs)
    return wrapper


@checked_options
def train_ddpm(
    num_epochs: int = 100,            # passes over the training set
    batch_size: int = 128,            # global batch: split across DDP ranks and accum_steps micro-batches
    lr: float = 2e-4,                 # Adam learning rate after warmup (the paper's CIFAR-10 value)
    device: str = None,               # None: CUDA, then MPS, then CPU
    dataset: str = 'cifar10',         # 'cifar10' | 'folder' | 'synthetic'
    data_dir: str = 'data',           # CIFAR-10 download folder, or the image folder for dataset='folder'
    checkpoint_dir: str = 'checkpoints',  # ddpm_epoch_{N}.pth and ddpm_latest.pth go here
    log_dir: str = 'runs',            # TensorBoard runs: log_dir/<run_name>
    run_name: str = None,             # None: a timestamp (or the resumed run's name)
    save_every: int = 10,             # epochs between numbered checkpoints
    sample_every: int = 20,           # epochs between sample grids (also written at the end)
    num_samples: int = 64,            # images in each sample grid
    sample_sampler: str = 'dpm-solver',  # sampler for the grids: 'dpm-solver', 'ddim' or 'ddpm' (the paper's T)
    sample_steps: int = DEFAULT_DPM_SOLVER_STEPS,  # network evaluations of a ddim / dpm-solver grid (FID: README)
    fid_every: int = 0,               # epochs between FID evaluations of the EMA model (0: off); see README
    fid_samples: int = 10000,         # samples per FID evaluation, scored against the training images
    fid_sampler: str = 'ddim',        # sampler for the FID samples: 'ddim', 'dpm-solver' or 'ddpm' (all T steps)
    fid_steps: int = 50,              # network evaluations of a ddim / dpm-solver FID sample
    fid_weights: str = None,          # Inception weights (torch-fidelity's or NVIDIA's TorchScript port); None: torch.hub's
    ema_decay: float = 0.9999,        # EMA of the weights (the paper's value); used for grids and sampling
    warmup_steps: int = 5000,         # linear learning-rate warmup (the paper's value)
    grad_clip: float = 1.0,           # max gradient norm (the paper's value); 0 disables clipping
    seed: int = 0,                    # seeds the weights, data order, t and eps of every step
    resume: str = None,               # a checkpoint path, or 'latest' (starts fresh when there is none)
    max_steps: int = None,            # stop after this many optimizer steps (saves ddpm_latest.pth)
    accum_steps: int = 1,             # gradient accumulation: micro-batches per optimizer step
    amp: str = DEFAULT_AMP,           # 'auto' (bf16 where native, fp16 + GradScaler on older GPUs, else fp32) | 'bf16' | 'fp16' | 'fp32'
    channels_last: bool = None,       # NHWC layout; None: on, except CPU bf16 where NCHW measured faster
    compile: bool = False,            # torch.compile the training step (checkpoints stay loadable without it)
    log_every: int = 10,              # steps between TensorBoard scalar writes
    arch: str = 'base',               # 'base' (15.6M params) | 'ddpm-paper' (the paper's 35.7M) | 'tiny' (CPU demos)
    channels: tuple = None,           # U-Net channels per level; None: the arch's
    num_res_blocks: int = None,       # ResNet blocks per level; None: the arch's
    time_emb_dim: int = None,         # time-embedding width; None: the arch's
    attn_resolutions: tuple = None,   # resolutions with self-attention; None: the arch's
    num_heads: int = None,            # attention heads; None: the arch's
    dropout: float = None,            # dropout in ResNet blocks; None: the arch's (0.1)
    image_size: int = 32,             # training resolution (images are resized for dataset='folder')
    downsample_padding: str = 'same', # 'same': TF padding, bottom/right (the paper's) | 'symmetric': older checkpoints
    timesteps: int = 1000,            # T
    beta_start: float = 1e-4,         # beta_1 of the linear schedule
    beta_end: float = 0.02,           # beta_T of the linear schedule
    variance: str = 'beta',           # 'beta' (paper) | 'posterior' (beta-tilde) | 'learned' (log sigma^2) | 'learned_range'
    beta_schedule: str = 'linear',    # 'linear' (the paper's) | 'cosine' (Improved DDPM; ignores beta_start/end)
    learn_sigma: bool = False,        # the U-Net also outputs the reverse variance (Improved DDPM); needs a loss below
    loss: str = 'simple',             # 'simple' (the paper's L_simple) | 'hybrid' (+ 0.001 L_vlb) | 'vlb'
    prediction: str = 'eps',          # what the U-Net predicts: 'eps' (the paper's) | 'x0' | 'mu' (mu-tilde) | 'v'
    min_snr_gamma: float = None,      # Min-SNR-gamma weighting of the MSE (Hang et al. 2023; they use 5); None: off
    importance_sampling: bool = False,  # loss='vlb' only: draw t with p_t ~ sqrt(E[L_t^2]) (Improved DDPM 3.3)
    class_cond: bool = False,         # class-conditional model for classifier-free guidance, labels from the dataset
    p_uncond: float = 0.1,            # with class_cond: probability that a label is dropped to the null class
):
    """Train a DDPM; returns its EMA model, the one every sample path uses (`model.sample(...)`).

    The raw (trained) weights are the checkpoint's model_state_dict:
    `DDPM.from_checkpoint('checkpoints/ddpm_latest.pth', ema=False)`. The returned
    model's `train_stats` says how the run ended (steps, skipped steps, stop reason).
    """
    config = {k: v for k, v in locals().items()}
    validate_config(config)
    dist = Distributed(device)
    try:
        return _train(config, dist)
    finally:
        dist.close()


OPTIONS = list(inspect.signature(train_ddpm).parameters)
DEFAULTS = {k: p.default for k, p in inspect.signature(train_ddpm).parameters.items()}
MODEL_KEYS = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS + ('class_cond',)
# Training options added after checkpoints had been written, with the value those checkpoints were trained with.
TRAIN_LEGACY_DEFAULTS = {'class_cond': False}


# ----- configuration ------------------------------------------------------------------------

def validate_config(c):
    """One clear ValueError for each impossible setting, before any work is done."""
    for key in ('num_epochs', 'batch_size', 'save_every', 'sample_every', 'accum_steps', 'log_every', 'image_size',
                'timesteps', 'sample_steps'):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f'{key} must be a positive integer, got {c[key]!r}')
    if not (c['lr'] > 0 and math.isfinite(c['lr'])):  # lr=inf would turn the first update into NaN weights
        raise ValueError(f'lr must be positive and finite, got {c["lr"]!r}')
    if c['sample_sampler'] != 'ddpm' and c['sample_steps'] > c['timesteps']:  # else it fails at the first grid
        raise ValueError(f'sample_steps={c["sample_steps"]} must not exceed timesteps={c["timesteps"]}')
    if c['max_steps'] is not None and c['max_steps'] < 1:
        raise ValueError(f'max_steps must be a positive integer or None, got {c["max_steps"]!r}')
    if not 0 <= c['p_uncond'] <= 1:
        raise ValueError(f'p_uncond must be in [0, 1], got {c["p_uncond"]!r}')
    if not 0 <= c['ema_decay'] < 1:
        raise ValueError(f'ema_decay must be in [0, 1), got {c["ema_decay"]!r}')
    if c['warmup_steps'] < 0 or c['grad_clip'] < 0 or c['num_samples'] < 0:
        raise ValueError('warmup_steps, grad_clip and num_samples must not be negative')
    if not isinstance(c['fid_every'], int) or c['fid_every'] < 0:
        raise ValueError(f'fid_every must be 0 (off) or a positive number of epochs, got {c["fid_every"]!r}')
    if c['fid_every'] and not (isinstance(c['fid_samples'], int) and c['fid_samples'] >= 2):
        raise ValueError(f'fid_samples must be an integer of at least 2, got {c["fid_samples"]!r}')
    if c['fid_every'] and c['fid_sampler'] != 'ddpm' and not 1 <= c['fid_steps'] <= c['timesteps']:
        raise ValueError(f'fid_steps must be between 1 and timesteps={c["timesteps"]}, got {c["fid_steps"]!r}')
    choices = {'dataset': ('cifar10', 'folder', 'synthetic'), 'amp': AMP_CHOICES,
               'sample_sampler': SAMPLERS, 'fid_sampler': SAMPLERS, 'variance': VARIANCES,
               'beta_schedule': BETA_SCHEDULES, 'loss': LOSSES, 'prediction': PREDICTIONS}
    for key, valid in choices.items():
        if c[key] not in valid:
            raise ValueError(f'{key} must be one of {valid}, got {c[key]!r}')
    check_model_options(c['timesteps'], c['beta_start'], c['beta_end'], c['variance'], c['beta_schedule'],
                  c['learn_sigma'], c['loss'], c['prediction'], c['min_snr_gamma'])
    if c['importance_sampling'] and c['loss'] != 'vlb':
        raise ValueError(f"importance_sampling=True needs loss='vlb' (it samples t for the bound), got "
                         f"loss={c['loss']!r}")


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
    """Take the model options of a resumed run from its checkpoint unless they were set differently now."""
    merged = dict(config)
    differ = []
    for key in MODEL_KEYS + ('seed', 'run_name', 'p_uncond'):
        if key not in ckpt_config or key not in config:   # (num_classes is set from the data, not asked for)
            continue
        old, new = plain(ckpt_config[key]), plain(config[key])
        if new == plain(DEFAULTS.get(key)):
            merged[key] = tuple(old) if isinstance(old, list) else old
        elif old != new and key in MODEL_KEYS:
            differ.append(f'{key}: checkpoint {old!r}, requested {new!r}')
    if differ:
        raise CheckpointError('the resume checkpoint was trained with a different model config ('
                              + '; '.join(differ) + '); drop those options to continue it, or start a new run')
    if merged.get('class_cond') and ckpt_config.get('class_names') is not None:
        merged['class_names'] = ckpt_config['class_names']   # the data's classes must match them (TrainLoop)
    for key in ('batch_size', 'dataset', 'image_size'):
        if key in ckpt_config and plain(ckpt_config[key]) != plain(merged[key]):
            say(f'note: {key} changed from {ckpt_config[key]!r} to {merged[key]!r}; the data order will differ '
                f'from the original run')
    return merged


def _train(config, dist):
    """Resolve the resume checkpoint and the run name, then run the TrainLoop."""
    say = (lambda msg: print(msg)) if dist.is_main else (lambda msg: None)
    # Resume: find the checkpoint and take its model config before building anything.
    resume_path = find_resume_checkpoint(config['resume'], config['checkpoint_dir'], say)
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
    if config['run_name'] is None:
        config['run_name'] = datetime.datetime.now().strftime('ddpm_%Y%m%d-%H%M%S')
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
    """An argparse parser generated from train_ddpm's signature and trailing comments."""
    source = inspect.getsource(inspect.unwrap(train_ddpm))
    comments = {}
    for line in source.splitlines():
        name = line.strip().split(':', 1)[0]
        if name in DEFAULTS and '#' in line:
            comments[name] = line.split('#', 1)[1].strip()
    # allow_abbrev=False: like train_ddpm's keywords, a flag is spelled out (--num_ep is an error, not --num_epochs).
    parser = OneLineErrorParser(description='Train a DDPM (Ho et al. 2020) on CIFAR-10 or an image folder.',
                                     allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sig = inspect.signature(train_ddpm)
    for name, p in sig.parameters.items():
        kind, default, help_text = p.annotation, p.default, comments.get(name, '')
        if kind is bool:
            parser.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind is tuple:
            # --attn_resolutions with no value means no attention; other tuples need at least one value.
            nargs = '*' if name == 'attn_resolutions' else '+'
            parser.add_argument(f'--{name}', nargs=nargs, type=int, default=default, help=help_text)
        else:
            parser.add_argument(f'--{name}', type=kind, default=default, help=help_text)
    parser.add_argument('--debug', action='store_true', help='show full tracebacks on errors')
    return parser


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith('--')]
        name = (flags[0] if flags else unknown[0]).split('=', 1)[0]
        match = difflib.get_close_matches(name.lstrip('-'), OPTIONS, n=1)
        hint = f' (did you mean --{match[0]}?)' if match else ''
        parser.exit(2, f'error: unknown option {name}{hint}; valid options: '
                       f'{", ".join("--" + o for o in OPTIONS)}\n')
    kwargs = vars(args)
    debug = kwargs.pop('debug')
    for key in ('channels', 'attn_resolutions'):
        if kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    try:
        train_ddpm(**kwargs)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as e:
        if debug:
            raise
        parser.exit(2, f'error: {e}\n')
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
