"""Tests of the fast samplers in sampling/ (dpm_solver.py, timesteps.py): DPM-Solver++(2M) and the step spacings.

The solvers are measured against the probability-flow ODE's exact solution for
Gaussian data, with the exact noise predictor (test_diffusion.IdealGaussianEps,
built from the test's own float64 schedule), never against themselves.
"""

import argparse

import numpy as np
import pytest
import torch

from diffusion import DDPM
from sampling.dpm_solver import dpm_solver_coefficients
from sampling.options import SampleOptions, few_steps_warning, timesteps_of
from sampling.timesteps import ddim_timesteps, distinct_steps, half_log_snr, spaced_timesteps
from test_diffusion import MU, S, T, IdealGaussianEps, Recorder, np_schedule


# ----- the exact ODE endpoint for Gaussian data ------------------------------------------------

def exact_ode_endpoint(x_T, net):
    """What a deterministic sampler's x_0 should be, from the same x_T, for data x_0 ~ N(mu, s^2) per pixel.

    Derivation. The forward process gives x_t = alpha_t x_0 + sigma_t eps (alpha_t = sqrt(a-bar_t),
    sigma_t = sqrt(1 - a-bar_t)), so its marginal is p_t = N(m_t, v_t) per pixel with m_t = alpha_t mu and
    v_t = alpha_t^2 s^2 + sigma_t^2. The probability-flow ODE dx/dt = f(t) x - g(t)^2 / 2 * d/dx log p_t(x),
    with alpha_t' = f alpha_t and v_t' = 2 f v_t + g^2 (the forward SDE's moment equations), is solved by
    x_t = m_t + sqrt(v_t) z with z constant: d/dt (m_t + sqrt(v_t) z) = f m_t + (f v_t + g^2 / 2) z / sqrt(v_t),
    which is f x_t + g^2 / 2 (x_t - m_t) / v_t, the right-hand side. So the ODE keeps
    z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2) and maps x_T to x_t = alpha_t mu + sqrt(v_t) z
    at every t, whatever continuous schedule joins the discrete a-bar_t (only their values at the integer
    steps enter).

    Where the chain ends: a-bar = 1 (lambda = +inf) is not a step of the discrete model. Like DDIM's, the
    solver's last step starts at code t = 0 (a-bar_0 = 1 - beta_1) and returns the data prediction there,
    x_0 = (x - sigma_0 eps(x, 0)) / alpha_0. With the exact predictor that is E[x_0 | x_{t=0}] =
    mu + s z / sqrt(1 + sigma_0^2 / (alpha_0 s)^2), which differs from the continuous limit mu + s z by
    0.22% of s here. Both samplers target this same point, so the reference is the exact ODE solution at
    code t = 0 followed by that same last step; the measured error is the solver's alone.
    """
    _, _, abar, _ = np_schedule()
    x_T = x_T.double().numpy()
    z = (x_T - np.sqrt(abar[-1]) * MU) / np.sqrt(abar[-1] * S ** 2 + 1 - abar[-1])
    x_at_0 = np.sqrt(abar[0]) * MU + np.sqrt(abar[0] * S ** 2 + 1 - abar[0]) * z
    eps = net.c[0] * x_at_0 + net.d[0]
    return (x_at_0 - np.sqrt(1 - abar[0]) * eps) / np.sqrt(abar[0])


def gaussian_model():
    net = IdealGaussianEps(MU, S)
    return DDPM(net, timesteps=T, image_shape=(1, 16, 16)), net


def ode_error(model, net, sampler, steps, spacing=None, n=16):
    """RMS(x_sampler - x_exact) / s over n x 256 pixels, from one fixed x_T, without clipping."""
    x_T = torch.randn(n, *model.image_shape, generator=torch.Generator().manual_seed(0))
    chain = list(model.sample_progressive(n, sampler=sampler, steps=steps, x_T=x_T, progress=False,
                                          clip_denoised=False, spacing=spacing))
    x_0 = chain[-2][1].double().numpy()   # the last step's output; chain[-1] is the same, clamped to [-1, 1]
    return float(np.sqrt(np.mean((x_0 - exact_ode_endpoint(x_T, net)) ** 2)) / S)


