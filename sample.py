"""Draw images from a trained DDPM checkpoint: a PNG grid, one PNG per image, or an .npz for FID tools.

    python sample.py --checkpoint checkpoints/ddpm_latest.pth                 # 64 images -> samples.png
    python sample.py --checkpoint ckpt.pth --sampler ddim --steps 50 --out grid.png
    python sample.py --checkpoint ckpt.pth --num_samples 50000 --batch_size 500 --npz samples.npz
    torchrun --nproc_per_node=8 sample.py --checkpoint ckpt.pth --num_samples 50000 --npz samples.npz
    python sample.py --checkpoint ckpt.pth --num_samples 8 --trajectory chain.png
    python sample.py --checkpoint cond.pth --class_label cat --guidance_scale 1   # a class-conditional model
    python sample.py --checkpoint cond.pth --classes all --num_samples 100       # grid: one row per class
    python sample.py --checkpoint ckpt.pth --inpaint photo.png --mask mask.png    # RePaint: fill the black of the mask
    python sample.py --checkpoint ckpt.pth --init_image sketch.png --strength 0.5  # SDEdit: image-to-image

The model is rebuilt from the config stored in the checkpoint, with its EMA
weights when it has them (--no-ema for the raw weights). A class-conditional
checkpoint (train.py --class_cond) samples one class (--class_label, an index or
a name from its class_names), all classes in turn (--classes all: image i gets
class i % num_classes), or none (unconditional, the null class); --guidance_scale w
is classifier-free guidance. The .npz then holds the labels beside the images.

Reproducibility: image i draws all its noise (x_T and every step's) from its own
generator, seeded from (--seed, i). The images therefore depend only on the
checkpoint, the sampler options and the seed: not on --batch_size, not on where a
run was interrupted, nor on how many processes shared the work. (Until seeds were
per image, a batch shared one generator; the same seed now gives other images.)

Resuming: with --npz or --out_dir, every finished batch is written at once to
<npz>.parts/ (or <out_dir>/.parts/) as its own small file. Run the same command
again after an interruption and only the missing batches are sampled; the
final .npz is assembled at the end and the parts are removed. A run with
different options refuses to mix its images with the old ones.
"""

import argparse
import importlib
import os
import sys
import warnings

import torch

import data.process_cifar as cifar   # a module name: to_uint8, which moved from here, still warns here
import sampling.generate as generation   # a module name: the names that moved there still warn here
from editing.images import load_image, load_mask
from editing.inpaint import RePaint, inpaint
from editing.sdedit import sdedit
from runtime import HelpFormatter, add_runtime_options, resolve_device, run_cli
from sampling.guidance import ALL_CLASSES, class_grid_order, resolve_class_label, run_labels
from sampling.options import (DEFAULT_DDIM_STEPS, DEFAULT_DPM_SOLVER_STEPS, DEFAULTS, SAMPLERS, SPACINGS,
                              SampleOptions, few_steps_warning, is_ancestral)
from weights.checkpoint import resolve_checkpoint

GRID_MAX_IMAGES = 256
TRAJECTORY_MAX_IMAGES = 8


# ----- pictures -------------------------------------------------------------------------------

def class_rows(images, labels, class_label):
    """(images, nrow) for the grid: with --classes all one row per class (class_grid_order), else the first
    GRID_MAX_IMAGES images in a square."""
    if class_label != ALL_CLASSES:
        return images[:GRID_MAX_IMAGES], None
    order, nrow = class_grid_order(labels, int(labels.max()) + 1 if len(labels) else 1)
    return images[order.numpy()][:GRID_MAX_IMAGES], nrow


