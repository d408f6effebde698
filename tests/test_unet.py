"""Tests of the U-Net in model/Blocks.py: shapes, the paper's parameter count, argument errors,
self-attention against a naive implementation, the time embedding's closed form, and gradient flow."""

import math

import numpy as np
import pytest
import torch

from diffusion import model_from_checkpoint
from diffusion import DDPM, create_cifar10_ddpm
from model.Blocks import Downsample, Dropout, ResNetBlock, SelfAttention, SinusoidalTimeEmbedding, UNet


def count(module):
    return sum(p.numel() for p in module.parameters())


def randomize(module, seed=0, std=0.1):
    """Overwrite every parameter with random values (some layers start at zero, hiding bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


# ----- shapes and structure -------------------------------------------------------------------

CONFIGS = [
    dict(),  # the 'base' defaults: channels (64, 128, 256), attention at 16 and 8
    dict(channels=(32, 64), attn_resolutions=(16,), num_res_blocks=1, time_emb_dim=32),
    dict(in_channels=1, image_size=16, channels=(16, 32, 32), attn_resolutions=(8, 4), num_heads=2,
         num_res_blocks=3, time_emb_dim=24),
    dict(image_size=8, channels=(16,), attn_resolutions=(), num_res_blocks=1, time_emb_dim=16),
]


@pytest.mark.parametrize('config', CONFIGS, ids=['base', 'two-level', 'one-channel-16px', 'one-level'])
def test_output_shape_equals_input_shape(config):
    """eps_theta(x_t, t) is shaped like x_t for any valid configuration."""
    net = randomize(UNet(**config, dropout=0.0), std=0.05)
    c, size = config.get('in_channels', 3), config.get('image_size', 32)
    x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('arch,expected', [('base', 2 + 2 + 1 + 3 + 3), ('ddpm-paper', 2 + 1 + 3)])
def test_attention_sits_at_the_named_resolutions(arch, expected):
    """Self-attention after every ResNet block at the resolutions in attn_resolutions, plus one in the
    middle: 'base' (16 and 8 of 32/16/8) has 2+2 down, 1 middle, 3+3 up; the paper (16 of 32/16/8/4)
    has 2 down, 1 middle, 3 up."""
    net = create_cifar10_ddpm(arch).network
    assert sum(isinstance(m, SelfAttention) for m in net.modules()) == expected


def test_parameter_counts():
    """The paper's CIFAR-10 net has 35.7M parameters (Ho et al., Sec. 4); both counts are pinned exactly."""
    paper = count(create_cifar10_ddpm('ddpm-paper'))
    base = count(create_cifar10_ddpm('base'))
    print(f'\nparameters: ddpm-paper {paper:,}, base {base:,}')
    assert paper == 35_746_307   # the released model's count (35.7M, Sec. 4)
    assert base == 15_646_595


def test_image_size_must_be_divisible_by_downsampling():
    """Three levels halve the image twice, so image_size must be a multiple of 4."""
    with pytest.raises(ValueError, match='divisible'):
        UNet(channels=(8, 16, 32), image_size=30)
    with pytest.raises(ValueError):
        create_cifar10_ddpm(channels=(8, 16, 32, 64), image_size=36)
    UNet(channels=(8, 16, 32), image_size=28, attn_resolutions=())  # 28 = 4 * 7 is fine


def test_num_heads_must_divide_channels():
    """Every attention layer splits its channels evenly across heads."""
    with pytest.raises(ValueError, match='num_heads'):
        UNet(channels=(32, 64), attn_resolutions=(16,), num_heads=3)
    with pytest.raises(ValueError):
        SelfAttention(48, num_heads=5)


def test_unknown_override_is_rejected():
    """create_cifar10_ddpm fails loudly on a misspelled U-Net option or arch."""
    with pytest.raises(ValueError, match='chanels'):
        create_cifar10_ddpm(chanels=(8, 16))
    with pytest.raises(ValueError):
        create_cifar10_ddpm(arch='ddpm-large')


# ----- self-attention against a naive implementation ------------------------------------------

