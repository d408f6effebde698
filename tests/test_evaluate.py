"""evaluate.py, metrics/fid.py and metrics/bpd.py: FID / IS glue, the Frechet distance, and bits/dim by the
variational bound (CPU, no network)."""
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.distributions import Normal, kl_divergence

import evaluate
import metrics.bpd as bpd
import metrics.fid as fid
import sampling.generate as generation
from diffusion import create_cifar10_ddpm, discretized_gaussian_log_likelihood
from weights.checkpoint import save_checkpoint
from tiny_extractor import TINY, registered_tiny_extractor, smooth_images  # noqa: F401 (an autouse fixture)

SIZE = 8


def tiny_model(timesteps=20, variance='beta', seed=0):
    torch.manual_seed(seed)
    model = create_cifar10_ddpm(timesteps=timesteps, variance=variance, channels=(32, 64), num_res_blocks=1,
                                attn_resolutions=(8,), image_size=SIZE, dropout=0.1)
    with torch.no_grad():   # the output conv starts at zero; give the net a non-trivial eps prediction
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_checkpoint(path, timesteps=10):
    model = tiny_model(timesteps)
    config = dict(arch='base', timesteps=timesteps, beta_start=1e-4, beta_end=0.02, variance='beta',
                  channels=[32, 64], num_res_blocks=1, attn_resolutions=[8], image_size=SIZE, dropout=0.1,
                  batch_size=128, lr=2e-4, seed=0, dataset='synthetic', data_dir='data')
    save_checkpoint({'model_state_dict': model.state_dict(), 'ema_state_dict': model.state_dict(),
                     'optimizer_state_dict': {}, 'epoch': 1, 'step': 10, 'config': config}, path)
    return str(path)


# ----- the Frechet distance ---------------------------------------------------------------------

def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = 0.5 + rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    mu1, s1 = fid.feature_statistics(a)
    mu2, s2 = fid.feature_statistics(b)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-8)
    assert ours == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)   # symmetric
    # torch-fidelity's own formula (eigenvalues of sigma1 sigma2) agrees as well.
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    theirs = fid_statistics_to_metric({'mu': mu1, 'sigma': s1}, {'mu': mu2, 'sigma': s2}, False)
    assert ours == pytest.approx(theirs['frechet_inception_distance'], rel=1e-8)
    # Rank-deficient covariances (fewer samples than dimensions), as with small sample sets.
    c, d = rng.normal(size=(10, 16)), rng.normal(size=(12, 16))
    stats = [*fid.feature_statistics(c), *fid.feature_statistics(d)]
    assert fid.frechet_distance(*stats) == pytest.approx(scipy_frechet(*stats), rel=1e-5)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 10))
    mu, sigma = fid.feature_statistics(features)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    shift = rng.normal(size=10)
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx((shift ** 2).sum(), rel=1e-7)
    # Two isotropic Gaussians: d^2 = ||dmu||^2 + D (s1 - s2)^2 for standard deviations s1, s2.
    assert fid.frechet_distance(np.zeros(4), 4 * np.eye(4), np.zeros(4), np.eye(4)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(mu, sigma, mu[:5], sigma[:5, :5])


# ----- the torch-fidelity glue, with the stand-in extractor ------------------------------------

def test_glue_fid_of_a_set_with_itself_is_zero_and_matches_torch_fidelity():
    images, other = smooth_images(60, seed=1), smooth_images(50, seed=2)
    extractor, fid_layer, isc_layer = fid.load_feature_extractor(TINY)
    assert (fid_layer, isc_layer) == ('pool', 'logits')
    ref = fid.feature_statistics(fid.extract_features(images, extractor, 16, progress=False)[fid_layer])
    same = fid.image_metrics(images, extractor, fid_layer, isc_layer, ref, batch_size=16, progress=False)
    assert abs(same['fid']) < 1e-6
    ref_features = fid.extract_features(other, extractor, 16, progress=False)[fid_layer]
    ours = fid.image_metrics(images, extractor, fid_layer, isc_layer, fid.feature_statistics(ref_features),
                                  ref_features=ref_features, batch_size=7, progress=False)
    assert ours['fid'] > 0.01 and ours['isc_mean'] > 1.0 and 'kid_mean' in ours

    # The same numbers from torch-fidelity's own pipeline (its FID code, data loading and batching).
    import torch_fidelity
    from torch_fidelity.datasets import RandomlyGeneratedDataset

    class Images(RandomlyGeneratedDataset):
        def __init__(self, array):
            self.imgs = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(images), input2=Images(other), fid=True, isc=True, kid=True, feature_extractor=TINY,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True, batch_size=16, kid_subset_size=50)
    assert ours['fid'] == pytest.approx(theirs['frechet_inception_distance'], rel=1e-5)
    assert ours['isc_mean'] == pytest.approx(theirs['inception_score_mean'], rel=1e-5)
    assert ours['kid_mean'] == pytest.approx(theirs['kernel_inception_distance_mean'], rel=1e-5, abs=1e-9)


