"""The paper's (Ho et al. 2020) tables and figures, one subcommand each; the code is in the library.

    python paper.py table2 --dataset folder --data_dir /tmp/cifar10/cifar10-jpeg --steps 500
        Table 2: every (prediction, objective, variance) row trained on the same data and budget,
        bits/dim on test images and FID-k beside the paper's IS / FID (training/ablations.py).
    python paper.py fig5 --checkpoint checkpoints/ddpm_latest.pth --dataset folder --data_dir ...
        Fig. 5: rate (bits/dim) and distortion (RMSE, 0-255) along the reverse chain, as a CSV and a
        three-panel PNG (metrics/rate_distortion.py; the plot needs matplotlib, bench/requirements.txt).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from data.process_cifar import DATASETS, load_dataset
from runtime import HelpFormatter, OneLineErrorParser, add_runtime_options, resolve_device, run_cli, write_json
from sampling.generate import load_model
from sampling.samplers import SAMPLERS


def test_and_train_images(args, train_count):
    """uint8 [N, H, W, C] test images (the first args.num_images) and `train_count` seeded training images."""
    test = load_dataset(args.dataset, args.data_dir, train=False)[:args.num_images]
    train = None
    if train_count:
        images = load_dataset(args.dataset, args.data_dir, train=True)
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:train_count]
        train = np.ascontiguousarray(images[pick].permute(0, 2, 3, 1).numpy())
    return np.ascontiguousarray(test.permute(0, 2, 3, 1).numpy()), train


def check_counts(args, names):
    """A one-line ValueError for a count that must be a positive integer."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f'--{name} must be a positive integer, got {getattr(args, name)}')


def run_table2(args):
    from train import train_ddpm
    from training.ablations import fid_scorer, format_table2, make_scorer, run_table2 as run_rows, select_rows
    select_rows(args.rows)   # an unknown row fails before any work
    check_counts(args, ('steps', 'batch_size', 'num_images', 'fid_ref_images', 'sample_steps'))
    if args.fid_samples and not (args.fid_weights and os.path.isfile(args.fid_weights)):
        raise FileNotFoundError(f'--fid_samples {args.fid_samples} needs --fid_weights, an existing Inception file '
                                f'(got {args.fid_weights!r}); or pass --fid_samples 0 for bits/dim only')
    device = str(resolve_device(args.device))
    test, train = test_and_train_images(args, args.fid_ref_images if args.fid_samples else 0)
    fid_score = fid_scorer(train, args.fid_weights, device) if args.fid_samples else None
    score = make_scorer(test, fid_score, args.fid_samples, args.sampler, args.sample_steps,
                        args.seed, device)
    common = dict(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, max_steps=args.steps,
                  num_epochs=10 ** 6, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                  ema_decay=args.ema_decay, seed=args.seed, device=device, amp='fp32', num_samples=0,
                  save_every=10 ** 6, sample_every=10 ** 6, log_every=50, resume='latest')
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.time()
    results = run_rows(train_ddpm, score, common, args.out_dir, args.rows)
    table = format_table2(results, args.fid_samples)
    write_json(os.path.join(args.out_dir, 'table2.json'),
               {'options': vars(args), 'results': results, 'seconds': round(time.time() - start, 1)})
    with open(os.path.join(args.out_dir, 'table2.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    return 0


def run_fig5(args):
    from metrics.rate_distortion import plot, rate_distortion, summary, write_csv
    check_counts(args, ('num_images', 'stride', 'batch_size'))
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    device = str(resolve_device(args.device))
    model, info = load_model(args.checkpoint, ema=args.ema, device=device)
    test, _ = test_and_train_images(args, 0)
    result = rate_distortion(model, test, args.stride, args.batch_size, device, args.seed, not args.quiet)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(result, args.out + '.csv')
    totals = summary(result)
    title = (f"{os.path.basename(args.checkpoint)} (step {info['step']}, {'EMA' if info['ema'] else 'raw'}), "
             f"{totals['num_images']} test images: rate {totals['rate_bpd']:.2f}, distortion "
             f"{totals['distortion_bpd']:.2f} bits/dim")
    plot(result, args.out + '.png', title)
    write_json(args.out + '.json', {**totals, 'checkpoint': info, 'stride': args.stride, 'seed': args.seed})
    print(json.dumps(totals))
    return 0


def build_parser():
    parser = OneLineErrorParser(description=__doc__.split('\n')[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    for name, helptext in (('table2', 'Table 2: the prediction / objective / variance ablation'),
                           ('fig5', 'Fig. 5: rate and distortion along the reverse chain')):
        p = sub.add_parser(name, help=helptext, formatter_class=HelpFormatter)
        p.add_argument('--dataset', choices=DATASETS, default='cifar10', help='where the (test) images come from')
        p.add_argument('--data_dir', default='data', help='CIFAR-10 folder, or the image folder (train/ and test/)')
        p.add_argument('--seed', type=int, default=0)
        add_runtime_options(p)
    t2, f5 = sub.choices['table2'], sub.choices['fig5']
    t2.add_argument('--rows', nargs='+', default=None, help='row names (e.g. eps_L_simple); default: all six')
    t2.add_argument('--steps', type=int, default=500, help='optimizer steps per row')
    t2.add_argument('--arch', default='tiny', help="the U-Net of every row ('tiny', 'base', 'ddpm-paper')")
    t2.add_argument('--batch_size', type=int, default=64)
    t2.add_argument('--lr', type=float, default=2e-4)
    t2.add_argument('--warmup_steps', type=int, default=100)
    t2.add_argument('--ema_decay', type=float, default=0.995, help='short runs need a short EMA')
    t2.add_argument('--num_images', type=int, default=200, help='test images for bits/dim (8 KL terms each)')
    t2.add_argument('--fid_samples', type=int, default=500, help='samples per row for FID-k (0: no FID)')
    t2.add_argument('--fid_ref_images', type=int, default=5000, help='training images FID compares against')
    t2.add_argument('--fid_weights', default=None, help='Inception weights file (e.g. inception-2015-12-05-nv.pt)')
    t2.add_argument('--sampler', choices=SAMPLERS, default='dpm-solver')
    t2.add_argument('--sample_steps', type=int, default=20)
    t2.add_argument('--out_dir', default='runs/table2')
    f5.add_argument('--checkpoint', required=True)
    f5.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                    help='EMA weights (default: when present)')
    f5.add_argument('--num_images', type=int, default=100, help='test images')
    f5.add_argument('--stride', type=int, default=1, help='every stride-th step (1: all T, exact)')
    f5.add_argument('--batch_size', type=int, default=100)
    f5.add_argument('--out', default='runs/fig5', help='writes OUT.csv, OUT.png and OUT.json')
    return parser


def main(argv=None):
    parser = build_parser()
    return run_cli(parser, lambda args: {'table2': run_table2, 'fig5': run_fig5}[args.command](args), argv)


if __name__ == '__main__':
    sys.exit(main())
