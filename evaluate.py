"""Score a DDPM the way the paper does: FID / Inception Score of samples, and NLL in bits/dim.

    python evaluate.py --checkpoint ckpt.pth --fid --num_samples 50000          # samples, then FID + IS
    python evaluate.py --samples samples.npz --fid                               # score existing samples
    python evaluate.py --checkpoint ckpt.pth --bpd --bpd_mode exact              # NLL on the CIFAR-10 test set
    python evaluate.py --checkpoint ckpt.pth --bpd --bpd_mode estimate --num_images 1000

FID and IS use torch-fidelity's Inception-v3: the TF-Inception (2015-12-05)
weights and TF1-style bilinear resize to 299x299 that the original TF code,
pytorch-fid and the paper's numbers use. One pass over the samples gives the
2048-d pool features (FID, KID) and the logits (IS). The reference statistics
(mu, sigma of the CIFAR-10 training set's features) are computed once and
cached as an .npz in the same format pytorch-fid / TTUR use, so precomputed
ones can be passed with --ref_stats.

Offline: pass --inception_weights for a local copy of the Inception weights,
and a local CIFAR-10 (--data_dir), image folder or .npz (--ref), or --ref_stats.

bits/dim follows the variational bound, Eq. (5) of Ho et al. 2020:
    L = L_T (prior) + sum_{t=2..T} L_{t-1} (KL terms) + L_0 (discretised decoder at t = 1),
either exactly (all T terms per image) or as an unbiased estimate that keeps
L_T and L_0 exact and samples the T-1 KL terms at uniform t. Both report the
mean over images and its standard error.

Results are printed and merged into <checkpoint>.eval.json (or <samples>.eval.json).
"""

import argparse
import contextlib
import datetime
import hashlib
import io
import math
import os
import sys
import time

import numpy as np
import torch

from checkpoint import load_model
from data.image_folder import list_images, read_image_folder, read_npz_images
from data.process_cifar import to_model_range
from runtime import (HelpFormatter, add_runtime_options, atomic_write, file_sha256, read_json, resolve_device, run_cli,
                     write_json)
from sample import batch_seed, resolve_steps, sample_checkpoint
from samplers import DEFAULT_DDIM_STEPS, DEFAULT_DPM_SOLVER_STEPS, SAMPLERS, SPACINGS, resolve_spacing

INCEPTION = 'inception-v3-compat'
INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'
INCEPTION_URL = f'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}'
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
PAPER_NUM_SAMPLES = 50_000


class EvalError(ValueError):
    """A problem with the inputs of an evaluation; the message says what to do."""


# ----- images ---------------------------------------------------------------------------------

def load_images(source, data_dir='data', train=True, image_size=32):
    """uint8 [N, H, W, 3] from a .npz, an image folder, or a dataset name known to data/process_cifar.py.

    A dataset name ('cifar10') reads the training split when `train`, else the test split.
    """
    if os.path.isfile(source):
        if not source.endswith('.npz'):
            raise EvalError(f'{source}: expected an .npz of uint8 images or an image folder')
        return read_npz_images(source)
    if os.path.isdir(source):
        return read_image_folder(source)
    split = 'train' if train else 'test'
    from data.process_cifar import load_dataset   # looked up at call time (tests swap in a stand-in)
    try:
        images = load_dataset(source, data_dir, image_size=image_size, train=train)
    except Exception as e:  # for CIFAR-10 typically a failed download: no network
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if source != 'cifar10':
            raise EvalError(f'cannot read dataset {source!r} ({split} split) from {data_dir}: {reason}') from None
        raise EvalError(f'{reason} [CIFAR-10 {split} split: download {CIFAR10_URL} into {data_dir}/, or pass an '
                        f'image folder or .npz' + (' or --ref_stats STATS.npz]' if train else ']')) from None
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def source_fingerprint(source):
    """A short id of an image source for cache names: content-based for files, listing-based for folders."""
    if os.path.isfile(source):
        hexdigest = file_sha256(source)
    elif os.path.isdir(source):
        digest = hashlib.sha256()
        for path in list_images(source):
            st = os.stat(path)
            digest.update(f'{os.path.relpath(path, source)}:{st.st_size}:{st.st_mtime_ns};'.encode())
        hexdigest = digest.hexdigest()
    else:
        return source
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    return f'{name}-{hexdigest[:12]}'


# ----- features (torch-fidelity) ---------------------------------------------------------------

