"""The DDIM / pytorch_diffusion format (weights/ddim_format.py) against diffusers, an independent implementation.

Random weights are made in the format from the `Model` class's own structure (ddim_model_shapes), with none
zero; diffusers' UNet2DModel gets them through a test-only key mapping that follows diffusers' conversion
script for this format (scripts/convert_ddpm_original_checkpoint_to_diffusers.py), never through our code.
"""
import argparse
import hashlib
import os
import re

import numpy as np
import pytest
import torch

import convert
import evaluate
import sample
from diffusion import DDPM, create_cifar10_ddpm
from sampling.generate import load_model
from weights import ddim_format
from conftest import CIFAR10_32
from weights.checkpoint import CheckpointError

TOL = 1e-5   # max abs difference, fp32
CIFAR10_LAYOUT = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
# The LSUN releases' six levels (ch_mult 1,1,2,2,4,4) with small channels; attention at one level (4 x 4).
SIX_LEVELS = dict(ch=64, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_levels=(3,))
SIX_LEVELS_32 = dict(CIFAR10_32, block_out_channels=[64, 64, 128, 128, 256, 256], layers_per_block=1,
                     down_block_types=['DownBlock2D'] * 3 + ['AttnDownBlock2D'] + ['DownBlock2D'] * 2,
                     up_block_types=['UpBlock2D'] * 2 + ['AttnUpBlock2D'] + ['UpBlock2D'] * 3)
SMALL = dict(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,))   # for command lines and bad files


# ----- the format, written from the Model class's structure -------------------------------------

