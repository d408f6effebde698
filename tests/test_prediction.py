"""What the network predicts (eps, x_0, mu-tilde, v), the learned diagonal variance and Min-SNR-gamma,
against closed forms computed here in float64 (the paper's Table 2 options, issue 25).

The exact predictors come from Gaussian data: with x_0 ~ N(m, s2) per pixel and x_t = a x_0 + sigma eps
(a = sqrt(a-bar_t), sigma = sqrt(1 - a-bar_t)), E[x_0 | x_t] = m + s2 a (x_t - a m) / (a^2 s2 + sigma^2),
and E[x_{t-1} | x_t] follows from the joint Gaussian of (x_{t-1}, x_t) alone, without the posterior
q(x_{t-1} | x_t, x_0) the model uses. Code step t = 0..T-1 is the paper's t = 1..T.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY_TRAIN, load, make_image_folder
from diffusion import DDPM, PREDICTIONS, check_model_options, create_cifar10_ddpm

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
SHAPE = (1, 2, 2)
M = torch.tensor([0.3, -0.5, 0.0, 0.8], dtype=torch.float64).reshape(SHAPE)     # the data's mean per pixel
S2 = torch.tensor([0.2, 0.05, 0.5, 0.01], dtype=torch.float64).reshape(SHAPE)   # and variance
STEPS = torch.tensor([0, 1, 2, 10, 100, 500, 900, 999])


def col(values, t):
    """values[t] as float64 [B, 1, 1, 1]."""
    return torch.as_tensor(np.asarray(values)[t.numpy()], dtype=torch.float64).reshape(-1, 1, 1, 1)


def exact_x0(x_t, t):
    a, var = col(np.sqrt(ABAR), t), col(1.0 - ABAR, t)
    return M + S2 * a * (x_t - a * M) / (a ** 2 * S2 + var)


def exact_eps(x_t, t):
    return (x_t - col(np.sqrt(ABAR), t) * exact_x0(x_t, t)) / col(np.sqrt(1.0 - ABAR), t)


def exact_prev_mean(x_t, t):
    """E[x_{t-1} | x_t] from the joint Gaussian: x_{t-1} ~ N(a' m, a'^2 s2 + 1 - a-bar'), x_t = sqrt(alpha_t) x_{t-1}
    + sqrt(beta_t) z (a' = sqrt(a-bar_{t-1}), a-bar_0 = 1 so that x_{-1} is x_0)."""
    abar_p, alpha, beta = col(ABAR_PREV, t), col(1.0 - BETAS, t), col(BETAS, t)
    var_prev = abar_p * S2 + 1.0 - abar_p
    var_t = alpha * var_prev + beta
    return abar_p.sqrt() * M + alpha.sqrt() * var_prev / var_t * (x_t - col(np.sqrt(ABAR), t) * M)


def exact_prediction(kind, x_t, t):
    if kind == 'eps':
        return exact_eps(x_t, t)
    if kind == 'x0':
        return exact_x0(x_t, t)
    if kind == 'mu':
        return exact_prev_mean(x_t, t)
    return col(np.sqrt(ABAR), t) * exact_eps(x_t, t) - col(np.sqrt(1.0 - ABAR), t) * exact_x0(x_t, t)


class Oracle(nn.Module):
    """The exact (minimum-MSE) predictor of `kind` for the Gaussian data, in float64, returned as float32;
    with `log_var`, a constant nu stacked on the channels (a learned variance)."""
    in_channels, image_size = 1, 2

    def __init__(self, kind, log_var=None):
        super().__init__()
        self.kind, self.log_var = kind, log_var

    def forward(self, x_t, t):
        out = exact_prediction(self.kind, x_t.double(), t.cpu()).float()
        return out if self.log_var is None else torch.cat([out, torch.full_like(out, self.log_var)], 1)


def draw_x_t(t, seed=0):
    """x_0 from the data and x_t ~ q(x_t | x_0), float64, with the noise."""
    g = torch.Generator().manual_seed(seed)
    x_0 = M + S2.sqrt() * torch.randn(len(t), *SHAPE, generator=g, dtype=torch.float64)
    noise = torch.randn(len(t), *SHAPE, generator=g, dtype=torch.float64)
    return x_0, col(np.sqrt(ABAR), t) * x_0 + col(np.sqrt(1.0 - ABAR), t) * noise, noise


# ----- conversions ----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', PREDICTIONS)
def test_exact_predictor_of_each_kind_gives_the_exact_posterior_mean(kind):
    """p_theta's mean from the exact eps, x_0, mu or v predictor is E[x_{t-1} | x_t] of the Gaussian data."""
    model = DDPM(Oracle(kind), prediction=kind, image_shape=SHAPE)
    _, x_t, _ = draw_x_t(STEPS)
    mean, _, _, x_0_pred = model.p_mean_variance(x_t.float(), STEPS, clip_denoised=False)
    np.testing.assert_allclose(mean.double().numpy(), exact_prev_mean(x_t, STEPS).numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(model.predict_eps(x_t.float(), STEPS).double().numpy(),
                               exact_eps(x_t, STEPS).numpy(), atol=2e-5 / math.sqrt(BETAS[0]), rtol=1e-4)
    # x_0_pred leaves float32 precision only where a-bar_t is tiny (x_0 = (x_t - sigma eps) / a)
    big = torch.from_numpy(ABAR[STEPS.numpy()] > 0.01)
    np.testing.assert_allclose(x_0_pred[big].double().numpy(), exact_x0(x_t, STEPS)[big].numpy(), atol=1e-4)


@pytest.mark.parametrize('kind', PREDICTIONS)
def test_prediction_to_eps_and_back_is_the_identity(kind):
    model = DDPM(Oracle(kind), prediction=kind, image_shape=SHAPE)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, T, (64,), generator=g)
    x_t, pred, eps = (torch.randn(64, *SHAPE, generator=g) for _ in range(3))
    back = model.prediction_from_eps(x_t, t, model.eps_from_prediction(x_t, t, pred))
    torch.testing.assert_close(back, pred, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.eps_from_prediction(x_t, t, model.prediction_from_eps(x_t, t, eps)), eps,
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize('kind', PREDICTIONS)
def test_training_target_is_the_exact_predictors_value_without_noise_in_the_data(kind):
    """With s2 -> 0 the data is the point m: x_0 and eps are known from x_t, and the target is the oracle's."""
    model = DDPM(Oracle(kind), prediction=kind, image_shape=SHAPE)
    x_0, x_t, noise = draw_x_t(STEPS)
    target = model.training_target(x_0.float(), x_t.float(), STEPS, noise.float()).double()
    a, sigma = col(np.sqrt(ABAR), STEPS), col(np.sqrt(1.0 - ABAR), STEPS)
    c1 = col(BETAS * np.sqrt(ABAR_PREV) / (1.0 - ABAR), STEPS)
    c2 = col((1.0 - ABAR_PREV) * np.sqrt(1.0 - BETAS) / (1.0 - ABAR), STEPS)
    expected = {'eps': noise, 'x0': x_0, 'v': a * noise - sigma * x_0, 'mu': c1 * x_0 + c2 * x_t}[kind]
    np.testing.assert_allclose(target.numpy(), expected.numpy(), atol=1e-5)


def test_respaced_chain_reads_a_mu_prediction_at_the_original_step():
    """mu-tilde belongs to one original step: on a respaced chain the exact mu and eps predictors agree."""
    from sampling.ancestral import respaced
    x_t = draw_x_t(torch.arange(10))[1].float()
    i, seq = torch.arange(10), torch.linspace(0, T - 1, 10).round().long()
    means = [respaced(DDPM(Oracle(kind), prediction=kind, image_shape=SHAPE), seq).p_mean_variance(
        x_t, i, clip_denoised=False)[0] for kind in ('eps', 'mu')]
    torch.testing.assert_close(means[1], means[0], atol=2e-4, rtol=0)


def test_guidance_mixes_the_converted_eps_of_an_x0_network():
    class CondX0(nn.Module):
        in_channels, image_size, num_classes, null_class = 1, 2, 2, 2

        def forward(self, x_t, t, labels):
            return 0.5 * x_t + labels.float()[:, None, None, None]

    model = DDPM(CondX0(), prediction='x0', image_shape=SHAPE)
    x_t, t = torch.randn(3, *SHAPE), torch.tensor([5, 50, 500])
    labels, null = torch.tensor([0, 1, 1]), torch.full((3,), 2)
    guided = model.predict_eps(x_t, t, labels=labels, guidance_scale=2.0)
    eps_c = model.predict_eps_from_x0(x_t, t, model.network(x_t, t, labels))
    eps_null = model.predict_eps_from_x0(x_t, t, model.network(x_t, t, null))
    torch.testing.assert_close(guided, 3.0 * eps_c - 2.0 * eps_null)


# ----- the bound L ------------------------------------------------------------------------------

def closed_form_kl_bits(x_0, x_t, t, mean_p, var_p):
    """KL(q(x_{t-1} | x_t, x_0) || N(mean_p, var_p)) in bits/dim per image, q from Eqs. (6)-(7)."""
    c1 = col(BETAS * np.sqrt(ABAR_PREV) / (1.0 - ABAR), t)
    c2 = col((1.0 - ABAR_PREV) * np.sqrt(1.0 - BETAS) / (1.0 - ABAR), t)
    tilde = col(BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR), t)
    kl = 0.5 * (torch.log(var_p / tilde) + tilde / var_p + (c1 * x_0 + c2 * x_t - mean_p) ** 2 / var_p - 1.0)
    return kl.flatten(1).mean(1) / math.log(2.0)


@pytest.mark.parametrize('kind', PREDICTIONS)
@pytest.mark.parametrize('variance', ['beta', 'posterior', 'learned'])
def test_the_bound_is_the_sum_of_its_closed_form_kl_terms(kind, variance):
    """loss='vlb' at every t = 2..T is T times the closed-form Gaussian KL, so their sum is L_1 + ... + L_{T-1};
    with the prior, L_T = KL(N(sqrt(a-bar_T) x_0, 1 - a-bar_T) || N(0, 1)), also closed form."""
    log_var = -5.0 if variance == 'learned' else None
    model = DDPM(Oracle(kind, log_var), prediction=kind, variance=variance, loss='vlb', image_shape=SHAPE)
    t = torch.arange(1, T)
    x_0, x_t, noise = draw_x_t(t, seed=2)
    x_0 = x_0[:1].expand_as(x_0)   # one image, every t
    x_t = col(np.sqrt(ABAR), t) * x_0 + col(np.sqrt(1.0 - ABAR), t) * noise
    terms = model.loss(x_0.float(), t, noise.float(), reduction='none').double() / T
    var_p = {'beta': col(BETAS, t), 'posterior': col(BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR), t),
             'learned': torch.full((len(t), 1, 1, 1), math.exp(-5.0), dtype=torch.float64)}[variance]
    expected = closed_form_kl_bits(x_0, x_t, t, exact_prev_mean(x_t, t), var_p)
    np.testing.assert_allclose(terms.numpy(), expected.numpy(), rtol=2e-3, atol=2e-4)
    assert abs(terms.sum().item() - expected.sum().item()) <= 1e-3 * expected.sum().item()
    a_T, var_T = math.sqrt(ABAR[-1]), 1.0 - ABAR[-1]
    prior = 0.5 * (-math.log(var_T) + var_T + (a_T * x_0[:1]) ** 2 - 1.0).mean() / math.log(2.0)
    assert model.prior_bpd(x_0[:1].float()).item() == pytest.approx(prior.item(), rel=1e-4)


def test_learned_diagonal_variance_is_the_networks_log_variance():
    model = DDPM(Oracle('eps', log_var=-3.25), variance='learned', loss='vlb', image_shape=SHAPE)
    _, x_t, _ = draw_x_t(STEPS)
    _, var, log_var, _ = model.p_mean_variance(x_t.float(), STEPS)
    assert torch.equal(log_var, torch.full_like(log_var, -3.25)) and torch.allclose(var, log_var.exp())
    assert DDPM(Oracle('eps', 0.0), learn_sigma=True, loss='vlb', image_shape=SHAPE).variance == 'learned_range'


# ----- Min-SNR-gamma ----------------------------------------------------------------------------

class Toy(nn.Module):
    in_channels, image_size = 1, 2

    def forward(self, x_t, t):
        return torch.tanh(1.3 * x_t + torch.sin(t.float() / 37)[:, None, None, None])


@pytest.mark.parametrize('gamma', [1.0, 5.0])
def test_min_snr_gamma_weights_eps_by_min_snr_over_snr(gamma):
    """Hang et al. 2023: the eps MSE weighted by min(SNR_t, gamma) / SNR_t, SNR_t = a-bar_t / (1 - a-bar_t)."""
    model = DDPM(Toy(), image_shape=SHAPE, min_snr_gamma=gamma)
    x_0, x_t, noise = draw_x_t(STEPS)
    loss = model.loss(x_0.float(), STEPS, noise.float(), reduction='none').double()
    snr = ABAR[STEPS.numpy()] / (1.0 - ABAR[STEPS.numpy()])
    mse = (model.network(x_t.float(), STEPS).double() - noise).pow(2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(loss.numpy(), np.minimum(snr, gamma) / snr * mse, rtol=1e-4)
    assert model.loss(x_0.float(), STEPS, noise.float()).item() == pytest.approx(loss.mean().item(), rel=1e-6)


@pytest.mark.parametrize('kind', PREDICTIONS)
def test_min_snr_gamma_is_min_snr_weighted_x0_error_for_every_prediction(kind):
    """Each kind's weighted MSE equals min(SNR_t, gamma) ||x_0 - x_0_pred||^2 (x_0_pred from the raw output)."""
    model = DDPM(Toy(), image_shape=SHAPE, min_snr_gamma=5.0, prediction=kind)
    x_0, x_t, noise = draw_x_t(STEPS)
    loss = model.loss(x_0.float(), STEPS, noise.float(), reduction='none').double()
    out = model.network(x_t.float(), STEPS).double()
    a, sigma = col(np.sqrt(ABAR), STEPS), col(np.sqrt(1.0 - ABAR), STEPS)
    c1 = col(BETAS * np.sqrt(ABAR_PREV) / (1.0 - ABAR), STEPS)
    c2 = col((1.0 - ABAR_PREV) * np.sqrt(1.0 - BETAS) / (1.0 - ABAR), STEPS)
    x_0_pred = {'eps': (x_t - sigma * out) / a, 'x0': out, 'v': a * x_t - sigma * out,
                'mu': (out - c2 * x_t) / c1}[kind]
    snr = ABAR[STEPS.numpy()] / (1.0 - ABAR[STEPS.numpy()])
    expected = np.minimum(snr, 5.0) * (x_0_pred - x_0).pow(2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(loss.numpy(), expected, rtol=2e-3)


def test_min_snr_gamma_off_is_l_simple():
    x_0, _, noise = draw_x_t(STEPS)
    model = DDPM(Toy(), image_shape=SHAPE)
    x_t = model.q_sample(x_0.float(), STEPS, noise.float())
    assert torch.equal(model.loss(x_0.float(), STEPS, noise.float()),
                       torch.nn.functional.mse_loss(model.network(x_t, STEPS), noise.float()))


@pytest.mark.parametrize('options, named', [
    (dict(prediction='xprev'), 'prediction must be one of'), (dict(loss='hybrid'), 'needs learn_sigma'),
    (dict(variance='learned'), "needs loss='hybrid'"), (dict(min_snr_gamma=0), 'positive'),
    (dict(min_snr_gamma=5, loss='vlb'), 'has none'), (dict(variance='posterior', learn_sigma=True), 'drop it'),
])
def test_impossible_options_get_one_line(options, named):
    kw = dict(timesteps=T, beta_start=1e-4, beta_end=0.02, variance='beta', beta_schedule='linear',
              learn_sigma=False, loss='simple')
    with pytest.raises(ValueError, match=named) as e:
        check_model_options(**{**kw, **options})
    assert '\n' not in str(e.value)


def test_learned_variance_refuses_a_respaced_chain():
    model = DDPM(Oracle('eps', -3.0), variance='learned', loss='vlb', image_shape=SHAPE)
    with pytest.raises(ValueError, match="variance='learned'"):
        model.sample(1, steps=10, progress=False)


# ----- every prediction trains, is saved and samples ----------------------------------------

@pytest.mark.parametrize('kind, extra', [('x0', dict(min_snr_gamma=5.0)), ('mu', dict(loss='vlb')),
                                         ('v', dict(variance='learned', loss='hybrid'))])
def test_each_prediction_trains_is_rebuilt_and_samples_with_every_sampler(tmp_path, kind, extra):
    from train import train_ddpm
    data = make_image_folder(tmp_path / 'img', 8)
    ckpt_dir = tmp_path / 'ckpt'
    train_ddpm(**{**TINY_TRAIN, 'dataset': 'folder', 'data_dir': data, 'checkpoint_dir': str(ckpt_dir),
                  'log_dir': str(tmp_path / 'runs'), 'run_name': 'r', 'max_steps': 2, 'timesteps': 50,
                  'prediction': kind, 'amp': 'fp32', **extra})
    ckpt = load(ckpt_dir / 'ddpm_latest.pth')
    assert ckpt['config']['prediction'] == kind
    model = DDPM.from_checkpoint(str(ckpt_dir / 'ddpm_latest.pth'))
    assert (model.prediction, model.min_snr_gamma) == (kind, extra.get('min_snr_gamma'))
    runs = [dict(), dict(sampler='ddim', steps=5), dict(sampler='dpm-solver', steps=5)]
    runs += [dict(steps=5)] if model.variance != 'learned' else []
    for kw in runs:
        x = model.sample(2, progress=False, generator=torch.Generator().manual_seed(0), **kw)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def test_an_old_checkpoint_config_is_an_eps_model():
    from diffusion import model_from_checkpoint
    old = create_cifar10_ddpm(channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,), time_emb_dim=32,
                              image_size=16, timesteps=50)
    config = dict(channels=[16, 32], num_res_blocks=1, attn_resolutions=[8], time_emb_dim=32, image_size=16,
                  timesteps=50)
    rebuilt = model_from_checkpoint({'model_state_dict': old.state_dict(), 'config': config})
    assert (rebuilt.prediction, rebuilt.min_snr_gamma, rebuilt.variance) == ('eps', None, 'beta')


@pytest.mark.parametrize('options, named', [(dict(prediction='x0'), 'predicts x0'),
                                            (dict(variance='learned', loss='vlb'), 'learns sigma')])
def test_ddim_format_export_refuses_what_it_cannot_express(tmp_path, options, named):
    from weights.ddim_format import DDIMFormatError, save_ddim
    model = create_cifar10_ddpm(arch='ddpm-paper', channels=(32, 64), num_res_blocks=1, **options)
    with pytest.raises(DDIMFormatError, match=named):
        save_ddim(model, str(tmp_path / 'model.ckpt'))
    assert not (tmp_path / 'model.ckpt').exists()