def load_feature_extractor(name=INCEPTION, weights=None, device='cpu', verbose=False):
    """A torch-fidelity feature extractor and the feature names it uses for FID and IS (None if it has none).

    `name` is any extractor registered with torch-fidelity (its Inception-v3 by
    default). For Inception, `weights` is a local weights file; without it the
    file is taken from torch.hub's cache or downloaded once.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(f'unknown feature extractor {name!r}; torch-fidelity has {sorted(FEATURE_EXTRACTORS_REGISTRY)}')
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    fid_layer = cls.get_default_feature_layer_for_metric('fid')
    try:
        isc_layer = cls.get_default_feature_layer_for_metric('isc')
    except (KeyError, NotImplementedError, ValueError):
        isc_layer = None
    layers = [fid_layer] + ([isc_layer] if isc_layer and isc_layer != fid_layer else [])
    kwargs = {'verbose': verbose}
    if weights is not None:
        if not os.path.isfile(weights):
            raise EvalError(f'feature extractor weights not found: {weights}')
        try:  # torch-fidelity loads the file with weights_only=False; refuse anything but tensors first
            torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:
            raise EvalError(f'{weights} is not a plain weights file ({type(e).__name__}); for {INCEPTION} '
                            f'download {INCEPTION_URL}') from None
        kwargs['feature_extractor_weights_path'] = weights
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # torch.hub's 'Downloading: ...' line
            extractor = cls(name, layers, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError: no network and no cached copy
        if name != INCEPTION:
            raise EvalError(f'cannot load feature extractor {name!r}: {e}') from None
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', INCEPTION_FILE)
        raise EvalError(f'the Inception weights for FID/IS are not available offline ({type(e).__name__}): download '
                        f'{INCEPTION_URL} and pass --inception_weights PATH (or put it at {cached})') from None
    extractor.requires_grad_(False).eval().to(device)
    return extractor, fid_layer, isc_layer


@torch.no_grad()
def extract_features(images, extractor, batch_size=250, device='cpu', progress=True):
    """Run the extractor over uint8 [N, H, W, C] images; returns {feature name: float64 [N, D]}."""
    out = {}
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f'features ({extractor.get_name()})', unit='batch', leave=False)
    for start in starts:
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        features = extractor.convert_features_tuple_to_dict(extractor(x.to(device)))
        for name, value in features.items():
            out.setdefault(name, []).append(value.double().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def feature_statistics(features):
    """mu and sigma (the unbiased covariance) of [N, D] features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvalError(f'need at least 2 images for FID statistics, got features shaped {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is computed as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix A sigma2 A with A = sigma1^(1/2),
    which has the same eigenvalues as sigma1 sigma2 but no complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
                        f'{sigma2.shape} (were they computed with the same feature extractor?)')
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def default_cache_dir():
    return os.path.join(os.path.dirname(torch.hub.get_dir()), 'ddpm_fid_stats')


def reference_statistics(ref='cifar10', data_dir='data', extractor=None, fid_layer=None, cache_dir=None,
                         batch_size=250, device='cpu', with_features=False, progress=True):
    """mu, sigma (and, if asked, the features) of the reference images, computed once and cached.

    ref: 'cifar10' (the training split in data_dir), an image folder, or an .npz.
    The cache file (an .npz with mu and sigma, as pytorch-fid writes) is named
    after the reference, the feature extractor and the layer.
    """
    cache_dir = cache_dir or default_cache_dir()
    ref_id = 'cifar10-train' if ref == 'cifar10' else source_fingerprint(ref)
    stem = os.path.join(cache_dir, f'{ref_id}-{extractor.get_name()}-{fid_layer}')
    stats_path, features_path = f'{stem}-stats.npz', f'{stem}-features.npy'
    if os.path.exists(stats_path) and (not with_features or os.path.exists(features_path)):
        if progress:
            print(f'reference statistics: {stats_path} (cached)', file=sys.stderr)
        mu, sigma, count = load_stats(stats_path)
        features = np.load(features_path) if with_features else None
        return mu, sigma, count, features, stats_path
    images = load_images(ref, data_dir, train=True)
    if progress:
        print(f'computing reference statistics of {len(images)} images from {ref} (once; cached in {cache_dir})',
              file=sys.stderr)
    features = extract_features(images, extractor, batch_size, device, progress)[fid_layer]
    mu, sigma = feature_statistics(features)
    atomic_write(stats_path, lambda f: np.savez(f, mu=mu, sigma=sigma, count=len(images), source=str(ref),
                                                 feature_extractor=extractor.get_name(), layer=fid_layer))
    if with_features:
        atomic_write(features_path, lambda f: np.save(f, features.astype(np.float32)))
    return mu, sigma, len(images), (features if with_features else None), stats_path


