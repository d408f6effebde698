"""Tests of the diffusion math in diffusion.py against closed forms.

Every expected value is computed here, independently, in numpy float64 from
the formulas of Ho et al. 2020 (arXiv:2006.11239) and Song et al. 2020 (DDIM),
never read back from the model's own buffers. Code step t = 0..T-1 is the
paper's t = 1..T, so a-bar_{t-1} at code t = 0 is 1.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusion import DDPM, create_cifar10_ddpm

T = 1000
BETA_START, BETA_END = 1e-4, 0.02


def np_schedule(timesteps=T, beta_start=BETA_START, beta_end=BETA_END):
    """The paper's linear schedule in float64: betas, alphas, a-bar_t and a-bar_{t-1} (a-bar_0 = 1)."""
    betas = np.linspace(beta_start, beta_end, timesteps)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return betas, alphas, abar, abar_prev


def bcast(values, t, ndim=4):
    """values[t] as a float64 array shaped [B, 1, 1, 1] for broadcasting against images."""
    return np.asarray(values)[np.asarray(t)].reshape(-1, *([1] * (ndim - 1)))


class Recorder(nn.Module):
    """A stub eps-network: returns fn(x_t, t) and records every (x_t, t) and the train/eval mode it saw."""

    def __init__(self, fn=None):
        super().__init__()
        self.fn = fn or (lambda x_t, t: torch.zeros_like(x_t))
        self.calls = []
        self.modes = []

    def forward(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        self.modes.append(self.training)
        return self.fn(x_t, t)


@pytest.fixture
def model():
    return DDPM(Recorder(), timesteps=T, beta_start=BETA_START, beta_end=BETA_END, image_shape=(3, 4, 4))


def np_(tensor):
    return tensor.detach().double().numpy()


# ----- the noise schedule ---------------------------------------------------------------------

def test_betas_are_linear_from_beta_start_to_beta_end(model):
    """beta_1 = beta_start, beta_T = beta_end, linear and strictly increasing in between."""
    betas = np_(model.betas)
    assert betas[0] == pytest.approx(BETA_START, rel=1e-6)
    assert betas[-1] == pytest.approx(BETA_END, rel=1e-6)
    assert np.all(np.diff(betas) > 0)
    np.testing.assert_allclose(betas, np.linspace(BETA_START, BETA_END, T), rtol=1e-6)
    np.testing.assert_allclose(np_(model.alphas), 1.0 - np.linspace(BETA_START, BETA_END, T), rtol=1e-6)


def test_alphas_cumprod_matches_float64_cumprod(model):
    """a-bar_t = prod_{s<=t} (1 - beta_s) to 1e-6 relative, strictly decreasing inside (0, 1); a-bar_0 = 1."""
    _, _, abar, _ = np_schedule()
    got = np_(model.alphas_cumprod)
    np.testing.assert_allclose(got, abar, rtol=1e-6, atol=0)
    assert np.all(np.diff(got) < 0)
    assert np.all((got > 0) & (got < 1))
    assert model.alphas_cumprod_prev[0].item() == 1.0
    np.testing.assert_allclose(np_(model.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6, atol=0)


def test_schedule_buffers_are_float32_and_not_in_state_dict(model):
    """Every schedule buffer is stored as float32 and derived from the constructor, not saved."""
    names = ['betas', 'alphas', 'alphas_cumprod', 'alphas_cumprod_prev', 'sqrt_alphas_cumprod',
             'sqrt_one_minus_alphas_cumprod', 'sqrt_recip_alphas_cumprod', 'sqrt_recipm1_alphas_cumprod',
             'posterior_variance', 'posterior_log_variance_clipped', 'posterior_mean_coef1', 'posterior_mean_coef2']
    for name in names:
        assert getattr(model, name).dtype == torch.float32, name
        assert getattr(model, name).shape == (T,), name
    assert not any(k in model.state_dict() for k in names)


def _closed_forms():
    betas, alphas, abar, abar_prev = np_schedule()
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return {
        'sqrt_alphas_cumprod': np.sqrt(abar),
        'sqrt_one_minus_alphas_cumprod': np.sqrt(1 - abar),
        'sqrt_recip_alphas_cumprod': 1 / np.sqrt(abar),
        'sqrt_recipm1_alphas_cumprod': np.sqrt(1 / abar - 1),
        # beta-tilde_t = (1 - a-bar_{t-1}) / (1 - a-bar_t) beta_t, Eq. (7); zero at the paper's t = 1.
        'posterior_variance': post_var,
        'posterior_log_variance_clipped': np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        # mu-tilde_t = coef1 x_0 + coef2 x_t, Eq. (7).
        'posterior_mean_coef1': np.sqrt(abar_prev) * betas / (1 - abar),
        'posterior_mean_coef2': np.sqrt(alphas) * (1 - abar_prev) / (1 - abar),
    }


@pytest.mark.parametrize('name', sorted(_closed_forms()))
def test_derived_buffers_match_float64_closed_forms(model, name):
    """Each derived buffer equals its closed form in float64 to 2e-6 relative.

    This also pins the float64 computation: the same formulas evaluated in
    float32 are off by ~8e-5 (sqrt(1 - a-bar_t) at small t) and ~1.6e-4
    (beta-tilde_t), because 1 - a-bar_t cancels catastrophically there.
    """
    np.testing.assert_allclose(np_(getattr(model, name)), _closed_forms()[name], rtol=2e-6, atol=0)


def test_posterior_matches_bayes_rule(model):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_t | x_{t-1}) q(x_{t-1} | x_0) equals coef1/coef2/beta-tilde.

    With prior N(sqrt(a-bar_{t-1}) x_0, 1 - a-bar_{t-1}) and likelihood
    N(x_t; sqrt(alpha_t) x_{t-1}, beta_t), the posterior precision is
    alpha_t / beta_t + 1 / (1 - a-bar_{t-1}). Checked for t >= 1 (code), where
    the prior is not a point mass; at code t = 0 the posterior is x_0 itself.
    """
    betas, alphas, abar, abar_prev = np_schedule()
    g = torch.Generator().manual_seed(0)
    x_0 = torch.randn(4, 3, 4, 4, generator=g)
    x_t = torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([1, 2, 400, T - 1])
    alpha, beta, abar_p = bcast(alphas, t), bcast(betas, t), bcast(abar_prev, t)
    var = 1.0 / (alpha / beta + 1.0 / (1 - abar_p))
    mean = var * (np.sqrt(alpha) / beta * np_(x_t) + np.sqrt(abar_p) / (1 - abar_p) * np_(x_0))
    got_mean, got_var, got_logvar = model.q_posterior(x_0, x_t, t)
    np.testing.assert_allclose(np_(got_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_(got_var).ravel(), var.ravel(), rtol=1e-5)
    np.testing.assert_allclose(np_(got_logvar).ravel(), np.log(var.ravel()), atol=1e-5)
    t0 = torch.zeros(4, dtype=torch.long)
    np.testing.assert_allclose(np_(model.q_posterior(x_0, x_t, t0)[0]), np_(x_0), rtol=1e-6, atol=1e-6)


# Steps that exercise both ends of the schedule and the middle.
STEPS = torch.tensor([0, 1, 2, 10, 500, T - 2, T - 1])


def eq11_mean(x_t, t, eps, timesteps=T):
    """Eq. (11): mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - a-bar_t) eps), in float64."""
    betas, alphas, abar, _ = np_schedule(timesteps)
    return (np_(x_t) - bcast(betas / np.sqrt(1 - abar), t) * np_(eps)) / bcast(np.sqrt(alphas), t)


def test_posterior_mean_of_implied_x0_is_eq11(model):
    """mu-tilde_t(x_t, x_0(x_t, eps)) with x_0 = (x_t - sqrt(1 - a-bar_t) eps) / sqrt(a-bar_t) equals Eq. (11)."""
    _, _, abar, _ = np_schedule()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(len(STEPS), 3, 4, 4, generator=g)
    eps = torch.randn(len(STEPS), 3, 4, 4, generator=g)
    x_0 = model.predict_x0_from_eps(x_t, STEPS, eps)
    x_0_ref = (np_(x_t) - bcast(np.sqrt(1 - abar), STEPS) * np_(eps)) / bcast(np.sqrt(abar), STEPS)
    np.testing.assert_allclose(np_(x_0), x_0_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_(model.predict_eps_from_x0(x_t, STEPS, x_0)), np_(eps), atol=1e-4)
    mean, _, _ = model.q_posterior(x_0, x_t, STEPS)
    np.testing.assert_allclose(np_(mean), eq11_mean(x_t, STEPS, eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variance', ['beta', 'posterior'])
def test_p_mean_variance_is_eq11_with_sigma_choice(variance):
    """p_theta(x_{t-1} | x_t): mean is Eq. (11) of the network's eps (no clipping);
    sigma_t^2 is beta_t ('beta') or beta-tilde_t ('posterior'), Sec. 3.2; at code t = 0
    both log-variances are log beta-tilde at code t = 1, as in the paper's code."""
    betas, _, abar, abar_prev = np_schedule()
    eps_fn = lambda x_t, t: torch.sin(3 * x_t) + 0.01 * t.float()[:, None, None, None]
    model = DDPM(Recorder(eps_fn), variance=variance, image_shape=(3, 4, 4))
    x_t = torch.randn(len(STEPS), 3, 4, 4, generator=torch.Generator().manual_seed(2))
    mean, var, logvar, _ = model.p_mean_variance(x_t, STEPS, clip_denoised=False)
    np.testing.assert_allclose(np_(mean), eq11_mean(x_t, STEPS, eps_fn(x_t, STEPS)), rtol=1e-5, atol=1e-5)
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expected = betas.copy() if variance == 'beta' else post_var.copy()
    expected[0] = post_var[1] if variance == 'beta' else 0.0
    np.testing.assert_allclose(np_(var).ravel(), expected[STEPS.numpy()], rtol=2e-6, atol=0)
    log_expected = np.log(np.concatenate([[post_var[1]], expected[1:]]))  # log 0 is clipped to log beta-tilde_2
    np.testing.assert_allclose(np_(logvar).ravel(), log_expected[STEPS.numpy()], atol=1e-5)


