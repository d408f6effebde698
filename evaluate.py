"""Score a DDPM the way the paper does: FID / Inception Score of samples, and NLL in bits/dim.

    python evaluate.py --checkpoint ckpt.pth --fid --num_samples 50000          # samples, then FID + IS
    python evaluate.py --samples samples.npz --fid                               # score existing samples
    python evaluate.py --checkpoint ckpt.pth --bpd --bpd_mode exact              # NLL on the CIFAR-10 test set
    python evaluate.py --checkpoint ckpt.pth --bpd --bpd_mode estimate --num_images 1000
    python evaluate.py --samples samples.npz --fid --inception_weights default_1.pt --ref images/   # offline

FID and IS use torch-fidelity's Inception-v3 (metrics/fid.py): the TF-Inception (2015-12-05)
weights and TF1-style bilinear resize to 299x299 that the original TF code,
pytorch-fid and the paper's numbers use. One pass over the samples gives the
2048-d pool features (FID, KID) and the logits (IS). The reference statistics
(mu, sigma of the CIFAR-10 training set's features) are computed once and
cached as an .npz in the same format pytorch-fid / TTUR use, so precomputed
ones can be passed with --ref_stats.

Offline: --inception_weights takes torch-fidelity's weights file or NVIDIA's
TorchScript port of the same network (inception-2015-12-05-nv.pt, see metrics/inception.py
and the README); pass a local CIFAR-10 (--data_dir), image folder or .npz (--ref),
or --ref_stats. `--convert_inception PORT.pt --out W.pth` writes the port's
weights as torch-fidelity's state_dict once and checks that both give the same features.

bits/dim follows the variational bound, Eq. (5) of Ho et al. 2020:
    L = L_T (prior) + sum_{t=2..T} L_{t-1} (KL terms) + L_0 (discretised decoder at t = 1),
either exactly (all T terms per image) or as an unbiased estimate that keeps
L_T and L_0 exact and samples the T-1 KL terms at uniform t. Both report the
mean over images and its standard error.

Results are printed and merged into <checkpoint>.eval.json (or <samples>.eval.json).
"""

import argparse
import datetime
import importlib
import os
import sys
import time
import warnings

import numpy as np
import torch

import metrics.bpd as bpd   # a module name: bits_per_dim, which moved there, still warns here
from metrics.fid import (INCEPTION, INCEPTION_FILE, EvalError, check_conversion, image_metrics, load_feature_extractor,
                         load_images, load_stats, reference_resolution, reference_statistics)
from metrics.inception import is_torchscript, torchscript_to_fidelity
from runtime import HelpFormatter, add_runtime_options, atomic_write, read_json, resolve_device, run_cli, write_json
from sampling.generate import SampleRun, load_model, sample_checkpoint
from sampling.options import DEFAULT_DDIM_STEPS, DEFAULT_DPM_SOLVER_STEPS, DEFAULTS, SAMPLERS, SPACINGS, SampleOptions
from weights.checkpoint import resolve_checkpoint

PAPER_NUM_SAMPLES = 50_000


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
                      help='a checkpoint written by train.py, a diffusers model folder, a DDIM-format .ckpt, or '
                           'a release name (ema_cifar10, ...; docs/weights.md)')
    what.add_argument('--image_size', type=int, default=None,
                      help='image size for weights that do not fix it (DDIM-format files; default 32)')
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
    s.add_argument('--sampler', choices=SAMPLERS, default=DEFAULTS.sampler, help='see sample.py')
    s.add_argument('--steps', type=int, default=DEFAULTS.steps,
                   help=f'network evaluations (default {DEFAULT_DDIM_STEPS} for ddim, {DEFAULT_DPM_SOLVER_STEPS} '
                        f'for dpm-solver; ddpm: all T, fewer respace the chain)')
    s.add_argument('--spacing', choices=SPACINGS, default=DEFAULTS.spacing, help='see sample.py')
    s.add_argument('--clip_denoised', action=argparse.BooleanOptionalAction, default=DEFAULTS.clip_denoised,
                   help='see sample.py')
    s.add_argument('--eta', type=float, default=DEFAULTS.eta, help='DDIM noise')
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
                   help=f'local copy of {INCEPTION_FILE}, or NVIDIA\'s TorchScript port inception-2015-12-05-nv.pt '
                        f'(README: "Offline FID"); default: torch.hub\'s cache or a download')
    f.add_argument('--trust_torchscript', action='store_true',
                   help='load a TorchScript --inception_weights whose sha1 is not the known port\'s (TorchScript '
                        'is code: only for files you trust)')
    f.add_argument('--feature_extractor', default=INCEPTION, help='any torch-fidelity feature extractor')
    f.add_argument('--cache_dir', default=None, help='where reference statistics are cached '
                                                     '(default: <torch hub dir>/../ddpm_fid_stats)')
    f.add_argument('--feature_batch_size', type=int, default=250, help='images per feature-extractor batch')

    c = p.add_argument_group('weights conversion')
    c.add_argument('--convert_inception', default=None, metavar='PORT.pt',
                   help="write NVIDIA's TorchScript Inception port as torch-fidelity's state_dict to --out, check "
                        "that both give the same features, and exit")
    c.add_argument('--out', default=None, help='the converted weights file (.pth)')

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
    spacing += {None: '', True: '-clip', False: '-noclip'}[args.clip_denoised]
    return (f'{stem}.samples-{"ema" if ema else "raw"}-{args.sampler}{steps}{spacing}-eta{args.eta:g}'
            f'-seed{args.seed}-{args.amp}.npz')