# RMS(x_sampler - x_exact) / s, measured by ode_error (T = 1000, mu = 0.25, s = 0.15, 16 x 256 pixels):
#   NFE                          5       10       20       50       100      200      1000
#   DDIM (uniform, default)    0.774    0.577    0.354    0.152    0.078    0.040    0.0081
#   DDIM quadratic             0.439    0.224    0.113    0.046    0.023    0.011    0.0081
#   DPM-Solver++(2M), logsnr   0.181    0.0126   0.0152   0.0022   0.00074  0.00083  0.00094
#   DPM-Solver, quadratic      0.063    0.103    0.049    0.0071   0.0017   0.00089  0.00094
# DPM-Solver is 46x, 23x and 69x closer than DDIM at 10, 20 and 50 NFE (4.9x, 7.5x, 21x than DDIM
# quadratic). Its error falls as 1/NFE^2 from 40 NFE on (checked against a continuous-lambda version of
# the same update), down to a floor of ~9e-4 that the integer steps near t = 0 set (lambda_0 - lambda_1
# = 0.4 with no step in between); DDIM reaches 8e-3 at 1000 steps. The same table is in README.md.
ERRORS = {('ddim', 10): 0.577, ('ddim', 20): 0.354, ('dpm-solver', 10): 0.0126, ('dpm-solver', 20): 0.0152}


@pytest.mark.parametrize('steps', [10, 20])
def test_dpm_solver_is_10x_closer_to_the_exact_ode_than_ddim(steps):
    """DPM-Solver++(2M) with `steps` network evaluations lands at least 10x closer to the ODE's exact x_0
    than DDIM with as many (both deterministic, both from the same x_T)."""
    model, net = gaussian_model()
    ddim, dpm = ode_error(model, net, 'ddim', steps), ode_error(model, net, 'dpm-solver', steps)
    print(f'\n{steps} NFE: RMS error / s: DDIM {ddim:.4f}, DPM-Solver {dpm:.4f} ({ddim / dpm:.0f}x)')
    assert dpm * 10 <= ddim
    assert ddim == pytest.approx(ERRORS['ddim', steps], rel=0.1)     # the docstring's numbers are these
    assert dpm == pytest.approx(ERRORS['dpm-solver', steps], rel=0.1)


def test_both_samplers_converge_to_the_exact_ode_endpoint():
    """The reference is the point both solvers converge to, at each one's order: DPM-Solver's error is below
    3e-3 and 1.5e-3 at 50 and 200 NFE and falls 4x from 50 to 100 NFE on the quadratic steps, whose uneven
    lambda steps exercise its step ratio r (second order; measured 7.1e-3 -> 1.7e-3); DDIM (first order)
    halves its error when its steps double."""
    model, net = gaussian_model()
    assert ode_error(model, net, 'dpm-solver', 50) < 3e-3
    assert ode_error(model, net, 'dpm-solver', 200) < 1.5e-3
    q50, q100 = (ode_error(model, net, 'dpm-solver', n, 'quadratic') for n in (50, 100))
    assert q50 / q100 == pytest.approx(4.0, rel=0.2)
    ddim_100, ddim_200 = ode_error(model, net, 'ddim', 100), ode_error(model, net, 'ddim', 200)
    assert ddim_200 < 0.1 and ddim_100 / ddim_200 == pytest.approx(2.0, rel=0.1)


def test_dpm_solver_coefficients_are_algorithm_2s():
    """Lu et al. 2022, Algorithm 2, from the test's float64 schedule: step s -> t has h = lambda_t - lambda_s,
    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D, D = (1 + 1/(2r)) x_theta(s) - 1/(2r) x_theta(s')
    with r = h_previous / h; first order (1/(2r) = 0) at the first step and at the last, into a-bar = 1."""
    _, _, abar, _ = np_schedule()
    model = DDPM(Recorder(), timesteps=T, image_shape=(1, 2, 2))
    seq = [999, 700, 400, 150, 40, 5, 0]
    alpha, sigma = np.sqrt(abar[seq]), np.sqrt(1 - abar[seq])
    lam = np.log(alpha / sigma)
    coefs = dpm_solver_coefficients(model, seq)
    assert len(coefs) == len(seq)
    for i, (c_x, c_d, w) in enumerate(coefs[:-1]):
        h = lam[i + 1] - lam[i]
        assert c_x == pytest.approx(sigma[i + 1] / sigma[i], rel=1e-5)
        assert c_d == pytest.approx(alpha[i + 1] * (1 - np.exp(-h)), rel=1e-5)
        assert w == (0.0 if i == 0 else pytest.approx(1 / (2 * ((lam[i] - lam[i - 1]) / h)), rel=1e-5))
    assert coefs[-1] == (0.0, 1.0, 0.0)   # x_0 = x_theta(x_{t=0}, 0), DDIM's last step


