"""Class-conditional DDPM and classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).

The network side: the null class of a conditional U-Net is the unconditional computation when its
embedding row is zero; guidance w = 0 is the conditional model; the guided eps is one batched call of
2n images that equals two separate calls combined by eps~ = (1 + w) eps(c) - w eps(null). The sampling
side, against closed forms: a two-class 1-D Gaussian mixture with its exact per-class noise predictor,
whose conditional samples land in their class's mode and whose guided samples move away from the
other class.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusion import DDPM, create_cifar10_ddpm
from model.Blocks import UNet

SMALL = dict(channels=(16, 32), num_res_blocks=1, attn_resolutions=(), time_emb_dim=32, image_size=8, dropout=0.0)
SAMPLERS = [('ddpm', None), ('ddim', 100), ('dpm-solver', 20)]   # DDIM-50's first-order error shrinks this s by 20%


def small_unet(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(**{**SMALL, **kw})


def randomize(net, seed=1):
    """Random weights everywhere (the zero-initialised output layers would hide every difference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


class CountingNet(nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.num_classes, self.null_class = net.num_classes, net.null_class
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def forward(self, x_t, t, labels=None):
        self.calls.append(x_t.shape[0])
        return self.net(x_t, t, labels)


# ----- the network: null class, w = 0, one batched call ---------------------------------------------

def test_unconditional_unet_has_no_class_parameters_and_rejects_labels():
    net = small_unet()
    assert net.class_embedding is None and not any('class' in k for k in net.state_dict())
    with pytest.raises(ValueError, match='unconditional'):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    cond = small_unet(num_classes=4)
    assert cond.class_embedding.weight.shape == (5, 32) and cond.null_class == 4
    assert set(cond.state_dict()) - set(net.state_dict()) == {'class_embedding.weight'}



def test_guidance_on_an_unconditional_checkpoint_says_so_first():
    """Issue 22, item 2: --guidance_scale without a class on an unconditional checkpoint names the real
    problem (adding --class_label would only fail next); on a conditional one it asks for a class."""
    from sampling.guidance import resolve_class_label
    with pytest.raises(ValueError, match='this checkpoint is unconditional .* --guidance_scale 3 does not apply'):
        resolve_class_label(None, None, None, guidance_scale=3.0)
    with pytest.raises(ValueError, match='needs a class to guide towards'):
        resolve_class_label(10, None, None, guidance_scale=3.0)
    assert resolve_class_label(None, None, None, guidance_scale=0.0) is None


def test_null_class_with_a_zero_embedding_is_the_unconditional_network():
    """temb + 0 is temb: the null class (labels None, or the null index) computes the unconditional net's
    function exactly, and through the DDPM the same samples; a real class does not."""
    cond = randomize(small_unet(num_classes=3))
    with torch.no_grad():
        cond.class_embedding.weight[cond.null_class] = 0.0
    uncond = small_unet()
    uncond.load_state_dict({k: v for k, v in cond.state_dict().items() if not k.startswith('class_embedding')})
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99])
    expected = uncond(x, t)
    assert torch.equal(cond(x, t), expected)
    assert torch.equal(cond(x, t, torch.full((4,), 3)), expected)
    assert (cond(x, t, torch.zeros(4, dtype=torch.long)) - expected).abs().max() > 1e-3
    a, b = DDPM(cond, timesteps=100), DDPM(uncond, timesteps=100)
    for sampler, steps in [('ddpm', None), ('ddim', 5), ('dpm-solver', 5)]:
        xa = a.sample(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), progress=False)
        xb = b.sample(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), progress=False)
        assert torch.equal(xa, xb), sampler


class FixedClass(nn.Module):
    """An unconditional-looking network that always asks `net` for one class: an independent path."""

    def __init__(self, net, label):
        super().__init__()
        self.net, self.label = net, label
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def forward(self, x_t, t):
        return self.net(x_t, t, torch.full_like(t, self.label))


