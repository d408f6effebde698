"""The README's sample grid: 64 images of one checkpoint, DPM-Solver++ with 20 steps and x_0 clipped.

    python bench/make_readme_grid.py                          # newest .pth in /tmp/pics/ckpt
    python bench/make_readme_grid.py --checkpoint checkpoints/ddpm_latest.pth

It prints the checkpoint's training step and the sample.py command, then runs that command (the one a
user would type; --seed 0, on the CPU) to write docs/images/samples.png.
"""

import argparse
import glob
import os
import shlex
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def newest_checkpoint(folder):
    paths = glob.glob(os.path.join(folder, '*.pth'))
    if not paths:
        raise SystemExit(f'error: no .pth checkpoint in {folder}; pass --checkpoint')
    return max(paths, key=os.path.getmtime)


def describe(path):
    """'<arch>, step N' from the checkpoint's stored config and step."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return f"{ckpt['config'].get('arch')} U-Net, step {ckpt.get('step')}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--checkpoint', default=None, help='default: the newest .pth in --ckpt_dir')
    p.add_argument('--ckpt_dir', default='/tmp/pics/ckpt')
    p.add_argument('--out', default=os.path.join(ROOT, 'docs', 'images', 'samples.png'))
    args = p.parse_args()
    ckpt = args.checkpoint or newest_checkpoint(args.ckpt_dir)
    print(f'{ckpt}: {describe(ckpt)}', flush=True)
    command = ['sample.py', '--checkpoint', ckpt, '--sampler', 'dpm-solver', '--steps', '20', '--clip_denoised',
               '--num_samples', '64', '--seed', '0', '--device', 'cpu', '--out', args.out]
    print('$ python', ' '.join(shlex.quote(c) for c in command), flush=True)
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True)
    print(f'wrote {args.out} ({os.path.getsize(args.out):,} bytes)')


if __name__ == '__main__':
    main()
