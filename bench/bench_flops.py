"""Model FLOPs per image and the achieved fraction of this machine's measured peak.

FLOPs come from torch.utils.flop_counter.FlopCounterMode (convolutions, matmuls
and attention; 1 multiply-add = 2 FLOPs); the training step counts forward and
backward. The peak is measured here, in the same run: the U-Net's 3x3 convolutions at each
level (64 ch at 32x32, 128 at 16x16, 256 at 8x8; the fastest counts) and a large
matmul, in fp32 (NCHW and channels_last) and bf16 channels_last, best of a few
repetitions. FLOPs are counted as direct convolution, so a library that uses a
faster algorithm (e.g. Winograd) can show more than the hardware's FMA rate,
and a fraction of peak above 1 means the model's mix of shapes beats these. Achieved fractions use the training speeds in
bench/results/train_<device>_<arch>.json when bench_train.py has written them.

    python bench/bench_flops.py
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import pick_device  # noqa: E402


def count_flops(model, batch, device, train):
    """FLOPs of one forward (train=False) or one loss forward + backward (train=True), per image."""
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    t = torch.randint(0, model.timesteps, (batch,), device=device)
    counter = FlopCounterMode(display=False)
    if train:
        model.train()
        with counter:
            model.loss(x, t).backward()
        model.zero_grad(set_to_none=True)
    else:
        model.eval()
        with torch.no_grad(), counter:
            model.network(x, t)
    return counter.get_total_flops() / batch


def best_time(fn, device, reps):
    fn()
    times = []
    for _ in range(reps):
        dt, _ = common.timed(fn, device)
        times.append(dt)
    return min(times)


def measure_peaks(device, reps=5):
    """GFLOP/s of a representative conv and a matmul, by dtype and layout."""
    cuda = device.type == 'cuda'
    batch = 256 if cuda else 32
    n = 8192 if cuda else 2048
    out = {}
    # The U-Net's 3x3 convolutions at each level; the peak is the fastest of them.
    shapes = [(64, 32), (128, 16), (256, 8)]
    for name, dtype, layout in (('conv fp32 NCHW', torch.float32, torch.contiguous_format),
                                ('conv fp32 channels_last', torch.float32, torch.channels_last),
                                ('conv bf16 channels_last', torch.bfloat16, torch.channels_last)):
        best = 0.0
        for ch, res in shapes:
            x = torch.randn(batch, ch, res, res, device=device, dtype=dtype).contiguous(memory_format=layout)
            w = torch.randn(ch, ch, 3, 3, device=device, dtype=dtype).contiguous(memory_format=layout)
            flops = 2 * batch * ch * res * res * ch * 9
            best = max(best, flops / best_time(lambda: F.conv2d(x, w, padding=1), device, reps) / 1e9)
        out[name] = best
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out['matmul fp32'] = 2 * n ** 3 / best_time(lambda: a @ b, device, reps) / 1e9
    ab, bb = a.bfloat16(), b.bfloat16()
    out['matmul bf16'] = 2 * n ** 3 / best_time(lambda: ab @ bb, device, reps) / 1e9
    return out


# Which measured peak a training variant should be compared with.
PEAK_FOR = {'fp32': 'conv fp32 NCHW', 'fp32-cl': 'conv fp32 channels_last', 'bf16': 'conv bf16 channels_last'}


def peak_key(variant):
    if 'bf16' in variant:
        return PEAK_FOR['bf16']
    return PEAK_FOR['fp32-cl'] if '-cl' in variant else PEAK_FOR['fp32']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto')
    p.add_argument('--reps', type=int, default=5)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    info = common.env_info(device)

    flop_rows = []
    for arch in ('base', 'ddpm-paper'):
        for impl in ('ours', 'diffusers'):
            model = common.build_model(impl, arch).to(device)
            fwd = count_flops(model, 2, device, train=False)
            train = count_flops(model, 2, device, train=True)
            flop_rows.append(dict(arch=arch, impl=impl, params_M=common.num_params(model.network) / 1e6,
                                  fwd_GFLOP_per_img=fwd / 1e9, train_GFLOP_per_img=train / 1e9,
                                  train_over_fwd=train / fwd))
            del model
    common.print_table(flop_rows, ['arch', 'impl', 'params_M', 'fwd_GFLOP_per_img', 'train_GFLOP_per_img',
                                   'train_over_fwd'], title='model FLOPs (FlopCounterMode)')

    peaks = measure_peaks(device, args.reps)
    common.print_table([dict(kernel=k, GFLOP_per_s=v) for k, v in peaks.items()], ['kernel', 'GFLOP_per_s'],
                       title=f'measured peak ({device.type}, best of {args.reps})')

    achieved = []
    for arch in ('base', 'ddpm-paper'):
        path = os.path.join(common.RESULTS_DIR, f'train_{device.type}_{arch}.json')
        if not os.path.exists(path):
            continue
        with open(path) as f:
            train = json.load(f)
        flops = {r['impl']: r['train_GFLOP_per_img'] for r in flop_rows if r['arch'] == arch}
        for row in train['rows']:
            impl = 'diffusers' if row['variant'] == 'diffusers' else 'ours'
            gflops = flops[impl] * row['batch'] / row['min_s']
            key = peak_key(row['variant'])
            achieved.append(dict(arch=arch, batch=row['batch'], variant=row['variant'],
                                 GFLOP_per_s_best_step=gflops, peak_kernel=key, fraction_of_peak=gflops / peaks[key]))
    if achieved:
        common.print_table(achieved, ['arch', 'batch', 'variant', 'GFLOP_per_s_best_step', 'peak_kernel',
                                      'fraction_of_peak'],
                           title='achieved training FLOP/s (fastest step in bench_train) / measured peak')
    path = common.write_json(f'flops_{device.type}', dict(env=info, flops=flop_rows, peaks_gflops=peaks,
                                                          achieved=achieved))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