def ddim_model_shapes(ch, ch_mult, num_res_blocks, attn_levels, in_channels=3):
    """name -> shape of every tensor of DDIM's Model(ch, ch_mult, num_res_blocks, attn at attn_levels)."""
    shapes, temb = {}, 4 * ch

    def layer(name, weight):
        shapes[f'{name}.weight'], shapes[f'{name}.bias'] = tuple(weight), (weight[0],)

    def resnet(name, c_in, c_out):
        layer(f'{name}.norm1', (c_in,))
        layer(f'{name}.conv1', (c_out, c_in, 3, 3))
        layer(f'{name}.temb_proj', (c_out, temb))
        layer(f'{name}.norm2', (c_out,))
        layer(f'{name}.conv2', (c_out, c_out, 3, 3))
        if c_in != c_out:
            layer(f'{name}.nin_shortcut', (c_out, c_in, 1, 1))

    def attn(name, c):
        layer(f'{name}.norm', (c,))
        for part in ('q', 'k', 'v', 'proj_out'):
            layer(f'{name}.{part}', (c, c, 1, 1))

    layer('temb.dense.0', (temb, ch))
    layer('temb.dense.1', (temb, temb))
    layer('conv_in', (ch, in_channels, 3, 3))
    in_mult, levels = (1,) + tuple(ch_mult), len(ch_mult)
    block_in = ch
    for i in range(levels):
        for j in range(num_res_blocks):
            resnet(f'down.{i}.block.{j}', block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if i in attn_levels:
                attn(f'down.{i}.attn.{j}', block_in)
        if i != levels - 1:
            layer(f'down.{i}.downsample.conv', (block_in, block_in, 3, 3))
    resnet('mid.block_1', block_in, block_in)
    attn('mid.attn_1', block_in)
    resnet('mid.block_2', block_in, block_in)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            skip_in = ch * (in_mult[i] if j == num_res_blocks else ch_mult[i])
            resnet(f'up.{i}.block.{j}', block_in + skip_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
            if i in attn_levels:
                attn(f'up.{i}.attn.{j}', block_in)
        if i != 0:
            layer(f'up.{i}.upsample.conv', (block_in, block_in, 3, 3))
    layer('norm_out', (block_in,))
    layer('conv_out', (in_channels, block_in, 3, 3))
    return shapes


def random_ddim_weights(layout, seed=0):
    """Random Model weights, none zero: norms near 1, weights ~ 1/sqrt(fan_in), biases small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in ddim_model_shapes(**layout).items():
        x = torch.randn(shape, generator=g)
        x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)   # no weight zero or nearly so
        if '.norm' in name or name.startswith('norm_out'):
            x = 1 + 0.1 * x if name.endswith('weight') else 0.1 * x
        else:
            x = x / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.1 * x
        out[name] = x
    assert all(v.abs().min() > 0 for v in out.values())
    return out


def ddim_to_diffusers(sd, levels):
    """Test-only: Model names -> UNet2DModel names and shapes, as diffusers' conversion script places them."""
    out = {}
    for name, value in sd.items():
        n = re.sub(r'^up\.(\d+)\.', lambda m: f'up_blocks.{levels - 1 - int(m[1])}.', name)
        n = re.sub(r'^down\.', 'down_blocks.', n)
        n = re.sub(r'^norm_out\.', 'conv_norm_out.', n)
        for old, new in (('temb.dense.0.', 'time_embedding.linear_1.'), ('temb.dense.1.', 'time_embedding.linear_2.'),
                         ('mid.block_1.', 'mid_block.resnets.0.'), ('mid.block_2.', 'mid_block.resnets.1.'),
                         ('mid.attn_1.', 'mid_block.attentions.0.'), ('.block.', '.resnets.'),
                         ('.attn.', '.attentions.'), ('.downsample.conv.', '.downsamplers.0.conv.'),
                         ('.upsample.conv.', '.upsamplers.0.conv.'), ('.temb_proj.', '.time_emb_proj.'),
                         ('.nin_shortcut.', '.conv_shortcut.')):
            n = n.replace(old, new)
        if '.attentions.' in n:   # 1x1 convs become Linear layers; q k v proj_out norm get diffusers' names
            n = re.sub(r'\.(q|k|v)\.', r'.to_\1.', n).replace('.proj_out.', '.to_out.0.').replace('.norm.',
                                                                                                   '.group_norm.')
            value = value.flatten(1) if value.dim() == 4 else value
        out[n] = value
    return out


def diffusers_from_ddim(diffusers, config, sd):
    unet = diffusers.UNet2DModel(**config)
    unet.load_state_dict(ddim_to_diffusers(sd, len(config['block_out_channels'])), strict=True)
    return unet.eval()


def max_diff_forward(theirs, ours, what, size=32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t, t = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        a, b = theirs(x_t, t).sample, ours(x_t, t)
    diff = (a - b).abs().max().item()
    print(f'{what}: max abs difference {diff:.2e} (output max abs {a.abs().max().item():.2f})')
    return diff


@pytest.fixture(scope='module')
def diffusers():
    return pytest.importorskip('diffusers')


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    err = ''.join(line for line in err.splitlines(True) if not line.startswith('downloading release'))  # progress
    assert err.startswith('error: ') and err.count('\n') == 1, err
    for word in words:
        assert word in err, err
    return err


# ----- the format -> ours and back, against diffusers ------------------------------------------

@pytest.mark.parametrize('layout, config', [(CIFAR10_LAYOUT, CIFAR10_32), (SIX_LEVELS, SIX_LEVELS_32)],
                         ids=['cifar10', 'six-levels'])
def test_loaded_and_exported_weights_compute_what_diffusers_computes(diffusers, tmp_path, layout, config):
    theirs = random_ddim_weights(layout)
    torch.save(theirs, tmp_path / 'model.ckpt')
    model = DDPM.from_checkpoint(tmp_path / 'model.ckpt').eval()
    assert (model.timesteps, model.variance, model.network.image_size) == (1000, 'beta', 32)
    unet = diffusers_from_ddim(diffusers, config, theirs)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters())
    assert max_diff_forward(unet, model.network, f'{layout["ch_mult"]}: format -> ours') <= TOL
    # ours -> format: new weights in our network, written, then read by the independent mapping
    with torch.no_grad():
        for p in model.network.parameters():
            p.mul_(1.01).add_(0.001)
    ddim_format.save_ddim(model, tmp_path / 'export.ckpt')
    exported = torch.load(tmp_path / 'export.ckpt', weights_only=True)
    assert {k: tuple(v.shape) for k, v in exported.items()} == ddim_model_shapes(**layout)   # Model, strict=True
    unet = diffusers_from_ddim(diffusers, config, exported)
    assert max_diff_forward(unet, model.network, f'{layout["ch_mult"]}: ours -> format') <= TOL


def test_format_to_ours_to_format_is_the_identity(tmp_path):
    theirs = random_ddim_weights(SIX_LEVELS, seed=3)
    torch.save({f'module.{k}': v for k, v in theirs.items()}, tmp_path / 'dp.ckpt')   # DataParallel names too
    model = DDPM.from_checkpoint(tmp_path / 'dp.ckpt')
    assert model.network.config['attn_resolutions'] == (4,) and model.network.config['num_heads'] == 1
    ddim_format.save_ddim(model, tmp_path / 'back.ckpt')
    assert_same(torch.load(tmp_path / 'back.ckpt', weights_only=True), theirs)


def training_checkpoint(path, with_ema=True):
    """A DDIM-codebase ckpt.pth: [state_dict ('module.' names), optimizer, epoch, step(, EMA shadow)]."""
    raw, shadow = random_ddim_weights(SMALL, seed=1), random_ddim_weights(SMALL, seed=2)
    optimizer = {'state': {0: {'step': torch.tensor(5.0), 'exp_avg': torch.ones(2)}},
                 'param_groups': [{'lr': 2e-4, 'betas': (0.9, 0.999), 'params': [0]}]}
    states = [{f'module.{k}': v for k, v in raw.items()}, optimizer, 7, 1234] + ([shadow] if with_ema else [])
    torch.save(states, path)
    return raw, shadow


def test_ddim_training_checkpoint_picks_the_ema_shadow_or_the_raw_weights(tmp_path, capsys):
    raw, shadow = training_checkpoint(tmp_path / 'ckpt.pth')
    for ema, expected in ((True, shadow), (False, raw)):
        model = DDPM.from_checkpoint(tmp_path / 'ckpt.pth', ema=ema)
        assert_same(ddim_format.to_ddim_state_dict(model.network), expected)
    model, info = load_model(str(tmp_path / 'ckpt.pth'))   # sample.py's default: the EMA when present
    assert info['ema'] is True and info['step'] == 1234 and info['epoch'] == 7
    assert capsys.readouterr().err == ''


def test_ddim_training_checkpoint_without_shadow_says_so_and_uses_the_raw_weights(tmp_path, capsys):
    raw, _ = training_checkpoint(tmp_path / 'ckpt.pth', with_ema=False)
    model = DDPM.from_checkpoint(tmp_path / 'ckpt.pth')   # ema=True by default
    assert_same(ddim_format.to_ddim_state_dict(model.network), raw)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'no EMA shadow' in err and 'raw weights' in err


# ----- command lines ----------------------------------------------------------------------------

def test_sample_and_evaluate_take_a_ddim_file_at_the_image_size_asked(tmp_path, capsys):
    torch.save(random_ddim_weights(SMALL), tmp_path / 'model.ckpt')
    npz = tmp_path / 's.npz'
    assert sample.main(['--checkpoint', str(tmp_path / 'model.ckpt'), '--num_samples', '2', '--sampler', 'ddim',
                        '--steps', '2', '--npz', str(npz), '--image_size', '16', '--device', 'cpu', '--quiet']) == 0
    assert np.load(npz)['arr_0'].shape == (2, 16, 16, 3)
    assert evaluate.main(['--checkpoint', str(tmp_path / 'model.ckpt'), '--image_size', '16', '--bpd', '--bpd_mode',
                          'estimate', '--bpd_data', str(npz), '--device', 'cpu', '--quiet']) == 0
    assert 'bits/dim' in capsys.readouterr().out
    # attention stays at the level the weights have it: 16 px -> 8 x 8 (32 px -> 16 x 16)
    assert DDPM.from_checkpoint(tmp_path / 'model.ckpt', image_size=16).network.config['attn_resolutions'] == (8,)
    assert DDPM.from_checkpoint(tmp_path / 'model.ckpt').network.config['attn_resolutions'] == (16,)


def test_convert_both_ways(tmp_path, capsys):
    theirs = random_ddim_weights(SMALL)
    torch.save(theirs, tmp_path / 'model.ckpt')
    assert convert.main([str(tmp_path / 'model.ckpt'), '--out', str(tmp_path / 'ours.pth')]) == 0
    assert convert.main([str(tmp_path / 'ours.pth'), '--to-ddim', str(tmp_path / 'back.ckpt')]) == 0
    assert 'model.ch_mult: [1, 2]' in capsys.readouterr().out
    assert_same(torch.load(tmp_path / 'back.ckpt', weights_only=True), theirs)
    # our checkpoint with EMA weights: EMA by default, the raw ones with --no-ema
    model = DDPM.from_checkpoint(tmp_path / 'ours.pth')
    raw = {k: v + 1 for k, v in model.state_dict().items()}
    stored = torch.load(tmp_path / 'ours.pth', weights_only=True)
    torch.save({'model_state_dict': raw, 'ema_state_dict': model.state_dict(), 'config': stored['config']},
               tmp_path / 'ema.pth')
    for flag, expected in (([], theirs), (['--no-ema'], {k: v + 1 for k, v in theirs.items()})):
        assert convert.main([str(tmp_path / 'ema.pth'), '--to-ddim', str(tmp_path / 'x.ckpt')] + flag) == 0
        assert_same(torch.load(tmp_path / 'x.ckpt', weights_only=True), expected)


def ours(**options):
    return create_cifar10_ddpm('ddpm-paper', **{'channels': (64, 128), 'time_emb_dim': 256, **options})


@pytest.mark.parametrize('model, why', [
    (lambda: ours(num_classes=10), 'class-conditional'),
    (lambda: ours(learn_sigma=True, loss='hybrid'), 'learns sigma'),
    (lambda: ours(num_heads=2), 'num_heads=2'),
    (lambda: create_cifar10_ddpm('tiny', num_heads=1, time_emb_dim=128), 'GroupNorm'),
    (lambda: ours(downsample_padding='symmetric'), 'symmetric'),
    (lambda: ours(beta_schedule='cosine'), 'cosine'),
    (lambda: ours(time_emb_dim=128), 'time_emb_dim'),
], ids=['class-cond', 'learn-sigma', 'heads', 'groupnorm', 'padding', 'cosine', 'temb'])
def test_what_the_format_cannot_express_is_refused_and_nothing_written(tmp_path, model, why):
    with pytest.raises(ddim_format.DDIMFormatError, match=why):
        ddim_format.save_ddim(model(), tmp_path / 'out.ckpt')
    assert not os.listdir(tmp_path)


def test_convert_refusal_is_one_line(tmp_path, capsys):
    model = ours(num_heads=2)
    torch.save({'model_state_dict': model.state_dict(), 'ema_state_dict': None,
                'config': {'arch': 'ddpm-paper', 'channels': [64, 128], 'time_emb_dim': 256,
                                                      'num_heads': 2}}, tmp_path / 'm.pth')
    assert convert.main([str(tmp_path / 'm.pth'), '--to-ddim', str(tmp_path / 'out.ckpt')]) == 2
    one_line_error(capsys, 'num_heads=2', 'nothing was written')
    assert not os.path.exists(tmp_path / 'out.ckpt')


# ----- bad files ---------------------------------------------------------------------------------

def bad_files(tmp_path):
    good = random_ddim_weights(SMALL)
    torch.save(good, tmp_path / 'good.ckpt')
    data = (tmp_path / 'good.ckpt').read_bytes()
    (tmp_path / 'truncated.ckpt').write_bytes(data[:len(data) // 2])
    torch.save({**good, 'extra.weight': torch.ones(1)}, tmp_path / 'extra.ckpt')
    torch.save({k: v for k, v in good.items() if 'downsample' not in k and 'upsample' not in k},
               tmp_path / 'avgpool.ckpt')
    torch.save({k.replace('nin_shortcut', 'conv_shortcut'): v for k, v in good.items()}, tmp_path / 'shortcut.ckpt')
    torch.save({**good, 'logvar': torch.zeros(1000)}, tmp_path / 'bayesian.ckpt')
    torch.save([good, {}, 1, 2, argparse.Namespace(ema=True)], tmp_path / 'code.pth')   # a pickled object
    torch.save({k: v for k, v in good.items() if k != 'up.1.block.0.conv1.weight'}, tmp_path / 'missing.ckpt')
    torch.save({k: v[:, :10] if k == 'mid.block_1.temb_proj.weight' else v for k, v in good.items()},
               tmp_path / 'shape.ckpt')


@pytest.mark.parametrize('name, words', [
    ('truncated.ckpt', ['truncated']), ('extra.ckpt', ['unknown layout', 'extra.weight']),
    ('avgpool.ckpt', ['resamp_with_conv']), ('shortcut.ckpt', ['conv_shortcut']), ('bayesian.ckpt', ['logvar']),
    ('code.pth', ['argparse.Namespace', 'refused']), ('missing.ckpt', ['unknown layout', 'up.1.block.0.conv1']),
    ('shape.ckpt', ['unknown layout', 'mid.block_1.temb_proj']),
])
def test_bad_files_are_one_line_and_exit_2(tmp_path, capsys, name, words):
    bad_files(tmp_path)
    assert sample.main(['--checkpoint', str(tmp_path / name), '--num_samples', '1', '--sampler', 'ddim',
                        '--steps', '1', '--out', str(tmp_path / 'x.png'), '--device', 'cpu', '--quiet']) == 2
    one_line_error(capsys, *words)
    assert not os.path.exists(tmp_path / 'x.png')


# ----- named releases ---------------------------------------------------------------------------

@pytest.fixture
def local_release(tmp_path, monkeypatch):
    """ema_cifar10 and ema_lsun_church served from file:// URLs (small stand-in weights), cached in tmp_path/cache."""
    torch.save(random_ddim_weights(SMALL), tmp_path / 'served.ckpt')
    md5 = hashlib.md5((tmp_path / 'served.ckpt').read_bytes()).hexdigest()
    for name in ('ema_cifar10', 'ema_lsun_church'):
        monkeypatch.setitem(ddim_format.RELEASES, name, ddim_format.RELEASES[name]._replace(
            url=(tmp_path / 'served.ckpt').as_uri(), md5=md5))
    monkeypatch.setenv(ddim_format.CACHE_ENV, str(tmp_path / 'cache'))
    return tmp_path


def test_a_release_downloads_once_checks_md5_and_loads(local_release, capsys):
    model = DDPM.from_checkpoint('ema_cifar10')
    cached = local_release / 'cache' / 'ema_diffusion_cifar10_model' / 'model-790000.ckpt'
    assert cached.exists() and 'downloading release ema_cifar10' in capsys.readouterr().err
    assert (model.network.image_size, model.variance) == (32, 'beta')
    lsun = DDPM.from_checkpoint('ema_lsun_church')   # pytorch_diffusion's LSUN settings
    assert (lsun.network.image_size, lsun.variance, lsun.network.config['attn_resolutions']) == (
        256, 'posterior', (128,))
    os.remove(local_release / 'served.ckpt')   # the second time it comes from the cache
    assert_same(DDPM.from_checkpoint('ema_cifar10').state_dict(), model.state_dict())
    with open(cached, 'ab') as f:   # a damaged cached copy is refused
        f.write(b'x')
    with pytest.raises(CheckpointError, match='md5'):
        DDPM.from_checkpoint('ema_cifar10')


def test_sample_takes_a_release_name(local_release):
    assert sample.main(['--checkpoint', 'ema_cifar10', '--num_samples', '1', '--sampler', 'ddim', '--steps', '1',
                        '--image_size', '8', '--npz', str(local_release / 's.npz'), '--device', 'cpu',
                        '--quiet']) == 0
    assert np.load(local_release / 's.npz')['arr_0'].shape == (1, 8, 8, 3)


@pytest.mark.parametrize('case, words', [
    ('unknown', ['ema_cifar100', 'ema_cifar10']), ('md5', ['md5', 'nothing was kept']),
    ('offline', ['cannot download', 'put it at']),
])
def test_release_failures_are_one_line_and_keep_nothing(local_release, monkeypatch, capsys, case, words):
    name = 'ema_cifar100' if case == 'unknown' else 'ema_cifar10'
    if case == 'md5':
        monkeypatch.setitem(ddim_format.RELEASES, name, ddim_format.RELEASES[name]._replace(md5='0' * 32))
    if case == 'offline':
        monkeypatch.setitem(ddim_format.RELEASES, name, ddim_format.RELEASES[name]._replace(
            url=(local_release / 'nowhere.ckpt').as_uri()))
    assert convert.main([name, '--out', str(local_release / 'out.pth')]) == 2
    one_line_error(capsys, *words)
    cache = local_release / 'cache'
    assert not os.path.exists(local_release / 'out.pth')
    assert not cache.exists() or not any(files for _, _, files in os.walk(cache))
