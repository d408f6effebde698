"""The U-Net that predicts the noise eps in x_t (Ho et al. 2020, Appendix B).

Only nn.Modules live here: the network knows nothing of noise schedules,
datasets or training loops. `UNet(x_t, t)` returns a tensor shaped like x_t;
a class-conditional one (`num_classes`) takes `UNet(x_t, t, labels)`.

Structure (as in the paper's CIFAR-10 model): a sinusoidal time embedding and
an MLP; per resolution level `num_res_blocks` ResNet blocks (with self-attention
at the resolutions in `attn_resolutions`) and a strided-conv downsample; a
middle block (res, attention, res); the mirrored up path, whose blocks take
the down path's activations as U-Net skip connections; GroupNorm, SiLU and a
3x3 conv back to the image channels.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

def group_norm(channels):
    """GroupNorm with 32 groups (the paper's choice), fewer for narrow test nets.

    Groups keep at least two channels: a one-channel group would subtract the
    per-channel time-embedding shift a ResNetBlock adds before its norm2,
    leaving the network blind to t.
    """
    groups = math.gcd(32, channels)
    if groups == channels:
        groups = max(channels // 2, 1)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module):
    """Zero a layer's weights so its residual branch starts as the identity (as in the paper)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from a uniform draw and a threshold.

    F.dropout draws its CPU mask with bernoulli_, which costs about twice
    rand_like plus a compare; a ResNet block's dropout then takes ~6% of an
    fp32 training step. Same distribution, same scaling by 1/(1-p). CUDA keeps
    the fused kernel, which is faster there.
    """

    def forward(self, x):
        if not (self.training and 0 < self.p < 1 and x.device.type == 'cpu'):
            return super().forward(x)
        scale = 1 / (1 - self.p)
        u = torch.rand_like(x, dtype=torch.float32)
        if x.dtype == torch.float32:
            return x * u.ge_(self.p).mul_(scale)  # the mask, scaled in place: one pass over x
        # bf16/fp16: a Python-scalar scale is applied in fp32, so 1/(1-p) is not rounded.
        return x * (u >= self.p) * scale


class SinusoidalTimeEmbedding(nn.Module):
    """The Transformer's sinusoidal position encoding of the step t, then a 2-layer MLP."""

    def __init__(self, base_dim, time_emb_dim):
        super().__init__()
        if base_dim % 2:
            raise ValueError(f'the sinusoidal embedding needs an even width, got {base_dim}')
        self.base_dim = base_dim
        self.mlp = nn.Sequential(
            nn.Linear(base_dim, time_emb_dim), nn.SiLU(), nn.Linear(time_emb_dim, time_emb_dim))

    def forward(self, t):
        half = self.base_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        angles = t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResNetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, dropout, residual."""

    def __init__(self, in_channels, out_channels, time_emb_dim, dropout):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # A 1x1 conv matches channels on the skip path only where they change.
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels, num_heads=4):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f'num_heads={num_heads} must divide the channels ({channels}) at every attention level')
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


DOWNSAMPLE_PADDINGS = ('same', 'symmetric')


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    padding='same' is TensorFlow's 'SAME' padding, which the paper's released
    code uses: for an even size it pads one pixel at the bottom and right only,
    so output pixel i sees input pixels 2i..2i+2. 'symmetric' pads one pixel on
    every side (pixels 2i-1..2i+1), which shifts every downsample by one input
    pixel against the released weights; checkpoints written before the option
    existed used it.
    """

    def __init__(self, channels, padding='same'):
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f'downsample_padding must be one of {DOWNSAMPLE_PADDINGS}, got {padding!r}')
        self.pad_bottom_right = padding == 'same'
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_bottom_right else 1)

    def forward(self, x):
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


class DownBlock(nn.Module):
    """One resolution level of the encoder: ResNet blocks (+ attention), then downsample.

    Returns the output and every intermediate activation, which the decoder
    consumes as skip connections.
    """

    def __init__(self, in_channels, out_channels, time_emb_dim, num_res_blocks, attention,
                 num_heads, dropout, downsample, downsample_padding='same'):
        super().__init__()
        self.res = nn.ModuleList(
            ResNetBlock(in_channels if i == 0 else out_channels, out_channels, time_emb_dim, dropout)
            for i in range(num_res_blocks))
        self.attn = nn.ModuleList(
            SelfAttention(out_channels, num_heads) if attention else nn.Identity() for _ in range(num_res_blocks))
        self.down = Downsample(out_channels, downsample_padding) if downsample else None

    def forward(self, h, temb):
        skips = []
        for res, attn in zip(self.res, self.attn):
            h = attn(res(h, temb))
            skips.append(h)
        if self.down is not None:
            h = self.down(h)
            skips.append(h)
        return h, skips


class MiddleBlock(nn.Module):
    """The bottleneck: ResNet block, self-attention, ResNet block."""

    def __init__(self, channels, time_emb_dim, num_heads, dropout):
        super().__init__()
        self.res1 = ResNetBlock(channels, channels, time_emb_dim, dropout)
        self.attn = SelfAttention(channels, num_heads)
        self.res2 = ResNetBlock(channels, channels, time_emb_dim, dropout)

    def forward(self, h, temb):
        return self.res2(self.attn(self.res1(h, temb)), temb)