def test_first_order_dpm_solver_is_ddim():
    """With at most two steps every DPM-Solver++ step is first order (no previous prediction at the first,
    lambda = +inf at the last), and first-order DPM-Solver++ is DDIM (Lu et al. 2022): the same x_0 from the
    same x_T on the same steps."""
    model = DDPM(Recorder(lambda x_t, t: 0.3 * x_t + 0.01 * t.view(-1, 1, 1, 1)), timesteps=50, image_shape=(2, 4, 4))
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2):
        dpm = model.sample(3, sampler='dpm-solver', steps=steps, x_T=x_T, progress=False)
        ddim = model.sample(3, sampler='ddim', steps=steps, x_T=x_T, progress=False, clip_denoised=False,
                            spacing='logsnr')
        torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-6)
    dpm = model.sample(3, sampler='dpm-solver', steps=3, x_T=x_T, progress=False)   # the second-order step
    ddim = model.sample(3, sampler='ddim', steps=3, x_T=x_T, progress=False, clip_denoised=False, spacing='logsnr')
    assert (dpm - ddim).abs().max() > 1e-3


# ----- which steps, and how many network evaluations -------------------------------------------

@pytest.mark.parametrize('spacing', [None, 'uniform', 'quadratic'])
@pytest.mark.parametrize('timesteps,steps', [(1000, 1), (1000, 2), (1000, 10), (1000, 20), (1000, 999),
                                             (1000, 1000), (100, 37), (100, 100)])
def test_dpm_solver_calls_network_steps_times_at_decreasing_integer_t(timesteps, steps, spacing):
    """`steps` is the number of network evaluations exactly: eps_theta is called `steps` times, on a
    LongTensor t of distinct integers in decreasing order, from T-1 (where x_T ~ N(0, I) holds) down to 0."""
    net = Recorder()
    model = DDPM(net, timesteps=timesteps, image_shape=(1, 2, 2))
    model.sample(2, sampler='dpm-solver', steps=steps, spacing=spacing, progress=False)
    assert len(net.calls) == steps
    seen = []
    for _, t in net.calls:
        assert t.dtype == torch.long and t.shape == (2,) and t[0] == t[1]
        seen.append(int(t[0]))
    assert seen[0] == timesteps - 1
    assert all(a > b for a, b in zip(seen, seen[1:]))
    if steps > 1:
        assert seen[-1] == 0


def test_default_ddim_sequence_is_unchanged():
    """The default (uniform) DDIM steps are still the ones from before spacing options existed,
    torch.linspace(0, T-1, S, float64).round() (round half to even), for every S, so default DDIM samples are
    what they were. (numpy's linspace differs from torch's at some exact halves, e.g. S = 27 picks 499 where
    torch picks 500, so the pinned formula is torch's.)"""
    for steps in range(2, 1001):
        expected = torch.linspace(0, 999, steps, dtype=torch.float64).round().long().tolist()
        assert spaced_timesteps(1000, steps).tolist() == expected, steps
        assert ddim_timesteps(1000, steps).tolist() == expected, steps
    assert spaced_timesteps(1000, 1).tolist() == [999]


def lambdas(timesteps=T):
    _, _, abar, _ = np_schedule(timesteps)
    return 0.5 * np.log(abar / (1 - abar))