# ----- the forward process q(x_t | x_0) ------------------------------------------------------

def test_q_sample_is_eq4_for_given_noise(model):
    """x_t = sqrt(a-bar_t) x_0 + sqrt(1 - a-bar_t) eps, Eq. (4); zero noise gives sqrt(a-bar_t) x_0."""
    _, _, abar, _ = np_schedule()
    g = torch.Generator().manual_seed(3)
    x_0 = torch.randn(len(STEPS), 3, 4, 4, generator=g)
    noise = torch.randn(len(STEPS), 3, 4, 4, generator=g)
    np.testing.assert_allclose(np_(model.q_sample(x_0, STEPS, torch.zeros_like(x_0))),
                               bcast(np.sqrt(abar), STEPS) * np_(x_0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np_(model.q_sample(x_0, STEPS, noise)),
                               bcast(np.sqrt(abar), STEPS) * np_(x_0) + bcast(np.sqrt(1 - abar), STEPS) * np_(noise),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('step', [0, 10, 250, T - 1])
def test_q_sample_moments(model, step):
    """Over N draws of x_t ~ q(x_t | x_0), each pixel's mean is sqrt(a-bar_t) x_0 and its variance 1 - a-bar_t.

    Tolerances are 5 standard errors: sqrt(var / N) for the mean and
    var * sqrt(2 / (N - 1)) for the sample variance of a Gaussian.
    """
    _, _, abar, _ = np_schedule()
    n = 20000
    torch.manual_seed(4 + step)
    x_0 = torch.rand(1, 3, 4, 4) * 2 - 1
    t = torch.full((n,), step, dtype=torch.long)
    x_t = np_(model.q_sample(x_0.expand(n, -1, -1, -1), t))
    var = 1 - abar[step]
    assert np.all(np.abs(x_t.mean(0) - np.sqrt(abar[step]) * np_(x_0)[0]) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(x_t.var(0, ddof=1) - var) < 5 * var * np.sqrt(2 / (n - 1)))


# ----- sampling from a network whose optimum is known ----------------------------------------

MU, S = 0.25, 0.15  # data x_0 ~ N(MU, S^2) per pixel; MU +- 5 S stays inside the final clamp to [-1, 1]


class IdealGaussianEps(nn.Module):
    """The optimal eps-predictor for x_0 ~ N(mu, s^2) per pixel, from the test's own float64 schedule:

        E[eps | x_t] = sqrt(1 - a-bar_t) (x_t - sqrt(a-bar_t) mu) / (a-bar_t s^2 + 1 - a-bar_t),

    written as eps = c_t x_t + d_t.
    """

    def __init__(self, mu, s, timesteps=T):
        super().__init__()
        _, _, abar, _ = np_schedule(timesteps)
        den = abar * s ** 2 + 1 - abar
        self.c = np.sqrt(1 - abar) / den
        self.d = -np.sqrt(1 - abar) * np.sqrt(abar) * mu / den
        self.register_buffer('c_t', torch.from_numpy(self.c))
        self.register_buffer('d_t', torch.from_numpy(self.d))

    def forward(self, x_t, t):
        eps = self.c_t[t].view(-1, 1, 1, 1) * x_t.double() + self.d_t[t].view(-1, 1, 1, 1)
        return eps.to(x_t.dtype)


def ddpm_recursion(net, variance):
    """Mean and std of the ancestral sampler's output (Algorithm 2 with Eq. (11)), as a scalar recursion.

    x_{t-1} = a_t x_t + b_t + sigma_t z with eps = c_t x_t + d_t:
    a_t = (1 - k_t c_t) / sqrt(alpha_t), b_t = -k_t d_t / sqrt(alpha_t), k_t = beta_t / sqrt(1 - a-bar_t);
    m <- a m + b, v <- a^2 v + sigma^2, from m_T = 0, v_T = 1; no noise at the last step.
    """
    betas, alphas, abar, abar_prev = np_schedule()
    m, v = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        k = betas[t] / np.sqrt(1 - abar[t])
        a = (1 - k * net.c[t]) / np.sqrt(alphas[t])
        b = -k * net.d[t] / np.sqrt(alphas[t])
        sigma2 = betas[t] if variance == 'beta' else betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
        m, v = a * m + b, a * a * v + (sigma2 if t > 0 else 0.0)
    return m, np.sqrt(v)


def ddim_recursion(net, steps, eta=0.0):
    """Mean and std of DDIM (Song et al. Eq. (12)) over `steps` evenly spaced steps:

    x_prev = sqrt(a-bar_prev) x_0_pred + sqrt(1 - a-bar_prev - sigma^2) eps + sigma z, with
    x_0_pred = (x_t - sqrt(1 - a-bar_t) eps) / sqrt(a-bar_t),
    sigma = eta sqrt((1 - a-bar_prev) / (1 - a-bar_t) (1 - a-bar_t / a-bar_prev)), a-bar_prev = 1 after the last step.
    """
    _, _, abar, _ = np_schedule()
    seq = np.round(np.linspace(0, T - 1, steps)).astype(int)[::-1]
    m, v = 0.0, 1.0
    for i, t in enumerate(seq):
        abar_prev = abar[seq[i + 1]] if i + 1 < len(seq) else 1.0
        sigma2 = eta ** 2 * (1 - abar_prev) / (1 - abar[t]) * (1 - abar[t] / abar_prev)
        x_coef = np.sqrt(abar_prev / abar[t])
        eps_coef = np.sqrt(1 - abar_prev - sigma2) - np.sqrt(abar_prev * (1 - abar[t]) / abar[t])
        a, b = x_coef + eps_coef * net.c[t], eps_coef * net.d[t]
        m, v = a * m + b, a * a * v + sigma2
    return m, np.sqrt(v)


def test_ddim_eta1_recursion_is_ddpm_posterior_recursion():
    """Over all T steps, DDIM with eta = 1 has sigma_t^2 = beta-tilde_t and the same mean as Eq. (11),
    so its output distribution is that of the ancestral sampler with sigma_t^2 = beta-tilde_t."""
    net = IdealGaussianEps(MU, S)
    np.testing.assert_allclose(ddim_recursion(net, T, eta=1.0), ddpm_recursion(net, 'posterior'), rtol=1e-9)


# (id, DDPM variance, sample() kwargs, tolerances on |recursion - target|: mean (abs), std (relative)).
# Measured recursion-vs-target errors with T = 1000, mu = 0.25, s = 0.15:
#   ddpm/beta:      mean -2.3e-7, std +0.59%      ddpm/posterior: mean -2.3e-7, std -2.46%
#   ddim 1000:      mean -2.4e-4, std -1.04%      ddim 50:        mean -2.0e-4, std -15.5%
#   ddim 1000, eta = 1: as ddpm/posterior (the same chain)
# The tolerances below allow about 2-3x those.
SAMPLERS = [
    ('ddpm-beta', 'beta', dict(sampler='ddpm'), 1e-6, 0.015),
    ('ddpm-posterior', 'posterior', dict(sampler='ddpm'), 1e-6, 0.05),
    ('ddim-1000', 'beta', dict(sampler='ddim', steps=1000, eta=0.0), 6e-4, 0.025),
    ('ddim-50', 'beta', dict(sampler='ddim', steps=50, eta=0.0), 5e-4, 0.35),
    ('ddim-1000-eta1', 'beta', dict(sampler='ddim', steps=1000, eta=1.0), 1e-6, 0.05),
]


@pytest.mark.parametrize('name,variance,kwargs,mean_tol,std_rel_tol', SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_sampler_output_distribution_with_ideal_network(name, variance, kwargs, mean_tol, std_rel_tol):
    """With the optimal eps for Gaussian data every step is linear-Gaussian, so the samples are exactly
    N(m, v) with (m, v) from the scalar recursion: (a) the samples' mean/std match the recursion within
    5 standard errors (std / sqrt(N) and std / sqrt(2N)); (b) the recursion lands near the data's (mu, s)
    up to the discretisation error of T = 1000 steps (or the DDIM sub-sequence)."""
    net = IdealGaussianEps(MU, S)
    model = DDPM(net, timesteps=T, beta_start=BETA_START, beta_end=BETA_END, variance=variance,
                 image_shape=(1, 8, 8))
    x = model.sample(2000, generator=torch.Generator().manual_seed(5), progress=False, clip_denoised=False,
                     **kwargs)
    x = np_(x).ravel()
    if kwargs['sampler'] == 'ddpm':
        m, s = ddpm_recursion(net, variance)
    else:
        m, s = ddim_recursion(net, kwargs['steps'], kwargs['eta'])
    n = x.size
    emp_m, emp_s = x.mean(), x.std(ddof=1)
    print(f'\n[{name}] empirical mean {emp_m:.5f} std {emp_s:.5f} (N={n}); recursion mean {m:.6f} std {s:.6f}; '
          f'emp-rec: mean {emp_m - m:+.2e} ({(emp_m - m) / (s / np.sqrt(n)):+.2f} SE), '
          f'std {emp_s - s:+.2e} ({(emp_s - s) / (s / np.sqrt(2 * n)):+.2f} SE); '
          f'rec-target: mean {m - MU:+.2e}, std {(s - S) / S:+.2%}')
    assert abs(emp_m - m) < 5 * s / np.sqrt(n)
    assert abs(emp_s - s) < 5 * s / np.sqrt(2 * n)
    assert abs(m - MU) < mean_tol
    assert abs(s - S) < std_rel_tol * S


# ----- sampler mechanics ----------------------------------------------------------------------

def test_ddpm_sampler_calls_network_at_every_step_in_order():
    """Algorithm 2 evaluates eps_theta once per step, t = T-1, ..., 0 (code), with a LongTensor [n] of steps."""
    net = Recorder()
    model = DDPM(net, timesteps=50, image_shape=(1, 4, 4))
    model.sample(3, progress=False)
    assert len(net.calls) == 50
    for (x_t, t), step in zip(net.calls, range(49, -1, -1)):
        assert t.dtype == torch.long and t.tolist() == [step] * 3
        assert x_t.shape == (3, 1, 4, 4)


@pytest.mark.parametrize('variance', ['beta', 'posterior'])
def test_ddpm_last_step_adds_no_noise(variance):
    """Algorithm 2 returns x_0 = mu_theta(x_1, 1) (Eq. (11)) with z = 0 at the paper's t = 1 (code t = 0),
    while every earlier step does add noise."""
    eps_fn = lambda x_t, t: 0.3 * x_t
    model = DDPM(Recorder(eps_fn), timesteps=20, variance=variance, image_shape=(3, 8, 8))
    g = torch.Generator().manual_seed(9)
    chain = {step: x for step, x, _ in model.sample_progressive(4, generator=g, progress=False,
                                                                clip_denoised=False)}
    x_1 = chain[1]
    t0 = torch.zeros(4, dtype=torch.long)
    np.testing.assert_allclose(np_(chain[0]), eq11_mean(x_1, t0, eps_fn(x_1, t0), timesteps=20),
                               rtol=1e-6, atol=1e-6)
    t1 = torch.ones(4, dtype=torch.long)
    assert np.abs(np_(chain[1]) - eq11_mean(chain[2], t1, eps_fn(chain[2], t1), timesteps=20)).max() > 1e-3


@pytest.mark.parametrize('steps', [1, 2, 10, 37, 100])
def test_ddim_sampler_calls_network_on_evenly_spaced_decreasing_steps(steps):
    """DDIM with S steps calls eps_theta S times, on round(linspace(0, T-1, S)) in decreasing order,
    so it starts at T-1 (where x_T ~ N(0, I) is right) and, for S > 1, ends at 0."""
    net = Recorder()
    model = DDPM(net, timesteps=100, image_shape=(1, 4, 4))
    model.sample(2, sampler='ddim', steps=steps, progress=False)
    seen = [t[0].item() for _, t in net.calls]
    assert len(seen) == steps
    assert seen[0] == 99
    assert all(a > b for a, b in zip(seen, seen[1:]))
    if steps > 1:
        assert seen[-1] == 0
        assert seen == np.round(np.linspace(0, 99, steps)).astype(int)[::-1].tolist()


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_sample_shape_with_default_unet_image_shape(sampler):
    """A U-Net-backed DDPM infers image_shape (3, 32, 32) from its network; sample(n) is [n, 3, 32, 32]."""
    model = create_cifar10_ddpm(timesteps=3, channels=(8, 16), num_res_blocks=1, time_emb_dim=16,
                                attn_resolutions=(16,), num_heads=2, dropout=0.0)
    assert model.image_shape == (3, 32, 32)
    out = model.sample(2, sampler=sampler, progress=False)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
@pytest.mark.parametrize('clip_denoised', [True, False])
def test_sample_range(sampler, clip_denoised):
    """sample() returns values in [-1, 1] even where the chain itself leaves [-1, 1]."""
    model = DDPM(Recorder(lambda x_t, t: -2.0 * x_t), timesteps=20, image_shape=(3, 8, 8))
    chain = list(model.sample_progressive(8, sampler=sampler, generator=torch.Generator().manual_seed(0),
                                          progress=False, clip_denoised=clip_denoised))
    assert max(x.abs().max().item() for _, x, _ in chain[:-1]) > 1  # so the range check below can fail
    out = model.sample(8, sampler=sampler, generator=torch.Generator().manual_seed(0), progress=False,
                       clip_denoised=clip_denoised)
    assert out.shape == (8, 3, 8, 8)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, chain[-1][1])


@pytest.mark.parametrize('sampler,eta', [('ddpm', 0.0), ('ddim', 0.0), ('ddim', 1.0)])
def test_same_seed_same_samples(sampler, eta):
    """One torch.Generator seed gives identical samples; another seed gives different ones."""
    model = DDPM(Recorder(lambda x_t, t: 0.5 * x_t), timesteps=20, image_shape=(3, 8, 8))

    def draw(seed):
        return model.sample(3, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(seed),
                            progress=False)

    assert torch.equal(draw(7), draw(7))
    assert not torch.allclose(draw(7), draw(8))


@pytest.mark.parametrize('training', [True, False])
def test_sample_runs_in_eval_mode_and_restores_mode(training):
    """sample() evaluates the network in eval mode and leaves the model in the mode it found."""
    net = Recorder()
    model = DDPM(net, timesteps=5, image_shape=(1, 4, 4))
    model.train(training)
    model.sample(2, progress=False)
    assert net.modes == [False] * 5
    assert model.training == training and net.training == training


def test_sampler_argument_errors():
    """More steps than T is an error for both samplers ('ddpm' with fewer respaces, test_iddpm.py);
    unknown sampler names are errors."""
    model = DDPM(Recorder(), timesteps=20, image_shape=(1, 4, 4))
    with pytest.raises(ValueError):
        model.sample(1, sampler='ddpm', steps=21, progress=False)
    with pytest.raises(ValueError):
        model.sample(1, sampler='euler', progress=False)
    with pytest.raises(ValueError):
        model.sample(1, sampler='ddim', steps=21, progress=False)
    model.sample(1, sampler='ddpm', steps=20, progress=False)  # steps == T is allowed


# ----- the training loss ----------------------------------------------------------------------

def test_loss_is_mse_between_network_output_and_noise():
    """L_simple, Eq. (14): mean((eps_theta(x_t, t) - eps)^2) with x_t from Eq. (4), at the given t and noise."""
    _, _, abar, _ = np_schedule()
    eps_fn = lambda x_t, t: 0.7 * x_t + 0.001 * t.float()[:, None, None, None]
    net = Recorder(eps_fn)
    model = DDPM(net, image_shape=(3, 4, 4))
    g = torch.Generator().manual_seed(6)
    x_0 = torch.rand(len(STEPS), 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(len(STEPS), 3, 4, 4, generator=g)
    loss = model.loss(x_0, STEPS, noise)
    (x_t, t), = net.calls
    assert t.tolist() == STEPS.tolist()
    x_t_ref = bcast(np.sqrt(abar), STEPS) * np_(x_0) + bcast(np.sqrt(1 - abar), STEPS) * np_(noise)
    np.testing.assert_allclose(np_(x_t), x_t_ref, rtol=1e-6, atol=1e-6)
    eps_pred = 0.7 * x_t_ref + 0.001 * STEPS.numpy()[:, None, None, None]
    assert loss.item() == pytest.approx(np.mean((eps_pred - np_(noise)) ** 2), rel=1e-5)


def test_loss_default_t_uniform_and_noise_standard_normal():
    """With t and noise left out, t ~ U{0..T-1} (Algorithm 1) covering every step with counts within
    5 binomial standard errors of N/T, and eps ~ N(0, I): a zero network's loss is E[eps^2] = 1."""
    timesteps, n = 10, 4000
    net = Recorder()
    model = DDPM(net, timesteps=timesteps, image_shape=(1, 4, 4))
    torch.manual_seed(7)
    loss = model(torch.zeros(n, 1, 4, 4))  # forward() is the training loss
    (_, t), = net.calls
    assert t.dtype == torch.long
    counts = np.bincount(t.numpy(), minlength=timesteps)
    assert len(counts) == timesteps and counts.min() > 0
    p = 1 / timesteps
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)))
    assert abs(loss.item() - 1.0) < 5 * np.sqrt(2 / (n * 16))


