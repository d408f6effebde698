"""The reverse process as a progressive code (Ho et al. 2020, section 4.3 and Fig. 5).

Sending x_T, x_{T-1}, ..., x_t costs the rate L_T + L_{T-1} + ... + L_t (each L_{s-1} =
KL(q(x_{s-1} | x_s, x_0) || p_theta(x_{s-1} | x_s)), in bits/dim); from x_t the receiver's best
guess of the image is x_0_pred = (x_t - sqrt(1 - a-bar_t) eps_theta(x_t, t)) / sqrt(a-bar_t), whose
distortion is its RMSE on the 0-255 scale. The paper's test-set totals: rate 1.78 bits/dim,
distortion (the decoder L_0) 1.97 bits/dim, RMSE 0.95 at the end of the chain.

`rate_distortion` measures both at a grid of steps for N images (one x_t per image and step);
the rate between grid points uses the KL at the nearest grid point above (exact with stride 1).
Code step t = 0..T-1 is the paper's t = 1..T.
"""

import argparse
import csv
import importlib.util
import math
import os

import numpy as np
import torch

from data.process_cifar import DATASETS, load_dataset
from runtime import add_runtime_options, resolve_device, write_json
from sampling.generate import load_model

PAPER = {'rate_bpd': 1.78, 'distortion_bpd': 1.97, 'rmse': 0.95}
CSV_COLUMNS = ('t', 'reverse_steps', 'rate_bpd', 'rmse_0_255', 'kl_bpd')


def step_grid(timesteps, stride):
    """Code steps 0, stride, 2 stride, ... and T-1 (the first step of the reverse chain), increasing."""
    if stride < 1:
        raise ValueError(f'stride must be a positive integer, got {stride}')
    grid = list(range(0, timesteps, stride))
    return torch.tensor(grid + ([timesteps - 1] if grid[-1] != timesteps - 1 else []))


@torch.inference_mode()
def grid_terms(model, x_0, grid, generator):
    """(KL in bits/dim [G, n], squared error on 0-255 [G, n]) at each grid step, for one batch x_0 in [-1, 1]."""
    kls, errors = [], []
    for step in grid.tolist():
        t = torch.full((x_0.shape[0],), step, dtype=torch.long, device=x_0.device)
        x_t = model.q_sample(x_0, t, torch.randn(x_0.shape, generator=generator).to(x_0.device))
        outputs = model.network_outputs(x_t, t)
        kls.append(model.vb_term_bpd(x_0, x_t, t, False, outputs).double().cpu())
        x_0_pred = model.predict_x0_from_eps(x_t, t, outputs[0]).clamp(-1.0, 1.0)
        errors.append(((x_0_pred - x_0) * 127.5).pow(2).flatten(1).mean(1).double().cpu())
    return torch.stack(kls), torch.stack(errors)


def rate_distortion(model, images, stride=1, batch_size=100, device='cpu', seed=0, progress=True):
    """Rate and distortion along the reverse chain for uint8 [N, H, W, C] images; a dict of float64 arrays.

    t: code steps of the grid (increasing); rate_bpd[i]: L_T + the KL terms of every step above t[i]
    (what has been sent when x_t is received); rmse_0_255[i]: RMSE of x_0_pred from x_t over all images;
    kl_bpd[i]: the mean KL term at t[i] (at t = 0: the decoder's NLL, L_0).
    """
    grid = step_grid(model.timesteps, stride)
    model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    kl_sum, sq_sum, prior_sum, n = torch.zeros(len(grid), dtype=torch.float64), 0.0, 0.0, 0
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc='rate/distortion', unit='batch', leave=False)
    for start in starts:
        x_0 = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        x_0 = (x_0.float() / 127.5 - 1.0).to(device)
        kl, sq = grid_terms(model, x_0, grid, generator)
        kl_sum += kl.sum(1)
        sq_sum = sq_sum + sq.sum(1)
        with torch.inference_mode():
            prior_sum += float(model.prior_bpd(x_0).double().sum())
        n += x_0.shape[0]
    kl_mean = kl_sum / n
    return {'t': grid.numpy(), 'kl_bpd': kl_mean.numpy(), 'rmse_0_255': (sq_sum / n).sqrt().numpy(),
            'rate_bpd': cumulative_rate(grid, kl_mean, prior_sum / n, model.timesteps), 'prior_bpd': prior_sum / n,
            'decoder_bpd': float(kl_mean[0]), 'num_images': n, 'timesteps': model.timesteps}


