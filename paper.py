"""The paper's figures and tables from a checkpoint: one subcommand each.

    python paper.py fig6 --checkpoint ckpt.pth                        # progressive generation
    python paper.py fig7 --checkpoint ckpt.pth --images test_images/   # samples sharing a latent x_t
    python paper.py fig8 --checkpoint ckpt.pth --images pairs/         # interpolation through x_t
    python paper.py fig8 --checkpoint ckpt.pth --noise                 # between two seeds' x_T
    python paper.py fig5 --checkpoint ckpt.pth --num_images 100        # rate and distortion along the chain
    python paper.py table2 --steps 500 --fid_weights inception.pt      # the prediction / objective ablation

Each subcommand's code lives in a library module (editing/figures.py for figures 6-8,
metrics/rate_distortion.py for Fig. 5, training/ablations.py for Table 2); this file only dispatches.
`python paper.py SUBCOMMAND --help` lists its options. docs/editing.md shows the pictures of 6-8,
docs/paper.md explains Table 2 and Fig. 5.
"""

import sys

from editing.figures import SUBCOMMANDS as FIGURES
from metrics.rate_distortion import FIG5
from runtime import HelpFormatter, OneLineErrorParser, run_cli
from train import train_ddpm
from training.ablations import table2_subcommand

SUBCOMMANDS = {**FIGURES, 'fig5': FIG5, 'table2': table2_subcommand(train_ddpm)}


def build_parser():
    p = OneLineErrorParser(description='Reproduce the paper\'s figures and tables.')
    commands = p.add_subparsers(dest='command', required=True, metavar='{' + ','.join(SUBCOMMANDS) + '}')
    for name, (help_text, add_arguments, run) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return p


def main(argv=None):
    return run_cli(build_parser(), run, argv)


def run(args):
    for line in args.run(args):
        print(f'wrote {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
