"""metrics/fid.py and metrics/inception.py: NVIDIA's TorchScript Inception port, its conversion into torch-fidelity's
network, the two TF1-style resizes, and FID on real photos against measured values.

The tests marked `real` need ../shared/data/inception-2015-12-05-nv.pt (next to the checkout; CI has it)
and skip cleanly without it. The Inception network at 299x299 runs at ~2-4 images/s on one busy CPU
core, so they use small image sets; their expected ranges were measured with the same set sizes.
"""
import io
import os
import tarfile
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
import metrics.fid as fid
import metrics.inception as inception
from conftest import ROOT

SHARED = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
NV_WEIGHTS = os.path.join(SHARED, 'inception-2015-12-05-nv.pt')
CIFAR_JPEG = os.path.join(SHARED, 'cifar10-jpeg.tar.gz')
CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
real = pytest.mark.skipif(not (os.path.exists(NV_WEIGHTS) and os.path.exists(CIFAR_JPEG)),
                          reason='needs ../shared/data (the Inception port and the CIFAR-10 JPEG copy)')


def cifar_jpegs(split, n, seed):
    """n random images of the offline CIFAR-10 JPEG copy's split as uint8 [n, 32, 32, 3], streamed from the tar."""
    from PIL import Image
    per_class = 5000 if split == 'train' else 1000
    picks = np.random.default_rng(seed).choice(10 * per_class, n, replace=False)
    wanted = {f'cifar10-jpeg/{split}/{CLASSES[i // per_class]}/{i % per_class:04d}.jpg' for i in picks}
    images = {}
    with tarfile.open(CIFAR_JPEG) as tar:
        for member in tar:
            if member.name in wanted:
                images[member.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB'))
    assert len(images) == n
    return np.stack([images[name] for name in sorted(images)])


def scipy_fid(a, b):
    """FID of two feature sets by the textbook formula, with scipy's matrix square root."""
    import warnings
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)   # singular: rank-deficient, as expected
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----- TorchScript is code: detected by content, loaded only when verified ------------------------

@pytest.mark.filterwarnings('ignore::FutureWarning')   # torch.jit.script / save are deprecated, still work
def test_torchscript_is_detected_by_content_and_loaded_only_after_its_sha1(tmp_path, monkeypatch):
    script, plain = tmp_path / 'net.pt', tmp_path / 'weights.pth'
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    torch.save({'w': torch.zeros(2)}, plain)
    assert inception.is_torchscript(str(script)) and not inception.is_torchscript(str(plain))
    assert zipfile.is_zipfile(plain)   # both are zips: the compiled code/ entries tell them apart

    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, 'load', lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(inception.InceptionFileError, match='--trust_torchscript') as info:
        fid.load_feature_extractor(weights=str(script), cache_dir=str(tmp_path / 'c'))
    assert inception.file_sha1(str(script)) in str(info.value) and loads == []   # never run before the check
    with pytest.raises(inception.InceptionFileError, match='unexpected tensor'):  # trusted, but not the port
        fid.load_feature_extractor(weights=str(script), cache_dir=str(tmp_path / 'c'), trust_torchscript=True)
    assert len(loads) == 1
    with pytest.raises(fid.EvalError, match='no fc.weight'):
        fid.load_feature_extractor(weights=str(plain))
    assert evaluate.main(['--convert_inception', str(script), '--out', str(tmp_path / 'o.pth')]) == 2
    assert evaluate.main(['--convert_inception', str(plain), '--out', str(tmp_path / 'o.pth')]) == 2
    assert not os.path.exists(tmp_path / 'o.pth')


# ----- the resize to 299x299 ----------------------------------------------------------------------

def tf1_resize_reference(x, size):
    """TF1's legacy resize_bilinear (align_corners=False), written out: output j reads input j * in / out."""
    def weights(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((size, n_in))
        m[np.arange(size), lo] += 1 - (src - lo)
        m[np.arange(size), hi] += src - lo
        return m
    return np.einsum('ih,nchw,jw->ncij', weights(x.shape[2]), x, weights(x.shape[3]))


def test_nvidia_and_torch_fidelity_resize_are_tf1_bilinear():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = torch.rand(2, 3, 7, 32, generator=torch.Generator().manual_seed(0))   # not square: catches a swap of H and W
    expected = tf1_resize_reference(x.double().numpy(), 299)
    nvidia = inception.nvidia_resize(x).double().numpy()
    fidelity = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False).double().numpy()
    assert np.abs(nvidia - expected).max() < 1e-5
    assert np.abs(fidelity - expected).max() < 1e-5


