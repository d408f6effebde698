"""Train a DDPM on CIFAR-10 (or any image folder): `python train.py`, or `train_ddpm(...)` from Python.

Every default lives once, in the signature of `train_ddpm`; the command line is
generated from it, so `python train.py --num_epochs 1 --device cpu` and
`train_ddpm(num_epochs=1, device='cpu')` are the same run.

Under `torchrun --nproc_per_node=N train.py ...` the same code trains with
DistributedDataParallel; batch_size is then the global batch, split across ranks.

Reproducibility: the data order and flips come from (seed, epoch), the t and
eps of every step from (seed, step) over the global batch, and dropout from
(seed, step, rank). So resuming from a checkpoint continues exactly as if the
run had never stopped, and N ranks (or accum_steps micro-batches) see exactly
the batch one process would.
"""

import argparse
import copy
import datetime
import difflib
import functools
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import closing, nullcontext

import torch
import torch.distributed as dist

from data.process_cifar import InMemoryLoader, load_dataset
from diffusion import (DDPM_OPTIONS, UNET_OPTIONS, CheckpointError, amp_dtype, autocast, closest,
                       create_cifar10_ddpm, load_checkpoint, load_model_state, model_kwargs, resolve_device,
                       save_checkpoint, use_channels_last)

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
MAX_BAD_STEPS = 5  # consecutive non-finite steps before training stops


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
    sample_sampler: str = 'ddim',     # sampler for the grids: 'ddim' (fast) or 'ddpm' (the paper's 1000 steps)
    sample_steps: int = 100,          # DDIM steps for the grids
    ema_decay: float = 0.9999,        # EMA of the weights (the paper's value); used for grids and sampling
    warmup_steps: int = 5000,         # linear learning-rate warmup (the paper's value)
    grad_clip: float = 1.0,           # max gradient norm (the paper's value); 0 disables clipping
    seed: int = 0,                    # seeds the weights, data order, t and eps of every step
    resume: str = None,               # a checkpoint path, or 'latest' (starts fresh when there is none)
    max_steps: int = None,            # stop after this many optimizer steps (saves ddpm_latest.pth)
    accum_steps: int = 1,             # gradient accumulation: micro-batches per optimizer step
    amp: str = 'auto',                # 'auto' (bf16 on CUDA and on CPUs with native bf16, else fp32) | 'bf16' | 'fp32'
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
    timesteps: int = 1000,            # T
    beta_start: float = 1e-4,         # beta_1 of the linear schedule
    beta_end: float = 0.02,           # beta_T of the linear schedule
    variance: str = 'beta',           # sampler variance: 'beta' (the paper's) | 'posterior' (beta-tilde)
):
    """Train a DDPM and return it (the trained, unwrapped model; EMA weights are in the checkpoints)."""
    config = {k: v for k, v in locals().items()}
    validate_config(config)
    dist_info = setup_distributed(device)
    try:
        return _train(config, dist_info)
    finally:
        if dist_info['owns_group'] and dist.is_initialized():
            dist.destroy_process_group()


OPTIONS = list(inspect.signature(train_ddpm).parameters)
DEFAULTS = {k: p.default for k, p in inspect.signature(train_ddpm).parameters.items()}
MODEL_KEYS = ('arch',) + DDPM_OPTIONS + UNET_OPTIONS


# ----- configuration ------------------------------------------------------------------------

