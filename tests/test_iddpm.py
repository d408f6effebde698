"""Tests of the Improved DDPM options (Nichol & Dhariwal 2021, arXiv:2102.09672) against closed forms.

Expected values are computed here in numpy float64 from the paper's formulas: the
cosine schedule (Eq. 17), the learned variance (Eq. 15), the VLB terms (Ho et al.
Eq. 5 with Gaussian KLs) and the respaced chain of section 4. Code step t = 0..T-1
is the paper's t = 1..T. The default model (linear, fixed variance, L_simple) is
pinned bit for bit at the end.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY_TRAIN, load, make_image_folder
from diffusion import DDPM, HYBRID_LAMBDA, create_cifar10_ddpm
from sampling.ancestral import respaced
from sampling.timesteps import ddim_timesteps

S, T = 0.008, 1000


def np_cosine_abar(timesteps=T, clipped=False):
    """a-bar_t = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2), t = 1..T (iDDPM Eq. 17);
    `clipped`: the a-bar of the betas clipped at 0.999."""
    f = np.cos((np.arange(timesteps + 1) / timesteps + S) / (1 + S) * np.pi / 2) ** 2
    abar = f[1:] / f[0]
    if clipped:
        abar = np.cumprod(1.0 - np.minimum(1.0 - abar / np.concatenate([[1.0], abar[:-1]]), 0.999))
    return abar


def np_linear_abar(timesteps=T, beta_start=1e-4, beta_end=0.02):
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, timesteps))


def np_fixed_log_variances(abar):
    """(log beta_t, log beta-tilde_t with t = 1 borrowing t = 2) from a-bar, as the paper's code clips it."""
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - abar / abar_prev
    tilde = betas * (1.0 - abar_prev) / (1.0 - abar)
    return np.log(betas), np.log(np.concatenate([tilde[1:2], tilde[1:]]))


class EpsNu(nn.Module):
    """A stub learned-sigma network: eps = a * x_t, nu = the constant `nu` (or b * x_t), each its own parameter."""

    def __init__(self, nu=0.0, a=0.3, b=None):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b if b is not None else 0.0))
        self.nu, self.use_b = nu, b is not None

    def forward(self, x_t, t):
        nu = self.b * x_t if self.use_b else torch.full_like(x_t, self.nu) + 0 * self.b
        return torch.cat([self.a * x_t, nu], dim=1)


class Eps(nn.Module):
    def __init__(self, a=0.3):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x_t, t):
        return self.a * x_t


def batch(seed=0, n=4, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g) * 2 - 1, torch.randn((n, *shape), generator=g)


# ----- the cosine schedule --------------------------------------------------------------------

def test_cosine_alphas_cumprod_match_eq17_in_float64():
    model = DDPM(Eps(), beta_schedule='cosine', image_shape=(3, 4, 4))
    expected = np_cosine_abar()
    abar64 = torch.cumprod(1.0 - model.betas64, 0).numpy()
    unclipped = slice(0, T - 1)   # only beta_T reaches the clip (checked below)
    np.testing.assert_allclose(abar64[unclipped], expected[unclipped], rtol=1e-12, atol=0)
    np.testing.assert_allclose(model.alphas_cumprod.double().numpy()[unclipped], expected[unclipped], rtol=2e-6)
    # beta_1 = 1 - f(1)/f(0), which s keeps from vanishing
    assert model.betas64[0].item() == pytest.approx(1 - expected[0], rel=1e-12)


def test_cosine_betas_clipped_at_0999():
    model = DDPM(Eps(), beta_schedule='cosine', image_shape=(3, 4, 4))
    abar = np_cosine_abar()
    raw = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    assert raw[-1] > 0.999 and (raw[:-1] < 0.999).all()     # the formula alone gives beta_T = 1
    assert model.betas64[-1].item() == 0.999
    np.testing.assert_allclose(model.betas64[:-1].numpy(), raw[:-1], rtol=1e-10)
    assert model.betas64.max().item() == 0.999 and torch.isfinite(model.posterior_log_variance_clipped).all()