def load_stats(path):
    """mu, sigma, count from a statistics .npz (ours, or pytorch-fid / TTUR's 'mu' and 'sigma')."""
    if not os.path.isfile(path):
        raise EvalError(f'reference statistics not found: {path}')
    with np.load(path) as data:
        if 'mu' not in data.files or 'sigma' not in data.files:
            raise EvalError(f'{path} has no mu / sigma arrays (found {data.files}); expected FID statistics '
                            f'as pytorch-fid writes them')
        count = int(data['count']) if 'count' in data.files else None
        return data['mu'].astype(np.float64), data['sigma'].astype(np.float64), count


def image_metrics(images, extractor, fid_layer, isc_layer, ref_stats, ref_features=None, batch_size=250,
                  device='cpu', progress=True, isc_splits=10, seed=2020):
    """FID (and IS when the extractor has logits, KID when ref_features are given) of uint8 [N, H, W, C] images.

    ref_stats: (mu, sigma) of the reference images' `fid_layer` features.
    IS and KID are torch-fidelity's own implementations, fed the same features.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    features = extract_features(images, extractor, batch_size, device, progress)
    mu, sigma = feature_statistics(features[fid_layer])
    results = {'fid': frechet_distance(mu, sigma, *ref_stats), 'num_samples': int(len(images))}
    if isc_layer is not None:
        isc = isc_features_to_metric(torch.from_numpy(features[isc_layer]), splits=isc_splits, shuffle=True,
                                     rng_seed=seed)
        results.update(isc_mean=isc['inception_score_mean'], isc_std=isc['inception_score_std'])
    if ref_features is not None:
        subset = min(1000, len(images), len(ref_features))
        kid = kid_features_to_metric(torch.from_numpy(features[fid_layer]), torch.from_numpy(
            np.asarray(ref_features, dtype=np.float64)), kid_subsets=100, kid_subset_size=subset, rng_seed=seed,
            verbose=False)
        results.update(kid_mean=kid['kernel_inception_distance_mean'], kid_std=kid['kernel_inception_distance_std'],
                       kid_subset_size=subset)
    return results


# ----- bits/dim -------------------------------------------------------------------------------

@torch.inference_mode()
def bits_per_dim(model, images, mode='exact', t_samples=1, batch_size=100, device='cpu', seed=0, progress=True,
                 clip_denoised=True):
    """NLL upper bound in bits/dim of uint8 [N, H, W, C] images by the variational bound, Eq. (5).

    mode 'exact': per image, L_T + sum over all T terms (the T-1 KL terms and
        the decoder L_0), each at one x_t ~ q(x_t | x_0).
    mode 'estimate': per image, L_T + L_0 + (T-1) * the mean of `t_samples`
        KL terms at t uniform over the T-1 KL steps: unbiased for the same bound.
    clip_denoised: p_theta's mean from the x_0 prediction clipped to [-1, 1], as the
        paper's code computes the published 3.70-3.75 (see DDPM.vb_term_bpd).
    Returns mean and standard error over images (they include the Monte Carlo
    noise of x_t and of t), and the mean prior / KL / decoder parts. The network
    runs in fp32: the small-t KL terms are differences of nearly equal numbers.
    """
    if mode not in ('exact', 'estimate'):
        raise EvalError(f"bpd mode must be 'exact' or 'estimate', got {mode!r}")
    if t_samples < 1:
        raise EvalError(f't_samples must be at least 1, got {t_samples}')
    if tuple(images.shape[1:]) != (model.image_shape[1], model.image_shape[2], model.image_shape[0]):
        raise EvalError(f'images are {list(images.shape[1:])} (H, W, C) but the model makes '
                        f'{list(model.image_shape)} (C, H, W)')
    model.to(device).eval()
    T = model.timesteps
    passes = T if mode == 'exact' else 1 + (t_samples if T > 1 else 0)
    starts = list(range(0, len(images), batch_size))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts) * passes, desc=f'bits/dim ({mode})', unit='pass', leave=False)
    totals, priors, kls, decoders, term_sums = [], [], [], [], torch.zeros(T, dtype=torch.float64)
    for b, start in enumerate(starts):
        x_0 = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        x_0 = to_model_range(x_0).to(device)
        n = x_0.shape[0]
        generator = torch.Generator().manual_seed(batch_seed(seed, b))

        def term(t):
            noise = torch.randn(x_0.shape, generator=generator).to(device)
            return model.vb_term_bpd(x_0, model.q_sample(x_0, t, noise), t, clip_denoised).double().cpu()

        prior = model.prior_bpd(x_0).double().cpu()
        decoder = term(torch.zeros(n, dtype=torch.long, device=device))
        if bar is not None:
            bar.update(1)
        kl = torch.zeros(n, dtype=torch.float64)
        if mode == 'exact':
            term_sums[0] += decoder.sum()
            for step in range(1, T):
                value = term(torch.full((n,), step, dtype=torch.long, device=device))
                kl += value
                term_sums[step] += value.sum()
                if bar is not None:
                    bar.update(1)
        else:
            for _ in range(t_samples if T > 1 else 0):
                t = torch.randint(1, T, (n,), generator=generator).to(device)
                kl += term(t)
                if bar is not None:
                    bar.update(1)
            kl = kl * (T - 1) / t_samples
        totals.append(prior + kl + decoder)
        priors.append(prior)
        kls.append(kl)
        decoders.append(decoder)
    if bar is not None:
        bar.close()
    total = torch.cat(totals).numpy()
    count = len(total)
    result = {
        'bpd': float(total.mean()),
        'bpd_stderr': float(total.std(ddof=1) / math.sqrt(count)) if count > 1 else float('nan'),
        'prior_bpd': float(torch.cat(priors).mean()),
        'kl_terms_bpd': float(torch.cat(kls).mean()),
        'decoder_bpd': float(torch.cat(decoders).mean()),
        'num_images': count,
        'mode': mode,
        'timesteps': T,
        'clip_denoised': bool(clip_denoised),
    }
    if mode == 'exact':
        result['terms_bpd'] = (term_sums / count).tolist()   # mean L_{t-1} at code t = 0..T-1 (t = 0: decoder)
    else:
        result['t_samples'] = t_samples
    return result


# ----- results file ---------------------------------------------------------------------------

def result_key(metric, options):
    return metric + ' ' + ' '.join(f'{k}={options[k]}' for k in sorted(options))


def record(path, metric, options, results):
    """Merge one result into the JSON file at `path`, keyed by metric and options; returns the key."""
    data = read_json(path) if os.path.exists(path) else {}
    if not isinstance(data, dict):
        print(f'warning: {path} was unreadable; starting it afresh', file=sys.stderr)
        data = {}
    key = result_key(metric, options)
    data[key] = {'metric': metric, 'options': options, 'results': results,
                 'time': datetime.datetime.now().isoformat(timespec='seconds')}
    write_json(path, data)
    return key


def results_path(args):
    if args.json:
        return args.json
    base = args.checkpoint if args.checkpoint else os.path.normpath(args.samples)
    return os.path.splitext(base)[0] + '.eval.json'


# ----- command line ---------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description='FID / Inception Score and bits/dim of a DDPM checkpoint (or of existing samples).',
        formatter_class=HelpFormatter)
    what = p.add_argument_group('what to evaluate')
    what.add_argument('--checkpoint', default=None,
                      help='a checkpoint written by train.py, or a diffusers model folder')
    what.add_argument('--samples', default=None, help='score existing samples: an .npz (uint8 NHWC) or image folder')
    what.add_argument('--fid', action='store_true', help='FID and Inception Score')
    what.add_argument('--kid', action='store_true', help='also KID (caches the reference features, ~0.4 GB)')
    what.add_argument('--bpd', action='store_true', help='NLL in bits/dim by the variational bound')
    what.add_argument('--json', default=None, help='results file (default: <checkpoint or samples>.eval.json)')
    what.add_argument('--data_dir', default='data', help='where CIFAR-10 is (or is downloaded to), for --ref and '
                                                          '--bpd_data cifar10')

    s = p.add_argument_group('sampling (with --checkpoint --fid; see sample.py)')
    s.add_argument('--num_samples', type=int, default=PAPER_NUM_SAMPLES, help='the paper uses 50,000')
    s.add_argument('--batch_size', type=int, default=256, help='sampling batch size')
    s.add_argument('--sampler', choices=SAMPLERS, default='ddpm', help='see sample.py')
    s.add_argument('--steps', type=int, default=None,
                   help=f'network evaluations (default {DEFAULT_DDIM_STEPS} for ddim, {DEFAULT_DPM_SOLVER_STEPS} '
                        f'for dpm-solver; ddpm: all T, fewer respace the chain)')
    s.add_argument('--spacing', choices=SPACINGS, default=None, help='see sample.py')
    s.add_argument('--eta', type=float, default=0.0, help='DDIM noise')
    s.add_argument('--seed', type=int, default=0, help='sampling seed; also seeds the noise of --bpd')
    s.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                   help='EMA weights (default: when the checkpoint has them)')
    s.add_argument('--npz', default=None,
                   help='where samples are written / reused (default: next to the checkpoint, named by the options)')

    f = p.add_argument_group('FID / IS')
    f.add_argument('--ref', default='cifar10',
                   help="reference images: 'cifar10' (training split in --data_dir), an image folder or an .npz")
    f.add_argument('--ref_stats', default=None, help='precomputed reference mu/sigma (.npz, pytorch-fid format)')
    f.add_argument('--inception_weights', default=None,
                   help=f'local copy of {INCEPTION_FILE} (else torch.hub\'s cache or a download)')
    f.add_argument('--feature_extractor', default=INCEPTION, help='any torch-fidelity feature extractor')
    f.add_argument('--cache_dir', default=None, help='where reference statistics are cached '
                                                     '(default: <torch hub dir>/../ddpm_fid_stats)')
    f.add_argument('--feature_batch_size', type=int, default=250, help='images per feature-extractor batch')

    b = p.add_argument_group('bits/dim')
    b.add_argument('--bpd_data', default='cifar10',
                   help="'cifar10' (its test split in --data_dir), an image folder or an .npz")
    b.add_argument('--bpd_mode', choices=('exact', 'estimate'), default='exact',
                   help='exact: all T terms per image; estimate: prior + decoder + sampled KL terms')
    b.add_argument('--t_samples', type=int, default=10, help='sampled t per image in estimate mode')
    b.add_argument('--num_images', type=int, default=None, help='a random subset of this many images')
    b.add_argument('--bpd_batch_size', type=int, default=250)
    b.add_argument('--bpd_clip', action=argparse.BooleanOptionalAction, default=True,
                   help="p_theta's mean from the x_0 prediction clipped to [-1, 1], as the paper's code evaluates "
                        'it (its 3.70-3.75); --no-bpd_clip: the unclipped bound')

    add_runtime_options(p)
    return p


def main(argv=None):
    return run_cli(build_parser(), run, argv)


def default_npz(args, steps, ema):
    stem = os.path.splitext(args.checkpoint)[0]
    spacing = f'-{args.spacing}' if args.spacing else ''   # the default spacing keeps the older names
    return (f'{stem}.samples-{"ema" if ema else "raw"}-{args.sampler}{steps}{spacing}-eta{args.eta:g}'
            f'-seed{args.seed}-{args.amp}.npz')


def run(args):
    if not (args.fid or args.kid or args.bpd):
        raise EvalError('nothing to do: pass --fid (FID and IS), --kid and/or --bpd')
    if bool(args.checkpoint) == bool(args.samples):
        raise EvalError('pass exactly one of --checkpoint (sample, then score) or --samples (score existing samples)')
    if args.bpd and not args.checkpoint:
        raise EvalError('--bpd needs --checkpoint (bits/dim is a property of the model, not of samples)')
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if args.samples and not os.path.exists(args.samples):
        raise FileNotFoundError(f'samples not found: {args.samples}')
    if args.kid and args.ref_stats:
        raise EvalError('KID needs the reference features, not only statistics: drop --ref_stats or --kid')
    device = str(resolve_device(args.device))   # a GPU asked for but absent is one line, not a traceback
    progress = not args.quiet
    out_path = results_path(args)
    lines = []
    # Under torchrun the other ranks only help to draw the samples; rank 0 scores them.
    helper = int(os.environ.get('RANK', '0')) != 0
    if helper and not (args.checkpoint and (args.fid or args.kid)):
        return 0

    if args.fid or args.kid:
        # Load the feature extractor first: a missing Inception file should fail before hours of sampling.
        extractor, fid_layer, isc_layer = (None, None, None) if helper else load_feature_extractor(
            args.feature_extractor, args.inception_weights, device)
        if helper:
            mu = sigma = ref_count = ref_features = ref_name = None
        elif args.ref_stats:
            mu, sigma, ref_count = load_stats(args.ref_stats)
            ref_features, ref_name = None, args.ref_stats
        else:
            mu, sigma, ref_count, ref_features, _ = reference_statistics(
                args.ref, args.data_dir, extractor, fid_layer, args.cache_dir, args.feature_batch_size, device,
                with_features=args.kid, progress=progress)
            ref_name = 'cifar10-train' if args.ref == 'cifar10' else os.path.abspath(args.ref)
        if args.checkpoint:
            model, info = load_model(args.checkpoint, ema=args.ema, device='cpu')
            steps, model_ema = resolve_steps(model, args.sampler, args.steps), info['ema']
            spacing = resolve_spacing(args.sampler, args.spacing, args.eta)
            del model
            npz = args.npz or default_npz(args, steps, model_ema)
            images = sample_checkpoint(args.checkpoint, args.num_samples, args.batch_size, args.sampler, steps,
                                       args.eta, args.seed, args.ema, device, npz=npz, progress=progress,
                                       amp=args.amp, spacing=spacing)
            if images is None:   # not rank 0 under torchrun
                return 0
            options = {'ema': model_ema, 'sampler': args.sampler, 'steps': steps, 'spacing': spacing, 'eta': args.eta,
                       'seed': args.seed, 'batch_size': args.batch_size, 'num_samples': args.num_samples,
                       'amp': args.amp}
        else:
            images = load_images(args.samples)
            options = {'samples': os.path.abspath(args.samples), 'num_samples': int(len(images))}
        options.update(ref=ref_name, feature_extractor=extractor.get_name())
        if len(images) < PAPER_NUM_SAMPLES:
            print(f'note: FID from {len(images)} samples is biased upwards; the paper\'s 3.17 uses '
                  f'{PAPER_NUM_SAMPLES} samples', file=sys.stderr)
        start = time.time()
        results = image_metrics(images, extractor, fid_layer, isc_layer, (mu, sigma),
                                ref_features if args.kid else None, args.feature_batch_size, device, progress)
        results.update(ref_count=ref_count, seconds=round(time.time() - start, 1))
        record(out_path, 'fid', options, results)
        line = f'FID {results["fid"]:.3f}'
        if 'isc_mean' in results:
            line += f'  IS {results["isc_mean"]:.3f} +- {results["isc_std"]:.3f}'
        if 'kid_mean' in results:
            line += f'  KID {results["kid_mean"]:.5f} +- {results["kid_std"]:.5f}'
        lines.append(f'{line}  ({results["num_samples"]} samples vs {ref_name}, {extractor.get_name()})')

    if args.bpd:
        model, info = load_model(args.checkpoint, ema=args.ema, device=device)
        c, h, w = model.image_shape
        images = load_images(args.bpd_data, args.data_dir, train=False, image_size=h)
        if args.num_images is not None:
            if not 1 <= args.num_images <= len(images):
                raise EvalError(f'--num_images must be between 1 and {len(images)}, got {args.num_images}')
            keep = np.sort(np.random.default_rng(args.seed).choice(len(images), args.num_images, replace=False))
            images = images[keep]
        start = time.time()
        results = bits_per_dim(model, images, args.bpd_mode, args.t_samples, args.bpd_batch_size, device,
                               args.seed, progress, clip_denoised=args.bpd_clip)
        results['seconds'] = round(time.time() - start, 1)
        data = (os.path.abspath(args.bpd_data) if os.path.exists(args.bpd_data) else
                args.bpd_data if args.bpd_data == 'cifar10' else f'{args.bpd_data}:{os.path.abspath(args.data_dir)}')
        options = {'ema': info['ema'], 'data': data, 'split': 'test', 'mode': args.bpd_mode,
                   'num_images': results['num_images'], 'seed': args.seed, 'clip_denoised': args.bpd_clip}
        if args.bpd_mode == 'estimate':
            options['t_samples'] = args.t_samples
        record(out_path, 'bpd', options, results)
        lines.append(f'NLL {results["bpd"]:.4f} +- {results["bpd_stderr"]:.4f} bits/dim ({args.bpd_mode}, '
                     f'{"clipped" if args.bpd_clip else "unclipped"} x_0, '
                     f'{results["num_images"]} images; prior {results["prior_bpd"]:.4f}, KL terms '
                     f'{results["kl_terms_bpd"]:.4f}, decoder {results["decoder_bpd"]:.4f})')

    for line in lines:
        print(line)
    print(f'results written to {out_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