def validate_config(c):
    """One clear ValueError for each impossible setting, before any work is done."""
    for key in ('num_epochs', 'batch_size', 'save_every', 'sample_every', 'accum_steps', 'log_every', 'image_size',
                'timesteps', 'sample_steps'):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f'{key} must be a positive integer, got {c[key]!r}')
    if not (c['lr'] > 0 and math.isfinite(c['lr'])):  # lr=inf would turn the first update into NaN weights
        raise ValueError(f'lr must be positive and finite, got {c["lr"]!r}')
    if c['sample_sampler'] == 'ddim' and c['sample_steps'] > c['timesteps']:  # else it fails at the first grid
        raise ValueError(f'sample_steps={c["sample_steps"]} must not exceed timesteps={c["timesteps"]}')
    if c['max_steps'] is not None and c['max_steps'] < 1:
        raise ValueError(f'max_steps must be a positive integer or None, got {c["max_steps"]!r}')
    if not 0 <= c['ema_decay'] < 1:
        raise ValueError(f'ema_decay must be in [0, 1), got {c["ema_decay"]!r}')
    if c['warmup_steps'] < 0 or c['grad_clip'] < 0 or c['num_samples'] < 0:
        raise ValueError('warmup_steps, grad_clip and num_samples must not be negative')
    choices = {'dataset': ('cifar10', 'folder', 'synthetic'), 'amp': ('auto', 'bf16', 'fp32'),
               'sample_sampler': ('ddpm', 'ddim'), 'variance': ('beta', 'posterior')}
    for key, valid in choices.items():
        if c[key] not in valid:
            raise ValueError(f'{key} must be one of {valid}, got {c[key]!r}')


def setup_distributed(device):
    """Join the torchrun process group when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU.

    A process group the caller already started (a script of yours run by torchrun
    that calls train_ddpm) is used as it is and left running afterwards.
    """
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        return {'world_size': 1, 'rank': 0, 'local_rank': 0, 'device': resolve_device(device), 'owns_group': False}
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', 0))
    device = resolve_device(device)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    elif device.type == 'mps':
        raise ValueError('torchrun with device=mps is not supported (no distributed backend for MPS); '
                         'use --device cpu, or train in one process without torchrun')
    owns_group = not dist.is_initialized()
    if owns_group:
        # Rank 0 alone samples grids and writes checkpoints while the others wait at a
        # barrier: a generous timeout keeps that wait from being taken for a hang.
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(minutes=60))
    return {'world_size': world_size, 'rank': rank, 'local_rank': local_rank, 'device': device,
            'owns_group': owns_group}


def keep_freed_memory():
    """On glibc, keep freed memory in the process instead of unmapping it after every use.

    By default glibc returns every allocation over 32 MiB to the OS when freed,
    so a CPU training step page-faults its large activations in again on every
    use (measured: 20-80% of a step, see bench/). mallopt() changes that for the
    running process, like GLIBC_TUNABLES=glibc.malloc.mmap_max=0 set at start.
    """
    import ctypes
    import ctypes.util
    if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_DIR, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ('-dirty' if dirty else '') if out.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def environment_info():
    import torchvision
    # str(): torch.__version__ is a str subclass that weights_only loading refuses.
    return {'python': platform.python_version(), 'torch': str(torch.__version__),
            'torchvision': str(torchvision.__version__), 'git_commit': git_commit(), 'hostname': platform.node()}