@pytest.mark.parametrize('spacing', ['quadratic', 'logsnr'])
def test_spaced_timesteps_are_distinct_integers_from_0_to_T_minus_1(spacing):
    """For every S in 1..T: S distinct increasing integers, 0 and T-1 included (T-1 alone for S = 1)."""
    log_snr = torch.from_numpy(lambdas())
    for steps in range(1, T + 1):
        seq = spaced_timesteps(T, steps, spacing, log_snr).tolist()
        assert len(seq) == steps and seq[-1] == T - 1, steps
        assert all(a < b for a, b in zip(seq, seq[1:])), steps
        assert steps == 1 or seq[0] == 0


def test_distinct_steps_resolves_collisions_anywhere():
    """Positions that round to the same step (here in the middle and at the top) become consecutive steps,
    and the rounding elsewhere is untouched."""
    u = torch.tensor([0.0, 3.2, 5.1, 5.2, 5.3, 7.9, 8.7, 8.8, 9.0], dtype=torch.float64)
    assert distinct_steps(u, 10).tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]   # 9 of 10: room decides
    assert distinct_steps(u, 12).tolist() == [0, 3, 5, 6, 7, 8, 9, 10, 11]
    assert distinct_steps(u[[0, 1, 2, 3, 4, 8]], 10).tolist() == [0, 3, 5, 6, 7, 9]


def test_quadratic_spacing_is_ddims_quadratic_sequence():
    """Where no two steps collide, 'quadratic' is round((T-1) (i / (S-1))^2), DDIM's tau_i = c i^2 with
    tau_{S-1} = T-1; at 100 steps the crowded first steps become 0, 1, 2, ... and the rest is unchanged."""
    i = np.arange(10)
    assert spaced_timesteps(T, 10, 'quadratic').tolist() == np.round(999 * (i / 9) ** 2).astype(int).tolist()
    seq = spaced_timesteps(T, 100, 'quadratic').numpy()
    quad = np.round(999 * (np.arange(100) / 99) ** 2).astype(int)
    assert seq[:10].tolist() == list(range(10))
    assert (seq[20:] == quad[20:]).all()


def test_logsnr_spacing_is_uniform_in_lambda():
    """With 10 steps, lambda_t at the chosen steps is within half a step's lambda gap of the uniform grid
    from lambda_0 to lambda_{T-1} (the model's own buffers, checked here against the float64 schedule)."""
    lam = lambdas()
    model = DDPM(Recorder(), timesteps=T, image_shape=(1, 2, 2))
    np.testing.assert_allclose(half_log_snr(model).numpy(), lam, rtol=1e-6, atol=1e-6)
    seq = spaced_timesteps(T, 10, 'logsnr', half_log_snr(model)).numpy()
    target = np.linspace(lam[0], lam[-1], 10)
    gaps = np.abs(np.diff(lam))
    for t, want in zip(seq, target):
        assert abs(lam[t] - want) <= 0.5 * max(gaps[max(t - 1, 0)], gaps[min(t, T - 2)]) + 1e-9


# ----- options and errors ----------------------------------------------------------------------

def test_dpm_solver_clips_only_when_asked():
    """DPM-Solver leaves x_0_pred unclipped by default; clip_denoised=True clips it to [-1, 1]."""
    model = DDPM(Recorder(lambda x_t, t: -2.0 * x_t), timesteps=20, image_shape=(3, 8, 8))

    def predictions(**kwargs):
        chain = model.sample_progressive(4, sampler='dpm-solver', steps=5, progress=False,
                                         generator=torch.Generator().manual_seed(0), **kwargs)
        return torch.stack([x_0_pred for _, _, x_0_pred in chain])

    assert predictions().abs().max() > 1
    assert predictions(clip_denoised=True).abs().max() <= 1


def test_no_host_sync_in_the_sampling_loop(monkeypatch):
    """After the schedule is set up (before the first step) the loop reads no tensor values into Python:
    .item(), .tolist(), bool() and float() of a tensor all raise inside it."""
    model = DDPM(Recorder(lambda x_t, t: 0.5 * x_t), timesteps=50, image_shape=(1, 4, 4))
    for sampler in ('dpm-solver', 'ddim'):
        chain = model.sample_progressive(2, sampler=sampler, steps=10, progress=False)
        next(chain)
        with monkeypatch.context() as m:
            for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
                m.setattr(torch.Tensor, name,
                          lambda *a, name=name: pytest.fail(f'{sampler}: Tensor.{name} in the loop'))
            steps = [step for step, _, _ in chain]
        assert steps[-1] == -1 and len(steps) == 10


