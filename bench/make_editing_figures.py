"""The pictures of docs/editing.md: Fig. 6, 7, 8, an inpainting and an SDEdit example, from one checkpoint.

    python bench/make_editing_figures.py                                   # newest checkpoint in /tmp/pics/ckpt
    python bench/make_editing_figures.py --checkpoint checkpoints/ddpm_latest.pth --images data/test_images

Every picture is made by the same command a user types (paper.py, sample.py), printed before it runs,
with --seed 0. The inputs are the first images of --images (a folder, e.g. the CIFAR-10 test split);
the inpainting mask (black centre square = fill in) is written beside the pictures. --fast uses
DDIM with 100 steps for figures 6-8 instead of the paper's ancestral sampler over all T steps; --repaint 100 3
gives the inpainting a 100-step chain with r = 3 (about 300 network evaluations per image instead of ~2,500).
"""

import argparse
import os
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

from common import newest_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_images(folder, n, out_dir):
    """Copies of the first image of the first n class subfolders (or files) of `folder`, as PNGs in out_dir."""
    paths = []
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        images = sorted(f for f in files if f.lower().endswith(('.png', '.jpg', '.jpeg')))
        if images:
            paths.append(os.path.join(root, images[0]))
    if len(paths) < n:
        raise SystemExit(f'error: need {n} images under {folder}, found {len(paths)}')
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for i, path in enumerate(paths[:n]):
        target = os.path.join(out_dir, f'{i:02d}.png')
        Image.open(path).convert('RGB').save(target)
        out.append(target)
    return out


def centre_mask(image_path, out_path):
    """White (keep) everywhere but a black centre square of half the side."""
    w, h = Image.open(image_path).size
    mask = np.full((h, w), 255, dtype=np.uint8)
    mask[h // 4:h - h // 4, w // 4:w - w // 4] = 0
    Image.fromarray(mask).save(out_path)
    return out_path


def run(command):
    print('$', ' '.join(shlex.quote(c) for c in command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=None, help='default: the newest .pth in --ckpt_dir')
    p.add_argument('--ckpt_dir', default='/tmp/pics/ckpt')
    p.add_argument('--images', default='/tmp/cifar10/cifar10-jpeg/test', help='a folder of input images')
    p.add_argument('--out_dir', default=os.path.join(ROOT, 'docs', 'images'))
    p.add_argument('--fast', action='store_true', help='DDIM, 100 steps, for figures 6-8')
    p.add_argument('--repaint', type=int, nargs=2, metavar=('STEPS', 'R'), default=None,
                   help='a shorter RePaint schedule for the inpainting picture (default: sample.py\'s, the paper\'s)')
    args = p.parse_args()
    ckpt = args.checkpoint or newest_checkpoint(args.ckpt_dir)
    inputs = first_images(args.images, 4, os.path.join(args.out_dir, 'editing_inputs'))
    mask = centre_mask(inputs[0], os.path.join(args.out_dir, 'editing_mask.png'))
    fast = ['--sampler', 'ddim', '--steps', '100'] if args.fast else []
    out = lambda name: os.path.join(args.out_dir, name)   # noqa: E731
    common = ['--checkpoint', ckpt, '--seed', '0', '--device', 'cpu']
    run(['paper.py', 'fig6', *common, *fast, '--num_samples', '4', '--out', out('fig6.png')])
    run(['paper.py', 'fig7', *common, *fast, '--images', inputs[0], '--num_images', '1', '--k', '6',
         '--out', out('fig7.png')])
    run(['paper.py', 'fig8', *common, *fast, '--images', os.path.dirname(inputs[0]), '--num_pairs', '2',
         '--out', out('fig8.png')])
    run(['paper.py', 'fig8', *common, '--noise', '--num_pairs', '2', '--sampler', 'ddim', '--steps', '100',
         '--out', out('fig8_noise.png')])
    repaint = ['--steps', str(args.repaint[0]), '--resamplings', str(args.repaint[1])] if args.repaint else []
    run(['sample.py', *common, '--inpaint', inputs[0], '--mask', mask, '--num_samples', '4', *repaint,
         '--out', out('inpaint.png')])
    run(['sample.py', *common, '--init_image', inputs[1], '--strength', '0.5', '--num_samples', '4',
         '--out', out('sdedit.png')])
    print(f'checkpoint: {ckpt}')


if __name__ == '__main__':
    main()
