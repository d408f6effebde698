"""Draw images from a trained DDPM checkpoint: a PNG grid, one PNG per image, or an .npz for FID tools.

    python sample.py --checkpoint checkpoints/ddpm_latest.pth                 # 64 images -> samples.png
    python sample.py --checkpoint ckpt.pth --sampler ddim --steps 50 --out grid.png
    python sample.py --checkpoint ckpt.pth --num_samples 50000 --batch_size 500 --npz samples.npz
    torchrun --nproc_per_node=8 sample.py --checkpoint ckpt.pth --num_samples 50000 --npz samples.npz
    python sample.py --checkpoint ckpt.pth --num_samples 8 --trajectory chain.png
    python sample.py --checkpoint cond.pth --class_label cat --guidance_scale 1   # a class-conditional model
    python sample.py --checkpoint cond.pth --classes all --num_samples 100       # grid: one row per class

The model is rebuilt from the config stored in the checkpoint, with its EMA
weights when it has them (--no-ema for the raw weights). A class-conditional
checkpoint (train.py --class_cond) samples one class (--class_label, an index or
a name from its class_names), all classes in turn (--classes all: image i gets
class i % num_classes), or none (unconditional, the null class); --guidance_scale w
is classifier-free guidance. The .npz then holds the labels beside the images.

Reproducibility: batch i (of --batch_size images) draws all its noise from its
own generator, seeded from (--seed, i). The images therefore depend only on the
checkpoint, the sampler options, the seed and the batch size; not on where a
run was interrupted, nor on how many processes shared the work.

Resuming: with --npz or --out_dir, every finished batch is written at once to
<npz>.parts/ (or <out_dir>/.parts/) as its own small file. Run the same command
again after an interruption and only the missing batches are sampled; the
final .npz is assembled at the end and the parts are removed. A run with
different options refuses to mix its images with the old ones.
"""

import argparse
import importlib
import math
import os
import sys
import warnings

import numpy as np
import torch

import sampling.generate as generation   # a module name: the names that moved there still warn here
from runtime import HelpFormatter, add_runtime_options, resolve_device, run_cli
from sampling.guidance import ALL_CLASSES, class_grid_order, resolve_class_label, run_labels
from sampling.samplers import DEFAULT_DDIM_STEPS, DEFAULT_DPM_SOLVER_STEPS, SAMPLERS, SPACINGS

GRID_MAX_IMAGES = 256
TRAJECTORY_MAX_IMAGES = 8


# ----- pictures -------------------------------------------------------------------------------

def save_grid(images, path, nrow=None):
    """uint8 [N, H, W, C] -> one PNG grid (torchvision.utils.save_image), sqrt(N) images a row by default."""
    from torchvision.utils import save_image
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(x, path, nrow=nrow)
    return path


def class_rows(images, labels, class_label):
    """(images, nrow) for the grid: with --classes all one row per class (class_grid_order), else the first
    GRID_MAX_IMAGES images in a square."""
    if class_label != ALL_CLASSES:
        return images[:GRID_MAX_IMAGES], None
    order, nrow = class_grid_order(labels, int(labels.max()) + 1 if len(labels) else 1)
    return images[order.numpy()][:GRID_MAX_IMAGES], nrow


def save_trajectory(frames, path):
    n, cols = frames.shape[:2]
    return save_grid(frames.reshape(n * cols, *frames.shape[2:]), path, nrow=cols)


