"""The paper's Table 2 (Ho et al. 2020): what the network predicts x the training objective x the variance.

Each row trains the same net on the same data and budget with one combination of options, then is scored
by bits/dim on test images (the variational bound, `bits_per_dim`) and by FID-k of its EMA model's samples
against the training images. The paper reports IS / FID (50k samples, CIFAR-10, 800k steps); its values
stand beside ours, and its two blank rows ("unstable to train") are the rows we expect to diverge. A row
whose training stops on non-finite losses, or whose bound or samples are not finite, is reported as
diverged, never dropped.

Fixed isotropic Sigma is sigma_t^2 = beta_t here, the paper's CIFAR-10 choice (its section 4).
"""

import argparse
import hashlib
import math
import os
import time

import numpy as np
import torch

from data.process_cifar import load_dataset

from metrics.bpd import bits_per_dim
from metrics.fid import (INCEPTION, cached_statistics, extract_features, feature_statistics, frechet_distance,
                         load_feature_extractor)
from metrics.rate_distortion import add_data_options
from runtime import resolve_device, write_json
from sampling.generate import SampleRun, generate
from sampling.options import SAMPLERS, SampleOptions

# (name, DDPM options, the paper's (IS, IS std, FID) or None where its Table 2 says unstable)
TABLE2_ROWS = (
    ('mu, L, learned diagonal', dict(prediction='mu', loss='vlb', variance='learned'), (7.28, 0.10, 23.69)),
    ('mu, L, fixed isotropic', dict(prediction='mu', loss='vlb', variance='beta'), (8.06, 0.09, 13.22)),
    ('mu, MSE (||mu~ - mu_theta||^2)', dict(prediction='mu', loss='simple', variance='beta'), None),
    ('eps, L, learned diagonal', dict(prediction='eps', loss='vlb', variance='learned'), None),
    ('eps, L, fixed isotropic', dict(prediction='eps', loss='vlb', variance='beta'), (7.67, 0.13, 13.51)),
    ('eps, L_simple', dict(prediction='eps', loss='simple', variance='beta'), (9.46, 0.11, 3.17)),
)
ROW_NAMES = tuple(name for name, _, _ in TABLE2_ROWS)
# The paper's Table 1 NLL (test, bits/dim) of the two rows that have one.
PAPER_NLL = {'eps, L, fixed isotropic': 3.70, 'eps, L_simple': 3.75}


def row_key(name):
    """A folder name for a row, its name before any parenthesis: 'eps, L_simple' -> 'eps_L_simple'."""
    return '_'.join(''.join(c if c.isalnum() or c == '_' else ' ' for c in name.split(' (')[0]).split())


def select_rows(names=None):
    """The Table 2 rows named (all when None); a one-line ValueError for an unknown name."""
    if not names:
        return TABLE2_ROWS
    by_key = {row_key(name): row for row in TABLE2_ROWS for name in [row[0]]}
    unknown = [n for n in names if row_key(n) not in by_key]
    if unknown:
        raise ValueError(f'unknown Table 2 row {unknown[0]!r}; rows: {", ".join(row_key(n) for n in ROW_NAMES)}')
    return tuple(by_key[row_key(n)] for n in names)


def fid_scorer(train_images, weights, device='cpu'):
    """score(samples uint8 [N, H, W, C]) -> FID against `train_images` (uint8 [N, H, W, C]), whose statistics
    are cached on disk by their content (fid.cached_statistics)."""
    extractor, fid_layer, _ = load_feature_extractor(INCEPTION, weights, device)
    ref_id = f'table2-{hashlib.sha256(train_images).hexdigest()[:12]}'
    ref = cached_statistics(ref_id, train_images, extractor, fid_layer, device=device, progress=False,
                            source=f'{len(train_images)} training images')[:2]

    def score(samples):
        features = extract_features(samples, extractor, 250, device, progress=False)[fid_layer]
        return frechet_distance(*feature_statistics(features), *ref)
    return score