class UpBlock(nn.Module):
    """One resolution level of the decoder.

    Each ResNet block takes the running activation concatenated with one skip
    connection from the encoder (popped in reverse order), then the level
    upsamples unless it is the top one.
    """

    def __init__(self, in_channels, out_channels, skip_channels, time_emb_dim, attention,
                 num_heads, dropout, upsample):
        super().__init__()
        res = []
        for skip_ch in skip_channels:
            res.append(ResNetBlock(in_channels + skip_ch, out_channels, time_emb_dim, dropout))
            in_channels = out_channels
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(
            SelfAttention(out_channels, num_heads) if attention else nn.Identity() for _ in skip_channels)
        self.up = Upsample(out_channels) if upsample else None

    def forward(self, h, skips, temb):
        for res, attn in zip(self.res, self.attn):
            h = attn(res(torch.cat([h, skips.pop()], dim=1), temb))
        if self.up is not None:
            h = self.up(h)
        return h


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t; t is a LongTensor [B] of steps.

    downsample_padding: 'same' (the paper's TF padding, the default) or
    'symmetric' (what checkpoints written before the option had); see Downsample.
    num_classes: None for the unconditional network (the paper's). An int makes it
    eps_theta(x_t, t, c) of classifier-free guidance (Ho & Salimans 2022): a learned
    embedding of the class c, added to the time embedding, with one extra row
    (index num_classes, `null_class`) for "no class", which the same network learns
    by training on labels dropped at random.
    out_channels (default in_channels) widens the output, e.g. to eps and a variance.
    """

    def __init__(self, in_channels=3, channels=(64, 128, 256), num_res_blocks=2, time_emb_dim=128,
                 attn_resolutions=(16, 8), num_heads=4, dropout=0.1, image_size=32, downsample_padding='same',
                 out_channels=None, num_classes=None):
        super().__init__()
        out_channels = out_channels or in_channels  # 2 * in_channels for eps and a variance (Nichol & Dhariwal 2021)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f'num_classes must be a positive integer or None (unconditional), got {num_classes!r}')
        channels, attn_resolutions = tuple(channels), tuple(attn_resolutions)
        levels = len(channels)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError('the U-Net needs at least one level (channels) and one ResNet block per level')
        if image_size % 2 ** (levels - 1):
            raise ValueError(f'image_size={image_size} must be divisible by 2**{levels - 1} '
                             f'(the U-Net halves it {levels - 1} times for channels={channels}); '
                             f'pick an image_size that is a multiple of {2 ** (levels - 1)} or use fewer levels')
        resolutions = [image_size // 2 ** i for i in range(levels)]
        unreached = [r for r in attn_resolutions if r not in resolutions]
        if unreached:  # silently training without the attention asked for would be worse than stopping
            raise ValueError(f'attn_resolutions {unreached} are never reached: with image_size={image_size} and '
                             f'{levels} level(s) the U-Net works at resolutions {resolutions}; pick attn_resolutions '
                             f'from those (or an empty list for no attention)')
        self.config = dict(in_channels=in_channels, channels=channels, num_res_blocks=num_res_blocks,
                           time_emb_dim=time_emb_dim, attn_resolutions=attn_resolutions,
                           num_heads=num_heads, dropout=dropout, image_size=image_size,
                           downsample_padding=downsample_padding, out_channels=out_channels,
                           num_classes=num_classes)
        self.in_channels, self.image_size = in_channels, image_size
        self.num_classes = num_classes

        self.time_embedding = SinusoidalTimeEmbedding(channels[0], time_emb_dim)
        # An unconditional net has no such module, so its state_dict is what it always was.
        self.class_embedding = nn.Embedding(num_classes + 1, time_emb_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        # Encoder; record the channels of every activation the decoder will concatenate.
        skip_channels = [channels[0]]
        self.down = nn.ModuleList()
        ch, resolution = channels[0], image_size
        for i, out_ch in enumerate(channels):
            last = i == levels - 1
            self.down.append(DownBlock(ch, out_ch, time_emb_dim, num_res_blocks, resolution in attn_resolutions,
                                       num_heads, dropout, downsample=not last,
                                       downsample_padding=downsample_padding))
            skip_channels += [out_ch] * (num_res_blocks + (0 if last else 1))
            ch = out_ch
            resolution = resolution if last else resolution // 2

        self.middle = MiddleBlock(ch, time_emb_dim, num_heads, dropout)

        self.up = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(channels))):
            skips = [skip_channels.pop() for _ in range(num_res_blocks + 1)]
            self.up.append(UpBlock(ch, out_ch, skips, time_emb_dim, resolution in attn_resolutions,
                                   num_heads, dropout, upsample=i > 0))
            ch = out_ch
            resolution = resolution * 2 if i > 0 else resolution

        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    @property
    def null_class(self):
        """The label index that means "no class" (the unconditional half of guidance)."""
        return self.num_classes

    def forward(self, x_t, t, labels=None):
        temb = self.time_embedding(t)
        if self.class_embedding is not None:
            if labels is None:   # no label: the null class, i.e. the unconditional model
                labels = torch.full_like(t, self.null_class)
            temb = temb + self.class_embedding(labels)
        elif labels is not None:
            raise ValueError('this U-Net is unconditional (num_classes=None), so it takes no class labels')
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            h, block_skips = block(h, temb)
            skips += block_skips
        h = self.middle(h, temb)
        for block in self.up:
            h = block(h, skips, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
