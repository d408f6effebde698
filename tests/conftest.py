"""Shared pytest setup: the repo root on sys.path, one CPU thread, and small helpers."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# A train_ddpm run that takes seconds on one CPU thread: a two-level U-Net on 16x16 images,
# no sample grids, a scalar log every step (test_train.py, test_reliability.py).
TRAIN_SIZE = 16
TINY_TRAIN = dict(device='cpu', channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,), time_emb_dim=32,
                  image_size=TRAIN_SIZE, batch_size=8, lr=1e-3, warmup_steps=2, save_every=1000, sample_every=1000,
                  num_samples=0, sample_steps=2, log_every=1)


# google/ddpm-cifar10-32's UNet2DModel config, key for key (tests/test_diffusers.py,
# tests/test_ddim_format.py build it locally; nothing is downloaded).
CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'], attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, act_fn='silu',
    time_embedding_type='positional', center_input_sample=False, mid_block_scale_factor=1)


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """One CPU thread for every test: the tiny test models run faster on one thread than on two
    busy cores, and runs whose weights are compared bit for bit must use the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_image_folder(folder, n, size=16, seed=0):
    """n smooth two-colour gradient PNGs of size x size pixels in `folder`; returns its path as a string."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        a, b = rng.random(3), rng.random(3)
        angle = rng.random() * 2 * np.pi
        ramp = (xx * np.cos(angle) + yy * np.sin(angle) + 1.5) / 3
        pixels = ((a + (b - a) * ramp[..., None]) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f'{i:03d}.png'))
    return str(folder)


def load(path):
    """A checkpoint the way every consumer loads it: weights_only=True."""
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b, what):
    """Two state dicts hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f'{what}: {k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})'
