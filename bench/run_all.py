"""Run every benchmark in bench/, print their tables and write bench/results/*.json.

    pip install -r bench/requirements.txt && python bench/run_all.py          # ~20 min on 2 CPU cores
    python bench/run_all.py --quick                                           # a few minutes: fewer rounds

On CPU the training and sampling benchmarks run in a child process started with
GLIBC_TUNABLES set (what train.py does for itself), and bench_malloc.py measures
the difference. On CUDA the malloc and bf16 checks are skipped unless asked for.
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402


def run(script, *args, env=None):
    cmd = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    print(f'\n$ {" ".join(cmd[1:])}', flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    print(f'({script}: {time.perf_counter() - t0:.0f} s, exit {rc})', flush=True)
    return rc


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='fewer rounds and steps: a smoke run, not a measurement')
    p.add_argument('--device', default='auto')
    p.add_argument('--compile', action='store_true', help='add torch.compile training variants (slow to compile on CPU)')
    p.add_argument('--skip', nargs='*', default=[], choices=['train', 'paper', 'sample', 'flops', 'malloc', 'bf16'])
    args = p.parse_args()
    device = common.pick_device(args.device)
    cuda = device.type == 'cuda'
    q = args.quick
    env = dict(os.environ)
    if not cuda and sys.platform == 'linux':
        env.setdefault('GLIBC_TUNABLES', common.GLIBC_TUNABLES_KEEP)
    dev = ['--device', args.device]
    failed = []
    t0 = time.perf_counter()
    if 'train' not in args.skip:
        extra = ['--compile'] if args.compile else []
        rounds = ['--rounds', 3, '--warmup', 1] if q else (['--rounds', 6] if not cuda else [])
        bs = ['--batch-sizes', 32, 128] if not cuda and not q else []
        failed += ['train'] * bool(run('bench_train.py', *dev, *rounds, *bs, *extra, '--memory', env=env))
    if 'paper' not in args.skip:
        rounds = ['--rounds', 2, '--warmup', 1] if q else ['--rounds', 4 if not cuda else 30]
        bs = ['--batch-sizes', 8] if not cuda else []
        # train.py's defaults: fp32 runs channels_last everywhere; bf16 runs NCHW on CPU, channels_last on CUDA.
        variants = ['--variants', 'diffusers', 'ours-fp32-cl', 'ours-bf16-cl' if cuda else 'ours-bf16']
        failed += ['paper'] * bool(run('bench_train.py', *dev, '--arch', 'ddpm-paper', *rounds, *bs, *variants, env=env))
    if 'sample' not in args.skip:
        rounds = ['--rounds', 3] if q else []
        failed += ['sample'] * bool(run('bench_sample.py', *dev, *rounds, *(['--cuda-graphs'] if cuda else []), env=env))
    if 'flops' not in args.skip:
        failed += ['flops'] * bool(run('bench_flops.py', *dev, '--reps', 3 if q else 5, env=env))
    if 'malloc' not in args.skip and not cuda and sys.platform == 'linux':
        opts = ['--batch-sizes', 32, '--rounds', 1, '--steps', 2] if q else ['--batch-sizes', 32, 128]
        failed += ['malloc'] * bool(run('bench_malloc.py', *opts))
    if 'bf16' not in args.skip and not cuda:
        opts = ['--steps', 60, '--window', 20, '--samples', 16, '--ddim-steps', 10] if q else []
        failed += ['bf16'] * bool(run('bench_bf16_check.py', *dev, *opts, env=env))
    print(f'\nall benchmarks: {time.perf_counter() - t0:.0f} s; results in {common.RESULTS_DIR}'
          + (f'; FAILED: {failed}' if failed else ''))
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
