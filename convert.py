"""Convert between our checkpoints, diffusers folders and the DDIM / pytorch_diffusion format.

    python convert.py checkpoints/ddpm_latest.pth --to-diffusers ddpm-ours     # a DDPMPipeline folder (EMA weights)
    python convert.py checkpoints/ddpm_latest.pth --to-ddim ddpm-ours.ckpt     # a DDIM `Model` state_dict (EMA)
    python convert.py ddpm-cifar10-32 --out ddpm-cifar10-32.pth                 # one of our checkpoints, with config
    python convert.py ema_cifar10 --out ema_cifar10.pth                         # the paper's EMA release (downloaded)

diffusers is not needed for any direction. The folder written loads with
`diffusers.DDPMPipeline.from_pretrained('ddpm-ours')`; the .ckpt loads with strict=True
into the `Model` class of ermongroup/ddim (and PNDM, DPM-Solver's DDPM code) given the
config values convert.py prints. sample.py and evaluate.py also take a diffusers folder,
a DDIM-format file or a release name directly as --checkpoint, so converting that way
is only needed to get a single file of ours.
"""

import argparse
import os
import sys

from diffusion import model_from_checkpoint
from runtime import HelpFormatter, OneLineErrorParser, run_cli
from weights.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from weights.ddim_format import RELEASES, check_exportable, ddim_config, save_ddim
from weights.diffusers_format import save_diffusers


def build_parser():
    p = OneLineErrorParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter)
    p.add_argument('source', help='a checkpoint written by train.py, a diffusers DDPMPipeline / UNet2DModel folder, '
                                  f'a DDIM-format .ckpt / ckpt.pth, or a release name ({", ".join(RELEASES)})')
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument('--to-diffusers', metavar='OUT_DIR', default=None,
                    help='write SOURCE (a checkpoint) as a diffusers DDPMPipeline folder')
    to.add_argument('--to-ddim', metavar='OUT_CKPT', default=None,
                    help='write SOURCE (a checkpoint) as a DDIM / pytorch_diffusion Model state_dict')
    to.add_argument('--out', metavar='CKPT', default=None,
                    help='write SOURCE (a diffusers folder or DDIM-format file) as one of our .pth checkpoints')
    p.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                   help='export the EMA weights (default: when the checkpoint has them; train.py always saves '
                        'them); --no-ema: the raw training weights')
    p.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    return p


def model_to_export(args):
    """The model to write with --to-diffusers / --to-ddim, and whether its weights are the EMA ones."""
    if os.path.isdir(args.source):
        raise CheckpointError(f'{args.source} is already a diffusers folder; --to-diffusers and --to-ddim take a '
                              f'.pth checkpoint')
    ckpt = load_checkpoint(args.source)
    has_ema = ckpt.get('ema_state_dict') is not None
    if args.ema and not has_ema:
        raise CheckpointError(f'{args.source} has no EMA weights; drop --ema to export its only weights')
    ema = has_ema if args.ema is None else args.ema
    return model_from_checkpoint(ckpt, ema=ema, source=args.source), ema


def run(args):
    args.source = resolve_checkpoint(args.source)
    if not os.path.exists(args.source):
        raise FileNotFoundError(f'not found: {args.source}')
    if args.to_diffusers:
        model, ema = model_to_export(args)
        print(f'wrote {save_diffusers(model, args.to_diffusers)} (DDPMPipeline, {"EMA" if ema else "raw"} weights)')
    elif args.to_ddim:
        model, ema = model_to_export(args)
        check_exportable(model, what=args.source)   # before anything is written
        save_ddim(model, args.to_ddim)
        config = ', '.join(f'{k}: {v}' for k, v in ddim_config(model).items())
        print(f'wrote {args.to_ddim} (DDIM Model state_dict, {"EMA" if ema else "raw"} weights; config: {config})')
    else:
        ckpt = load_checkpoint(args.source)   # names and shapes are checked against the config here
        if 'source' not in ckpt:
            raise CheckpointError(f'{args.source} is already one of our checkpoints; --out converts a diffusers '
                                  f'folder or a DDIM-format file (use --to-diffusers or --to-ddim the other way)')
        keep = ('model_state_dict', 'ema_state_dict', 'config', 'source', 'step', 'epoch')
        save_checkpoint({k: ckpt[k] for k in keep if ckpt.get(k) is not None}, args.out)
        print(f'wrote {args.out} (config: {ckpt["config"]})')
    return 0


def main(argv=None):
    return run_cli(build_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