def convert_inception(args):
    """--convert_inception: the port's tensors as torch-fidelity's state_dict, checked on a few images."""
    if not args.out:
        raise EvalError('--convert_inception needs --out W.pth (where the converted weights go)')
    if not os.path.isfile(args.convert_inception):
        raise FileNotFoundError(f'not found: {args.convert_inception}')
    if not is_torchscript(args.convert_inception):
        raise EvalError(f'{args.convert_inception} is not a TorchScript archive; torch-fidelity weights files '
                        f'need no conversion')
    state_dict = torchscript_to_fidelity(args.convert_inception, trust=args.trust_torchscript)
    atomic_write(args.out, lambda f: torch.save(state_dict, f))
    rng = np.random.default_rng(0)   # noise and flat colours: the resize's border and interior both matter
    images = np.concatenate([rng.integers(0, 256, (4, 32, 32, 3)), np.broadcast_to(
        rng.integers(0, 256, (4, 1, 1, 3)), (4, 32, 32, 3))]).astype(np.uint8)
    diff = check_conversion(args.convert_inception, args.out, images, args.trust_torchscript)
    if not diff <= 1e-3:
        os.remove(args.out)
        raise EvalError(f'the converted weights give features {diff:.3g} away from the port\'s; not written')
    print(f'wrote {args.out}: torch-fidelity\'s Inception state_dict (no classifier: FID and KID, no IS); '
          f'features match the port\'s within {diff:.2g} on {len(images)} images')
    return 0


def run(args):
    if args.convert_inception:
        return convert_inception(args)
    check_inputs(args)
    device = str(resolve_device(args.device))   # a GPU asked for but absent is one line, not a traceback
    # Under torchrun the other ranks only help to draw the samples; rank 0 scores them.
    helper = int(os.environ.get('RANK', '0')) != 0
    if helper and not (args.checkpoint and (args.fid or args.kid)):
        return 0
    lines = []
    if args.fid or args.kid:
        line = score_images(args, device, helper)
        if line is None:   # not rank 0 under torchrun
            return 0
        lines.append(line)
    if args.bpd:
        lines.append(score_bpd(args, device))
    for line in lines:
        print(line)
    print(f'results written to {results_path(args)}')
    return 0


def check_inputs(args):
    """Every check that needs no model, no network and no Inception, so bad input fails at once."""
    if not (args.fid or args.kid or args.bpd):
        raise EvalError('nothing to do: pass --fid (FID and IS), --kid and/or --bpd')
    if bool(args.checkpoint) == bool(args.samples):
        raise EvalError('pass exactly one of --checkpoint (sample, then score) or --samples (score existing samples)')
    if args.bpd and not args.checkpoint:
        raise EvalError('--bpd needs --checkpoint (bits/dim is a property of the model, not of samples)')
    if args.checkpoint:
        args.checkpoint = resolve_checkpoint(args.checkpoint)   # a release name -> its file (downloaded once)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if args.samples and not os.path.exists(args.samples):
        raise FileNotFoundError(f'samples not found: {args.samples}')
    if args.kid and args.ref_stats:
        raise EvalError('KID needs the reference features, not only statistics: drop --ref_stats or --kid')


def score_images(args, device, helper):
    """FID (IS, KID) of existing samples or of a checkpoint's samples; the result line (None off rank 0)."""
    progress = not args.quiet
    # Samples are read (and checked) before the Inception network is loaded: a text file or a float
    # array fails in a second. A missing Inception file still fails before hours of sampling.
    images = load_images(args.samples) if args.samples else None
    extractor, fid_layer, isc_layer = (None, None, None) if helper else load_feature_extractor(
        args.feature_extractor, args.inception_weights, device, cache_dir=args.cache_dir,
        trust_torchscript=args.trust_torchscript)
    # Before the reference statistics and the sampling, which take hours at full size.
    check_resolution(images.shape[1:3] if images is not None else
                     load_model(args.checkpoint, ema=args.ema, device='cpu')[0].image_shape[1:], args)
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
        images, options = sample_for_fid(args, device, progress)
        if images is None:   # not rank 0 under torchrun
            return None
    else:
        options = {'samples': os.path.abspath(args.samples), 'num_samples': int(len(images))}
    options.update(ref=ref_name, feature_extractor=extractor.get_name())
    if extractor.weights_id:   # a local weights file: results with other weights get their own entry
        options['inception_weights'] = extractor.weights_id
    if len(images) < PAPER_NUM_SAMPLES:
        print(f'note: FID from {len(images)} samples is biased upwards; the paper\'s 3.17 uses '
              f'{PAPER_NUM_SAMPLES} samples', file=sys.stderr)
    start = time.time()
    results = image_metrics(images, extractor, fid_layer, isc_layer, (mu, sigma),
                            ref_features if args.kid else None, args.feature_batch_size, device, progress)
    results.update(ref_count=ref_count, seconds=round(time.time() - start, 1))
    record(results_path(args), 'fid', options, results)
    line = f'FID {results["fid"]:.3f}'
    if 'isc_mean' in results:
        line += f'  IS {results["isc_mean"]:.3f} +- {results["isc_std"]:.3f}'
    if 'kid_mean' in results:
        line += f'  KID {results["kid_mean"]:.5f} +- {results["kid_std"]:.5f}'
    if isc_layer is None and args.feature_extractor == INCEPTION:
        line += '  (no IS: these Inception weights have no classifier)'
    return f'{line}  ({results["num_samples"]} samples vs {ref_name}, {extractor.get_name()})'