def make_scorer(test_images, fid_score, fid_samples, sampler, steps, seed, device):
    """score(model) -> (bits/dim dict, FID or None, samples finite?). Bits/dim: the unclipped bound,
    8 KL terms per image; FID: `fid_samples` samples of `sampler` in `steps` steps, by `fid_score`, with
    x_0_pred clipped to [-1, 1] as the paper's sampler does (unclipped, a barely trained mu-tilde
    model's DPM-Solver++ samples overflow: its eps = (x_t - sqrt(alpha_t) mu) sqrt(1 - a-bar_t) / beta_t
    magnifies the network's error)."""
    def score(model):
        bpd = bits_per_dim(model, test_images, mode='estimate', t_samples=8, batch_size=100, device=device,
                           seed=seed, progress=False, clip_denoised=False)
        if not fid_samples:
            return bpd, None, True
        # generate clamps to [-1, 1] on the way to uint8, which hides NaN: check two samples of our own
        probe = model.sample(2, device=device, sampler=sampler, steps=steps, progress=False, clip_denoised=True,
                             generator=torch.Generator().manual_seed(seed))
        if not bool(torch.isfinite(probe).all()):
            return bpd, None, False
        samples = generate(model, SampleOptions(sampler=sampler, steps=steps, clip_denoised=True),
                           SampleRun(num_samples=fid_samples, batch_size=min(250, fid_samples), seed=seed, amp='fp32'),
                           device=device, progress=False)
        return bpd, fid_score(samples), True
    return score


def run_row(train_fn, name, options, train_options, out_dir):
    """Train one row; returns (EMA model or None, train record). A FloatingPointError (the loop's stop after
    repeated non-finite losses) is the row diverging."""
    start = time.time()
    folder = os.path.join(out_dir, row_key(name))
    try:
        model = train_fn(**{**train_options, **options, 'checkpoint_dir': folder,
                            'log_dir': os.path.join(out_dir, 'runs'), 'run_name': row_key(name)})
    except FloatingPointError as e:
        return None, {'diverged': True, 'why': str(e), 'train_seconds': round(time.time() - start, 1)}
    stats = getattr(model, 'train_stats', {})
    return model, {'diverged': False, 'steps': stats.get('step'), 'nan_skipped': stats.get('nan_skipped'),
                   'train_seconds': round(time.time() - start, 1),
                   'checkpoint': os.path.join(folder, 'ddpm_latest.pth')}


def run_table2(train_fn, score, train_options, out_dir, rows=None, say=print):
    """Train and score every Table 2 row (or `rows`); returns one result dict per row.

    train_fn: train.train_ddpm (passed in: a library module does not import an entry point);
    score: `make_scorer`'s; train_options: the keywords every row shares (data, budget, net).
    """
    results = []
    for name, options, paper in select_rows(rows):
        say(f'--- Table 2 row: {name} ({options})')
        model, record = run_row(train_fn, name, options, train_options, out_dir)
        record.update(row=name, options=options, paper=paper, paper_nll=PAPER_NLL.get(name))
        if model is not None:
            bpd, fid, finite = score(model)
            record.update(bpd=bpd['bpd'], bpd_stderr=bpd['bpd_stderr'], fid=fid, samples_finite=finite,
                          bpd_images=bpd['num_images'])
            record['diverged'] = not (finite and math.isfinite(bpd['bpd']))
        say(format_row(record))
        results.append(record)
    return results


def format_row(r):
    """One markdown table row of a result."""
    paper, name = r['paper'], r['row'].replace('|', '\\|')   # a markdown cell may not hold a bare |
    paper_text = 'unstable' if paper is None else f'{paper[0]:.2f} ± {paper[1]:.2f} / {paper[2]:.2f}'
    nll = f"{r['paper_nll']:.2f}" if r.get('paper_nll') else '-'
    if r['diverged'] and r.get('bpd') is None:
        ours = 'diverged (training stopped on non-finite losses)'
        return f"| {name} | {ours} | | | {paper_text} | {nll} |"
    fid = f"{r['fid']:.1f}" if r.get('fid') is not None else '-'
    state = ('diverged (samples not finite)' if not r.get('samples_finite', True) else
             'diverged (bound not finite)' if r['diverged'] else 'trained')
    return (f"| {name} | {state}, {r['steps']} steps, {r['train_seconds']:.0f} s | "
            f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f} | {fid} | {paper_text} | {nll} |")


