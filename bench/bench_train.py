"""Training throughput: our U-Net vs diffusers' equal-size UNet2DModel, interleaved in one process.

One training step = DDPM loss forward (q_sample + U-Net + MSE), backward, Adam
step, EMA update. Every variant gets its own model and optimizer; the rounds
run the variants one step each, in rotating order, so a slow patch of a shared
machine hits all of them. Reported: median step time, images/s, and the median
of the per-round speed-ups over diffusers' defaults (fp32, NCHW, Adam with no
options, a per-parameter EMA loop).

    python bench/bench_train.py                      # CPU: base arch, batch 32
    python bench/bench_train.py --batch-sizes 32 128 --rounds 8 --compile
    python bench/bench_train.py --device cuda        # CUDA: batch 128 and 512, TF32 on

Peak memory is per variant in a fresh subprocess (VmHWM, the process's peak RSS,
on CPU; torch.cuda.max_memory_allocated on CUDA): `--memory`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import autocast, median, pick_device  # noqa: E402

# name -> options. 'adam': fused / foreach / default (torch.optim.Adam with no flags:
# a per-parameter loop on CPU, foreach on CUDA). 'ema': foreach (torch._foreach_lerp_) / loop.
VARIANTS = {
    'diffusers': dict(impl='diffusers', dtype='fp32', channels_last=False, compile=False, adam='default', ema='loop'),
    'ours-fp32': dict(impl='ours', dtype='fp32', channels_last=False, compile=False, adam='fused', ema='foreach'),
    'ours-fp32-cl': dict(impl='ours', dtype='fp32', channels_last=True, compile=False, adam='fused', ema='foreach'),
    'ours-bf16': dict(impl='ours', dtype='bf16', channels_last=False, compile=False, adam='fused', ema='foreach'),
    'ours-bf16-cl': dict(impl='ours', dtype='bf16', channels_last=True, compile=False, adam='fused', ema='foreach'),
    'ours-fp32-cl-compile': dict(impl='ours', dtype='fp32', channels_last=True, compile=True, adam='fused',
                                 ema='foreach'),
    'ours-bf16-cl-compile': dict(impl='ours', dtype='bf16', channels_last=True, compile=True, adam='fused',
                                 ema='foreach'),
}
DEFAULT_VARIANTS = ['diffusers', 'ours-fp32', 'ours-fp32-cl', 'ours-bf16', 'ours-bf16-cl']  # ours-bf16: train.py's default on CPUs with native bf16


def make_adam(params, kind, lr=2e-4):
    if kind == 'default':
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, **{kind: True})


@torch.no_grad()
def ema_update(ema_params, params, decay, kind):
    """ema <- decay * ema + (1 - decay) * param, for every parameter."""
    if kind == 'foreach':
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    else:
        for e, p in zip(ema_params, params):
            e.mul_(decay).add_(p, alpha=1.0 - decay)


class Trainer:
    """One variant: model, optimizer, EMA copy and a step function."""

    def __init__(self, name, opts, arch, device):
        self.name, self.opts, self.device = name, opts, device
        model = common.build_model(opts['impl'], arch).to(device)
        if opts['channels_last']:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = [p.detach().clone() for p in self.params]
        self.opt = make_adam(self.params, opts['adam'])
        self.loss_fn = torch.compile(model) if opts['compile'] else model
        self.compile_s = None

    def step(self, x_cpu):
        x = x_cpu.to(self.device, non_blocking=True)
        if self.opts['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.opts['dtype']):
            loss = self.loss_fn(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.ema_params, self.params, 0.9999, self.opts['ema'])
        return loss


def optimizer_micro(arch, device, reps):
    """Adam step (fused / foreach / default) and EMA update (foreach lerp / loop) alone, on the arch's parameters."""
    model = common.build_model('ours', arch).to(device)
    params = list(model.parameters())
    for p_ in params:
        p_.grad = torch.randn_like(p_) * 1e-3
    ema = [p_.detach().clone() for p_ in params]
    cases = {f'adam-{k}': (lambda o: o.step)(make_adam(params, k)) for k in ('fused', 'foreach', 'default')}
    cases.update({f'ema-{k}': (lambda k: lambda: ema_update(ema, params, 0.9999, k))(k) for k in ('foreach', 'loop')})
    times = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for r in range(reps):
        for k, fn in cases.items():
            dt, _ = common.timed(fn, device)
            times[k].append(dt)
    return [dict(op=k, median_ms=1e3 * median(v), min_ms=1e3 * min(v)) for k, v in times.items()]


def make_batch(batch_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, 32, 32, generator=g) * 2 - 1
    return x.pin_memory() if device.type == 'cuda' else x