# ----- the real network -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def nv_extractor(tmp_path_factory):
    """torch-fidelity's Inception with the port's weights, converted once into a temporary cache."""
    cache = tmp_path_factory.mktemp('fid_cache')
    extractor, fid_layer, isc_layer = fid.load_feature_extractor(weights=NV_WEIGHTS, cache_dir=str(cache))
    return extractor, fid_layer, isc_layer, cache


@real
def test_converted_weights_give_the_ports_features_on_real_photos(nv_extractor, tmp_path):
    extractor, fid_layer, isc_layer, cache = nv_extractor
    assert fid_layer == '2048' and isc_layer is None   # the port has no classifier: no IS
    images = cifar_jpegs('train', 6, seed=0)
    ours = fid.extract_features(images, extractor, 6, progress=False)[fid_layer]
    port = inception.torchscript_features(inception.load_torchscript(NV_WEIGHTS), images)
    assert ours.shape == (6, 2048) and np.abs(ours - port).max() <= 1e-3, np.abs(ours - port).max()
    assert np.abs(port).max() > 1   # features, not zeros

    # The CLI conversion writes a plain state_dict (weights_only) that loads the same network.
    out = tmp_path / 'nv.pth'
    assert evaluate.main(['--convert_inception', NV_WEIGHTS, '--out', str(out)]) == 0
    state_dict = torch.load(out, weights_only=True)
    converted = torch.load(next(cache.glob('*-fidelity.pth')), weights_only=True)
    assert state_dict.keys() == converted.keys() and all(torch.equal(state_dict[k], converted[k]) or
                                                         k.startswith('fc.') for k in state_dict)


# Measured with bench/fid_reference.py (features of 800 train / 800 test images): FID(train 50, test 50) was
# 208-213 over its 4 random draws and 197-216 over 8 more; uniform noise (50 images) vs 50 test images ~500.
N_REAL = 50
TRAIN_VS_TEST_50 = (175.0, 235.0)
SQRTM_DIMS = 512   # scipy's sqrtm of a 2048 x 2048 matrix takes a minute on a busy core; its first 512 features


@real
def test_fid_of_the_offline_cifar10_copy_is_in_the_measured_range(nv_extractor):
    extractor, fid_layer, _, _ = nv_extractor
    train = fid.extract_features(cifar_jpegs('train', N_REAL, seed=10), extractor, 25, progress=False)[fid_layer]
    test = fid.extract_features(cifar_jpegs('test', N_REAL, seed=11), extractor, 25, progress=False)[fid_layer]
    noise_images = np.random.default_rng(12).integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    noise = fid.extract_features(noise_images, extractor, 25, progress=False)[fid_layer]

    ours = fid.frechet_distance(*fid.feature_statistics(train), *fid.feature_statistics(test))
    assert TRAIN_VS_TEST_50[0] < ours < TRAIN_VS_TEST_50[1], ours
    noise_fid = fid.frechet_distance(*fid.feature_statistics(noise), *fid.feature_statistics(test))
    assert 300 < noise_fid < 1000, noise_fid
    # Our Frechet distance against the textbook formula with scipy's sqrtm, on real Inception features
    # (rank-deficient covariances: 50 images in 512 dimensions, where round-off shows).
    a, b = train[:, :SQRTM_DIMS], test[:, :SQRTM_DIMS]
    assert fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b)) == \
        pytest.approx(scipy_fid(a, b), rel=1e-6)


@real
def test_evaluate_cli_scores_samples_offline_with_the_port(nv_extractor, tmp_path, capsys):
    _, _, _, cache = nv_extractor   # the converted weights are cached there: no second conversion
    samples, ref = tmp_path / 'samples.npz', tmp_path / 'ref.npz'
    np.savez(samples, cifar_jpegs('test', 5, seed=13))
    np.savez(ref, cifar_jpegs('train', 5, seed=14))
    assert evaluate.main(['--samples', str(samples), '--fid', '--inception_weights', NV_WEIGHTS, '--ref', str(ref),
                          '--cache_dir', str(cache), '--device', 'cpu', '--quiet']) == 0
    out = capsys.readouterr().out
    assert out.startswith('FID ') and 'no IS' in out
    (entry,) = evaluate.read_json(str(tmp_path / 'samples.eval.json')).values()
    assert entry['options']['inception_weights'].startswith('ts') and entry['results']['fid'] > 0