def cumulative_rate(grid, kl_mean, prior, timesteps):
    """L_T + sum of the KL terms of the steps s > t, for each grid step t; the KL of each integer step s in
    1..T-1 is that of the grid step at or above it (exact when the grid holds every step; T-1 is on the grid)."""
    above_index = torch.searchsorted(grid, torch.arange(timesteps))   # the first grid step >= each step
    per_step = kl_mean[above_index]   # (step 0's entry, the decoder, is never above a step t >= 0)
    above = per_step.flip(0).cumsum(0).flip(0)   # above[s] = sum over steps >= s
    rate = torch.cat([above[1:], torch.zeros(1, dtype=torch.float64)])   # steps > t
    return (prior + rate[grid]).numpy()


def write_csv(result, path):
    """One row per grid step: t (the paper's, 1..T), reverse steps T - t, rate, RMSE and the KL term."""
    T = result['timesteps']
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i in range(len(result['t'])):
            t = int(result['t'][i]) + 1
            writer.writerow([t, T - t, f"{result['rate_bpd'][i]:.6f}", f"{result['rmse_0_255'][i]:.6f}",
                             f"{result['kl_bpd'][i]:.6f}"])


def plot(result, path, title=None):
    """Fig. 5's three panels: distortion and rate against reverse-process steps, and distortion against rate."""
    import matplotlib   # bench/requirements.txt: only this plot needs it
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps = result['timesteps'] - (result['t'] + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [(steps, result['rmse_0_255'], 'Reverse process steps (T - t)', 'Distortion (RMSE [0, 255])'),
              (steps, result['rate_bpd'], 'Reverse process steps (T - t)', 'Rate (bits/dim)'),
              (result['rate_bpd'], result['rmse_0_255'], 'Rate (bits/dim)', 'Distortion (RMSE [0, 255])')]
    for ax, (x, y, xlabel, ylabel) in zip(axes, panels):
        ax.plot(x, y)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(result):
    """The totals the paper quotes (section 4.3), ours beside them."""
    final = 0   # grid index 0 is code step 0: everything above it has been sent
    return {'rate_bpd': float(result['rate_bpd'][final]), 'distortion_bpd': result['decoder_bpd'],
            'rmse_0_255_at_t1': float(result['rmse_0_255'][final]), 'num_images': result['num_images'],
            'paper': PAPER, 'finite': bool(math.isfinite(float(result['rate_bpd'][final])))}


# ----- paper.py fig5 ------------------------------------------------------------------------------

def add_data_options(p):
    """--dataset, --data_dir, --seed and the runtime options: shared by fig5 and table2."""
    p.add_argument('--dataset', choices=DATASETS, default='cifar10', help='where the (test) images come from')
    p.add_argument('--data_dir', default='data', help='CIFAR-10 folder, or the image folder (train/ and test/)')
    p.add_argument('--seed', type=int, default=0)
    add_runtime_options(p)


def add_fig5(p):
    add_data_options(p)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                   help='EMA weights (default: when present)')
    p.add_argument('--num_images', type=int, default=100, help='test images')
    p.add_argument('--stride', type=int, default=1, help='every stride-th step (1: all T, exact)')
    p.add_argument('--batch_size', type=int, default=100)
    p.add_argument('--out', default='runs/fig5', help='writes OUT.csv, OUT.png and OUT.json')


def run_fig5(args):
    """paper.py fig5: the CSV, the plot and the totals of `rate_distortion`; returns the files written."""
    for name in ('num_images', 'stride', 'batch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name} must be a positive integer, got {getattr(args, name)}')
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if importlib.util.find_spec('matplotlib') is None:   # before the work, so a missing plotter loses nothing
        raise ValueError('fig5 draws its plot with matplotlib, which is not installed: '
                         'pip install -r bench/requirements.txt')
    device = str(resolve_device(args.device))
    model, info = load_model(args.checkpoint, ema=args.ema, device=device)
    test = load_dataset(args.dataset, args.data_dir, train=False)[:args.num_images]
    result = rate_distortion(model, np.ascontiguousarray(test.permute(0, 2, 3, 1).numpy()), args.stride,
                             args.batch_size, device, args.seed, not args.quiet)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(result, args.out + '.csv')
    totals = summary(result)
    title = (f"{os.path.basename(args.checkpoint)} (step {info['step']}, {'EMA' if info['ema'] else 'raw'}), "
             f"{totals['num_images']} test images: rate {totals['rate_bpd']:.2f}, distortion "
             f"{totals['distortion_bpd']:.2f} bits/dim")
    plot(result, args.out + '.png', title)
    write_json(args.out + '.json', {**totals, 'checkpoint': info, 'stride': args.stride, 'seed': args.seed})
    return [args.out + ext for ext in ('.csv', '.png', '.json')]


FIG5 = ('Fig. 5: rate (bits/dim) and distortion (RMSE, 0-255) along the reverse chain', add_fig5, run_fig5)
