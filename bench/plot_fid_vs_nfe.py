"""Plot FID against network evaluations (NFE), one line per sampler: the picture of docs/sampling.md.

The numbers come from bench/results/<--results>.json, which bench/fid_vs_nfe.py writes, when that file
exists; otherwise from TABLE below, a copy of the table "Fast samplers: FID against network evaluations"
in bench/RESULTS.md (the run it describes left no results file in the repository). The script says which
one it used, and so does the plot's title.

    pip install -r bench/requirements.txt
    python bench/plot_fid_vs_nfe.py                      # -> docs/images/fid_vs_nfe.png
    python bench/plot_fid_vs_nfe.py --results my_run --out fid.png
"""

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')   # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, 'bench', 'results')   # where bench/common.py writes results

# bench/RESULTS.md, "Fast samplers: FID against network evaluations": tiny U-Net, 3,980 CPU steps;
# FID of 1,000 samples against 2,000 training images; 1,000 test images score 38.2 (the floor).
NFE = [5, 10, 20, 50, 100]
TABLE = {
    'ddpm (respaced ancestral)': [422, 339, 299, 248, 199],
    'ddim': [242, 186, 160, 130, 121],
    'ddim-quadratic': [199, 139, 129, 123, 121],
    'dpm-solver': [333, 245, 235, 232, 232],
    'dpm-solver-clip': [247, 130.5, 120.5, 118.9, 119.1],
}
TABLE_FLOOR = 38.2
TABLE_SOURCE = 'bench/RESULTS.md: FID-1k vs 2k training images, tiny U-Net, 3,980 CPU steps'


def from_results(path):
    """{sampler: [(nfe, fid), ...]}, the floor and a source line, from a bench/fid_vs_nfe.py results file."""
    with open(path) as f:
        data = json.load(f)
    curves = {}
    for row in sorted(data['rows'], key=lambda r: r['nfe']):
        curves.setdefault(row['sampler'], []).append((row['nfe'], row['fid']))
    key = data['key']
    return curves, data['fid_floor'], (f'{os.path.relpath(path, ROOT)}: FID-{key["num_samples"]} '
                                       f'vs {key["ref_images"]} training images')


def from_table():
    return {name: list(zip(NFE, fids)) for name, fids in TABLE.items()}, TABLE_FLOOR, TABLE_SOURCE


def plot(curves, floor, source, out):
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in curves.items():
        ax.plot(*zip(*points), marker='o', markersize=4, label=name)
    ax.axhline(floor, color='grey', linestyle='--', linewidth=1, label=f'real test images ({floor:.1f})')
    ax.set_xscale('log')
    ax.set_xticks(sorted({n for points in curves.values() for n, _ in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel('network evaluations (NFE)')
    ax.set_ylabel('FID (lower is better)')
    ax.set_title(source, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--results', default='fid_vs_nfe', help='bench/results/<name>.json (default: fid_vs_nfe)')
    p.add_argument('--out', default=os.path.join(ROOT, 'docs', 'images', 'fid_vs_nfe.png'))
    args = p.parse_args()
    path = os.path.join(RESULTS_DIR, f'{args.results}.json')
    curves, floor, source = from_results(path) if os.path.exists(path) else from_table()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot(curves, floor, source, args.out)
    print(f'numbers from {source}\nwrote {args.out} ({os.path.getsize(args.out):,} bytes)')


if __name__ == '__main__':
    main()