# ----- command line ---------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description='Sample images from a DDPM checkpoint (the model is rebuilt from the checkpoint\'s config).',
        formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True,
                   help='a checkpoint written by train.py, or a diffusers DDPMPipeline / UNet2DModel folder')
    p.add_argument('--num_samples', type=int, default=64, help='number of images')
    p.add_argument('--batch_size', type=int, default=256,
                   help='images per batch; part of a run\'s identity (batch i is seeded from (seed, i))')
    p.add_argument('--sampler', choices=SAMPLERS, default='ddpm',
                   help='ddpm: the paper\'s ancestral sampler over all T steps; ddim: Song et al. 2020; '
                        'dpm-solver: DPM-Solver++(2M), Lu et al. 2022 (fast; see README)')
    p.add_argument('--steps', type=int, default=None,
                   help=f'network evaluations (default {DEFAULT_DDIM_STEPS} for ddim, {DEFAULT_DPM_SOLVER_STEPS} '
                        f'for dpm-solver); for ddpm (default all T) fewer steps respace the chain (Nichol & '
                        f'Dhariwal 2021, section 4)')
    p.add_argument('--spacing', choices=SPACINGS, default=None,
                   help='which steps ddim and dpm-solver visit: uniform or quadratic in t, or logsnr (uniform in '
                        'log-SNR); default: uniform for ddim, logsnr for dpm-solver')
    p.add_argument('--clip_denoised', action=argparse.BooleanOptionalAction, default=None,
                   help='clip the predicted x_0 to [-1, 1] at every step (default: on for ddpm and ddim, as the '
                        'paper\'s sampler does; off for dpm-solver; see README for what it does to FID)')
    p.add_argument('--eta', type=float, default=0.0, help='DDIM noise: 0 deterministic, 1 DDPM-like')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--class_label', default=None,
                       help='class-conditional checkpoints: the class of every image, an index or a name from the '
                            'checkpoint\'s class_names (default: unconditional, the null class)')
    which.add_argument('--classes', choices=['all'], default=None,
                       help='all: image i gets class i %% num_classes; the grid shows one row per class')
    p.add_argument('--guidance_scale', type=float, default=0.0,
                   help='classifier-free guidance w: eps = (1 + w) eps(class) - w eps(null); 0: the conditional '
                        'model alone; larger trades diversity for fidelity')
    p.add_argument('--seed', type=int, default=0, help='the same seed and options give the same images')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                   help='EMA weights (default: when the checkpoint has them); --no-ema: the raw weights')
    p.add_argument('--out', default=None,
                   help=f'grid PNG of the first {GRID_MAX_IMAGES} images '
                        '(default samples.png when no other output is asked for)')
    p.add_argument('--out_dir', default=None, help='also write every image as OUT_DIR/NNNNNN.png')
    p.add_argument('--npz', default=None,
                   help='also write all images as uint8 [N, H, W, 3] (arr_0), the format FID tools read; '
                        'resumable: rerun the same command to continue an interrupted run')
    p.add_argument('--trajectory', default=None,
                   help=f'write a picture of the denoising chain: the first min(num_samples, '
                        f'{TRAJECTORY_MAX_IMAGES}) images in rows, x_t from t=T to 0 in columns')
    add_runtime_options(p)
    return p


def main(argv=None):
    return run_cli(build_parser(), run, argv)


def run(args):
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError('--num_samples and --batch_size must be at least 1')
    if args.npz and not args.npz.endswith('.npz'):
        raise ValueError(f'--npz must name a .npz file, got {args.npz}')
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    progress = not args.quiet
    out = args.out
    if out is None and not (args.npz or args.out_dir or args.trajectory):
        out = 'samples.png'
    device = str(resolve_device(args.device))   # a GPU asked for but absent is one line, not a traceback
    rank = int(os.environ.get('RANK', '0'))

    written = []
    class_label = args.classes or args.class_label
    if out or args.npz or args.out_dir:
        result = generation.sample_checkpoint(
            args.checkpoint, args.num_samples, args.batch_size, args.sampler, args.steps, args.eta, args.seed,
            args.ema, device, args.npz, args.out_dir, progress, amp=args.amp, spacing=args.spacing,
            class_label=class_label, guidance_scale=args.guidance_scale, with_labels=True,
            clip_denoised=args.clip_denoised)
        if result is None:   # not rank 0
            return 0
        images, labels = result
        if out:
            grid_images, nrow = class_rows(images, labels, class_label)
            written.append(save_grid(grid_images, out, nrow))
        if args.npz:
            written.append(f'{args.npz} (uint8 {list(images.shape)})')
        if args.out_dir:
            written.append(f'{args.out_dir}/ ({images.shape[0]} PNG files)')
    if args.trajectory and rank == 0:
        model, info = generation.load_model(args.checkpoint, ema=args.ema, device=device)
        n = min(args.num_samples, TRAJECTORY_MAX_IMAGES)
        label = resolve_class_label(model.num_classes, info.get('class_names'), class_label, args.guidance_scale)
        ts, frames = generation.trajectory(model, n, args.sampler, args.steps, args.eta, args.seed, device,
                                           progress=progress, amp=args.amp, spacing=args.spacing,
                                           labels=run_labels(label, n, model.num_classes),
                                           guidance_scale=args.guidance_scale, clip_denoised=args.clip_denoised)
        written.append(f'{save_trajectory(frames, args.trajectory)} (rows: {n} images; columns: x_t at t = '
                       f'{", ".join(map(str, ts))})')
    for line in written:
        print(f'wrote {line}')
    return 0


# Names that lived here before sampling/generate.py existed; old imports keep working, with a warning.
MOVED = {name: 'sampling.generate' for name in ('batch_seed', 'batch_counts', 'resolve_steps', 'sample_batch',
                                                'generate', 'open_parts', 'save_pngs', 'assemble', 'sample_checkpoint',
                                                'trajectory', 'load_model', 'TRAJECTORY_COLUMNS')}
MOVED['to_uint8'] = 'data.process_cifar'


def __getattr__(name):
    if name in MOVED:
        warnings.warn(f'sample.{name} has moved to {MOVED[name]}.{name}', DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
    sys.exit(main())
