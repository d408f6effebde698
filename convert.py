"""Convert between our checkpoints and diffusers folders.

    python convert.py checkpoints/ddpm_latest.pth --to-diffusers ddpm-ours     # a DDPMPipeline folder (EMA weights)
    python convert.py ddpm-cifar10-32 --out ddpm-cifar10-32.pth                 # one of our checkpoints, with config

diffusers is not needed for either direction. The folder written loads with
`diffusers.DDPMPipeline.from_pretrained('ddpm-ours')`; sample.py and evaluate.py
also take a diffusers folder directly as --checkpoint, so converting that way
is only needed to get a single file.
"""

import argparse
import os
import sys

from diffusion import model_from_checkpoint
from runtime import HelpFormatter, OneLineErrorParser, run_cli
from weights.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from weights.diffusers_format import save_diffusers


def build_parser():
    p = OneLineErrorParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('source', help='a checkpoint written by train.py, or a diffusers DDPMPipeline / UNet2DModel folder')
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument('--to-diffusers', metavar='OUT_DIR', default=None,
                    help='write SOURCE (a checkpoint) as a diffusers DDPMPipeline folder')
    to.add_argument('--out', metavar='CKPT', default=None,
                    help='write SOURCE (a diffusers folder) as one of our .pth checkpoints')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                   help='export the EMA weights (default: when the checkpoint has them; train.py always saves '
                        'them); --no-ema: the raw training weights')
    p.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    return p


def run(args):
    if not os.path.exists(args.source):
        raise FileNotFoundError(f'not found: {args.source}')
    if args.to_diffusers:
        if os.path.isdir(args.source):
            raise CheckpointError(f'{args.source} is already a diffusers folder; --to-diffusers takes a .pth '
                                  f'checkpoint')
        ckpt = load_checkpoint(args.source)
        has_ema = ckpt.get('ema_state_dict') is not None
        if args.ema and not has_ema:
            raise CheckpointError(f'{args.source} has no EMA weights; drop --ema to export its only weights')
        ema = has_ema if args.ema is None else args.ema
        model = model_from_checkpoint(ckpt, ema=ema, source=args.source)
        print(f'wrote {save_diffusers(model, args.to_diffusers)} (DDPMPipeline, {"EMA" if ema else "raw"} weights)')
    else:
        if not os.path.isdir(args.source):
            raise CheckpointError(f'{args.source} is not a folder; --out converts a diffusers folder '
                                  f'(use --to-diffusers for a .pth checkpoint)')
        ckpt = load_checkpoint(args.source)   # names and shapes are checked against the config here
        save_checkpoint({k: ckpt[k] for k in ('model_state_dict', 'config', 'source')}, args.out)
        print(f'wrote {args.out} (config: {ckpt["config"]})')
    return 0


def main(argv=None):
    return run_cli(build_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
