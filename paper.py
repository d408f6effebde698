"""The paper's figures and tables from a checkpoint: one subcommand each.

    python paper.py fig6 --checkpoint ckpt.pth                        # progressive generation
    python paper.py fig7 --checkpoint ckpt.pth --images test_images/   # samples sharing a latent x_t
    python paper.py fig8 --checkpoint ckpt.pth --images pairs/         # interpolation through x_t
    python paper.py fig8 --checkpoint ckpt.pth --noise                 # between two seeds' x_T

Each subcommand's code lives in a library module (editing/figures.py for figures 6-8); this file only
dispatches. `python paper.py SUBCOMMAND --help` lists its options. docs/editing.md shows the pictures.
"""

import sys

from editing.figures import SUBCOMMANDS as FIGURES
from runtime import HelpFormatter, OneLineErrorParser, run_cli

SUBCOMMANDS = {**FIGURES}


def build_parser():
    p = OneLineErrorParser(description='Reproduce the paper\'s figures from a checkpoint.')
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