def naive_self_attention(attn, x):
    """x + proj(concat_h softmax(Q_h K_h^T / sqrt(d)) V_h) over the H*W positions, in numpy float64.

    Q, K, V = the first, second and third C channels of the 1x1 qkv conv applied to GroupNorm(x);
    head h owns channels h*d .. (h+1)*d - 1 of each, d = C / heads.
    """
    x = x.detach().double().numpy()
    B, C, H, W = x.shape
    G, heads = attn.norm.num_groups, attn.num_heads
    # GroupNorm: normalise over each group of C/G channels and all positions, then scale and shift.
    xg = x.reshape(B, G, -1)
    xn = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + attn.norm.eps)
    xn = xn.reshape(B, C, H * W) * attn.norm.weight.detach().double().numpy()[:, None] \
        + attn.norm.bias.detach().double().numpy()[:, None]
    w_qkv = attn.qkv.weight.detach().double().numpy()[:, :, 0, 0]
    b_qkv = attn.qkv.bias.detach().double().numpy()
    qkv = np.einsum('oc,bcn->bon', w_qkv, xn) + b_qkv[:, None]
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    d = C // heads
    out = np.zeros((B, C, H * W))
    for b in range(B):
        for h in range(heads):
            ch = slice(h * d, (h + 1) * d)
            scores = q[b, ch].T @ k[b, ch] / math.sqrt(d)  # [query position, key position]
            weights = np.exp(scores - scores.max(1, keepdims=True))
            weights /= weights.sum(1, keepdims=True)
            out[b, ch] = v[b, ch] @ weights.T
    w_proj = attn.proj.weight.detach().double().numpy()[:, :, 0, 0]
    b_proj = attn.proj.bias.detach().double().numpy()
    return x + (np.einsum('oc,bcn->bon', w_proj, out) + b_proj[:, None]).reshape(B, C, H, W)


@pytest.mark.parametrize('channels,heads', [(64, 1), (64, 4), (24, 3)])
def test_self_attention_matches_naive_softmax_attention(channels, heads):
    """SelfAttention equals softmax(Q K^T / sqrt(d)) V per head (plus projection and residual)."""
    attn = SelfAttention(channels, num_heads=heads).double()
    assert torch.all(attn.proj.weight == 0)  # zero-initialised: starts as the identity
    randomize(attn, seed=1, std=0.3)
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = attn(x).numpy()
    expected = naive_self_attention(attn, x)
    assert np.abs(expected - x.numpy()).max() > 0.1  # the attention branch is not negligible
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


# ----- the time embedding ---------------------------------------------------------------------

def test_sinusoidal_features_closed_form():
    """Before its MLP the embedding is [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (half - 1)), i < half
    (the Transformer encoding in the layout of the paper's code)."""
    emb = SinusoidalTimeEmbedding(16, 32)
    emb.mlp = torch.nn.Identity()
    t = torch.tensor([0, 1, 17, 999])
    half = 8
    w = 10000.0 ** (-np.arange(half) / (half - 1))
    angles = t.numpy()[:, None].astype(np.float64) * w[None]
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    np.testing.assert_allclose(emb(t).numpy(), expected, atol=2e-4)


def test_time_embedding_differs_across_steps():
    """Distinct steps t get distinct embeddings (so eps_theta can depend on t)."""
    net = UNet(channels=(16, 32), attn_resolutions=(), num_res_blocks=1, time_emb_dim=32)
    t = torch.tensor([0, 1, 2, 500, 998, 999])
    with torch.no_grad():
        e = net.time_embedding(t)
    dist = torch.cdist(e, e) + torch.eye(len(t)) * 1e9
    assert dist.min() > 1e-4


@pytest.mark.parametrize('arch', ['base', 'ddpm-paper'])
def test_group_norm_uses_32_groups_in_named_archs(arch):
    """The paper normalises with GroupNorm(32 groups) throughout; 'base' (64/128/256 channels) does too."""
    norms = [m for m in create_cifar10_ddpm(arch).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)


@pytest.mark.parametrize('channels', [8, 16, 32, 64, 128])
def test_resnet_block_output_depends_on_time_embedding(channels):
    """The time embedding enters a ResNetBlock as a per-channel shift before its second GroupNorm; it must
    survive that norm at every width (one-channel groups would subtract it exactly)."""
    block = randomize(ResNetBlock(channels, channels, time_emb_dim=8, dropout=0.0), std=0.1)
    x = torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(3)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = block(x, torch.randn(2, 8, generator=torch.Generator().manual_seed(4)))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_network_output_depends_on_t():
    """With non-zero weights, the same x_t at different t gives different eps predictions."""
    net = randomize(UNet(channels=(16, 32), attn_resolutions=(16,), num_res_blocks=1, time_emb_dim=32,
                         num_heads=2, dropout=0.0, image_size=16), std=0.1).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = net(x, torch.tensor([10, 600]))
    assert (out[0] - out[1]).abs().max() > 1e-3


# ----- dropout --------------------------------------------------------------------------------

@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropout_keeps_1_minus_p_and_rescales_by_its_inverse(p):
    """Training mode zeroes each element with probability p (within 5 SE over 2**20 draws) and
    scales the rest by exactly 1/(1-p); the gradient is the same mask times the same scale."""
    torch.manual_seed(0)
    x = (torch.rand(16, 8, 64, 128) + 0.5).requires_grad_()
    y = Dropout(p).train()(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / (1 - p), rtol=1e-6, atol=0)