# ----- checkpoints: the README's usage --------------------------------------------------------

TINY = dict(channels=(16, 32), num_res_blocks=1, time_emb_dim=32, attn_resolutions=(16,), num_heads=2, dropout=0.0,
            image_size=16)


def randomize(model, seed, std=0.05):
    """Give every parameter random values (the U-Net zero-initialises some layers, which would make outputs 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def net_output(model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval().network(x, torch.tensor([3, 900]))


def test_readme_state_dict_round_trip(tmp_path):
    """torch.save({'model_state_dict': ...}) then load_state_dict(torch.load(path, weights_only=True)[...])
    on a freshly built model reproduces the network's outputs exactly."""
    model = randomize(create_cifar10_ddpm(**TINY), seed=0)
    path = tmp_path / 'ddpm_epoch_1.pth'
    torch.save({'model_state_dict': model.state_dict(), 'epoch': 1, 'config': dict(TINY)}, path)
    fresh = randomize(create_cifar10_ddpm(**TINY), seed=1)
    assert not torch.allclose(net_output(fresh), net_output(model))
    fresh.load_state_dict(torch.load(path, weights_only=True)['model_state_dict'])
    assert torch.equal(net_output(fresh), net_output(model))


def test_from_checkpoint_rebuilds_from_config_and_prefers_ema(tmp_path):
    """DDPM.from_checkpoint rebuilds the architecture and schedule from the checkpoint's plain-dict config
    (ignoring training-only keys) and loads ema_state_dict when ema=True, model_state_dict otherwise."""
    ddpm_kwargs = dict(timesteps=100, beta_end=0.03, variance='posterior')
    model = randomize(create_cifar10_ddpm(**TINY, **ddpm_kwargs), seed=0)
    ema = randomize(create_cifar10_ddpm(**TINY, **ddpm_kwargs), seed=1)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    # downsample_padding as train.py records it (a config without it means the older symmetric padding)
    config.update(ddpm_kwargs, arch='base', lr=1e-4, batch_size=8, num_epochs=3, downsample_padding='same')
    path = tmp_path / 'ddpm_latest.pth'
    torch.save({'model_state_dict': model.state_dict(), 'ema_state_dict': ema.state_dict(), 'config': config}, path)

    from_ema = DDPM.from_checkpoint(path, ema=True)
    from_raw = DDPM.from_checkpoint(path, ema=False)
    for rebuilt in (from_ema, from_raw):
        assert rebuilt.timesteps == 100 and rebuilt.variance == 'posterior'
        assert rebuilt.betas[-1].item() == pytest.approx(0.03, rel=1e-6)
        assert rebuilt.network.config['channels'] == (16, 32)
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}
    assert torch.equal(net_output(from_ema), net_output(ema))
    assert torch.equal(net_output(from_raw), net_output(model))

    torch.save({'model_state_dict': model.state_dict(), 'ema_state_dict': None, 'config': config}, path)
    assert torch.equal(net_output(DDPM.from_checkpoint(path, ema=True)), net_output(model))