def test_cli_scores_samples_and_caches_reference_statistics(tmp_path, monkeypatch, capsys):
    samples, ref = tmp_path / 'samples.npz', tmp_path / 'ref.npz'
    np.savez(samples, smooth_images(40, seed=3))
    np.savez(ref, smooth_images(64, seed=4))
    cache = tmp_path / 'cache'
    args = ['--fid', '--kid', '--ref', str(ref), '--feature_extractor', TINY, '--cache_dir', str(cache),
            '--device', 'cpu', '--quiet']
    assert evaluate.main(['--samples', str(samples), *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith('FID ') and ' IS ' in out and ' KID ' in out
    results_file = tmp_path / 'samples.eval.json'
    data = json.loads(results_file.read_text())
    (entry,) = data.values()
    assert entry['metric'] == 'fid' and entry['options']['num_samples'] == 40
    assert entry['results']['ref_count'] == 64 and entry['results']['fid'] > 0
    stats = [f for f in os.listdir(cache) if f.endswith('-stats.npz')]
    assert len(stats) == 1 and any(f.endswith('-features.npy') for f in os.listdir(cache))

    # The reference is read once: later runs use the cache.
    reads = []
    real_load = fid.load_images

    def counted_load(source, *a, **k):
        reads.append(source)
        return real_load(source, *a, **k)
    monkeypatch.setattr(fid, 'load_images', counted_load)        # reference images (fid.py)
    monkeypatch.setattr(evaluate, 'load_images', counted_load)   # samples (evaluate.py)
    assert evaluate.main(['--samples', str(ref), *args]) == 0
    assert reads == [str(ref)], 'only the samples are read; the reference comes from the cache'
    assert json.loads((tmp_path / 'ref.eval.json').read_text())
    fid_self = next(iter(json.loads((tmp_path / 'ref.eval.json').read_text()).values()))['results']['fid']
    assert abs(fid_self) < 1e-6

    # Precomputed statistics (pytorch-fid's mu / sigma format) give the same FID.
    assert evaluate.main(['--samples', str(samples), '--fid', '--ref_stats', str(cache / stats[0]),
                          '--feature_extractor', TINY, '--json', str(tmp_path / 'other.json'), '--quiet']) == 0
    (again,) = json.loads((tmp_path / 'other.json').read_text()).values()
    assert again['results']['fid'] == pytest.approx(entry['results']['fid'], rel=1e-9)


def test_cli_fid_of_a_checkpoint_samples_once(tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / 'ddpm_latest.pth')
    ref = tmp_path / 'ref.npz'
    np.savez(ref, smooth_images(30, seed=5))
    args = ['--checkpoint', ckpt, '--fid', '--num_samples', '20', '--batch_size', '10', '--sampler', 'ddim',
            '--steps', '3', '--ref', str(ref), '--feature_extractor', TINY, '--cache_dir', str(tmp_path / 'c'),
            '--device', 'cpu', '--quiet']
    assert evaluate.main(args) == 0
    assert 'biased upwards' in capsys.readouterr().err    # fewer than 50,000 samples is said out loud
    npz = tmp_path / 'ddpm_latest.samples-ema-ddim3-eta0-seed0-auto.npz'
    assert npz.exists() and np.load(npz)['arr_0'].shape == (20, SIZE, SIZE, 3)
    calls = []
    monkeypatch.setattr(generation, 'sample_batch', lambda *a, **k: calls.append(a) or pytest.fail('resampled'))
    assert evaluate.main(args) == 0
    assert calls == []
    data = json.loads((tmp_path / 'ddpm_latest.eval.json').read_text())
    (entry,) = data.values()     # the same options land on the same key
    assert entry['options']['ema'] is True and entry['options']['steps'] == 3
    assert entry['options']['clip_denoised'] is True   # DDIM's default

    # Unclipped DDIM is another run: its own samples file and its own entry.
    monkeypatch.undo()
    assert evaluate.main([*args, '--no-clip_denoised']) == 0
    assert (tmp_path / 'ddpm_latest.samples-ema-ddim3-noclip-eta0-seed0-auto.npz').exists()
    data = json.loads((tmp_path / 'ddpm_latest.eval.json').read_text())
    assert sorted(e['options']['clip_denoised'] for e in data.values()) == [False, True]



def test_fid_refuses_samples_and_reference_at_different_resolutions(tmp_path, monkeypatch, capsys):
    """Issue 22, item 1: 16x16 samples against 8x8 references (an .npz, a folder, our cached statistics,
    CIFAR-10's 32x32) are one line and exit 2, before the reference is read or samples drawn, with no
    results written."""
    from PIL import Image
    samples, ref_npz, folder = tmp_path / 'samples.npz', tmp_path / 'ref.npz', tmp_path / 'ref_folder'
    np.savez(samples, smooth_images(8, seed=1, size=16))
    np.savez(ref_npz, smooth_images(8, seed=2))
    folder.mkdir()
    for i, image in enumerate(smooth_images(3, seed=3)):
        Image.fromarray(image).save(folder / f'{i}.png')
    stats = tmp_path / 'stats.npz'   # statistics as metrics/fid.py caches them, with their resolution
    extractor, layer, _ = fid.load_feature_extractor(TINY)
    written = fid.cached_statistics('ref8', smooth_images(8, seed=2), extractor, layer, cache_dir=str(tmp_path / 'c'),
                                    progress=False)[-1]
    os.replace(written, stats)
    made = sorted(os.listdir(tmp_path))
    assert fid.reference_resolution(str(ref_npz)) == (8, 8) and fid.reference_resolution(str(folder)) == (8, 8)
    assert fid.reference_resolution('cifar10') == (32, 32) and fid.reference_resolution('x', str(stats)) == (8, 8)
    monkeypatch.setattr(evaluate, 'reference_statistics', lambda *a, **k: pytest.fail('reference read first'))
    monkeypatch.setattr(evaluate, 'sample_checkpoint', lambda *a, **k: pytest.fail('sampled first'))
    tiny = ['--feature_extractor', TINY, '--device', 'cpu', '--quiet']
    for ref, size in ((['--ref', str(ref_npz)], 8), (['--ref', str(folder)], 8), (['--ref_stats', str(stats)], 8),
                      ([], 32)):
        assert evaluate.main(['--samples', str(samples), '--fid', *ref, *tiny]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f'error: the samples are 16x16 but the reference images'), err
        assert f'are {size}x{size}; FID needs both at one resolution' in err, err
    ckpt = make_checkpoint(tmp_path / 'ddpm_latest.pth')   # 8x8 samples drawn from a model against CIFAR-10
    made.append('ddpm_latest.pth')
    assert evaluate.main(['--checkpoint', ckpt, '--fid', '--num_samples', '4', *tiny]) == 2
    assert 'the samples are 8x8 but the reference images (cifar10) are 32x32' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted(made), 'no results or samples are written'


def test_offline_errors_say_what_to_download(tmp_path, monkeypatch, capsys):
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(inception, 'load_state_dict_from_url', no_network)
    samples = tmp_path / 's.npz'
    np.savez(samples, smooth_images(4))
    assert evaluate.main(['--samples', str(samples), '--fid', '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ')
    assert fid.INCEPTION_URL in err and '--inception_weights' in err

    pickle = tmp_path / 'evil.pth'
    torch.save({'x': types.SimpleNamespace(a=1)}, pickle)
    assert evaluate.main(['--samples', str(samples), '--fid', '--inception_weights', str(pickle)]) == 2
    assert 'not a plain weights file' in capsys.readouterr().err
    assert evaluate.main(['--samples', str(samples), '--fid', '--inception_weights', str(tmp_path / 'x.pth')]) == 2
    assert 'weights not found' in capsys.readouterr().err

    # No CIFAR-10 on disk and no network: the message names the archive and the alternatives.
    fake = types.ModuleType('data.process_cifar')

    def load_dataset(name, data_dir, image_size=32, train=True):
        raise RuntimeError('Error downloading cifar-10-python.tar.gz')

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, 'data.process_cifar', fake)
    with pytest.raises(fid.EvalError) as info:
        fid.load_images('cifar10', str(tmp_path / 'data'), train=True)
    message = str(info.value)
    assert 'Error downloading' in message and fid.CIFAR10_URL in message and '--ref_stats' in message


# ----- bits/dim ---------------------------------------------------------------------------------

def schedule(T, beta_start=1e-4, beta_end=0.02):
    """The linear schedule in float64, independently of diffusion.py."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return betas, alphas_cumprod


@pytest.mark.parametrize('clip', [True, False], ids=['clipped', 'unclipped'])
@pytest.mark.parametrize('variance', ['beta', 'posterior'])
def test_each_kl_term_matches_its_closed_form(variance, clip):
    """KL(q || p_theta) per term; with clip, p_theta's mean is Eq. (7)'s posterior mean of the clipped
    x_0 prediction (the paper's evaluation), else Eq. (11)."""
    T = 20
    model = tiny_model(T, variance=variance)
    betas, abar = schedule(T)
    g = torch.Generator().manual_seed(0)
    x_0 = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    for step in (1, 2, 10, T - 1):       # code t = step is the paper's t = step + 1 > 1
        t = torch.full((3,), step)
        noise = torch.randn(x_0.shape, generator=g)
        x_t = model.q_sample(x_0, t, noise)
        ours = model.vb_term_bpd(x_0, x_t, t, clip_denoised=clip)

        # q(x_{t-1} | x_t, x_0), Eqs. (6)-(7), and p(x_{t-1} | x_t) with the mean of Eq. (11).
        b, a_t, a_prev = betas[step], abar[step], abar[step - 1]
        x0d, xtd = x_0.double(), x_t.double()
        q_mean = a_prev.sqrt() * b / (1 - a_t) * x0d + (1 - b).sqrt() * (1 - a_prev) / (1 - a_t) * xtd
        q_var = (1 - a_prev) / (1 - a_t) * b
        with torch.no_grad():
            eps = model.network(x_t, t).double()
        p_mean = (xtd - b / (1 - a_t).sqrt() * eps) / (1 - b).sqrt()
        x0_pred = ((xtd - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        if clip:
            assert (x0_pred.abs() == 1).any()   # the clip changes something here
            p_mean = a_prev.sqrt() * b / (1 - a_t) * x0_pred + (1 - b).sqrt() * (1 - a_prev) / (1 - a_t) * xtd
        p_var = b if variance == 'beta' else q_var
        kl = kl_divergence(Normal(q_mean, q_var.sqrt()), Normal(p_mean, p_var.sqrt()))
        expected = kl.flatten(1).mean(1) / math.log(2)
        torch.testing.assert_close(ours.double(), expected, rtol=2e-3, atol=1e-6)


def test_prior_term_matches_its_closed_form():
    T = 20
    model = tiny_model(T)
    _, abar = schedule(T)
    x_0 = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    q = Normal(abar[-1].sqrt() * x_0.double(), (1 - abar[-1]).sqrt())
    expected = kl_divergence(q, Normal(0.0, 1.0)).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(model.prior_bpd(x_0).double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('mean,log_scale', [(0.0, -3.0), (0.3, -6.0), (-0.98, -4.0), (0.999, -1.0), (0.5, 0.5)])
def test_the_decoder_sums_to_one_over_the_256_bins(mean, log_scale):
    bins = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    log_p = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (log_p <= 0).all()


def test_exact_bound_and_estimate_agree_within_their_error():
    model = tiny_model(20)
    images = smooth_images(24, seed=6)
    exact = bpd.bits_per_dim(model, images, 'exact', batch_size=12, seed=0, progress=False)
    estimate = bpd.bits_per_dim(model, images, 'estimate', t_samples=4, batch_size=12, seed=1, progress=False)
    combined = math.hypot(exact['bpd_stderr'], estimate['bpd_stderr'])
    assert abs(exact['bpd'] - estimate['bpd']) < 3 * combined, (exact, estimate)
    assert 0 < exact['bpd_stderr'] < estimate['bpd_stderr']
    # The bound is the sum of its parts; the per-t means add up to it too.
    assert exact['bpd'] == pytest.approx(exact['prior_bpd'] + exact['kl_terms_bpd'] + exact['decoder_bpd'])
    assert exact['bpd'] == pytest.approx(exact['prior_bpd'] + sum(exact['terms_bpd']))
    assert exact['terms_bpd'][0] == pytest.approx(exact['decoder_bpd'])
    # Both are reproducible given the seed.
    again = bpd.bits_per_dim(model, images, 'estimate', t_samples=4, batch_size=12, seed=1, progress=False)
    assert again['bpd'] == estimate['bpd']


def test_cli_bpd_writes_results_next_to_the_checkpoint(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / 'ddpm_epoch_1.pth')
    data = tmp_path / 'test.npz'
    np.savez(data, smooth_images(10, seed=7))
    common = ['--checkpoint', ckpt, '--bpd', '--bpd_data', str(data), '--device', 'cpu', '--quiet']
    assert evaluate.main([*common, '--bpd_mode', 'exact', '--num_images', '6']) == 0
    assert evaluate.main([*common, '--bpd_mode', 'estimate', '--t_samples', '2']) == 0
    out = capsys.readouterr().out
    assert out.count('bits/dim') == 2
    results = json.loads((tmp_path / 'ddpm_epoch_1.eval.json').read_text())
    assert len(results) == 2
    modes = {entry['options']['mode']: entry for entry in results.values()}
    assert modes['exact']['results']['num_images'] == 6 and modes['estimate']['results']['num_images'] == 10
    assert len(modes['exact']['results']['terms_bpd']) == 10
    assert all(entry['metric'] == 'bpd' for entry in results.values())

    # Images of the wrong size fail with a message, not a traceback.
    np.savez(tmp_path / 'big.npz', smooth_images(2, size=16))
    assert evaluate.main(['--checkpoint', ckpt, '--bpd', '--bpd_data', str(tmp_path / 'big.npz'), '--quiet']) == 2
    assert 'the model makes' in capsys.readouterr().err
    assert evaluate.main(['--checkpoint', ckpt, '--quiet']) == 2
    assert 'nothing to do' in capsys.readouterr().err


def test_bpd_clips_x0_by_default_as_the_papers_code_and_records_it(tmp_path, capsys):
    """The default bound uses the clipped x_0 prediction (the paper's calc_bpd_loop); --no-bpd_clip the
    unclipped one. Both are recorded apart in the .eval.json, and the bits/dim agree with bits_per_dim."""
    ckpt = make_checkpoint(tmp_path / 'ddpm_epoch_1.pth', timesteps=20)
    data = tmp_path / 'test.npz'
    np.savez(data, smooth_images(6, seed=3))
    common = ['--checkpoint', ckpt, '--bpd', '--bpd_data', str(data), '--device', 'cpu', '--quiet']
    assert evaluate.main(common) == 0 and evaluate.main([*common, '--no-bpd_clip']) == 0
    assert 'clipped x_0' in capsys.readouterr().out
    results = {e['options']['clip_denoised']: e['results'] for e in
               json.loads((tmp_path / 'ddpm_epoch_1.eval.json').read_text()).values()}
    assert results[True]['clip_denoised'] is True and results[False]['clip_denoised'] is False
    model = generation.load_model(ckpt, device="cpu")[0]
    images = np.load(data)['arr_0']
    for clip in (True, False):
        direct = bpd.bits_per_dim(model, images, 'exact', batch_size=250, seed=0, progress=False,
                                       clip_denoised=clip)
        assert results[clip]['bpd'] == pytest.approx(direct['bpd'], rel=1e-9)
    assert results[True]['bpd'] != results[False]['bpd']


@pytest.mark.parametrize('kind', ['text', 'float-npz'])
def test_bad_samples_fail_before_the_inception_network_is_looked_for(tmp_path, monkeypatch, capsys, kind):
    """The cheap checks of the inputs come first: a text file or float images get their own one-line error,
    not the message about missing Inception weights (which would send the user to download 90 MB)."""
    import metrics.fid as fid
    monkeypatch.setattr(evaluate, 'load_feature_extractor', lambda *a, **k: pytest.fail('Inception loaded first'))
    monkeypatch.setattr(fid, 'load_feature_extractor', lambda *a, **k: pytest.fail('Inception loaded first'))
    if kind == 'text':
        path = tmp_path / 'notes.txt'
        path.write_text('not images\n')
        expected = 'expected an .npz of uint8 images'
    else:
        path = tmp_path / 'float.npz'
        np.savez(path, np.random.default_rng(0).random((4, 8, 8, 3)))
        expected = 'expected uint8 images'
    assert evaluate.main(['--samples', str(path), '--fid', '--device', 'cpu', '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and expected in err, err
