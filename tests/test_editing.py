"""editing/: RePaint, SDEdit, shared latents and interpolation against closed forms.

The data are Gaussian, x_0 ~ N(mu, Sigma) in d = 4 dimensions (images of 1 x 2 x 2 pixels), so the exact
noise predictor is known: eps*(x_t, t) = sqrt(1 - a-bar_t) (a-bar_t Sigma + (1 - a-bar_t) I)^{-1}
(x_t - sqrt(a-bar_t) mu), and so are the distributions the tools should draw from.
"""
import pytest
import torch

from diffusion import DDPM
from editing.inpaint import RePaint, inpaint, repaint_walk, reverse_step
from editing.interpolate import interpolate, interpolate_noise, slerp
from editing.latents import shared_latents
from editing.reverse import code_step, strength_step
from editing.sdedit import sdedit
from sampling.options import SampleOptions

D, SHAPE = 4, (1, 2, 2)
MU = torch.tensor([0.1, -0.1, 0.0, 0.2], dtype=torch.float64)
# Pixels 0 and 1 are known, 2 and 3 unknown; each unknown pixel leans on both known ones.
SIGMA = 0.04 * torch.tensor([[1, .6, .8, .5], [.6, 1, .5, .8], [.8, .5, 1, .6], [.5, .8, .6, 1]], dtype=torch.float64)
KNOWN, UNKNOWN = [0, 1], [2, 3]


class GaussianEps(torch.nn.Module):
    """The exact eps of N(mu, Sigma) data at every step (one matrix per step, precomputed in float64);
    with `class_means`, a class-conditional network whose class c has mean class_means[c]."""

    def __init__(self, betas, mu=MU, sigma=SIGMA, class_means=None):
        super().__init__()
        abar = torch.cumprod(1 - betas, 0).reshape(-1, 1, 1)
        self.matrix = ((1 - abar).sqrt() * torch.linalg.inv(abar * sigma + (1 - abar) * torch.eye(D))).float()
        means = torch.stack([mu] + list(class_means or []))   # row 0: the null class (unconditional)
        self.shift = (abar.sqrt() * means.T.unsqueeze(0)).float()   # [T, D, classes + 1]
        self.num_classes = len(class_means) if class_means else None
        self.null_class = self.num_classes

    def forward(self, x_t, t, labels=None):
        column = torch.zeros_like(t) if labels is None else (labels + 1) % (self.num_classes + 1)
        r = x_t.reshape(x_t.shape[0], D) - self.shift[t, :, column]
        return torch.einsum('bij,bj->bi', self.matrix[t], r).reshape(x_t.shape)


def gaussian_ddpm(timesteps=200, beta_end=0.06, **kwargs):
    """A DDPM with the exact predictor; T = 200 steps up to beta = 0.06 leave a-bar_T = 0.002."""
    model = DDPM(torch.nn.Identity(), timesteps=timesteps, beta_start=1e-4, beta_end=beta_end, image_shape=SHAPE)
    model.network = GaussianEps(model.betas64, **kwargs)
    return model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def known_image(n):
    x_0 = torch.zeros(n, *SHAPE)
    x_0.reshape(n, D)[:, KNOWN] = torch.tensor([0.4, 0.2])
    mask = torch.zeros(1, *SHAPE)
    mask.reshape(D)[KNOWN] = 1
    return x_0, mask


def conditional_gaussian(x_known):
    """Mean and covariance of the unknown pixels given the known ones: mu_U + S_UK S_KK^-1 (x_K - mu_K),
    S_UU - S_UK S_KK^-1 S_KU."""
    s_kk, s_uk = SIGMA[KNOWN][:, KNOWN], SIGMA[UNKNOWN][:, KNOWN]
    mean = MU[UNKNOWN] + s_uk @ torch.linalg.solve(s_kk, x_known - MU[KNOWN])
    return mean, SIGMA[UNKNOWN][:, UNKNOWN] - s_uk @ torch.linalg.solve(s_kk, s_uk.T)


# ----- RePaint --------------------------------------------------------------------------------------------------

