"""Does a class-conditional checkpoint draw its classes? A cheap check against the data, not FID.

Proxy (no offline FID in this repository yet): for every class c, the mean image
of --per_class samples drawn with label c is compared with the mean image of the
test split's class-c images (L2 distance over all pixels, in [-1, 1] units). A
model that follows its labels puts each class's sample mean nearest its own
class's data mean ('nearest own class', out of num_classes); unconditional
samples (the null class) give the baseline distance. 'spread' is the per-pixel
standard deviation across a class's samples, a crude measure of their variety.
It says nothing about sample quality beyond first moments: only FID would.

    python bench/class_means.py --checkpoint checkpoints/ddpm_latest.pth --data_dir cifar10-jpeg
    python bench/class_means.py --checkpoint ckpt.pth --data_dir cifar10-jpeg --guidance 0 1 3 --per_class 50
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository on sys.path)
from common import print_table  # noqa: E402

from data.process_cifar import load_dataset, to_model_range  # noqa: E402
from sampling.generate import load_model  # noqa: E402


def class_means(data_dir, image_size, num_classes):
    """The test split's mean image per class, [num_classes, C, H, W] in [-1, 1]."""
    images, labels, _ = load_dataset('folder', data_dir, image_size=image_size, train=False, labels=True)
    x = to_model_range(images)
    return torch.stack([x[labels == c].mean(0) for c in range(num_classes)])


def row(name, sample_means, spreads, data_means):
    dist = torch.cdist(sample_means.flatten(1), data_means.flatten(1)) / data_means[0].numel() ** 0.5
    own = dist.diagonal()
    others = dist[~torch.eye(len(dist), dtype=torch.bool)].view(len(dist), -1).mean(1)
    hits = int((dist.argmin(1) == torch.arange(len(dist))).sum())
    return {'samples': name, 'nearest own class': f'{hits}/{len(dist)}', 'dist to own mean': own.mean().item(),
            'dist to other means': others.mean().item(), 'spread': spreads.mean().item()}


@torch.inference_mode()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--data_dir', required=True, help='the image folder with test/<class>/ subfolders')
    p.add_argument('--per_class', type=int, default=50)
    p.add_argument('--steps', type=int, default=20, help='dpm-solver steps')
    p.add_argument('--guidance', type=float, nargs='+', default=[0.0, 1.0, 3.0])
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args()
    model, _ = load_model(args.checkpoint, device='cpu')
    if model.num_classes is None:
        sys.exit('error: this checkpoint is unconditional; train one with --class_cond')
    C = model.num_classes
    data_means = class_means(args.data_dir, model.image_shape[-1], C)

    def draw(labels, w):
        # The same noise for every label and guidance scale, so the rows differ only in the conditioning.
        g = torch.Generator().manual_seed(args.seed)
        return model.sample(args.per_class, sampler='dpm-solver', steps=args.steps, generator=g, progress=False,
                            labels=labels, guidance_scale=w)

    rows = []
    x = draw(None, 0.0)   # unconditional: the same sample mean compared with every class
    rows.append(row('unconditional (null class)', x.mean(0, keepdim=True).expand(C, *x.shape[1:]),
                    x.std(0).mean().expand(C), data_means))
    for w in args.guidance:
        xs = [draw(c, w) for c in range(C)]
        rows.append(row(f'class-conditional, w={w:g}', torch.stack([x.mean(0) for x in xs]),
                        torch.stack([x.std(0).mean() for x in xs]), data_means))
    print_table(rows, list(rows[0]), title=f'{args.per_class} dpm-solver-{args.steps} samples per class, '
                                           f'{args.checkpoint}')


if __name__ == '__main__':
    main()
