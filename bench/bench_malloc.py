"""The CPU allocator question: glibc's default malloc vs keeping freed memory in the process.

glibc hands every allocation above its mmap threshold (at most 32 MiB) to a fresh
mmap and unmaps it on free, so a CPU training step page-faults its large
activations in from zeroed kernel pages on every step. This script measures, in
fresh subprocesses (the allocator is chosen at process start):

1. a micro-check of the mechanism: 20 x allocate + fill + free a 64 MiB tensor,
   counting minor page faults, for each way of changing the allocator;
2. the training step (bench_train's default variant) at the given batch sizes,
   allocator modes interleaved round by round.

Modes: glibc (default), env (GLIBC_TUNABLES set before start), late-env (the same
variable set through os.environ after start: glibc ignores it), mallopt (glibc's
mallopt() called through ctypes at start-up, what a script can do to itself),
jemalloc / tcmalloc (LD_PRELOAD, where the library is installed), jemalloc-keep
(jemalloc with MALLOC_CONF telling it to keep large freed extents).

    python bench/bench_malloc.py --batch-sizes 32 128
"""

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import median  # noqa: E402
import bench_train  # noqa: E402

PRELOADS = {
    'jemalloc': ['/usr/lib/x86_64-linux-gnu/libjemalloc.so.2', '/usr/lib/aarch64-linux-gnu/libjemalloc.so.2',
                 '/usr/lib64/libjemalloc.so.2'],
    'tcmalloc': ['/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4', '/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4',
                 '/usr/lib64/libtcmalloc_minimal.so.4'],
}


def find_preload(name):
    for path in PRELOADS[name] + glob.glob(os.path.join(sys.prefix, 'lib', f'lib{name}*.so*')):
        if os.path.exists(path):
            return path
    return None


def mode_env(mode):
    """The environment for a subprocess in the given allocator mode, or None where it is unavailable."""
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', 'MALLOC_CONF',
                                                            'BENCH_MALLOPT', 'BENCH_LATE_ENV')}
    if mode == 'env':
        env['GLIBC_TUNABLES'] = common.GLIBC_TUNABLES_KEEP
    elif mode == 'late-env':
        env['BENCH_LATE_ENV'] = '1'
    elif mode == 'mallopt':
        env['BENCH_MALLOPT'] = '1'
    elif mode.split('-')[0] in PRELOADS:
        lib = find_preload(mode.split('-')[0])
        if lib is None:
            return None
        env['LD_PRELOAD'] = lib
        if mode == 'jemalloc-keep':  # jemalloc's defaults purge allocations over 8 MiB at once
            env['MALLOC_CONF'] = 'oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1'
    return env


def micro():
    """Subprocess mode: allocate/fill/free a 64 MiB tensor 20 times; print faults and time."""
    common.apply_allocator_mode()
    import torch
    torch.empty(16 * 2 ** 20).fill_(1.0)  # warm up
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(20):
        torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MiB of float32, freed at once
    dt = time.perf_counter() - t0
    f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print('RESULT ' + json.dumps(dict(minor_faults_per_alloc=(f1 - f0) / 20, ms_per_alloc=1e3 * dt / 20)))


def run_micro(mode):
    env = mode_env(mode)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--micro'], env=env, capture_output=True,
                          text=True, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(proc.stderr[-2000:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 128])
    p.add_argument('--modes', nargs='+', default=['glibc', 'env', 'mallopt', 'jemalloc', 'jemalloc-keep', 'tcmalloc'],
                   choices=['glibc', 'env', 'late-env', 'mallopt', 'jemalloc', 'jemalloc-keep', 'tcmalloc'])
    p.add_argument('--variant', default='ours-bf16-cl', choices=sorted(bench_train.VARIANTS))
    p.add_argument('--rounds', type=int, default=2, help='subprocesses per mode and batch size')
    p.add_argument('--steps', type=int, default=3, help='steps per subprocess (the first is reported separately)')
    p.add_argument('--micro', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.micro:
        return micro()
    if sys.platform != 'linux':
        print('bench_malloc: glibc allocator settings apply to Linux only; skipped')
        return
    import torch
    info = common.env_info(torch.device('cpu'))
    modes = [m for m in args.modes if mode_env(m) is not None]
    skipped = sorted(set(args.modes) - set(modes))
    if skipped:
        print(f'# not installed, skipped: {skipped} (e.g. apt-get install libjemalloc2 libtcmalloc-minimal4)')

    micro_rows = []
    for mode in dict.fromkeys(modes + ['late-env']):
        micro_rows.append(dict(mode=mode, **run_micro(mode)))
    common.print_table(micro_rows, ['mode', 'minor_faults_per_alloc', 'ms_per_alloc'],
                       title='allocate + fill + free 64 MiB, per allocation (16,384 faults = every page, every time)')

    rows = []
    for bs in args.batch_sizes:
        res = {m: [] for m in modes}
        for r in range(args.rounds):
            for mode in common.rotated(modes, r):
                res[mode].append(bench_train.run_worker(args.variant, 'base', bs, 'cpu', args.steps,
                                                        env=mode_env(mode)))
        base = median([t for x in res['glibc'] for t in x['times'][1:]]) if 'glibc' in res else None
        for mode in modes:
            steady = [t for x in res[mode] for t in x['times'][1:]]
            first = [x['times'][0] for x in res[mode]]
            step_s = median(steady)
            rows.append(dict(batch=bs, mode=mode, first_step_s=median(first), step_s=step_s, step_min_s=min(steady),
                             img_per_s=bs / step_s, speedup_vs_glibc=base / step_s if base else None,
                             sys_frac=median([x['sys_s'] / (x['sys_s'] + x['user_s']) for x in res[mode]]),
                             minflt_per_step=median([f for x in res[mode] for f in x['minflt'][1:]]),
                             peak_rss_mib=max(x['peak_mib'] for x in res[mode]), times=[x['times'] for x in res[mode]]))
    common.print_table(rows, ['batch', 'mode', 'first_step_s', 'step_s', 'step_min_s', 'img_per_s', 'speedup_vs_glibc',
                              'sys_frac', 'minflt_per_step', 'peak_rss_mib'],
                       title=f'training step ({args.variant}) by allocator; steps after the first of each process')
    path = common.write_json('malloc_cpu', dict(env=info, variant=args.variant, micro=micro_rows, rows=rows))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