@pytest.mark.parametrize('sampler, steps', [('ddpm', None), ('ddim', 5), ('dpm-solver', 5)])
def test_guidance_zero_is_the_conditional_model_in_one_call_of_n(sampler, steps):
    net = CountingNet(randomize(small_unet(num_classes=3)))
    model = DDPM(net, timesteps=60)
    x = model.sample(4, sampler=sampler, steps=steps, labels=2, guidance_scale=0.0,
                     generator=torch.Generator().manual_seed(0), progress=False)
    assert net.calls and set(net.calls) == {4}
    reference = DDPM(FixedClass(net.net, 2), timesteps=60).sample(
        4, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(x, reference)


def test_guided_eps_is_one_batched_call_equal_to_two_separate_calls():
    net = CountingNet(randomize(small_unet(num_classes=3)))
    model = DDPM(net, timesteps=100)
    x, t, labels, w = torch.randn(5, 3, 8, 8), torch.tensor([1, 20, 40, 60, 99]), torch.tensor([0, 1, 2, 1, 0]), 1.5
    with torch.no_grad():
        guided = model.predict_eps(x, t, labels, w)
        assert net.calls == [10]
        eps_c, eps_null = net.net(x, t, labels), net.net(x, t, torch.full((5,), 3))
    torch.testing.assert_close(guided, (1 + w) * eps_c - w * eps_null, rtol=1e-5, atol=1e-5)
    assert (guided - eps_c).abs().max() > 1e-2   # the guidance term is not negligible here


class TwoCallGuidance(nn.Module):
    """The guided eps from two separate network calls, written from the paper's Eq. (6): the reference."""

    def __init__(self, net, labels, w):
        super().__init__()
        self.net, self.labels, self.w = net, labels, w
        self.in_channels, self.image_size = net.in_channels, net.image_size

    def forward(self, x_t, t):
        eps_c = self.net(x_t, t, self.labels)
        eps_null = self.net(x_t, t, torch.full_like(self.labels, self.net.null_class))
        return (1 + self.w) * eps_c - self.w * eps_null


@pytest.mark.parametrize('sampler, steps', [('ddpm', None), ('ddpm', 5), ('ddim', 4), ('dpm-solver', 4)],
                         ids=['ddpm', 'ddpm-respaced', 'ddim', 'dpm-solver'])
def test_every_sampler_gets_the_guided_eps_in_one_call_of_2n_per_step(sampler, steps):
    net = CountingNet(randomize(small_unet(num_classes=3)))
    model = DDPM(net, timesteps=40)
    labels = torch.tensor([2, 0, 1])
    x = model.sample(3, sampler=sampler, steps=steps, labels=labels, guidance_scale=2.0,
                     generator=torch.Generator().manual_seed(0), progress=False)
    assert net.calls == [6] * (steps or 40)
    reference = DDPM(TwoCallGuidance(net.net, labels, 2.0), timesteps=40).sample(
        3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(x, reference, rtol=1e-4, atol=1e-4)


def test_learned_variance_comes_from_the_conditional_half():
    """learn_sigma stacks [eps, nu] on the channels: only eps is guided, nu is the conditional call's."""
    net = randomize(small_unet(num_classes=3, out_channels=6))
    model = DDPM(net, timesteps=100, learn_sigma=True, loss='hybrid')
    x, t, labels, w = torch.randn(2, 3, 8, 8), torch.tensor([10, 70]), torch.tensor([1, 2]), 3.0
    with torch.no_grad():
        eps, nu = model.network_outputs(x, t, labels, w)
        eps_c, nu_c = net(x, t, labels).chunk(2, dim=1)
        eps_null, _ = net(x, t, torch.full((2,), 3)).chunk(2, dim=1)
    torch.testing.assert_close(eps, (1 + w) * eps_c - w * eps_null, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nu, nu_c, rtol=1e-5, atol=1e-5)


def test_labels_are_checked_in_one_line():
    cond = DDPM(small_unet(num_classes=3), timesteps=10)
    with pytest.raises(ValueError, match=r'0\.\.2'):
        cond.sample(2, labels=3, progress=False)
    with pytest.raises(ValueError, match='need 2 class labels'):
        cond.sample(2, labels=[0, 1, 2], progress=False)
    with pytest.raises(ValueError, match='needs class labels'):
        cond.sample(2, guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match='unconditional'):
        DDPM(small_unet(), timesteps=10).sample(2, labels=0, progress=False)


def test_create_cifar10_ddpm_takes_num_classes_and_the_base_model_is_unchanged():
    torch.manual_seed(0)
    plain = create_cifar10_ddpm(arch='tiny')
    torch.manual_seed(0)
    again = create_cifar10_ddpm(arch='tiny', num_classes=None)
    assert plain.num_classes is None and plain.state_dict().keys() == again.state_dict().keys()
    assert create_cifar10_ddpm(arch='tiny', num_classes=10).num_classes == 10


# ----- closed form: a two-class Gaussian mixture and its exact noise predictor ------------------------

T_TOY, MEANS, S = 1000, (-0.5, 0.5), 0.1


class ExactMixtureEps(nn.Module):
    """The optimal eps-predictor of 1-D data x_0 ~ N(m_c, s^2) given class c, and of the equal-weight
    mixture of the two for the null class, in float64 from the test's own schedule:

        x_t | c ~ N(sqrt(a-bar_t) m_c, v_t),  v_t = a-bar_t s^2 + 1 - a-bar_t,
        E[eps | x_t, c] = sqrt(1 - a-bar_t) (x_t - sqrt(a-bar_t) m_c) / v_t,
        E[eps | x_t]    = sum_c p(c | x_t) E[eps | x_t, c],  p(c | x_t) from the two Gaussians.
    """
    num_classes, null_class, in_channels, image_size = 2, 2, 1, 1

    def __init__(self):
        super().__init__()
        abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, T_TOY))
        self.register_buffer('abar', torch.from_numpy(abar))

    def forward(self, x_t, t, labels=None):
        x, abar = x_t.double().flatten(), self.abar[t]
        labels = torch.full_like(t, self.null_class) if labels is None else labels
        v = abar * S ** 2 + 1 - abar
        eps = torch.stack([(1 - abar).sqrt() * (x - abar.sqrt() * m) / v for m in MEANS])     # [2, B]
        log_lik = torch.stack([-(x - abar.sqrt() * m) ** 2 / (2 * v) for m in MEANS])
        eps_null = (torch.softmax(log_lik, dim=0) * eps).sum(0)
        out = torch.where(labels == 0, eps[0], torch.where(labels == 1, eps[1], eps_null))
        return out.to(x_t.dtype).view_as(x_t)