def plain(value):
    """Config values as JSON / weights_only-safe plain types (tuples become lists, devices strings)."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, torch.device) else value


# ----- checkpoints --------------------------------------------------------------------------

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
    for key in MODEL_KEYS + ('seed', 'run_name'):
        if key not in ckpt_config:
            continue
        old, new = plain(ckpt_config[key]), plain(config[key])
        if new == plain(DEFAULTS.get(key)):
            merged[key] = tuple(old) if isinstance(old, list) else old
        elif old != new and key in MODEL_KEYS:
            differ.append(f'{key}: checkpoint {old!r}, requested {new!r}')
    if differ:
        raise CheckpointError('the resume checkpoint was trained with a different model config ('
                              + '; '.join(differ) + '); drop those options to continue it, or start a new run')
    for key in ('batch_size', 'dataset', 'image_size'):
        if key in ckpt_config and plain(ckpt_config[key]) != plain(merged[key]):
            say(f'note: {key} changed from {ckpt_config[key]!r} to {merged[key]!r}; the data order will differ '
                f'from the original run')
    return merged


def rng_states():
    states = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


# ----- the training step --------------------------------------------------------------------

def step_noise(generator, seed, step, global_batch, shape, timesteps):
    """t and eps for every image of the global batch at this step, drawn from (seed, step) alone.

    `generator` lives on the training device, so on a GPU the noise is drawn there
    (no host work or copy in the step); re-seeding it is cheap and needs no sync.
    """
    generator.manual_seed(seed * 1_000_003 + step)
    t = torch.randint(0, timesteps, (global_batch,), generator=generator, device=generator.device)
    eps = torch.randn((global_batch, *shape), generator=generator, device=generator.device)
    return t, eps


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in one fused op over all tensors."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def ema_decay_at(step, ema_decay):
    """The EMA decay after `step` updates: ramps up early so short runs' EMA is not stuck at the init.

    min(ema_decay, (1 + step) / (10 + step)) reaches 0.9999 after ~90k steps, so
    long runs match the paper's constant decay.
    """
    return min(ema_decay, (1.0 + step) / (10.0 + step))


class GracefulStop:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----- the loop -----------------------------------------------------------------------------

def _train(config, dist_info):
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    import torchvision

    world_size, rank, device = dist_info['world_size'], dist_info['rank'], dist_info['device']
    is_main = rank == 0

    def say(msg):
        if is_main:
            tqdm.write(msg)

    def barrier():
        if world_size > 1:
            dist.barrier(device_ids=[device.index] if device.type == 'cuda' else None)

    # Resume: find the checkpoint and take its model config before building anything.
    resume_path = find_resume_checkpoint(config['resume'], config['checkpoint_dir'], say)
    ckpt = None
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, map_location='cpu')
        if 'optimizer_state_dict' not in ckpt or 'step' not in ckpt:
            raise CheckpointError(f'{resume_path} holds weights only (no optimizer state or step), so training '
                                  f'cannot resume from it; load it with DDPM.from_checkpoint instead')
        config = merge_resumed_config(config, ckpt.get('config') or {}, say)
    if world_size > 1:
        # Every rank reads the checkpoint itself; a checkpoint_dir that not every node
        # sees would let ranks start from different steps and silently diverge.
        resumed_at = torch.tensor([int(ckpt['step']) if ckpt is not None else -1], device=device)
        lowest = resumed_at.clone()
        dist.all_reduce(resumed_at, op=dist.ReduceOp.MAX)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        if resumed_at.item() != lowest.item():
            raise ValueError(f'ranks disagree on where to resume (steps {lowest.item()} to '
                             f'{resumed_at.item()}, -1 = no checkpoint): put checkpoint_dir on a disk every '
                             f'node sees, or copy the checkpoint to each node and pass --resume <path>')
    if config['run_name'] is None:
        config['run_name'] = datetime.datetime.now().strftime('ddpm_%Y%m%d-%H%M%S')
    c = config

    per_rank = c['batch_size'] // world_size
    if c['batch_size'] % (world_size * c['accum_steps']):
        raise ValueError(f'batch_size={c["batch_size"]} must be divisible by world_size x accum_steps = '
                         f'{world_size} x {c["accum_steps"]}; pick a multiple of {world_size * c["accum_steps"]}')
    micro = per_rank // c['accum_steps']

    # Model, EMA, optimizer. The same seed gives every rank the same initial weights.
    torch.manual_seed(c['seed'])
    raw_model = create_cifar10_ddpm(**model_kwargs(c)).to(device)
    if ckpt is not None:
        load_model_state(raw_model, ckpt['model_state_dict'], source=resume_path)
    ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
    if ckpt is not None and ckpt.get('ema_state_dict') is not None:
        load_model_state(ema_model, ckpt['ema_state_dict'], source=resume_path)
    autocast_dtype = amp_dtype(c['amp'], device)
    channels_last = use_channels_last(c['channels_last'], device, autocast_dtype)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == 'cpu':
        keep_freed_memory()
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True          # fixed shapes: pick the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls/convs on tensor cores (amp='fp32' runs)
        torch.backends.cudnn.allow_tf32 = True
    raw_model.to(memory_format=memory_format)
    ema_model.to(memory_format=memory_format)

    params = [p for p in raw_model.parameters() if p.requires_grad]
    ema_params = list(ema_model.parameters())
    adam_kwargs = {'fused': True} if device.type in ('cuda', 'cpu') else {'foreach': True}
    optimizer = torch.optim.Adam(params, lr=c['lr'], **adam_kwargs)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer_state_dict'])

    train_module = raw_model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_module = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
    if c['compile']:
        train_module = torch.compile(train_module)

    # Data: the whole set as uint8 on the device; batches are sliced from it.
    # Ranks load in turns so that a CIFAR-10 download or a folder's decode cache is
    # written once, never by two processes at a time: rank 0 first, then the first
    # process of every other node (for nodes that do not share rank 0's disk), then
    # the rest, who find the files in place.
    turn = 0 if rank == 0 else 1 if dist_info['local_rank'] == 0 else 2
    for t in range(3 if world_size > 1 else 1):
        if t == turn:
            images = load_dataset(c['dataset'], c['data_dir'], image_size=c['image_size'], train=True)
        barrier()
    loader = InMemoryLoader(images, c['batch_size'], seed=c['seed'], rank=rank, world_size=world_size,
                            device=device)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * c['num_epochs']
    if c['max_steps'] is not None:
        total_steps = min(total_steps, c['max_steps'])
    step = int(ckpt['step']) if ckpt is not None else 0
    nan_skipped = int(ckpt.get('nan_skipped', 0)) if ckpt is not None else 0

    env = environment_info()
    run_dir = os.path.join(c['log_dir'], c['run_name'])
    plain_config = {k: plain(v) for k, v in c.items()}
    writer = None
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        os.makedirs(c['checkpoint_dir'], exist_ok=True)
        with open(os.path.join(run_dir, 'config.json'), 'w') as f:
            json.dump({'config': plain_config, 'environment': env, 'world_size': world_size}, f, indent=2)
        writer = SummaryWriter(run_dir, purge_step=step if step > 0 else None)
        writer.add_text('config', '\n'.join(f'    {k}: {v!r}' for k, v in {**plain_config, **env}.items()), step)
        say('config: ' + json.dumps(plain_config))
        say(f'{len(images)} training images, {steps_per_epoch} steps/epoch, global batch {c["batch_size"]} = '
            f'{world_size} rank(s) x {c["accum_steps"]} micro-batch(es) x {micro} images; device {device}, '
            f'amp {autocast_dtype or "fp32"}, {"channels_last" if channels_last else "NCHW"}, '
            f'{sum(p.numel() for p in params) / 1e6:.2f}M parameters; git {env["git_commit"]}')
        if ckpt is not None:
            say(f'resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch})')

    latest_path = os.path.join(c['checkpoint_dir'], 'ddpm_latest.pth')

    def kept():
        return (f'the last good checkpoint is kept ({latest_path})' if os.path.exists(latest_path)
                else 'no checkpoint had been saved yet')

    def checkpoint(tag_epoch=None):
        """Write ddpm_latest.pth (and ddpm_epoch_N.pth) from rank 0, atomically; never NaN/inf weights."""
        # Every rank holds the same weights, so every rank stops here together.
        if not all(bool(torch.isfinite(p).all()) for p in params + ema_params):
            raise FloatingPointError(f'training stopped: the weights became NaN/inf by step {step} and were not '
                                     f'saved; {kept()}; lower lr or check the data')
        if not is_main:
            return None
        state = {'model_state_dict': raw_model.state_dict(), 'ema_state_dict': ema_model.state_dict(),
                 'optimizer_state_dict': optimizer.state_dict(), 'epoch': step // steps_per_epoch, 'step': step,
                 'config': plain_config, 'rng_state': rng_states(), 'nan_skipped': nan_skipped,
                 'environment': env}
        if tag_epoch is not None:
            save_checkpoint(state, os.path.join(c['checkpoint_dir'], f'ddpm_epoch_{tag_epoch}.pth'))
        return save_checkpoint(state, latest_path)

    grid_made_at = {'step': None}

    def sample_grid(epoch):
        """A grid from the EMA weights with a fixed seed, so grids are comparable across epochs."""
        if not is_main or c['num_samples'] == 0:
            return
        grid_made_at['step'] = step
        g = torch.Generator().manual_seed(c['seed'])
        with autocast(device, autocast_dtype):
            x = ema_model.sample(c['num_samples'], device=device, sampler=c['sample_sampler'],
                                 steps=c['sample_steps'] if c['sample_sampler'] == 'ddim' else None,
                                 generator=g, progress=True)
        grid = torchvision.utils.make_grid((x.float() + 1) / 2, nrow=int(math.ceil(math.sqrt(len(x)))))
        path = os.path.join(run_dir, 'samples', f'epoch_{epoch:04d}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torchvision.utils.save_image(grid, path)
        writer.add_image('samples', grid, step)
        say(f'sample grid: {path}')

    sample_shape = tuple(images.shape[1:])
    noise_generator = torch.Generator(device=device)
    raw_model.train()
    start_epoch, start_batch = divmod(step, steps_per_epoch)
    bad_in_a_row = 0
    stop_reason = None
    log_t, log_images, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
    bar = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True, unit='step')

    # closing(bar): an exception (OOM, a failed save) ends the bar's line, so the error starts its own.
    with GracefulStop() as stop, closing(bar):
        epoch = start_epoch
        while step < total_steps and stop_reason is None:
            loader.set_epoch(epoch)
            bar.set_description(f'epoch {epoch + 1}/{c["num_epochs"]}')
            for x_0 in loader.iterate(start_batch):
                x_0 = x_0.contiguous(memory_format=memory_format)
                # t and eps for the global batch from (seed, step); this rank takes its slice.
                t_all, eps_all = step_noise(noise_generator, c['seed'], step, c['batch_size'], sample_shape,
                                            c['timesteps'])
                t_rank = t_all[rank * per_rank:(rank + 1) * per_rank]
                eps_rank = eps_all[rank * per_rank:(rank + 1) * per_rank]
                torch.manual_seed(c['seed'] * 1_000_003 + step * 1009 + rank)  # dropout
                for group in optimizer.param_groups:
                    group['lr'] = c['lr'] * min(1.0, (step + 1) / max(1, c['warmup_steps']))

                loss_value = 0.0
                for m in range(c['accum_steps']):
                    sl = slice(m * micro, (m + 1) * micro)
                    sync = m == c['accum_steps'] - 1 or world_size == 1
                    ctx = train_module.no_sync() if (not sync and hasattr(train_module, 'no_sync')) else nullcontext()
                    with ctx, autocast(device, autocast_dtype):
                        loss = train_module(x_0[sl], t_rank[sl], eps_rank[sl])
                    (loss / c['accum_steps']).backward()
                    loss_value += loss.detach() / c['accum_steps']

                grad_norm = torch.nn.utils.clip_grad_norm_(params, c['grad_clip'] if c['grad_clip'] > 0 else math.inf)
                # A NaN/inf loss can come with finite gradients (e.g. a NaN added outside the graph): check both.
                finite = torch.isfinite(grad_norm) & torch.isfinite(torch.as_tensor(loss_value))
                stop_agreed = stop.requested is not None
                if world_size > 1:
                    # One collective a step settles both: one rank's bad share makes every rank skip
                    # (or the replicas diverge), and a signal on any rank stops all after this step.
                    flags = torch.stack([finite.to(device=device, dtype=torch.float32).reshape(()),
                                         torch.tensor(0.0 if stop_agreed else 1.0, device=device)])
                    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
                    finite, stop_agreed = flags[0] > 0, bool(flags[1] == 0)
                    if stop_agreed and stop.requested is None:
                        stop.requested = 'signal'
                if finite:
                    optimizer.step()
                    ema_update(ema_params, params, ema_decay_at(step, c['ema_decay']))
                    bad_in_a_row = 0
                else:
                    # Skip the update (the batch is still consumed, so data order is unchanged):
                    # NaN never reaches the weights; too many in a row stops the run.
                    nan_skipped += 1
                    bad_in_a_row += 1
                    say(f'step {step}: non-finite loss/gradient, update skipped ({bad_in_a_row} in a row)')
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if bad_in_a_row >= MAX_BAD_STEPS:
                    stop_reason = 'nan'
                    break

                if finite:  # a skipped step's NaN stays out of the logged mean
                    loss_sum, loss_count = loss_sum + float(loss_value), loss_count + 1
                log_images += c['batch_size']
                if (step % c['log_every'] == 0 or step == total_steps) and loss_count:
                    mean_loss = loss_sum / loss_count
                    if world_size > 1:  # the loss of the global batch, not only of rank 0's share of it
                        mean_loss = torch.tensor([mean_loss], device=device)
                        dist.all_reduce(mean_loss)
                        mean_loss = mean_loss.item() / world_size
                    now = time.perf_counter()
                    if is_main:
                        ips = log_images / max(now - log_t, 1e-9)
                        writer.add_scalar('train/loss', mean_loss, step)
                        writer.add_scalar('train/lr', optimizer.param_groups[0]['lr'], step)
                        writer.add_scalar('train/grad_norm', float(grad_norm), step)
                        writer.add_scalar('train/images_per_sec', ips, step)
                        bar.set_postfix(loss=f'{mean_loss:.4f}', img_s=f'{ips:.1f}')
                    log_t, log_images, loss_sum, loss_count = now, 0, 0.0, 0

                if stop_agreed if world_size > 1 else stop.requested:
                    stop_reason = 'signal'
                    break
                if step >= total_steps:
                    break

            start_batch = 0
            epoch = step // steps_per_epoch
            if step % steps_per_epoch == 0 and stop_reason is None:
                if epoch % c['save_every'] == 0:
                    path = checkpoint(tag_epoch=epoch)
                    say(f'saved {path} and ddpm_epoch_{epoch}.pth')
                if epoch % c['sample_every'] == 0:
                    sample_grid(epoch)
                barrier()
    bar.close()

    epoch = step // steps_per_epoch
    if stop_reason == 'nan':
        if writer:
            writer.close()
        raise FloatingPointError(f'training stopped: {MAX_BAD_STEPS} non-finite losses in a row at step {step}; '
                                 f'{kept()}; lower lr or check the data')
    path = checkpoint()
    if stop_reason is None and grid_made_at['step'] != step:
        sample_grid(epoch)  # the end of training always gets a grid (also when max_steps ends it mid-epoch)
    barrier()
    if stop_reason == 'signal':
        say(f'stopped by {stop.requested} at step {step}; saved {path}; continue with --resume latest')
    else:
        say(f'done: {step} steps; saved {path}')
    if writer:
        writer.close()
    # How the run ended, for scripts that call train_ddpm (the model is the usual DDPM otherwise).
    raw_model.train_stats = {'step': step, 'nan_skipped': nan_skipped, 'stopped_by': stop_reason}
    return raw_model


# ----- command line -------------------------------------------------------------------------

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (a bad value, a missing argument) as one `error:` line, like all of ours."""

    def error(self, message):
        self.exit(2, f'error: {message} (see --help)\n')


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
            parser.add_argument(f'--{name}', nargs='+', type=int, default=default, help=help_text)
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
