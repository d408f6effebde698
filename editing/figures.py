"""The paper's qualitative figures 6-8 from a checkpoint, as PNG grids: the subcommands of paper.py.

    fig6  progressive generation: rows are samples, columns the x_0 predicted from x_t, t = T .. 0
    fig7  shared latents: per image and t, [x_0, x_t, k samples from that x_t]
    fig8  interpolation through x_t: per pair, [x_a, lambda = 0 .. 1, x_b]; --noise: between two seeds' x_T

Each SUBCOMMANDS entry is (help, add_arguments, run); run(args) returns the lines it printed as 'wrote ...'.
"""

import argparse

import torch

from data.process_cifar import to_uint8
from editing.images import load_images
from editing.interpolate import FIG8_LAMBDAS, FIG8_T, interpolate, interpolate_noise
from editing.latents import fig7_ts, shared_latents
from runtime import add_runtime_options, resolve_device
from sampling.generate import load_model, save_grid, save_trajectory, trajectory
from sampling.guidance import resolve_class_label, run_labels
from sampling.options import DEFAULTS, SAMPLERS, SampleOptions


def add_model_options(p, out):
    """The options every figure takes: the checkpoint, the sampler, the seed, the class, the output."""
    p.add_argument('--checkpoint', required=True, help='a checkpoint written by train.py (or a diffusers folder)')
    p.add_argument('--out', default=out, help='the PNG to write')
    p.add_argument('--sampler', choices=SAMPLERS, default=DEFAULTS.sampler,
                   help='the reverse process (default: the paper\'s)')
    p.add_argument('--steps', type=int, default=None,
                   help='network evaluations of the whole chain (default: all T for ddpm, the sampler\'s default '
                        'otherwise); a walk from t runs those below t')
    p.add_argument('--seed', type=int, default=0, help='the same seed and options give the same picture')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None, help='EMA weights (default: when present)')
    p.add_argument('--class_label', default=None, help='class-conditional checkpoints: a class index or name')
    p.add_argument('--guidance_scale', type=float, default=DEFAULTS.guidance_scale, help='classifier-free guidance w')
    add_runtime_options(p)


def open_model(args, n):
    """(model, labels for n images or None, device) from the options of add_model_options."""
    device = str(resolve_device(args.device))
    model, info = load_model(args.checkpoint, ema=args.ema, device=device)
    label = resolve_class_label(model.num_classes, info.get('class_names'), args.class_label, args.guidance_scale)
    return model, run_labels(label, n, model.num_classes), device




def nhwc(x):
    """Images in [-1, 1] [..., C, H, W] -> uint8 numpy [N, H, W, C] for save_grid."""
    x = to_uint8(x.clamp(-1, 1).reshape(-1, *x.shape[-3:]))
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ----- fig6 ---------------------------------------------------------------------------------------

def add_fig6(p):
    add_model_options(p, 'fig6.png')
    p.add_argument('--num_samples', type=int, default=4, help='rows: samples')
    p.add_argument('--columns', type=int, default=11, help='x_0 predictions at this many t from T to 0')


def run_fig6(args):
    if args.num_samples < 1 or args.columns < 2:
        raise ValueError('--num_samples must be at least 1 and --columns at least 2')
    model, labels, device = open_model(args, args.num_samples)
    ts, frames = trajectory(model, args.num_samples, SampleOptions.from_args(args), args.seed, device, args.columns,
                            progress=not args.quiet, amp=args.amp, labels=labels, predicted_x0=True)
    return [f'{save_trajectory(frames, args.out)} (rows: samples; columns: x_0 predicted at t = '
            f'{", ".join(map(str, ts))})']


# ----- fig7 ---------------------------------------------------------------------------------------

def add_fig7(p):
    add_model_options(p, 'fig7.png')
    p.add_argument('--images', required=True, help='a folder of images, an .npz of uint8 [N, H, W, 3], or one image')
    p.add_argument('--num_images', type=int, default=2, help='how many of the images')
    p.add_argument('--t', type=int, nargs='+', default=None,
                   help='the paper\'s t of the shared latents (default: T, 3T/4, T/2, T/4; the paper\'s 1000 750 500 250)')
    p.add_argument('--k', type=int, default=6, help='samples from each shared x_t')