def check_resolution(size, args):
    """Samples and reference images must have one resolution: Inception resizes both to 299 px, so a
    mismatch still gives a number, but one that compares blur, not models."""
    ref_size = reference_resolution(args.ref, args.ref_stats)
    if ref_size is not None and tuple(size) != tuple(ref_size):
        raise EvalError(f'the samples are {size[0]}x{size[1]} but the reference images ({args.ref_stats or args.ref}) '
                        f'are {ref_size[0]}x{ref_size[1]}; FID needs both at one resolution: pass a reference of '
                        f'{size[0]}x{size[1]} images')


def sample_for_fid(args, device, progress):
    """The checkpoint's samples for FID (drawn once, reused from their .npz) and the options they depend on."""
    model, info = load_model(args.checkpoint, ema=args.ema, device='cpu', image_size=args.image_size)
    options = SampleOptions.from_args(args).resolve(model)
    del model
    npz = args.npz or default_npz(args, options.steps, info['ema'])
    run = SampleRun(args.num_samples, args.batch_size, args.seed, amp=args.amp)
    images = sample_checkpoint(args.checkpoint, options, run, args.ema, device, npz=npz, progress=progress,
                               image_size=args.image_size)
    record = {'ema': info['ema'], **options.asdict(), 'seed': args.seed, 'batch_size': args.batch_size,
              'num_samples': args.num_samples, 'amp': args.amp}
    record.pop('guidance_scale')   # evaluate.py samples unconditionally (no --guidance_scale)
    return images, record


def score_bpd(args, device):
    """bits/dim of the checkpoint on the test images; the result line."""
    model, info = load_model(args.checkpoint, ema=args.ema, device=device, image_size=args.image_size)
    c, h, w = model.image_shape
    images = load_images(args.bpd_data, args.data_dir, train=False, image_size=h)
    if args.num_images is not None:
        if not 1 <= args.num_images <= len(images):
            raise EvalError(f'--num_images must be between 1 and {len(images)}, got {args.num_images}')
        keep = np.sort(np.random.default_rng(args.seed).choice(len(images), args.num_images, replace=False))
        images = images[keep]
    start = time.time()
    results = bpd.bits_per_dim(model, images, args.bpd_mode, args.t_samples, args.bpd_batch_size, device,
                               args.seed, not args.quiet, clip_denoised=args.bpd_clip)
    results['seconds'] = round(time.time() - start, 1)
    data = (os.path.abspath(args.bpd_data) if os.path.exists(args.bpd_data) else
            args.bpd_data if args.bpd_data == 'cifar10' else f'{args.bpd_data}:{os.path.abspath(args.data_dir)}')
    options = {'ema': info['ema'], 'data': data, 'split': 'test', 'mode': args.bpd_mode,
               'num_images': results['num_images'], 'seed': args.seed, 'clip_denoised': args.bpd_clip}
    if args.bpd_mode == 'estimate':
        options['t_samples'] = args.t_samples
    record(results_path(args), 'bpd', options, results)
    return (f'NLL {results["bpd"]:.4f} +- {results["bpd_stderr"]:.4f} bits/dim ({args.bpd_mode}, '
            f'{"clipped" if args.bpd_clip else "unclipped"} x_0, '
            f'{results["num_images"]} images; prior {results["prior_bpd"]:.4f}, KL terms '
            f'{results["kl_terms_bpd"]:.4f}, decoder {results["decoder_bpd"]:.4f})')


# Names that lived here before metrics/bpd.py existed; old imports keep working, with a warning.
MOVED = {'bits_per_dim': 'metrics.bpd', 'image_terms': 'metrics.bpd', 'batch_seed': 'sampling.generate'}


def __getattr__(name):
    if name in MOVED:
        warnings.warn(f'evaluate.{name} has moved to {MOVED[name]}.{name}', DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
    sys.exit(main())