def test_dropout_in_bf16_scales_by_the_unrounded_inverse():
    """bf16 activations (CPU autocast) are scaled by 1/(1-p) in fp32: the mean ratio of kept outputs
    to inputs is 1/0.9 to 1e-4, where a scale rounded to bf16 (1.109375) would be 1.6e-3 off."""
    torch.manual_seed(0)
    x = (torch.rand(16, 8, 64, 128) + 0.5).bfloat16()
    y = Dropout(0.1).train()(x)
    kept = y != 0
    assert y.dtype == torch.bfloat16
    assert abs((y[kept].float() / x[kept].float()).mean().item() - 1 / 0.9) < 1e-4


def test_dropout_masks_differ_across_calls_and_follow_the_seed():
    """A fresh mask per call, reproducible from torch.manual_seed (train.py seeds it per step)."""
    x = torch.ones(4, 8, 16, 16)
    drop = Dropout(0.3).train()
    torch.manual_seed(7)
    a, b = drop(x), drop(x)
    torch.manual_seed(7)
    assert not torch.equal(a, b) and torch.equal(drop(x), a)


def test_dropout_is_the_identity_in_eval_and_at_p_0_and_keeps_dtype_and_layout():
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(Dropout(0.3).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    y = Dropout(0.3).train()(x.bfloat16())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


# ----- gradients ------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    """One backward of the DDPM loss through a U-Net with no zeroed layers gives every parameter a
    finite, non-zero gradient (no dead branches, nothing detached)."""
    torch.manual_seed(0)
    net = UNet(channels=(16, 32), attn_resolutions=(16,), num_res_blocks=1, time_emb_dim=32, num_heads=2,
               dropout=0.0, image_size=16)
    randomize(net, seed=3, std=0.1)
    model = DDPM(net, timesteps=100)
    loss = model.loss(torch.rand(4, 3, 16, 16) * 2 - 1)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_attention_at_a_resolution_the_unet_never_reaches_is_an_error():
    """channels=(32, 64) on 32x32 images works at 32 and 16: attention 'at 64' would silently be none."""
    with pytest.raises(ValueError, match=r'attn_resolutions \[64\] are never reached.*resolutions \[32, 16\]'):
        create_cifar10_ddpm(channels=(32, 64), attn_resolutions=(64,))
    net = create_cifar10_ddpm(channels=(32, 64), attn_resolutions=()).network   # none, said explicitly
    assert sum(isinstance(m, SelfAttention) for m in net.modules()) == 1   # the middle block's own


# ----- downsampling padding: the paper's TF 'SAME', and the old symmetric one ------------------

@pytest.mark.parametrize('padding, first_row', [('same', 0), ('symmetric', -1)])
def test_downsample_window_closed_form(padding, first_row):
    """Output pixel (i, j) of the stride-2 3x3 conv sums input rows/columns first_row + 2i .. + 2 (zeros outside).

    TF 'SAME' for an even size pads (3 - 2) = 1 pixel in total, all of it at the bottom/right, so the
    window starts at 2i; one pixel on every side starts it at 2i - 1.
    """
    down = Downsample(1, padding)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    padded = np.pad(x[0, 0].numpy(), 2)   # zeros around, so any window can be read off
    expected = np.array([[padded[2 + first_row + 2 * i:5 + first_row + 2 * i,
                                 2 + first_row + 2 * j:5 + first_row + 2 * j].sum() for j in range(4)]
                         for i in range(4)])
    np.testing.assert_allclose(down.double()(x)[0, 0].detach().numpy(), expected, rtol=1e-12)


def test_new_models_pad_like_the_paper_and_old_checkpoint_configs_keep_symmetric_padding():
    def paddings(model):
        return {m.pad_bottom_right for m in model.modules() if isinstance(m, Downsample)}

    model = create_cifar10_ddpm('tiny')
    assert model.network.config['downsample_padding'] == 'same' and paddings(model) == {True}
    state = model.state_dict()
    old_config = {'arch': 'tiny'}   # written before the option existed: no downsample_padding key
    for config, expected in ((old_config, {False}), ({**old_config, 'downsample_padding': 'same'}, {True}),
                             ({**old_config, 'downsample_padding': 'symmetric'}, {False}), (None, {False})):
        rebuilt = model_from_checkpoint({'model_state_dict': state, 'config': config}, **(
            {'arch': 'tiny'} if config is None else {}))
        assert paddings(rebuilt) == expected, config
