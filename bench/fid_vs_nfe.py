"""FID against network evaluations (NFE) for every sampler, on one trained checkpoint.

For each NFE in --nfe and each sampler (the paper's ancestral DDPM on a
respaced chain, DDIM on uniform and on quadratic steps, DPM-Solver++(2M) on its
default log-SNR steps, also with the predicted x_0 clipped to [-1, 1] at every
step as DDIM does; on request DDIM without that clipping) it draws --num_samples images with sample.py's code
(same seeds for every setting, so the deterministic samplers start from the
same x_T; network in bf16 where native, --amp), times them, and scores them
with the offline FID (metrics/fid.py: NVIDIA's TorchScript Inception converted into
torch-fidelity's network) against --ref_images training images of the offline
CIFAR-10 JPEG copy. The FID of --num_samples held-out test images against the
same reference is printed too: FID at this sample size is biased upwards, and
that row is the floor a perfect model would reach.

Resumable: every finished setting is kept in bench/results/<--out>.json and
skipped on a rerun with the same checkpoint and sizes, and each setting's
samples are written to <--samples_dir>/<setting>.npz as they are drawn.

    python bench/fid_vs_nfe.py --checkpoint checkpoints/ddpm_latest.pth            # FID-2k, 20 settings
    python bench/fid_vs_nfe.py --checkpoint ckpt.pth --num_samples 200 --nfe 10 20  # a quick look
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from metrics.fid import cached_statistics, image_metrics, load_feature_extractor  # noqa: E402
from runtime import file_sha256, keep_freed_memory, read_json  # noqa: E402
from sampling.generate import SampleRun, sample_checkpoint  # noqa: E402
from sampling.options import SampleOptions  # noqa: E402

SHARED = os.path.join(os.path.dirname(common.ROOT), 'shared', 'data')
# (name, sampler, spacing, clip_denoised); None: the sampler's own (ddpm: uniform respacing, it takes no spacing;
# ddpm and ddim clip the predicted x_0 to [-1, 1], dpm-solver does not unless asked).
CONFIGS = [('ddpm', 'ddpm', None, None), ('ddim', 'ddim', 'uniform', None),
           ('ddim-quadratic', 'ddim', 'quadratic', None), ('dpm-solver', 'dpm-solver', 'logsnr', None),
           ('dpm-solver-clip', 'dpm-solver', 'logsnr', True), ('ddim-noclip', 'ddim', 'uniform', False)]
DEFAULT_SAMPLERS = 'ddpm,ddim,ddim-quadratic,dpm-solver,dpm-solver-clip'   # ddim-noclip: on request


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--nfe', type=int, nargs='+', default=[5, 10, 20, 50, 100])
    p.add_argument('--samplers', default=DEFAULT_SAMPLERS, help=f'any of {",".join(c[0] for c in CONFIGS)}')
    p.add_argument('--num_samples', type=int, default=2000)
    p.add_argument('--ref_images', type=int, default=5000, help='training images for the FID reference')
    p.add_argument('--batch_size', type=int, default=250)
    p.add_argument('--amp', default='auto')
    p.add_argument('--data', default=os.path.join(SHARED, 'cifar10-jpeg.tar.gz'))
    p.add_argument('--inception_weights', default=os.path.join(SHARED, 'inception-2015-12-05-nv.pt'))
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--samples_dir', default='fid_vs_nfe_samples')
    p.add_argument('--out', default='fid_vs_nfe')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    return p.parse_args()


def reference(args, extractor, fid_layer, floor=None):
    """(mu, sigma) of --ref_images training images (cached) and the FID floor: --num_samples test images
    (`floor`: known from an earlier run). The images are read only when one of them is computed."""
    data = {}

    def pick(split, n):
        if not data:
            data.update(common.read_cifar_jpeg(args.data))
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(data[split]))[:n])
        return data[split][torch.from_numpy(keep)].permute(0, 2, 3, 1).numpy()

    mu, sigma, *_ = cached_statistics(f'cifar10-jpeg-train{args.ref_images}-seed{args.seed}',
                                      lambda: pick('train', args.ref_images), extractor, fid_layer, batch_size=50)
    if floor is None:
        floor = image_metrics(pick('test', args.num_samples), extractor, fid_layer, None, (mu, sigma),
                              batch_size=50, progress=False)['fid']
    return (mu, sigma), floor


def run_setting(args, name, sampler, spacing, clip, nfe, extractor, fid_layer, ref):
    """One row: the FID of --num_samples images of one sampler at one NFE, and its seconds per image."""
    os.makedirs(args.samples_dir, exist_ok=True)
    npz = os.path.join(args.samples_dir, f'{name}-{nfe}.npz')
    # Samples left by an interrupted run are reused (sample.py resumes them); their time would be wrong.
    timed = not os.path.exists(npz) and not os.path.exists(npz + '.parts')
    start = time.perf_counter()
    options = SampleOptions(sampler, nfe, spacing, clip_denoised=clip)
    run = SampleRun(args.num_samples, args.batch_size, args.seed, amp=args.amp)
    images = sample_checkpoint(args.checkpoint, options, run, npz=npz, progress=not args.quiet)
    sample_s = time.perf_counter() - start
    metrics = image_metrics(images, extractor, fid_layer, None, ref, batch_size=50, progress=not args.quiet)
    return dict(sampler=name, nfe=nfe, fid=metrics['fid'],
                s_per_image=sample_s / args.num_samples if timed else None)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()   # as train.py does: else glibc re-faults every large activation (bench_malloc.py)
    configs = [c for c in CONFIGS if c[0] in args.samplers.split(',')]
    unknown = set(args.samplers.split(',')) - {c[0] for c in CONFIGS}
    if unknown:
        sys.exit(f'error: unknown --samplers {",".join(sorted(unknown))}; choose from {[c[0] for c in CONFIGS]}')
    key = dict(checkpoint_sha256=file_sha256(args.checkpoint), num_samples=args.num_samples,
               ref_images=args.ref_images, seed=args.seed, batch_size=args.batch_size, amp=args.amp)
    path = os.path.join(common.RESULTS_DIR, f'{args.out}.json')
    old = read_json(path) if os.path.exists(path) else {}
    done = old.get('rows', []) if old.get('key') == key else []

    extractor, fid_layer, _ = load_feature_extractor(weights=args.inception_weights)
    ref, floor = reference(args, extractor, fid_layer, old.get('fid_floor') if done else None)
    print(f'FID of {args.num_samples} test images vs the {args.ref_images} training images: {floor:.2f} '
          f'(the floor at this size)', flush=True)
    rows = list(done)
    for nfe in sorted(args.nfe):   # cheap settings first: an interrupted run still has whole columns
        for name, sampler, spacing, clip in configs:
            if any(r['sampler'] == name and r['nfe'] == nfe for r in rows):
                continue
            rows.append(run_setting(args, name, sampler, spacing, clip, nfe, extractor, fid_layer, ref))
            print(f'  {name:15s} {nfe:4d} NFE: FID {rows[-1]["fid"]:.2f}, '
                  f'{rows[-1]["s_per_image"] or float("nan"):.3f} s/image', flush=True)
            common.write_json(args.out, dict(key=key, args=vars(args), fid_floor=floor, rows=rows,
                                             env=common.env_info(torch.device('cpu'))))

    cell = lambda name, n, field: next((r[field] for r in rows if r['sampler'] == name and r['nfe'] == n), None)  # noqa: E731
    columns = [f'{n} NFE' for n in sorted(args.nfe)]
    for field, title in (('fid', f'FID of {args.num_samples} samples vs {args.ref_images} training images '
                                 f'(floor: {args.num_samples} test images give {floor:.2f})'),
                         ('s_per_image', f'seconds per image (batch {args.batch_size}, amp {args.amp}, '
                                         f'{torch.get_num_threads()} threads)')):
        table = [dict(sampler=name, **{c: cell(name, n, field) for c, n in zip(columns, sorted(args.nfe))})
                 for name, *_ in configs]
        common.print_table(table, ['sampler'] + columns, title)
    print(f'\nwrote {path}')


if __name__ == '__main__':
    main()