@pytest.mark.parametrize('kwargs', [dict(sampler='dpm-solver', steps=0), dict(sampler='dpm-solver', steps=21),
                                    dict(sampler='ddim', steps=21), dict(sampler='ddim', steps=5, spacing='cosine'),
                                    dict(sampler='ddpm', spacing='uniform'), dict(sampler='dpm-solver', eta=1.0),
                                    dict(sampler='dpm-solve')])
def test_bad_sampler_options_are_one_line_errors(kwargs):
    model = DDPM(Recorder(), timesteps=20, image_shape=(1, 2, 2))
    with pytest.raises(ValueError) as e:
        model.sample(1, progress=False, **kwargs)
    assert '\n' not in str(e.value)


def test_few_steps_warning_below_the_readmes_smallest_recommendation():
    """Issue 22, item 6: dpm-solver below 10 steps gets a one-line warning; other samplers, 10 steps and
    more, no steps given, and out-of-range steps (an error elsewhere) get none."""
    message = few_steps_warning('dpm-solver', 1)
    assert message == 'dpm-solver with 1 step gives poor images; the README recommends at least 10 (20 for final samples)'
    assert 'with 9 steps' in few_steps_warning('dpm-solver', 9)
    for sampler, steps in (('dpm-solver', 10), ('dpm-solver', None), ('dpm-solver', 0), ('ddim', 1), ('ddpm', 2)):
        assert few_steps_warning(sampler, steps) is None, (sampler, steps)


# ----- SampleOptions: walks that start part-way, resolving, the command line ----------------------

@pytest.mark.parametrize('sampler,steps,start', [('ddim', 5, 12), ('dpm-solver', 5, 12), ('ddpm', None, 7),
                                                 ('ddpm', 5, 12)])
def test_a_walk_started_part_way_calls_the_network_at_the_start_then_the_steps_below(sampler, steps, start):
    """timesteps_of(start=s): x_T holds x_s, so the network sees s first, then the sampler's own steps below s
    (uniform: round(linspace(0, T-1, steps)), numpy's; 'ddpm' unspaced: every step), and nothing above s."""
    T = 20
    net = Recorder()
    model = DDPM(net, timesteps=T, image_shape=(1, 2, 2))
    options = SampleOptions(sampler, steps, None if sampler == 'ddpm' else 'uniform').resolve(model)
    walk = timesteps_of(model, options, start=start)
    for _ in model.run_sampler(options, 2, 'cpu', torch.Generator().manual_seed(0), x_T=torch.zeros(2, 1, 2, 2),
                               timesteps=walk):
        pass
    own = np.round(np.linspace(0, T - 1, steps)).astype(int) if steps else np.arange(T)
    expected = [start] + sorted((int(s) for s in own if s < start), reverse=True)
    assert walk == expected   # a respaced 'ddpm' chain too: its network sees the original steps
    assert [int(t[0]) for _, t in net.calls] == expected


def test_a_bad_start_is_a_one_line_error():
    model = DDPM(Recorder(), timesteps=10, image_shape=(1, 2, 2))
    options = SampleOptions().resolve(model)
    for bad in (-1, 10, 2.5, True):
        with pytest.raises(ValueError, match='start must be a code step in 0..9') as e:
            timesteps_of(model, options, start=bad)
        assert '\n' not in str(e.value)


def test_resolved_options_resolve_to_themselves_and_from_args_keeps_missing_flags_default():
    model = DDPM(Recorder(), timesteps=50, image_shape=(1, 2, 2))
    for options in (SampleOptions(), SampleOptions('ddim'), SampleOptions('dpm-solver', 7, 'quadratic'),
                    SampleOptions('ddim', 10, eta=1, clip_denoised=False, guidance_scale=2)):
        once = options.resolve(model)
        assert once.resolve(model) == once and None not in (once.steps, once.clip_denoised)
    args = argparse.Namespace(sampler='ddim', steps=4, quiet=True)   # a CLI without --eta, --spacing, ...
    assert SampleOptions.from_args(args) == SampleOptions(sampler='ddim', steps=4)