# ----- command line ---------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description='Sample images from a DDPM checkpoint (the model is rebuilt from the checkpoint\'s config).',
        formatter_class=HelpFormatter)
    p.add_argument('--checkpoint', required=True,
                   help='a checkpoint written by train.py, a diffusers DDPMPipeline / UNet2DModel folder, a '
                        'DDIM-format .ckpt, or a release name (ema_cifar10, cifar10, ema_lsun_church, ...; '
                        'docs/weights.md)')
    p.add_argument('--image_size', type=int, default=None,
                   help='image size for weights that do not fix it (DDIM-format files; default 32)')
    p.add_argument('--num_samples', type=int, default=64, help='number of images')
    p.add_argument('--batch_size', type=int, default=256,
                   help='images per batch; not part of a run\'s identity (image i is seeded from (seed, i))')
    p.add_argument('--sampler', choices=SAMPLERS, default=DEFAULTS.sampler,
                   help='ddpm: the paper\'s ancestral sampler over all T steps; ddim: Song et al. 2020; '
                        'dpm-solver: DPM-Solver++(2M), Lu et al. 2022 (fast; see README)')
    p.add_argument('--steps', type=int, default=DEFAULTS.steps,
                   help=f'network evaluations (default {DEFAULT_DDIM_STEPS} for ddim, {DEFAULT_DPM_SOLVER_STEPS} '
                        f'for dpm-solver); for ddpm (default all T) fewer steps respace the chain (Nichol & '
                        f'Dhariwal 2021, section 4)')
    p.add_argument('--spacing', choices=SPACINGS, default=DEFAULTS.spacing,
                   help='which steps ddim and dpm-solver visit: uniform or quadratic in t, or logsnr (uniform in '
                        'log-SNR); default: uniform for ddim, logsnr for dpm-solver')
    p.add_argument('--clip_denoised', action=argparse.BooleanOptionalAction, default=DEFAULTS.clip_denoised,
                   help='clip the predicted x_0 to [-1, 1] at every step (default: on for ddpm and ddim, as the '
                        'paper\'s sampler does; off for dpm-solver; see README for what it does to FID)')
    p.add_argument('--eta', type=float, default=DEFAULTS.eta, help='DDIM noise: 0 deterministic, 1 DDPM-like')
    which = p.add_mutually_exclusive_group()
    which.add_argument('--class_label', default=None,
                       help='class-conditional checkpoints: the class of every image, an index or a name from the '
                            'checkpoint\'s class_names (default: unconditional, the null class)')
    which.add_argument('--classes', choices=['all'], default=None,
                       help='all: image i gets class i %% num_classes; the grid shows one row per class')
    p.add_argument('--guidance_scale', type=float, default=DEFAULTS.guidance_scale,
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
    edit = p.add_argument_group('editing a picture (docs/editing.md); --num_samples results, in a grid after the input')
    which_edit = edit.add_mutually_exclusive_group()
    which_edit.add_argument('--inpaint', metavar='IMAGE', default=None,
                            help='fill in IMAGE where --mask is black (RePaint, Lugmayr et al. 2022; ddpm sampler; '
                                 '--steps: its chain, default min(250, T))')
    which_edit.add_argument('--init_image', metavar='IMAGE', default=None,
                            help='image-to-image from IMAGE (SDEdit, Meng et al. 2021) at --strength')
    edit.add_argument('--mask', default=None, help='with --inpaint: a PNG of the image\'s size, white = keep')
    edit.add_argument('--jump_length', type=int, default=RePaint.jump_length, help='RePaint\'s j')
    edit.add_argument('--resamplings', type=int, default=RePaint.resamplings, help='RePaint\'s r (1: no resampling)')
    edit.add_argument('--strength', type=float, default=None,
                      help='with --init_image: t/T in (0, 1] where the reverse process starts (default 0.5); '
                           '1 keeps almost nothing of the image')
    add_runtime_options(p)
    return p


def check_edit_args(args):
    """One line for each editing option that does not fit the others."""
    if args.mask and not args.inpaint:
        raise ValueError('--mask goes with --inpaint IMAGE')
    if args.inpaint and not args.mask:
        raise ValueError('--inpaint needs --mask MASK (a PNG of the image\'s size, white = keep, black = fill in)')
    if args.strength is not None and not args.init_image:
        raise ValueError('--strength goes with --init_image IMAGE')
    if args.inpaint and not is_ancestral(args.sampler):
        raise ValueError(f'--inpaint walks the ancestral chain (RePaint); drop --sampler {args.sampler}')
    if (args.inpaint or args.init_image) and (args.npz or args.out_dir or args.trajectory):
        raise ValueError('--inpaint and --init_image write one grid (--out); drop --npz, --out_dir, --trajectory')


def run_edit(args, device, progress):
    """--inpaint or --init_image: the input, then --num_samples results, as one grid PNG at --out."""
    model, info = generation.load_model(args.checkpoint, ema=args.ema, device=device,
                                        image_size=args.image_size)
    size = model.image_shape[-1]
    label = resolve_class_label(model.num_classes, info.get('class_names'), args.classes or args.class_label,
                                args.guidance_scale)
    labels = run_labels(label, args.num_samples, model.num_classes)
    image = load_image(args.inpaint or args.init_image, size).to(device)
    generator = torch.Generator().manual_seed(generation.batch_seed(args.seed, 0))
    batch = image.expand(args.num_samples, -1, -1, -1)
    if args.inpaint:
        mask = load_mask(args.mask, args.inpaint, size).to(device)
        schedule = RePaint(args.steps, args.jump_length, args.resamplings)
        options = SampleOptions.from_args(args).resolve(model)   # the ancestral sampler's (check_edit_args)
        out = inpaint(model, batch, mask, generator, labels, schedule, options.clip_denoised, options.guidance_scale,
                      progress)
        image = image * mask   # the input as the model sees it: the hole grey (0 in [-1, 1])
    else:
        strength = 0.5 if args.strength is None else args.strength
        out = sdedit(model, batch, strength, generator, labels, SampleOptions.from_args(args), progress)
    images = cifar.to_uint8(torch.cat([image, out])).permute(0, 2, 3, 1).cpu().numpy()
    path = generation.save_grid(images, args.out or 'samples.png', nrow=len(images))
    return [f'{path} (the input, then {args.num_samples} results)']


def main(argv=None):
    return run_cli(build_parser(), run, argv)


def run(args):
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError('--num_samples and --batch_size must be at least 1')
    if args.npz and not args.npz.endswith('.npz'):
        raise ValueError(f'--npz must name a .npz file, got {args.npz}')
    args.checkpoint = resolve_checkpoint(args.checkpoint)   # a release name (ema_cifar10, ...) -> its file
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    check_edit_args(args)
    progress = not args.quiet
    if args.inpaint or args.init_image:
        for line in run_edit(args, str(resolve_device(args.device)), progress):
            print(f'wrote {line}')
        return 0
    out = args.out
    if out is None and not (args.npz or args.out_dir or args.trajectory):
        out = 'samples.png'
    device = str(resolve_device(args.device))   # a GPU asked for but absent is one line, not a traceback
    rank = int(os.environ.get('RANK', '0'))

    written = []
    class_label = args.classes or args.class_label
    if out or args.npz or args.out_dir:
        run = generation.SampleRun(args.num_samples, args.batch_size, args.seed, class_label, args.amp)
        result = generation.sample_checkpoint(args.checkpoint, SampleOptions.from_args(args), run, args.ema, device,
                                              args.npz, args.out_dir, progress, with_labels=True,
                                              image_size=args.image_size)
        if result is None:   # not rank 0
            return 0
        images, labels = result
        if out:
            grid_images, nrow = class_rows(images, labels, class_label)
            written.append(generation.save_grid(grid_images, out, nrow))
        if args.npz:
            written.append(f'{args.npz} (uint8 {list(images.shape)})')
        if args.out_dir:
            written.append(f'{args.out_dir}/ ({images.shape[0]} PNG files)')
    if args.trajectory and rank == 0:
        model, info = generation.load_model(args.checkpoint, ema=args.ema, device=device,
                                            image_size=args.image_size)
        n = min(args.num_samples, TRAJECTORY_MAX_IMAGES)
        label = resolve_class_label(model.num_classes, info.get('class_names'), class_label, args.guidance_scale)
        ts, frames = generation.trajectory(model, n, SampleOptions.from_args(args), args.seed, device,
                                           progress=progress, amp=args.amp,
                                           labels=run_labels(label, n, model.num_classes))
        written.append(f'{generation.save_trajectory(frames, args.trajectory)} (rows: {n} images; '
                       f'columns: x_t at t = '
                       f'{", ".join(map(str, ts))})')
    warning = few_steps_warning(args.sampler, args.steps)
    if warning:   # said after the run (a short one, at these steps), so that a failed run shows only its error
        print(f'warning: {warning}', file=sys.stderr)
    for line in written:
        print(f'wrote {line}')
    return 0


# Names that lived here before sampling/generate.py existed; old imports keep working, with a warning.
MOVED = {name: 'sampling.generate' for name in ('batch_seed', 'batch_counts', 'sample_batch',
                                                'generate', 'open_parts', 'save_pngs', 'assemble', 'sample_checkpoint',
                                                'trajectory', 'load_model', 'TRAJECTORY_COLUMNS', 'save_grid',
                                                'save_trajectory')}
MOVED['to_uint8'] = 'data.process_cifar'
MOVED['resolve_steps'] = 'sampling.options'


def __getattr__(name):
    if name in MOVED:
        warnings.warn(f'sample.{name} has moved to {MOVED[name]}.{name}', DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


if __name__ == '__main__':
    sys.exit(main())