def run_interleaved(names, arch, batch_size, device, rounds, warmup):
    """Time `rounds` steps of each variant, interleaved; returns rows and raw times."""
    trainers = [Trainer(n, VARIANTS[n], arch, device) for n in names]
    x = make_batch(batch_size, device)
    for tr in trainers:
        for i in range(warmup):
            dt, _ = common.timed(lambda: tr.step(x), device)
            if i == 0 and tr.opts['compile']:
                tr.compile_s = dt
    times = {tr.name: [] for tr in trainers}
    for r in range(rounds):
        for tr in common.rotated(trainers, r):
            dt, _ = common.timed(lambda: tr.step(x), device)
            times[tr.name].append(dt)
    baseline = 'diffusers' if 'diffusers' in times else names[0]
    ratios = common.interleaved_ratios(times, baseline)
    rows = []
    for tr in trainers:
        t = times[tr.name]
        rows.append(dict(arch=arch, batch=batch_size, variant=tr.name, median_s=median(t), min_s=min(t),
                         img_per_s=batch_size / median(t), speedup=median(ratios[tr.name]),
                         speedup_min=min(ratios[tr.name]), speedup_max=max(ratios[tr.name]),
                         compile_s=tr.compile_s, times=t))
    del trainers
    return rows


def worker(variant, arch, batch_size, device_name, steps):
    """Subprocess mode: a few steps of one variant in a fresh process; prints one JSON line."""
    common.apply_allocator_mode()
    device = pick_device(device_name)
    tr = Trainer(variant, VARIANTS[variant], arch, device)
    x = make_batch(batch_size, device)
    common.reset_peak_memory(device)
    t_cpu0 = os.times()
    times, faults = [], []
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        dt, _ = common.timed(lambda: tr.step(x), device)
        times.append(dt)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    t_cpu1 = os.times()
    print('RESULT ' + json.dumps(dict(
        variant=variant, arch=arch, batch=batch_size, times=times, peak_mib=common.peak_memory_mib(device),
        minflt=faults, user_s=t_cpu1.user - t_cpu0.user, sys_s=t_cpu1.system - t_cpu0.system,
        glibc_tunables=os.environ.get('GLIBC_TUNABLES'), ld_preload=os.environ.get('LD_PRELOAD'))))


def run_worker(variant, arch, batch_size, device_name, steps, env=None, timeout=1800):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', variant, '--arch', arch,
           '--batch-sizes', str(batch_size), '--device', device_name, '--steps', str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    raise RuntimeError(f'worker {variant} failed:\n{proc.stderr[-3000:]}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto')
    p.add_argument('--arch', default='base', choices=['base', 'ddpm-paper'])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=None,
                   help='default: 32 on CPU, 128 and 512 on CUDA')
    p.add_argument('--variants', nargs='+', default=None, choices=sorted(VARIANTS))
    p.add_argument('--compile', action='store_true', help='add the torch.compile variants')
    p.add_argument('--rounds', type=int, default=None, help='timed steps per variant (default 6 CPU, 30 CUDA)')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps per variant (default 2 CPU, 10 CUDA)')
    p.add_argument('--memory', action='store_true', help='also measure peak memory per variant in subprocesses')
    p.add_argument('--optim-reps', type=int, default=20, help='Adam/EMA micro-benchmark repetitions (0: skip)')
    p.add_argument('--out', default=None, help='results file name (default train_<device>_<arch>)')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    p.add_argument('--steps', type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    device = pick_device(args.device)
    cuda = device.type == 'cuda'
    batch_sizes = args.batch_sizes or ([128, 512] if cuda else [32])
    if args.worker:
        return worker(args.worker, args.arch, batch_sizes[0], args.device, args.steps)
    names = list(args.variants or DEFAULT_VARIANTS)
    if args.compile:
        names += [n for n in ('ours-fp32-cl-compile', 'ours-bf16-cl-compile') if n not in names]
    rounds = args.rounds or (30 if cuda else 6)
    warmup = args.warmup or (10 if cuda else 2)

    info = common.env_info(device)
    print(f"# training step, {args.arch}; {info.get('gpu') or info.get('cpu')}, torch {info['torch']}, "
          f"{info['threads']} threads, diffusers {info['diffusers']}")
    rows = []
    for bs in batch_sizes:
        t0 = time.perf_counter()
        rows += run_interleaved(names, args.arch, bs, device, rounds, warmup)
        print(f'  batch {bs}: {time.perf_counter() - t0:.0f} s')
    if args.memory:
        for row in rows:
            res = run_worker(row['variant'], args.arch, row['batch'], args.device, 2)
            row['peak_mib'] = res['peak_mib']
    optim = optimizer_micro(args.arch, device, args.optim_reps) if args.optim_reps else []
    if optim:
        common.print_table(optim, ['op', 'median_ms', 'min_ms'], title=f'optimizer and EMA step alone ({args.arch}, '
                                                                       f'{args.optim_reps} reps)')
    cols = ['arch', 'batch', 'variant', 'median_s', 'min_s', 'img_per_s', 'speedup', 'speedup_min',
            'speedup_max'] + (['peak_mib'] if args.memory else []) + (['compile_s'] if args.compile else [])
    common.print_table(rows, cols, title=f'training step ({device.type}); speedup = median over rounds of '
                                         f't(diffusers) / t(variant), same round')
    path = common.write_json(args.out or f'train_{device.type}_{args.arch}',
                             dict(env=info, rounds=rounds, warmup=warmup, variants={n: VARIANTS[n] for n in names},
                                  rows=rows, optimizer=optim))
    print(f'wrote {path}')
    return rows


if __name__ == '__main__':
    main()
