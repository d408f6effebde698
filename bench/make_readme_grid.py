"""The README's sample grid: 64 images of one checkpoint, DPM-Solver++ with 20 steps and x_0 clipped.

    python bench/make_readme_grid.py                          # newest .pth in /tmp/pics/ckpt
    python bench/make_readme_grid.py --checkpoint checkpoints/ddpm_latest.pth

It prints the checkpoint's training step and the sample.py command, then runs that command (the one a
user would type; --seed 0, on the CPU) to write docs/images/samples.png, and stores that grid again with a
256-colour palette (median cut, no dithering): noisy samples of a weak model compress badly, and the
README's pictures stay under 150 KB that way. --full_colour keeps sample.py's file as it is.
"""

import argparse
import os
import shlex
import subprocess
import sys

import torch
from PIL import Image

from common import newest_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def describe(path):
    """'<arch>, step N' from the checkpoint's stored config and step."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return f"{ckpt['config'].get('arch')} U-Net, step {ckpt.get('step')}"


def to_palette(path):
    """Re-save a PNG with 256 colours: about a third of the bytes for a grid of 64 noisy samples."""
    with Image.open(path) as image:
        small = image.convert('RGB').quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default=None, help='default: the newest .pth in --ckpt_dir')
    p.add_argument('--ckpt_dir', default='/tmp/pics/ckpt')
    p.add_argument('--out', default=os.path.join('docs', 'images', 'samples.png'), help='relative to the repo root')
    p.add_argument('--full_colour', action='store_true', help='keep sample.py\'s PNG (no 256-colour palette)')
    args = p.parse_args()
    ckpt = args.checkpoint or newest_checkpoint(args.ckpt_dir)
    print(f'{ckpt}: {describe(ckpt)}', flush=True)
    command = ['sample.py', '--checkpoint', ckpt, '--sampler', 'dpm-solver', '--steps', '20', '--clip_denoised',
               '--num_samples', '64', '--seed', '0', '--device', 'cpu', '--out', args.out]
    print('$ python', ' '.join(shlex.quote(c) for c in command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    out = os.path.join(ROOT, args.out)
    if not args.full_colour:
        to_palette(out)
    print(f'wrote {args.out} ({os.path.getsize(out):,} bytes{"" if args.full_colour else ", 256 colours"})')


if __name__ == '__main__':
    main()
