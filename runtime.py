"""Run-time plumbing shared by train.py, sample.py and evaluate.py (and nothing of the model's math).

- where and how to run: `resolve_device`, `amp_dtype` / `autocast`, `use_channels_last`
  (the defaults were measured in bench/), `keep_freed_memory`, `GracefulStop` (SIGINT/SIGTERM);
- the torchrun process group: `Distributed`, one setup and one timeout for every script;
- files: `atomic_write` (crash-safe writes), JSON and sha256 helpers, `environment_info`;
- command lines: did-you-mean hints, one-line errors, the help formatter and the
  --device / --amp / --quiet / --debug options of sample.py and evaluate.py.
"""

import argparse
import ctypes
import ctypes.util
import datetime
import difflib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys

import torch
import torch.distributed as torch_dist

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
AMP_CHOICES = ('auto', 'bf16', 'fp16', 'fp32')
DEFAULT_AMP = 'auto'   # train.py, sample.py and evaluate.py: see amp_dtype

# The longest one rank waits at a collective for the others: rank 0 alone writes checkpoints, grids
# and FID statistics while the rest wait, and a resumed sampling run can leave some ranks with
# hours less work than others. A real hang is reported after this long.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=12)


# ----- device, precision and layout (measured in bench/) ------------------------------------

def resolve_device(device):
    """The device to run on: the one asked for (checked), else CUDA, then MPS, then CPU."""
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


def default_device():
    return str(resolve_device(None))


def cpu_has_native_bf16():
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def amp_dtype(amp, device):
    """The autocast dtype for `amp` on `device` (None: fp32).

    'auto': bf16 on GPUs that support it (Ampere and newer) and on CPUs with
    native bf16 (measured faster, bench/); fp16 on older GPUs (T4, V100), where
    bf16 is emulated or refused, with train.py's GradScaler; else fp32.
    """
    if amp in ('bf16', 'fp16'):
        return torch.bfloat16 if amp == 'bf16' else torch.float16
    if amp != 'auto':
        return None
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == 'cpu' and cpu_has_native_bf16():
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


def keep_freed_memory():
    """On glibc, keep freed memory in the process instead of unmapping it after every use.

    By default glibc returns every allocation over 32 MiB to the OS when freed,
    so a CPU training step page-faults its large activations in again on every
    use (measured: 20-80% of a step, see bench/). mallopt() changes that for the
    running process, like GLIBC_TUNABLES=glibc.malloc.mmap_max=0 set at start.
    """
    if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


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


# ----- the process group --------------------------------------------------------------------

class Distributed:
    """This process's place in a torchrun job: rank, world size and device, with the few collectives we use.

    With WORLD_SIZE > 1 and no process group running, one is started (NCCL on CUDA,
    gloo on CPU) and closed again by `close`; a group the caller already started
    (a script of yours run by torchrun) is used as it is and left running.
    """

    def __init__(self, device=None):
        running = torch_dist.is_available() and torch_dist.is_initialized()
        self.world_size = torch_dist.get_world_size() if running else int(os.environ.get('WORLD_SIZE', '1'))
        self.rank = torch_dist.get_rank() if running else int(os.environ.get('RANK', '0'))
        self.local_rank = int(os.environ.get('LOCAL_RANK', '0'))
        self.device = resolve_device(device)
        self.started = False
        if self.world_size == 1:
            return
        if self.device.type == 'cuda':
            self.device = torch.device('cuda', self.local_rank)
            torch.cuda.set_device(self.device)
        elif self.device.type == 'mps':
            raise ValueError('torchrun with device=mps is not supported (no distributed backend for MPS); '
                             'use --device cpu, or run one process without torchrun')
        if not running:
            backend = 'nccl' if self.device.type == 'cuda' else 'gloo'
            torch_dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
            self.started = True

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            torch_dist.barrier(device_ids=[self.device.index] if self.device.type == 'cuda' else None)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj):
        """The list of every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, out, dst=0)
        return out

    def close(self):
        if self.started and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.started = False


# ----- files --------------------------------------------------------------------------------

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


def file_digest(path, algorithm, chunk=1 << 22):
    """The hex digest ('md5', 'sha1', 'sha256', ...) of one file's bytes, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path, chunk=1 << 22):
    """SHA-256 of a file; of a folder (a diffusers model): of its .json and weight files' names and bytes."""
    digest = hashlib.sha256()
    files = {'': path}
    if os.path.isdir(path):
        files = {}
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith('.')]   # .git, .cache, our outputs: not the model
            for name in names:
                if name.endswith(('.json', '.safetensors', '.bin')) and not name.startswith('.'):
                    files[os.path.relpath(os.path.join(root, name), path)] = os.path.join(root, name)
    for name in sorted(files):
        digest.update(name.encode())
        with open(files[name], 'rb') as f:
            for block in iter(lambda: f.read(chunk), b''):
                digest.update(block)
    return digest.hexdigest()


def read_json(path):
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path, obj):
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + '\n').encode()))


def plain(value):
    """Config values as JSON / weights_only-safe plain types (tuples become lists, devices strings)."""
    if isinstance(value, tuple):
        return list(value)
    return str(value) if isinstance(value, torch.device) else value


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


# ----- command lines ------------------------------------------------------------------------

def closest(name, options):
    """The valid option closest to a misspelled one, for 'did you mean' messages."""
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ''


def cli_text(error):
    """An error's message for a command-line user: its `cli_message` (the fix spelled in flags) when it
    carries one, else its message (which names keywords, as Python callers write them)."""
    return getattr(error, 'cli_message', None) or str(error)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's own errors (a bad value, a missing argument) as one `error:` line, like all of ours."""

    def error(self, message):
        self.exit(2, f'error: {message} (see --help)\n')


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except empty ones (None, False) and those the help text states itself."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or 'default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def add_runtime_options(p):
    """--device, --amp, --quiet, --debug: shared by sample.py and evaluate.py."""
    p.add_argument('--device', default=None, help='cuda, cpu, mps, cuda:1 ... (default: the best available)')
    p.add_argument('--amp', choices=AMP_CHOICES, default=DEFAULT_AMP,
                   help='network precision when sampling: auto is bf16 on GPUs and CPUs with native bf16, fp16 on '
                        'older GPUs, else fp32')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument('--debug', action='store_true', help='show the full traceback on errors')


def run_cli(parser, run, argv):
    """Parse argv and run; bad input ends as one `error:` line and exit code 2 (--debug: the traceback).

    Bad input is a ValueError (CheckpointError is one) or a missing file.
    """
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f'error: {cli_text(e)}', file=sys.stderr)
        return 2
