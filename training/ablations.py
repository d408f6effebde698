"""The paper's Table 2 (Ho et al. 2020): what the network predicts x the training objective x the variance.

Each row trains the same net on the same data and budget with one combination of options, then is scored
by bits/dim on test images (the variational bound, `bits_per_dim`) and by FID-k of its EMA model's samples
against the training images. The paper reports IS / FID (50k samples, CIFAR-10, 800k steps); its values
stand beside ours, and its two blank rows ("unstable to train") are the rows we expect to diverge. A row
whose training stops on non-finite losses, or whose bound or samples are not finite, is reported as
diverged, never dropped.

Fixed isotropic Sigma is sigma_t^2 = beta_t here, the paper's CIFAR-10 choice (its section 4).
"""

import hashlib
import math
import os
import time

import torch

from metrics.bpd import bits_per_dim
from metrics.fid import (INCEPTION, cached_statistics, extract_features, feature_statistics, frechet_distance,
                         load_feature_extractor)
from sampling.generate import generate

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
        samples = generate(model, fid_samples, min(250, fid_samples), sampler, steps, 0.0, seed, device,
                           progress=False, clip_denoised=True)
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

