"""Bits/dim of the Improved DDPM options at an equal training budget (Nichol & Dhariwal 2021).

Trains the tiny U-Net once per variant with the same data, seed, batch, learning rate and number of
steps (train.py, one CPU thread each, run one after another), then measures the variational bound
in bits/dim of every checkpoint on the same test images with the same noise and the same sampled t
(evaluate.py --bpd --bpd_mode estimate --no-bpd_clip, seed 0), and prints one table. A variant whose checkpoint
already exists is not trained again.

    python bench/bench_iddpm.py --data_dir /tmp/cifar10/cifar10-jpeg --images /tmp/w16/test256.npz \\
        --out /tmp/w16 --max_steps 150

--images: uint8 [N, 32, 32, 3] test images (.npz) or an image folder.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    'linear': [],                                              # Ho et al. 2020: the paper's setup
    'cosine': ['--beta_schedule', 'cosine'],                   # iDDPM Eq. 17
    'hybrid': ['--learn_sigma', '--loss', 'hybrid'],           # iDDPM Eq. 15-16, linear schedule
    'cosine-hybrid': ['--beta_schedule', 'cosine', '--learn_sigma', '--loss', 'hybrid'],
    'vlb-is': ['--learn_sigma', '--loss', 'vlb', '--importance_sampling'],   # iDDPM section 3.3
}


def train_command(args, name):
    return [sys.executable, os.path.join(ROOT, 'train.py'), '--arch', 'tiny', '--dataset', 'folder',
            '--data_dir', args.data_dir, '--device', 'cpu', '--batch_size', str(args.batch_size), '--lr', str(args.lr),
            '--warmup_steps', str(args.warmup_steps), '--max_steps', str(args.max_steps), '--num_samples', '0',
            '--amp', 'fp32', '--log_every', '10', '--log_dir', os.path.join(args.out, 'runs'),
            '--checkpoint_dir', os.path.join(args.out, f'ckpt_{name}'), '--run_name', name] + VARIANTS[name]


def bpd_command(args, checkpoint, result):
    return [sys.executable, os.path.join(ROOT, 'evaluate.py'), '--checkpoint', checkpoint, '--bpd',
            '--bpd_data', args.images, '--bpd_mode', 'estimate', '--t_samples', str(args.t_samples),
            '--bpd_batch_size', '128', '--seed', '0', '--device', 'cpu', '--json', result,
            '--bpd_clip' if args.bpd_clip else '--no-bpd_clip']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data_dir', required=True, help='image folder with train/ (the offline CIFAR-10 copy)')
    p.add_argument('--images', required=True, help='test images for bits/dim (.npz or folder)')
    p.add_argument('--out', required=True, help='checkpoints, logs and results go here')
    p.add_argument('--variants', nargs='+', default=['linear', 'cosine', 'hybrid'], choices=sorted(VARIANTS))
    p.add_argument('--max_steps', type=int, default=150)
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--warmup_steps', type=int, default=20)
    p.add_argument('--t_samples', type=int, default=20)
    p.add_argument('--bpd_clip', action=argparse.BooleanOptionalAction, default=False,
                   help='clip the predicted x_0 in the bound (evaluate.py\'s default); the table in '
                        'bench/RESULTS.md is the unclipped bound')
    args = p.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    rows = []
    for name in args.variants:
        checkpoint = os.path.join(args.out, f'ckpt_{name}', 'ddpm_latest.pth')
        if not os.path.exists(checkpoint):
            print('$', ' '.join(train_command(args, name)), flush=True)
            subprocess.run(train_command(args, name), check=True, env=env, stdout=subprocess.DEVNULL)
        result = os.path.join(args.out, f'bpd_{name}{"-clip" if args.bpd_clip else ""}.json')
        print('$', ' '.join(bpd_command(args, checkpoint, result)), flush=True)
        subprocess.run(bpd_command(args, checkpoint, result), check=True, env=env)
        with open(result) as f:
            r = next(iter(json.load(f).values()))["results"]
        rows.append((name, r))
    print(f'\n| variant | bits/dim | +- stderr | prior | KL terms | decoder | images |')
    print('|---|---|---|---|---|---|---|')
    for name, r in rows:
        print(f'| {name} | {r["bpd"]:.3f} | {r["bpd_stderr"]:.3f} | {r["prior_bpd"]:.4f} | {r["kl_terms_bpd"]:.3f} '
              f'| {r["decoder_bpd"]:.3f} | {r["num_images"]} |')


if __name__ == '__main__':
    main()
