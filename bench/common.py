"""Shared helpers for the benchmarks in bench/: devices, timing, models, memory, results.

Benchmarks are scripts, not tests. Every script prints a table and writes
bench/results/<name>.json. Timings on a shared, noisy CPU are only comparable
inside one run, so the scripts interleave the variants they compare
(A B C A B C ...) and report medians of per-round ratios next to medians of
the raw times.
"""

import glob
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from diffusion import DDPM, create_cifar10_ddpm  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, 'bench', 'results')


# ----- device and timing ------------------------------------------------------------------------

def newest_checkpoint(folder):
    """The most recently written .pth in `folder` (the bench picture scripts' default checkpoint)."""
    paths = glob.glob(os.path.join(folder, '*.pth'))
    if not paths:
        raise SystemExit(f'error: no .pth checkpoint in {folder}; pass --checkpoint')
    return max(paths, key=os.path.getmtime)


def pick_device(name='auto'):
    """'auto' -> CUDA when present, else CPU. On CUDA, TF32 matmuls/convs are switched on."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def sync(device):
    """Wait for queued GPU work so wall-clock timings measure it (a no-op on CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn takes, with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def autocast(device, dtype):
    """An autocast context for dtype 'bf16' / 'fp16'; a disabled one for 'fp32'."""
    if dtype == 'fp32':
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype])


# ----- memory -------------------------------------------------------------------------------------

def proc_status_mib(field):
    """A VmHWM / VmRSS style field of /proc/self/status in MiB (None where /proc is missing)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device):
    """Reset the peak counter: CUDA's allocator peak, or the process's VmHWM on Linux."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        except OSError:
            pass


def peak_memory_mib(device):
    """Peak memory since the last reset: torch.cuda.max_memory_allocated, or VmHWM (whole-process RSS) on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return proc_status_mib('VmHWM')


# ----- models ---------------------------------------------------------------------------------------

# diffusers' UNet2DModel built to the same size as our archs. Time embedding width,
# GroupNorm eps and dropout match ours. diffusers takes one attention_head_dim for
# every level, so heads = channels / head_dim differs where ours fixes the number
# of heads (base: ours 4 heads at 256 channels, theirs 8 of width 32); attention
# FLOPs do not depend on the head count.
DIFFUSERS_ARCHS = {
    'base': dict(block_out_channels=(64, 128, 256), time_embedding_dim=128, attention_head_dim=32,
                 down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
                 up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')),
    'ddpm-paper': dict(block_out_channels=(128, 256, 256, 256), time_embedding_dim=512, attention_head_dim=None,
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')),
}


class DiffusersEps(nn.Module):
    """Adapts diffusers' UNet2DModel to our `network(x_t, t) -> eps` interface."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.in_channels = unet.config.in_channels
        self.image_size = unet.config.sample_size

    def forward(self, x_t, t):
        return self.unet(x_t, t).sample


def build_diffusers_unet(arch='base'):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, norm_num_groups=32,
                       norm_eps=1e-6, dropout=0.1, **DIFFUSERS_ARCHS[arch])


def build_model(impl, arch='base', seed=0):
    """A DDPM around our UNet ('ours') or diffusers' equal-size UNet2DModel ('diffusers').

    Both go through the same DDPM, so q_sample, the loss and the samplers are
    identical and only the network differs.
    """
    torch.manual_seed(seed)
    if impl == 'ours':
        return create_cifar10_ddpm(arch)
    if impl == 'diffusers':
        return DDPM(DiffusersEps(build_diffusers_unet(arch)))
    raise ValueError(f'impl must be ours or diffusers, got {impl!r}')


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ----- data ------------------------------------------------------------------------------------------

def read_cifar_jpeg(path):
    """{'train': uint8 [50000, 3, 32, 32], 'test': ...} from the offline copy's tar.gz, in name order."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    found = {'train': {}, 'test': {}}
    with tarfile.open(path) as tar:
        for member in tar:
            parts = member.name.split('/')
            if member.isfile() and len(parts) == 4 and parts[1] in found:
                found[parts[1]][member.name] = np.asarray(
                    Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
    return {split: torch.from_numpy(np.stack([files[k] for k in sorted(files)])).permute(0, 3, 1, 2).contiguous()
            for split, files in found.items()}



# ----- statistics and output --------------------------------------------------------------------

def median(xs):
    return statistics.median(xs) if xs else float('nan')


def interleaved_ratios(times, baseline):
    """Per-round ratios times[baseline][i] / times[v][i] (speed-up of v over the baseline), by variant."""
    out = {}
    for name, ts in times.items():
        base = times[baseline]
        n = min(len(ts), len(base))
        out[name] = [base[i] / ts[i] for i in range(n)]
    return out


def env_info(device):
    info = dict(python=platform.python_version(), torch=torch.__version__, device=str(device),
                threads=torch.get_num_threads(), machine=platform.machine(),
                glibc_tunables=os.environ.get('GLIBC_TUNABLES'), ld_preload=os.environ.get('LD_PRELOAD'))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        try:
            with open('/proc/cpuinfo') as f:
                info['cpu'] = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), None)
        except OSError:
            info['cpu'] = platform.processor()
        info['cpu_capability'] = torch.backends.cpu.get_cpu_capability()
    try:
        import diffusers
        info['diffusers'] = diffusers.__version__
    except ImportError:
        info['diffusers'] = None
    return info


def write_json(name, obj):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return path


def print_table(rows, columns, title=None):
    """Print a list of dicts as an aligned plain-text table (also valid Markdown)."""
    def fmt(v):
        if isinstance(v, float):
            return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
        return '' if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f'\n{title}')
    print('| ' + ' | '.join(c.ljust(w) for c, w in zip(columns, widths)) + ' |')
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    for row in cells:
        print('| ' + ' | '.join(v.ljust(w) for v, w in zip(row, widths)) + ' |')
    sys.stdout.flush()


# ----- glibc malloc -----------------------------------------------------------------------------

# glibc serves every allocation above the mmap threshold (dynamic, at most 32 MiB on
# 64-bit) with a fresh mmap and returns it with munmap on free, so each large
# activation of a CPU training step is zero-filled by the kernel page by page, every
# step. These settings keep freed memory in the process instead.
GLIBC_TUNABLES_KEEP = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184'


def apply_allocator_mode():
    """In a benchmark subprocess: bench_malloc.py's 'mallopt' and 'late-env' modes, chosen by the environment.

    'mallopt' is what train.py does for itself on CPU (keep_freed_memory); 'late-env'
    sets GLIBC_TUNABLES after start to show that it does nothing then (glibc reads
    its tunables once, when the process starts).
    """
    if os.environ.get('BENCH_MALLOPT') == '1':
        from runtime import keep_freed_memory
        keep_freed_memory()
    if os.environ.get('BENCH_LATE_ENV') == '1':
        os.environ['GLIBC_TUNABLES'] = GLIBC_TUNABLES_KEEP


def rotated(items, r):
    """items started at position r (mod len): round r's order, so no variant always runs first."""
    k = r % len(items)
    return items[k:] + items[:k]
