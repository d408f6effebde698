"""FID between the splits of the offline CIFAR-10 JPEG copy, at several sample sizes: the reference values
of tests/test_fid.py and the README.

    python bench/fid_reference.py --per_split 800          # ~1,700 Inception passes: ~10 min on 2 busy cores

Draws --per_split random training and test images (numpy seeds 1 and 2) and 100
uniform-noise images (seed 3), extracts their 2048-d features once with the
TorchScript Inception port converted into torch-fidelity's network (metrics/fid.py),
then scores random subsets of n training images against n test images, several
draws per n, and noise against n test images. The features are kept in
--features, so a second run only recomputes the FIDs.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from metrics.fid import extract_features, feature_statistics, frechet_distance, load_feature_extractor  # noqa: E402

SHARED = os.path.join(os.path.dirname(common.ROOT), 'shared', 'data')


def subset(images, n, seed):
    """n random images (numpy seed) of a split, in file-name order."""
    return images[np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))].permute(0, 2, 3, 1).numpy()


def features(args):
    if os.path.exists(args.features):
        with np.load(args.features) as data:
            return {k: data[k] for k in data.files}
    extractor, layer, _ = load_feature_extractor(weights=args.inception_weights)
    data = common.read_cifar_jpeg(args.data)
    images = {'train': subset(data['train'], args.per_split, seed=1), 'test': subset(data['test'], args.per_split, seed=2),
              'noise': np.random.default_rng(3).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)}
    out = {name: extract_features(x, extractor, 50)[layer] for name, x in images.items()}
    np.savez(args.features, **out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=os.path.join(SHARED, 'cifar10-jpeg.tar.gz'))
    p.add_argument('--inception_weights', default=os.path.join(SHARED, 'inception-2015-12-05-nv.pt'))
    p.add_argument('--per_split', type=int, default=800)
    p.add_argument('--sizes', default='50,100,200,400,800')
    p.add_argument('--draws', type=int, default=4)
    p.add_argument('--features', default=os.path.join(common.RESULTS_DIR, 'fid_reference_features.npz'))
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.features), exist_ok=True)
    f = features(args)
    rng = np.random.default_rng(0)

    def fid(a, b):
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))

    rows = []
    for n in (int(s) for s in args.sizes.split(',')):
        draws = 1 if n == len(f['train']) else args.draws
        values = [fid(f['train'][rng.choice(len(f['train']), n, replace=False)],
                      f['test'][rng.choice(len(f['test']), n, replace=False)]) for _ in range(draws)]
        m = min(n, len(f['noise']))
        noise = fid(f['noise'][rng.choice(len(f['noise']), m, replace=False)],
                    f['test'][rng.choice(len(f['test']), n, replace=False)])
        rows.append(dict(n=n, draws=draws, fid_min=min(values), fid_max=max(values), fid_mean=float(np.mean(values)),
                         noise_images=m, noise_fid=noise))
        print(rows[-1], flush=True)
    common.print_table(rows, list(rows[0]), 'FID(train n, test n) of the offline CIFAR-10 JPEG copy')
    print('wrote', common.write_json('fid_reference', dict(args=vars(args), rows=rows)))


if __name__ == '__main__':
    main()