def toy_model():
    return DDPM(ExactMixtureEps(), timesteps=T_TOY, image_shape=(1, 1, 1))


@pytest.mark.parametrize('sampler, steps', SAMPLERS)
def test_conditional_samples_land_in_their_class_mode(sampler, steps):
    model = toy_model()
    for c, m in enumerate(MEANS):
        x = model.sample(1000, sampler=sampler, steps=steps, labels=c, progress=False,
                         generator=torch.Generator().manual_seed(c)).flatten()
        assert (torch.sign(x) == math.copysign(1, m)).float().mean() == 1.0
        # 1000 samples: the mean's standard error is 0.003
        assert abs(x.mean().item() - m) < 0.012 and abs(x.std().item() - S) < 0.015, (c, x.mean(), x.std())


@pytest.mark.parametrize('sampler, steps', SAMPLERS)
def test_null_class_samples_the_mixture(sampler, steps):
    x = toy_model().sample(2000, sampler=sampler, steps=steps, progress=False,
                           generator=torch.Generator().manual_seed(5)).flatten()
    upper = (x > 0).float().mean().item()
    assert 0.45 < upper < 0.55, upper   # half in each mode (binomial sd 0.011)
    assert abs(x[x > 0].mean().item() - MEANS[1]) < 0.02 and abs(x[x < 0].mean().item() - MEANS[0]) < 0.02


@pytest.mark.parametrize('sampler, steps', SAMPLERS)
def test_guidance_moves_samples_away_from_the_other_class(sampler, steps):
    """w > 0 adds w grad log p(c | x_t), which points away from the other class: the samples of class 1
    move up, those of class 0 down, further with larger w, from the same noise."""
    model = toy_model()
    for c, sign in ((0, -1.0), (1, 1.0)):
        means = []
        for w in (0.0, 1.0, 4.0):
            x = model.sample(1000, sampler=sampler, steps=steps, labels=c, guidance_scale=w, progress=False,
                             generator=torch.Generator().manual_seed(7))
            means.append(x.mean().item())
        assert sign * (means[1] - means[0]) > 0.002 and sign * (means[2] - means[1]) > 0.002, (c, means)