# ----- the clipped reverse steps, against a float64 reference -----------------------------------

def clipped_inputs(step, seed=0):
    """x_t and an eps prediction whose implied x_0 lies far outside [-1, 1] for most pixels."""
    g = torch.Generator().manual_seed(seed)
    x_t = 3.0 * torch.randn(4, 3, 4, 4, generator=g)
    eps = 0.2 * torch.randn(4, 3, 4, 4, generator=g)
    _, _, abar, _ = np_schedule()
    x_0 = (np_(x_t) - np.sqrt(1 - abar[step]) * np_(eps)) / np.sqrt(abar[step])
    assert (np.abs(x_0) > 1).mean() > 0.5   # the clip matters for this input
    return x_t, eps, np.clip(x_0, -1.0, 1.0)


@pytest.mark.parametrize('step', [1, 500, T - 1])
def test_clipped_ancestral_step_is_eq7_of_the_clipped_x0(step):
    """Algorithm 2 as the paper's code runs it: x_0 = clip(x_0_pred), then x_{t-1} = mu-tilde_t(x_t, x_0) +
    sqrt(beta_t) z, with mu-tilde_t from Eq. (7)."""
    from sampling.ancestral import sample_ancestral
    betas, alphas, abar, abar_prev = np_schedule()
    x_t, eps, x_0 = clipped_inputs(step)
    model = DDPM(Recorder(lambda x, t: eps), image_shape=(3, 4, 4))
    chain = sample_ancestral(model, x_t, list(range(step, -1, -1)), None, torch.Generator().manual_seed(7), True)
    _, x_prev, x_0_pred = next(chain)   # the first step, t = step -> step - 1, of the chain's tail
    z = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(7)).double().numpy()
    mean = (betas[step] * np.sqrt(abar_prev[step]) * x_0 + (1 - abar_prev[step]) * np.sqrt(alphas[step]) * np_(x_t)) \
        / (1 - abar[step])
    np.testing.assert_allclose(np_(x_0_pred), x_0, atol=1e-6)
    np.testing.assert_allclose(np_(x_prev), mean + np.sqrt(betas[step]) * z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('eta', [0.0, 0.5])
@pytest.mark.parametrize('step, prev', [(999, 899), (300, 0), (10, -1)])
def test_clipped_ddim_step_uses_the_eps_of_the_clipped_x0(step, prev, eta):
    """DDIM Eq. (12) with x_0 clipped: the direction term uses the eps that the clipped x_0 implies,
    eps' = (x_t - sqrt(a-bar_t) x_0) / sqrt(1 - a-bar_t), as in the DDIM code (prev = -1: a-bar = 1)."""
    from sampling.ddim import sample_ddim
    _, _, abar, _ = np_schedule()
    x_t, eps, x_0 = clipped_inputs(step, seed=1)
    model = DDPM(Recorder(lambda x, t: eps), image_shape=(3, 4, 4))
    chain = sample_ddim(model, x_t, [step] + ([prev] if prev >= 0 else []), None, torch.Generator().manual_seed(3),
                        True, eta)
    _, x_prev, _ = next(chain)   # the step from `step` to `prev` (after the last step: a-bar = 1)
    a_t, a_prev = abar[step], (abar[prev] if prev >= 0 else 1.0)
    eps_clipped = (np_(x_t) - np.sqrt(a_t) * x_0) / np.sqrt(1 - a_t)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    expected = np.sqrt(a_prev) * x_0 + np.sqrt(1 - a_prev - sigma ** 2) * eps_clipped
    if eta > 0 and prev >= 0:
        expected = expected + sigma * torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3)).double().numpy()
    np.testing.assert_allclose(np_(x_prev), expected, rtol=1e-4, atol=1e-4)