def format_table2(results, fid_samples):
    """The whole table, markdown, with the header naming what each column measured."""
    head = (f'| row | training | bits/dim (test, ours) | FID-{fid_samples} (ours) | paper IS / FID (50k) | '
            f'paper NLL |\n|---|---|---|---|---|---|')
    return '\n'.join([head] + [format_row(r) for r in results])



# ----- paper.py table2 ----------------------------------------------------------------------------

def check_counts(args, names):
    """A one-line ValueError for a count that must be a positive integer."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f'--{name} must be a positive integer, got {getattr(args, name)}')


def load_split(args, train, count):
    """uint8 [N, H, W, C]: the first `count` test images, or `count` seeded training images."""
    images = load_dataset(args.dataset, args.data_dir, train=train)
    if train:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:count]]
    return np.ascontiguousarray(images[:count].permute(0, 2, 3, 1).numpy())


def add_table2(p):
    add_data_options(p)
    p.add_argument('--rows', nargs='+', default=None, help='row names (e.g. eps_L_simple); default: all six')
    p.add_argument('--steps', type=int, default=500, help='optimizer steps per row')
    p.add_argument('--arch', default='tiny', help="the U-Net of every row ('tiny', 'base', 'ddpm-paper')")
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--lr', type=float, default=2e-4)
    p.add_argument('--warmup_steps', type=int, default=100)
    p.add_argument('--ema_decay', type=float, default=0.995, help='short runs need a short EMA')
    p.add_argument('--num_images', type=int, default=200, help='test images for bits/dim (8 KL terms each)')
    p.add_argument('--fid_samples', type=int, default=500, help='samples per row for FID-k (0: no FID)')
    p.add_argument('--fid_ref_images', type=int, default=5000, help='training images FID compares against')
    p.add_argument('--fid_weights', default=None, help='Inception weights file (e.g. inception-2015-12-05-nv.pt)')
    p.add_argument('--sampler', choices=SAMPLERS, default='dpm-solver')
    p.add_argument('--sample_steps', type=int, default=20)
    p.add_argument('--out_dir', default='runs/table2')


def run_table2_command(args, train_fn):
    """paper.py table2: train and score the rows, print the table; returns the files written."""
    select_rows(args.rows)   # an unknown row fails before any work
    check_counts(args, ('steps', 'batch_size', 'num_images', 'fid_ref_images', 'sample_steps'))
    if args.fid_samples and not (args.fid_weights and os.path.isfile(args.fid_weights)):
        raise FileNotFoundError(f'--fid_samples {args.fid_samples} needs --fid_weights, an existing Inception file '
                                f'(got {args.fid_weights!r}); or pass --fid_samples 0 for bits/dim only')
    device = str(resolve_device(args.device))
    test = load_split(args, False, args.num_images)
    fid_score = fid_scorer(load_split(args, True, args.fid_ref_images), args.fid_weights, device) \
        if args.fid_samples else None
    score = make_scorer(test, fid_score, args.fid_samples, args.sampler, args.sample_steps, args.seed, device)
    common = dict(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, max_steps=args.steps,
                  num_epochs=10 ** 6, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                  ema_decay=args.ema_decay, seed=args.seed, device=device, amp='fp32', num_samples=0,
                  save_every=10 ** 6, sample_every=10 ** 6, log_every=50, resume='latest')
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.time()
    results = run_table2(train_fn, score, common, args.out_dir, args.rows)
    table = format_table2(results, args.fid_samples)
    paths = [os.path.join(args.out_dir, 'table2.json'), os.path.join(args.out_dir, 'table2.md')]
    options = {k: v for k, v in vars(args).items() if not callable(v)}   # (paper.py's dispatch adds `run`)
    write_json(paths[0], {'options': options, 'results': results, 'seconds': round(time.time() - start, 1)})
    with open(paths[1], 'w') as f:
        f.write(table + '\n')
    print(table)
    return paths


def table2_subcommand(train_fn):
    """paper.py's (help, add_arguments, run) entry for table2; train_fn is train.train_ddpm."""
    return ('Table 2: the prediction / objective / variance ablation, trained and scored',
            add_table2, lambda args: run_table2_command(args, train_fn))