def run_fig7(args):
    model, labels, device = open_model(args, args.num_images)
    x_0 = load_images(args.images, args.num_images, model.image_shape[-1]).to(device)
    ts = args.t if args.t is not None else fig7_ts(model)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    labels = labels if labels is None else labels[:x_0.shape[0]]
    for x_t, samples in shared_latents(model, x_0, ts, args.k, generator, labels, SampleOptions.from_args(args),
                                             not args.quiet):
        rows.append(torch.cat([x_0.unsqueeze(1), x_t.unsqueeze(1), samples], dim=1))   # [B, 2 + k, C, H, W]
    grid = torch.stack(rows, dim=1)   # [B, len(ts), 2 + k, ...]: image-major rows
    save_grid(nhwc(grid), args.out, nrow=2 + args.k)
    return [f'{args.out} (rows: {x_0.shape[0]} images x t = {", ".join(map(str, ts))}; columns: x_0, x_t, '
            f'{args.k} samples from that x_t)']


# ----- fig8 ---------------------------------------------------------------------------------------

def add_fig8(p):
    add_model_options(p, 'fig8.png')
    p.add_argument('--images', default=None, help='a folder, an .npz or image files: pairs (1st, 2nd), (3rd, 4th), ...')
    p.add_argument('--num_pairs', type=int, default=2, help='rows: pairs of images')
    p.add_argument('--t', type=int, default=None, help=f'the paper\'s t to mix at (default: T/2, the paper\'s {FIG8_T})')
    p.add_argument('--lambdas', type=float, nargs='+', default=list(FIG8_LAMBDAS), help='the mixing weights')
    p.add_argument('--noise', action='store_true',
                   help='interpolate between the x_T of seeds --seed and --seed + 1 (slerp) instead of images')


def run_fig8(args):
    if args.noise == (args.images is not None):
        raise ValueError('give --images (pairs to mix through x_t) or --noise (two seeds\' x_T), one of them')
    model, labels, device = open_model(args, args.num_pairs)
    if args.noise:
        out = interpolate_noise(model, args.seed, args.seed + 1, args.num_pairs, args.lambdas, device, labels,
                                SampleOptions.from_args(args), not args.quiet)
        save_grid(nhwc(out.transpose(0, 1)), args.out, nrow=len(args.lambdas))
        return [f'{args.out} (rows: {args.num_pairs} pairs of seeds; columns: slerp lambda = {args.lambdas})']
    images = load_images(args.images, 2 * args.num_pairs, model.image_shape[-1]).to(device)
    if images.shape[0] < 2:
        raise ValueError(f'{args.images} holds fewer than two images; interpolation needs a pair')
    x_a, x_b = images[0::2][:len(images) // 2], images[1::2]
    t = args.t if args.t is not None else max(1, model.timesteps // 2)
    out = interpolate(model, x_a, x_b, t, args.lambdas, torch.Generator().manual_seed(args.seed),
                      labels if labels is None else labels[:len(x_a)], SampleOptions.from_args(args), not args.quiet)
    grid = torch.cat([x_a.unsqueeze(1), out.transpose(0, 1), x_b.unsqueeze(1)], dim=1)
    save_grid(nhwc(grid), args.out, nrow=len(args.lambdas) + 2)
    return [f'{args.out} (rows: {len(x_a)} pairs; columns: x_a, decoded mixes at t = {t} for lambda = '
            f'{args.lambdas}, x_b)']


SUBCOMMANDS = {
    'fig6': ('Fig. 6: progressive generation, the x_0 predicted along the reverse chain', add_fig6, run_fig6),
    'fig7': ('Fig. 7: samples that share a latent x_t ~ q(x_t | x_0)', add_fig7, run_fig7),
    'fig8': ('Fig. 8: interpolation through x_t (or between two seeds\' x_T)', add_fig8, run_fig8),
}
