"""Is bf16 autocast a safe training default on this machine? A short run, fp32 vs bf16, same everything.

Three short training runs on the same synthetic data (smooth random colour
fields, a learnable distribution): fp32 with seed 0, bf16 autocast (+
channels_last) with seed 0 (same initial weights, batches, steps t, noise and
dropout masks), and fp32 with seed 1. The seed-1 run is the yardstick: bf16 is
"within noise" when its loss curve and samples differ from fp32-seed-0 by no
more than an fp32 run with another seed does. Samples: DDIM from the same x_T,
each model sampled in fp32; the bf16-trained model also with bf16 autocast
(what sampling would use by default).

    python bench/bench_bf16_check.py                 # small U-Net, 300 steps
    python bench/bench_bf16_check.py --arch base --steps 200
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import autocast, pick_device  # noqa: E402
from diffusion import create_cifar10_ddpm  # noqa: E402

# The base arch's structure at a quarter of its width, so the check fits in a few minutes on a CPU.
SMALL = dict(channels=(32, 64, 64), num_res_blocks=2, time_emb_dim=64, attn_resolutions=(16, 8), num_heads=4,
             dropout=0.1)


def synthetic_data(n, seed=1234):
    """Smooth random colour fields in [-1, 1]: 4x4 Gaussian noise upsampled to 32x32, squashed by tanh."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g) * 1.5
    return torch.tanh(F.interpolate(low, size=32, mode='bicubic', align_corners=False))


def build(arch, seed):
    torch.manual_seed(seed)
    return create_cifar10_ddpm('base', **SMALL) if arch == 'small' else create_cifar10_ddpm(arch)


def train(arch, dtype, seed, data, steps, batch, device, lr):
    model = build(arch, seed).to(device)
    channels_last = dtype != 'fp32'
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    g = torch.Generator().manual_seed(seed)  # batches, t and noise
    torch.manual_seed(seed)  # dropout masks
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x_0 = data[idx].to(device)
        t = torch.randint(0, model.timesteps, (batch,), generator=g).to(device)
        noise = torch.randn(x_0.shape, generator=g).to(device)
        if channels_last:
            x_0 = x_0.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            loss = model.loss(x_0, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def window_means(losses, w):
    return [sum(losses[i:i + w]) / len(losses[i:i + w]) for i in range(0, len(losses), w)]


def sample(model, dtype, n, steps, device):
    x_T = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    with autocast(device, dtype):
        return model.sample(n, device=device, sampler='ddim', steps=steps, x_T=x_T, progress=False).float().cpu()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto')
    p.add_argument('--arch', default='small', choices=['small', 'base', 'ddpm-paper'])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-4)
    p.add_argument('--window', type=int, default=25, help='loss curve: mean over windows of this many steps')
    p.add_argument('--samples', type=int, default=64)
    p.add_argument('--ddim-steps', type=int, default=20)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    info = common.env_info(device)
    data = synthetic_data(4096)
    print(f'# bf16 check: {args.arch} U-Net, {args.steps} steps, batch {args.batch}, synthetic data; {device}')

    runs = {}
    for name, dtype, seed in (('fp32-s0', 'fp32', 0), ('bf16-s0', 'bf16', 0), ('fp32-s1', 'fp32', 1)):
        t0 = time.perf_counter()
        model, losses = train(args.arch, dtype, seed, data, args.steps, args.batch, device, args.lr)
        runs[name] = dict(model=model, losses=losses, seconds=time.perf_counter() - t0, dtype=dtype)
        print(f'  trained {name}: {runs[name]["seconds"]:.0f} s')

    curves = {k: window_means(v['losses'], args.window) for k, v in runs.items()}
    rows = [dict(steps=f'{i * args.window + 1}-{min((i + 1) * args.window, args.steps)}',
                 **{k: curves[k][i] for k in curves},
                 bf16_minus_fp32=curves['bf16-s0'][i] - curves['fp32-s0'][i],
                 seed1_minus_seed0=curves['fp32-s1'][i] - curves['fp32-s0'][i])
            for i in range(len(curves['fp32-s0']))]
    common.print_table(rows, ['steps', 'fp32-s0', 'bf16-s0', 'fp32-s1', 'bf16_minus_fp32', 'seed1_minus_seed0'],
                       title=f'training loss, mean over {args.window}-step windows')
    tail = max(1, len(rows) // 3)
    last = {k: sum(v[-tail:]) / tail for k, v in curves.items()}

    samples = {
        'fp32-s0 (fp32 sampling)': sample(runs['fp32-s0']['model'], 'fp32', args.samples, args.ddim_steps, device),
        'bf16-s0 (fp32 sampling)': sample(runs['bf16-s0']['model'], 'fp32', args.samples, args.ddim_steps, device),
        'bf16-s0 (bf16 sampling)': sample(runs['bf16-s0']['model'], 'bf16', args.samples, args.ddim_steps, device),
        'fp32-s1 (fp32 sampling)': sample(runs['fp32-s1']['model'], 'fp32', args.samples, args.ddim_steps, device),
    }
    ref = samples['fp32-s0 (fp32 sampling)']
    srows = [dict(model=k, mean=v.mean().item(), std=v.std().item(),
                  channel_means=' '.join(f'{m:.3f}' for m in v.mean((0, 2, 3)).tolist()),
                  rms_diff_vs_fp32_s0=(v - ref).pow(2).mean().sqrt().item()) for k, v in samples.items()]
    srows.append(dict(model='data', mean=data.mean().item(), std=data.std().item(),
                      channel_means=' '.join(f'{m:.3f}' for m in data.mean((0, 2, 3)).tolist())))
    common.print_table(srows, ['model', 'mean', 'std', 'channel_means', 'rms_diff_vs_fp32_s0'],
                       title=f'{args.samples} DDIM-{args.ddim_steps} samples from the same x_T')

    d_bf16 = abs(last['bf16-s0'] - last['fp32-s0'])
    d_seed = abs(last['fp32-s1'] - last['fp32-s0'])
    rms_bf16 = srows[1]['rms_diff_vs_fp32_s0']
    rms_seed = srows[3]['rms_diff_vs_fp32_s0']
    verdict = 'within noise' if d_bf16 <= max(d_seed, 0.1 * last['fp32-s0']) and rms_bf16 <= rms_seed else 'NOT within noise'
    print(f'\nlast third of training: |bf16 - fp32| = {d_bf16:.4f} vs |seed1 - seed0| = {d_seed:.4f}; '
          f'samples rms diff: bf16-trained {rms_bf16:.3f} vs other seed {rms_seed:.3f} -> {verdict}')
    path = common.write_json(f'bf16_check_{device.type}', dict(
        env=info, args=vars(args), losses={k: v['losses'] for k, v in runs.items()},
        seconds={k: v['seconds'] for k, v in runs.items()}, curves=rows, samples=srows, verdict=verdict))
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