def test_repaint_walk_goes_back_up_j_levels_r_minus_1_times():
    assert repaint_walk(4, 1, 1) == [4, 3, 2, 1, 0]
    # jumps from levels 1 and 3 (1 + j), each taken r - 1 = 1 time
    assert repaint_walk(5, 2, 2) == [5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    walk = repaint_walk(250, 10, 10)
    down = sum(b < a for a, b in zip(walk, walk[1:]))
    assert walk[0] == 250 and walk[-1] == 0 and down == 250 + 9 * 10 * 24   # 24 jump levels: 1, 11, ..., 231 (<= 250 - j)
    assert all(abs(a - b) == 1 for a, b in zip(walk, walk[1:]))


def test_full_mask_returns_the_known_image_exactly():
    model = gaussian_ddpm(timesteps=20)
    x_0 = torch.rand(3, *SHAPE, generator=gen(5)) - 0.5
    out = inpaint(model, x_0, torch.ones(1, 1, 2, 2), gen(), schedule=RePaint(jump_length=3, resamplings=3))
    assert torch.equal(out, x_0)


@pytest.mark.parametrize('level', [2, 5, 20])
def test_known_pixels_of_x_t_minus_1_are_drawn_from_q_given_x_0(level):
    """One step down from `level`: the known pixels ~ N(sqrt(a-bar_{t-1}) x_0, (1 - a-bar_{t-1}) I), Eq. (4)
    at the level below (closed form; a-bar of levels 1 and 2 differ by a factor of 30 in 1 - a-bar)."""
    model, n = gaussian_ddpm(timesteps=20), 20000
    x_0 = torch.full((n, *SHAPE), 0.5)
    x_t = torch.randn(n, *SHAPE, generator=gen(1))
    out = reverse_step(model, x_t, x_0, torch.ones(1, 1, 2, 2), level, gen(2), False, {}).double()
    abar = torch.cumprod(1 - model.betas64, 0)[level - 2]
    assert abs(out.mean() - abar.sqrt() * 0.5) < 4 * ((1 - abar) / (n * D)).sqrt()
    assert abs(out.var() / (1 - abar) - 1) < 0.05


@pytest.mark.parametrize('steps', [None, 7])
def test_empty_mask_is_ancestral_sampling_from_the_same_seed(steps):
    model = gaussian_ddpm(timesteps=20)
    x_0 = torch.zeros(5, *SHAPE)
    out = inpaint(model, x_0, torch.zeros(1, 1, 2, 2), gen(3), schedule=RePaint(steps=steps, resamplings=1))
    ref = model.sample(5, generator=gen(3), steps=steps, progress=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def repaint_errors(resamplings, jump_length, n=4000):
    """Largest errors of the unknown pixels' mean and covariance against the conditional Gaussian."""
    x_0, mask = known_image(n)
    out = inpaint(gaussian_ddpm(), x_0, mask, gen(1), schedule=RePaint(jump_length=jump_length,
                  resamplings=resamplings), clip_denoised=False).reshape(n, D).double()
    assert torch.equal(out[:, KNOWN], x_0.reshape(n, D)[:, KNOWN].double())
    mean, cov = conditional_gaussian(torch.tensor([0.4, 0.2], dtype=torch.float64))
    unknown = out[:, UNKNOWN]
    return (unknown.mean(0) - mean).abs().max().item(), (torch.cov(unknown.T) - cov).abs().max().item()


def test_repaint_resampling_draws_the_conditional_gaussian_and_plain_replacement_does_not():
    """Pasting known pixels alone (r = 1) pulls the unknown mean halfway back to the prior (error 0.094);
    resampling (r = 10, j = 1) brings it to 0.015. Sampling error: 0.002 on the mean, ~0.0005 on the
    covariance (n = 4000); the rest is the 200-step chain's discretisation (measured 0.009 with T = 1000,
    r = 20), so the bounds hold that, not the sampling error alone."""
    plain_mean, plain_cov = repaint_errors(1, 1)
    mean_err, cov_err = repaint_errors(10, 1)
    assert plain_mean > 0.07 and plain_cov > 0.005
    assert mean_err < 0.025 and cov_err < 0.002
    assert mean_err < plain_mean / 4 and cov_err < plain_cov / 3


def test_inpaint_class_conditional_labels_reach_the_network():
    model = gaussian_ddpm(timesteps=20, class_means=[MU - 0.3, MU + 0.3])
    x_0 = torch.zeros(4, *SHAPE)
    out = inpaint(model, x_0, torch.zeros(1, 1, 2, 2), gen(2), labels=1, schedule=RePaint(resamplings=1))
    torch.testing.assert_close(out, model.sample(4, generator=gen(2), labels=1, progress=False), rtol=0, atol=1e-6)
    other = inpaint(model, x_0, torch.zeros(1, 1, 2, 2), gen(2), labels=0, schedule=RePaint(resamplings=1))
    assert (out - other).mean() > 0.3


def test_bad_masks_and_schedules_are_one_line_errors():
    model, x_0 = gaussian_ddpm(timesteps=20), torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match='mask must be'):
        inpaint(model, x_0, torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match='only 0'):
        inpaint(model, x_0, torch.full((1, 1, 2, 2), 0.5))
    with pytest.raises(ValueError, match='steps must be in 1..T=20'):
        inpaint(model, x_0, torch.ones(1, 1, 2, 2), schedule=RePaint(steps=21))


# ----- starting part-way: SDEdit, shared latents ---------------------------------------------------------------

@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpm-solver'])
def test_sdedit_at_strength_1_is_sampling_from_the_same_x_T(sampler):
    model = gaussian_ddpm(timesteps=50)
    guide = torch.rand(3, *SHAPE, generator=gen(7)) - 0.5
    steps = None if sampler == 'ddpm' else 10
    out = sdedit(model, guide, 1.0, gen(4), options=SampleOptions(sampler, steps, clip_denoised=False))
    g = gen(4)
    x_T = model.q_sample(guide, torch.full((3,), 49), torch.randn(guide.shape, generator=g))
    ref = model.sample(3, generator=g, x_T=x_T, sampler=sampler, steps=steps, clip_denoised=False, progress=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_samples_from_a_shared_latent_follow_the_posterior_p_x0_given_x_t():
    """From one x_t, the reverse process draws p(x_0 | x_t) = N(C (Sigma^-1 mu + sqrt(a) / (1 - a) x_t), C),
    C = (Sigma^-1 + a / (1 - a) I)^-1, a = a-bar_t: the exact answer for Gaussian data."""
    model, t, k = gaussian_ddpm(), 60, 4000
    x_0 = torch.tensor([[0.3, -0.2, 0.25, 0.1]]).reshape(1, *SHAPE)
    [(x_t, samples)] = shared_latents(model, x_0, [t], k, gen(6), options=SampleOptions(clip_denoised=False))
    a = model.alphas_cumprod[t - 1].double()
    inv = torch.linalg.inv(SIGMA)
    cov = torch.linalg.inv(inv + a / (1 - a) * torch.eye(D, dtype=torch.float64))
    mean = cov @ (inv @ MU + a.sqrt() / (1 - a) * x_t.reshape(D).double())
    x = samples.reshape(k, D).double()
    assert (x.mean(0) - mean).abs().max() < 4 * (cov.diag().max() / k).sqrt() + 0.003   # + the chain's bias
    assert (torch.cov(x.T) - cov).abs().max() < 0.1 * cov.diag().max()
    # x_t itself: x_0 noised with the generator's first draw
    g = gen(6)
    expected = model.q_sample(x_0, torch.tensor([t - 1]), torch.randn(x_0.shape, generator=g))
    torch.testing.assert_close(x_t, expected)


def test_strength_and_t_outside_the_chain_are_errors():
    model = gaussian_ddpm(timesteps=20)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r'strength must be in \(0, 1\]'):
            sdedit(model, torch.zeros(1, *SHAPE), bad)
    assert strength_step(model, 0.5) == 10 and strength_step(model, 0.001) == 1
    for bad in (0, 21, 2.5):
        with pytest.raises(ValueError, match='1..T=20'):
            code_step(model, bad)
    with pytest.raises(ValueError, match='1..T=20'):
        shared_latents(model, torch.zeros(1, *SHAPE), [10, 25], 2)


# ----- interpolation --------------------------------------------------------------------------------------------

def reference_decode(model, x_t, t, g):
    """Algorithm 2 of Ho et al. written out with the exact eps: x_{s-1} = (x_s - beta_s / sqrt(1 - a-bar_s) eps)
    / sqrt(alpha_s) + sqrt(beta_s) z, no noise at s = 1. An independent check of editing's reverse walk."""
    betas = model.betas64
    abar = torch.cumprod(1 - betas, 0)
    x = x_t.double()
    for s in range(t - 1, -1, -1):
        eps = model.network(x.float(), torch.full((x.shape[0],), s)).double()
        x = (x - betas[s] / (1 - abar[s]).sqrt() * eps) / (1 - betas[s]).sqrt()
        if s > 0:
            x = x + betas[s].sqrt() * torch.randn(x.shape, generator=g).double()
    return x.clamp(-1, 1).float()


def test_interpolation_ends_are_the_reconstructions_from_x_t_with_the_same_noise():
    model, t = gaussian_ddpm(timesteps=30), 15
    x_a = torch.rand(2, *SHAPE, generator=gen(8)) - 0.5
    x_b = torch.rand(2, *SHAPE, generator=gen(9)) - 0.5
    out = interpolate(model, x_a, x_b, t, [0, 0.5, 1], gen(3), options=SampleOptions(clip_denoised=False))
    g = gen(3)
    step = torch.full((2,), t - 1)
    x_t_a = model.q_sample(x_a, step, torch.randn(x_a.shape, generator=g))
    x_t_b = model.q_sample(x_b, step, torch.randn(x_b.shape, generator=g))
    state = g.get_state()
    for i, x_t in enumerate([x_t_a, 0.5 * x_t_a + 0.5 * x_t_b, x_t_b]):
        g.set_state(state)
        torch.testing.assert_close(out[i], reference_decode(model, x_t, t, g), rtol=0, atol=1e-4)


def test_slerp_keeps_the_angle_and_the_ends():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([[2 ** -0.5, 2 ** -0.5]]))
    torch.testing.assert_close(slerp(a, b, 1 / 3), torch.tensor([[3 ** 0.5 / 2, 0.5]]))   # 30 degrees from a
    torch.testing.assert_close(slerp(a, 2 * a, 0.25), 1.25 * a)   # parallel: a straight mix
    z_a, z_b = torch.randn(3, *SHAPE, generator=gen(1)), torch.randn(3, *SHAPE, generator=gen(2))
    assert torch.equal(slerp(z_a, z_b, 0.0), z_a)


def test_noise_interpolation_at_0_is_the_sample_of_seed_a():
    model = gaussian_ddpm(timesteps=20)
    out = interpolate_noise(model, 11, 12, n=3, lambdas=[0, 0.5, 1], options=SampleOptions(clip_denoised=False))
    torch.testing.assert_close(out[0], model.sample(3, generator=gen(11), clip_denoised=False, progress=False),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], out[0]) and not torch.allclose(out[2], out[0])