def test_linear_is_the_default_schedule():
    model = DDPM(Eps(), image_shape=(3, 4, 4))
    np.testing.assert_allclose(model.betas64.numpy(), np.linspace(1e-4, 0.02, T), rtol=1e-14)


# ----- the learned variance, Eq. 15 -----------------------------------------------------------

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_learned_variance_ends_are_the_two_fixed_variances(schedule):
    """nu = +1 (the paper's v = 1) is log beta_t, nu = -1 (v = 0) log beta-tilde_t, nu = 0 their midpoint."""
    abar = np_linear_abar() if schedule == 'linear' else np_cosine_abar(clipped=True)
    log_beta, log_tilde = np_fixed_log_variances(abar)
    x_0, noise = batch(n=6)
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    for nu, expected in ((1.0, log_beta), (-1.0, log_tilde), (0.0, (log_beta + log_tilde) / 2)):
        model = DDPM(EpsNu(nu=nu), beta_schedule=schedule, learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
        x_t = model.q_sample(x_0, t, noise)
        _, var, log_var, _ = model.p_mean_variance(x_t, t, clip_denoised=False)
        np.testing.assert_allclose(log_var[:, 0, 0, 0].detach().double().numpy(), expected[t.numpy()], rtol=1e-5)
        torch.testing.assert_close(var, log_var.exp())


def test_learned_sigma_mean_is_the_fixed_models_mean():
    """The eps half of the output gives Eq. (11)'s mean, the same as a fixed-variance model with that eps."""
    x_0, noise = batch()
    t = torch.tensor([0, 10, 400, 999])
    learned = DDPM(EpsNu(b=0.7), learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    fixed = DDPM(Eps(), image_shape=(3, 4, 4))
    x_t = fixed.q_sample(x_0, t, noise)
    for clip in (True, False):
        m1, _, _, x1 = learned.p_mean_variance(x_t, t, clip)
        m2, _, _, x2 = fixed.p_mean_variance(x_t, t, clip)
        torch.testing.assert_close(m1, m2, rtol=0, atol=0)
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    assert torch.equal(learned.predict_eps(x_t, t), fixed.predict_eps(x_t, t))


def test_learned_sigma_needs_twice_the_channels():
    model = DDPM(Eps(), learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    with pytest.raises(ValueError, match='2 x 3 output channels'):
        model.predict_eps(torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long))
    net = create_cifar10_ddpm(channels=(8, 16), num_res_blocks=1, attn_resolutions=(), time_emb_dim=16,
                              image_size=8, learn_sigma=True, loss='hybrid').network
    assert net(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 6, 8, 8)


# ----- the hybrid and VLB losses --------------------------------------------------------------

def np_kl_bits_per_dim(model, x_0, x_t, t, eps_pred, log_var):
    """KL(q(x_{t-1} | x_t, x_0) || N(mu_theta, exp(log_var))) from Eqs. (7) and (11), mean over pixels, in bits."""
    abar = np_linear_abar()
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1.0 - abar / abar_prev
    x_0, x_t, eps_pred, log_var = (np.asarray(v, dtype=np.float64) for v in (x_0, x_t, eps_pred, log_var))
    b = lambda a: a[t].reshape(-1, 1, 1, 1)   # noqa: E731
    mu_tilde = (np.sqrt(b(abar_prev)) * b(betas) * x_0 + np.sqrt(1 - b(betas)) * (1 - b(abar_prev)) * x_t) / (1 - b(abar))
    tilde = b(betas) * (1 - b(abar_prev)) / (1 - b(abar))
    mu = (x_t - b(betas) / np.sqrt(1 - b(abar)) * eps_pred) / np.sqrt(1 - b(betas))
    kl = 0.5 * (log_var - np.log(tilde) + tilde / np.exp(log_var) + (mu_tilde - mu) ** 2 / np.exp(log_var) - 1)
    return kl.reshape(len(t), -1).mean(1) / math.log(2)


def test_hybrid_loss_is_lsimple_plus_lambda_T_times_the_vlb_term_in_bits_per_dim():
    """iDDPM Eq. 16 as their code weighs it: mean-over-pixels MSE + 0.001 * T * L_{t-1} (bits/dim)."""
    x_0, noise = batch(n=4)
    t = torch.tensor([1, 30, 500, 999])   # KL terms (t = 0, the decoder, is checked below)
    model = DDPM(EpsNu(b=0.4), learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    x_t = model.q_sample(x_0, t, noise)
    eps_pred, nu = model.network_outputs(x_t, t)
    log_var = model.learned_log_variance(nu, t)
    kl = np_kl_bits_per_dim(model, x_0, x_t.detach(), t.numpy(), eps_pred.detach(), log_var.detach())
    mse = ((eps_pred - noise) ** 2).flatten(1).mean(1).detach().double().numpy()
    per_image = model.loss(x_0, t, noise, reduction='none').detach().double().numpy()
    np.testing.assert_allclose(per_image, mse + HYBRID_LAMBDA * T * kl, rtol=1e-4)
    np.testing.assert_allclose(model.vb_term_bpd(x_0, x_t, t, clip_denoised=False).detach().double().numpy(), kl, rtol=1e-4)
    assert model.loss(x_0, t, noise).item() == pytest.approx(per_image.mean(), rel=1e-6)
    # the decoder step: its VLB term is vb_term_bpd's L_0
    t0 = torch.zeros(4, dtype=torch.long)
    x_1 = model.q_sample(x_0, t0, noise)
    mse0 = ((model.predict_eps(x_1, t0) - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(model.loss(x_0, t0, noise, reduction='none'),
                               mse0 + HYBRID_LAMBDA * T * model.vb_term_bpd(x_0, x_1, t0, clip_denoised=False))


def test_vlb_loss_is_T_times_the_vlb_term():
    x_0, noise = batch(n=3)
    t = torch.tensor([3, 200, 900])
    model = DDPM(Eps(), loss='vlb', image_shape=(3, 4, 4))   # fixed variance sigma_t^2 = beta_t
    x_t = model.q_sample(x_0, t, noise)
    log_beta, _ = np_fixed_log_variances(np_linear_abar())
    log_var = np.broadcast_to(log_beta[t.numpy()].reshape(-1, 1, 1, 1), x_0.shape)
    kl = np_kl_bits_per_dim(model, x_0, x_t.detach(), t.numpy(), model.predict_eps(x_t, t).detach(), log_var)
    np.testing.assert_allclose(model.loss(x_0, t, noise, reduction='none').detach().double().numpy(), T * kl,
                               rtol=1e-4)


def test_hybrid_vlb_term_does_not_train_the_mean():
    """Stop-gradient: in L_hybrid the eps parameter gets L_simple's gradient only, nu's only the VLB's."""
    x_0, noise = batch(n=4)
    t = torch.tensor([0, 5, 300, 800])
    net = EpsNu(b=0.4)
    model = DDPM(net, learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    model.loss(x_0, t, noise).backward()
    grad_a, grad_b = net.a.grad.clone(), net.b.grad.clone()
    net.zero_grad()
    x_t = model.q_sample(x_0, t, noise)
    ((net.a * x_t - noise) ** 2).mean().backward()           # L_simple alone
    torch.testing.assert_close(grad_a, net.a.grad, rtol=1e-6, atol=0)
    assert grad_b.abs() > 0
    # without the stop-gradient (loss='vlb'), the bound does reach the mean
    net.zero_grad()
    DDPM(net, learn_sigma=True, loss='vlb', image_shape=(3, 4, 4)).loss(x_0, t, noise).backward()
    assert net.a.grad.abs() > 0


# ----- samplers and bits/dim use the learned variance ----------------------------------------

def test_bits_per_dim_uses_the_learned_variance():
    """nu = -1 is beta-tilde: the learned model's bits/dim equal the variance='posterior' model's."""
    from metrics.bpd import bits_per_dim
    images = (np.random.default_rng(0).random((3, 4, 4, 3)) * 255).astype(np.uint8)
    kwargs = dict(mode='exact', batch_size=3, progress=False)
    learned = bits_per_dim(DDPM(EpsNu(nu=-1.0), timesteps=20, learn_sigma=True, loss='hybrid',
                                image_shape=(3, 4, 4)), images, **kwargs)
    posterior = bits_per_dim(DDPM(Eps(), timesteps=20, variance='posterior', image_shape=(3, 4, 4)), images, **kwargs)
    beta = bits_per_dim(DDPM(Eps(), timesteps=20, image_shape=(3, 4, 4)), images, **kwargs)
    assert learned['bpd'] == pytest.approx(posterior['bpd'], rel=1e-6)
    assert abs(learned['bpd'] - beta['bpd']) > 1e-3


@pytest.mark.parametrize('nu, variance', [(-1.0, 'posterior'), (1.0, 'beta')])
def test_ddpm_sampler_uses_the_learned_variance(nu, variance):
    """Algorithm 2 with nu = -1 is the beta-tilde sampler; nu = +1 the beta one (bar the unused t = 1 variance)."""
    kw = dict(timesteps=20, image_shape=(3, 4, 4))
    learned = DDPM(EpsNu(nu=nu), learn_sigma=True, loss='hybrid', **kw)
    fixed = DDPM(Eps(), variance=variance, **kw)
    a = learned.sample(2, generator=torch.Generator().manual_seed(3), progress=False)
    b = fixed.sample(2, generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    other = DDPM(Eps(), variance='beta' if variance == 'posterior' else 'posterior', **kw)
    assert not torch.allclose(a, other.sample(2, generator=torch.Generator().manual_seed(3), progress=False))


@pytest.mark.parametrize('sampler, eta', [('ddim', 0.0), ('ddim', 1.0), ('dpm-solver', 0.0)])
def test_deterministic_samplers_use_the_eps_half_only(sampler, eta):
    """DDIM (also with eta > 0, whose sigma is DDIM's own) and DPM-Solver read eps through DDPM.predict_eps."""
    kw = dict(timesteps=20, image_shape=(3, 4, 4))
    a = DDPM(EpsNu(b=2.0), learn_sigma=True, loss='hybrid', **kw).sample(
        2, sampler=sampler, steps=5, eta=eta, generator=torch.Generator().manual_seed(4), progress=False)
    b = DDPM(Eps(), **kw).sample(2, sampler=sampler, steps=5, eta=eta,
                                 generator=torch.Generator().manual_seed(4), progress=False)
    assert torch.equal(a, b)


# ----- respacing, iDDPM section 4 -------------------------------------------------------------

@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('steps', [2, 10, 50, 999])
def test_respaced_chain_keeps_the_subsequences_alphas_cumprod(schedule, steps):
    model = DDPM(EpsNu(nu=1.0), beta_schedule=schedule, learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    abar = np_linear_abar() if schedule == 'linear' else np_cosine_abar(clipped=True)
    seq = ddim_timesteps(T, steps).numpy()
    chain = respaced(model, ddim_timesteps(T, steps))
    assert chain.timesteps == len(seq) == steps
    # to float64 rounding: alpha_i = 1 - beta_i loses ~1e-16 absolute, the most a-bar ~ 1e-9 feels
    np.testing.assert_allclose(torch.cumprod(1.0 - chain.betas64, 0).numpy(), abar[seq], rtol=1e-12, atol=1e-16)
    assert torch.equal(chain.alphas_cumprod, model.alphas_cumprod[torch.from_numpy(seq)])   # the float32 buffers
    # its learned variance interpolates the respaced beta_i and beta-tilde_i
    log_beta, log_tilde = np_fixed_log_variances(abar[seq])
    i = torch.arange(len(seq))
    x = torch.zeros(len(seq), 3, 4, 4)
    np.testing.assert_allclose(chain.p_mean_variance(x, i)[2][:, 0, 0, 0].detach().double().numpy(), log_beta, rtol=1e-5)
    chain.network.network.nu = -1.0
    np.testing.assert_allclose(chain.p_mean_variance(x, i)[2][:, 0, 0, 0].detach().double().numpy(), log_tilde, rtol=1e-5)


def test_respaced_ddpm_sampler_calls_the_network_at_the_original_steps():
    seen = []

    class Spy(EpsNu):
        def forward(self, x_t, t):
            seen.append(t[0].item())
            return super().forward(x_t, t)

    model = DDPM(Spy(nu=0.5), timesteps=100, learn_sigma=True, loss='hybrid', image_shape=(3, 4, 4))
    x = model.sample(2, steps=7, generator=torch.Generator().manual_seed(0), progress=False)
    expected = ddim_timesteps(100, 7).flip(0).tolist()
    assert seen == expected and x.shape == (2, 3, 4, 4)
    assert [s for s, _, _ in model.sample_progressive(1, steps=7, progress=False)] == expected + [-1]


# ----- options, training and checkpoints ------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    (dict(learn_sigma=True), "needs loss='hybrid'"),
    (dict(loss='hybrid'), 'needs learn_sigma=True'),
    (dict(beta_schedule='quadratic'), 'beta_schedule must be one of'),
    (dict(loss='l1'), 'loss must be one of'),
    (dict(learn_sigma=True, loss='vlb', variance='posterior'), 'drop it with learn_sigma=True'),
])
def test_bad_option_combinations_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPM(Eps(), image_shape=(3, 4, 4), **kwargs)


def test_options_train_sample_and_rebuild_from_the_checkpoint(tmp_path):
    from train import train_ddpm
    data = make_image_folder(tmp_path / 'img', 8)
    ckpt_dir = tmp_path / 'ckpt'
    train_ddpm(**{**TINY_TRAIN, 'dataset': 'folder', 'data_dir': data, 'checkpoint_dir': str(ckpt_dir),
                  'log_dir': str(tmp_path / 'runs'), 'run_name': 'r', 'max_steps': 2, 'timesteps': 50,
                  'beta_schedule': 'cosine', 'learn_sigma': True, 'loss': 'hybrid', 'amp': 'fp32'})
    ckpt = load(ckpt_dir / 'ddpm_latest.pth')
    assert (ckpt['config']['beta_schedule'], ckpt['config']['learn_sigma'], ckpt['config']['loss']) == \
        ('cosine', True, 'hybrid')
    model = DDPM.from_checkpoint(str(ckpt_dir / 'ddpm_latest.pth'))
    assert model.learn_sigma and model.beta_schedule == 'cosine' and model.network.conv_out.out_channels == 6
    for kw in (dict(), dict(steps=5), dict(sampler='ddim', steps=5)):
        x = model.sample(2, progress=False, generator=torch.Generator().manual_seed(0), **kw)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    # an older checkpoint (no such keys in its config) rebuilds as the paper's model
    for key in ('beta_schedule', 'learn_sigma', 'loss'):
        del ckpt['config'][key]
    ckpt['config']['learn_sigma'] = None   # also: a None value means the default
    from diffusion import model_from_checkpoint
    with pytest.raises(Exception, match='wrong shape'):   # the 6-channel weights do not fit the 3-channel model
        model_from_checkpoint(ckpt)
    old = create_cifar10_ddpm(**{k: v for k, v in dict(channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,),
                                                            time_emb_dim=32, image_size=16, timesteps=50).items()})
    ckpt['model_state_dict'] = ckpt['ema_state_dict'] = old.state_dict()
    rebuilt = model_from_checkpoint(ckpt)
    assert (rebuilt.beta_schedule, rebuilt.learn_sigma, rebuilt.loss_type) == ('linear', False, 'simple')
    np.testing.assert_allclose(rebuilt.betas64.numpy(), np.linspace(1e-4, 0.02, 50), rtol=1e-14)


# ----- importance sampling of t, iDDPM section 3.3 -------------------------------------------

def test_importance_sampler_is_uniform_until_full_then_sqrt_mean_square():
    from training.timestep_sampler import ImportanceSampler
    sampler = ImportanceSampler(4)
    rng = np.random.default_rng(0)
    losses = {t: list(rng.random(12) * (t + 1)) for t in range(4)}
    for i in range(12):
        if i < 10:   # some t still lacks 10 losses
            assert not sampler.warmed_up()
            np.testing.assert_array_equal(sampler.probabilities().numpy(), np.full(4, 0.25))
        sampler.update(torch.arange(4), torch.tensor([losses[t][i] for t in range(4)]))
    assert sampler.warmed_up()
    kept = np.array([losses[t][2:] for t in range(4)])              # the newest 10 of 12
    np.testing.assert_allclose(sampler.losses.numpy(), kept, rtol=1e-6)
    p = np.sqrt((kept ** 2).mean(1))
    expected = 0.999 * p / p.sum() + 0.001 / 4
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-6)
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(np.bincount(t.numpy(), minlength=4) / 200_000, expected, atol=4e-3)
    np.testing.assert_allclose(w.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    # E_p[w L_t] = the uniform mean of L_t: the weighted loss still estimates the bound's sum
    value = rng.random(4)
    assert float((w.double() * torch.from_numpy(value)[t]).mean()) == pytest.approx(value.mean(), rel=1e-2)


def test_importance_sampling_resumes_exactly(tmp_path):
    """Its loss history is in the checkpoint: 4 steps + resume to 8 equals 8 straight steps (warm after 5)."""
    from train import train_ddpm
    data = make_image_folder(tmp_path / 'img', 16)

    def run(name, **kw):
        ckpt = tmp_path / name
        train_ddpm(**{**TINY_TRAIN, 'dataset': 'folder', 'data_dir': data, 'checkpoint_dir': str(ckpt),
                      'log_dir': str(tmp_path / 'runs'), 'run_name': name, 'timesteps': 4, 'amp': 'fp32',
                      'learn_sigma': True, 'loss': 'vlb', 'importance_sampling': True, 'num_epochs': 4, **kw})
        return load(ckpt / 'ddpm_latest.pth')

    straight = run('straight')
    run('resumed', max_steps=4)
    resumed = run('resumed', resume='latest')
    assert straight['step'] == resumed['step'] == 8
    assert (straight['timestep_sampler']['counts'] == 10).all()
    for key in ('losses', 'counts'):
        assert torch.equal(straight['timestep_sampler'][key], resumed['timestep_sampler'][key])
    for k, v in straight['model_state_dict'].items():
        assert torch.equal(v, resumed['model_state_dict'][k]), k
    with pytest.raises(ValueError, match="needs loss='vlb'"):
        train_ddpm(importance_sampling=True, device='cpu')


# ----- the default model is unchanged ---------------------------------------------------------

# Hashes of the default model's samples, VLB terms (clipped, the default) and loss, computed on the
# code before the Improved DDPM options existed; they must leave the default path bit for bit where it was.
PINNED_DEFAULT = {'ddpm': 'defc53098d7f9be8', 'ddim0': 'e17b084d46d6b370', 'ddim1': 'ec465d2db249b7f9',
                  'vb': '89de72e6e833a5b9', 'loss': 'b574e764342c6986', 'ddpm_post': 'cb18183d6f66e030'}


def test_default_samples_vlb_and_loss_are_pinned():
    def digest(x):
        return hashlib.sha256(x.detach().contiguous().numpy().tobytes()).hexdigest()[:16]

    kw = dict(channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,), time_emb_dim=32, image_size=8, timesteps=20)
    torch.manual_seed(0)
    model = create_cifar10_ddpm(**kw)
    with torch.no_grad():
        for p in model.parameters():   # leave the zero-initialised output layer's trivial function
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    got = {}
    for name, sample_kw in (('ddpm', dict(sampler='ddpm')), ('ddim0', dict(sampler='ddim', steps=5)),
                            ('ddim1', dict(sampler='ddim', steps=5, eta=1.0))):
        got[name] = digest(model.sample(2, generator=torch.Generator().manual_seed(1), progress=False, **sample_kw))
    x_0 = torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 7])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    got['vb'] = digest(model.vb_term_bpd(x_0, model.q_sample(x_0, t, noise), t))
    got['loss'] = digest(model.loss(x_0, t, noise))
    posterior = create_cifar10_ddpm(variance='posterior', **kw)
    posterior.load_state_dict(model.state_dict())
    got['ddpm_post'] = digest(posterior.eval().sample(2, generator=torch.Generator().manual_seed(1), progress=False))
    assert got == PINNED_DEFAULT