# ----- the decoder L_0 against the exact Gaussian integral --------------------------------------

def test_decoder_bins_are_the_exact_gaussian_integrals_within_the_tanh_error():
    """Eq. (13): each of the 256 pixel values owns [x - 1/255, x + 1/255], the end bins reach to -inf and
    +inf. scipy's exact normal CDF gives each bin's probability; the model uses the paper's tanh
    approximation of the CDF, whose error is at most 1.79e-4 (measured over z in [-10, 10]), so a bin
    (a difference of two CDF values) may be off by twice that, and no more."""
    from scipy.stats import norm

    from metrics.likelihood import approx_standard_normal_cdf, discretized_gaussian_log_likelihood
    z = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    cdf_error = float((approx_standard_normal_cdf(z) - torch.from_numpy(norm.cdf(z.numpy()))).abs().max())
    assert cdf_error < 1.8e-4
    g = torch.Generator().manual_seed(0)
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1.0).repeat(40)   # every pixel value, 40 times
    mean = (torch.rand(len(x), generator=g, dtype=torch.float64) * 2.4 - 1.2)
    log_scale = torch.rand(len(x), generator=g, dtype=torch.float64) * np.log(300.0) + np.log(1e-3)
    p_model = discretized_gaussian_log_likelihood(x, mean, log_scale).exp().numpy()
    xs, m, s = x.numpy(), mean.numpy(), log_scale.exp().numpy()
    upper = np.where(xs > 0.999, 1.0, norm.cdf((xs + 1 / 255 - m) / s))
    lower = np.where(xs < -0.999, 0.0, norm.cdf((xs - 1 / 255 - m) / s))
    p_exact = upper - lower
    assert np.abs(p_model - p_exact).max() <= 2 * cdf_error + 1e-9
    big = p_exact > 0.05   # where the bin holds real mass, the log-likelihood itself is close
    np.testing.assert_allclose(np.log(p_model[big]), np.log(p_exact[big]), atol=0.01)
    assert big.sum() > 50 and (xs[big] == -1).any() and (xs[big] == 1).any()   # edges are in the check
