"""Our U-Net and samplers against diffusers' (an independent implementation), and diffusers folders in and out.

diffusers is a test dependency (requirements-dev.txt); the tests that build diffusers models skip without it.
Weights are random and non-zero everywhere, so a swapped, transposed or zeroed weight shows in the output.
"""
import json
import logging
import os

import numpy as np
import pytest
import torch

import convert
import evaluate
import sample
import weights.diffusers_format as diffusers_io
from conftest import CIFAR10_32
from diffusion import DDPM, create_cifar10_ddpm
from weights.checkpoint import CheckpointError, load_checkpoint

# The paper's 256x256 models (celebahq, church, bedroom, cat): six levels, attention at 16x16.
FAMILY_256 = dict(CIFAR10_32, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                  down_block_types=['DownBlock2D'] * 4 + ['AttnDownBlock2D', 'DownBlock2D'],
                  up_block_types=['UpBlock2D', 'AttnUpBlock2D'] + ['UpBlock2D'] * 4)
# The same structure, small enough for CI: 64 px, so the attention level (the fifth) is 4x4.
SMALL_256 = dict(FAMILY_256, sample_size=64, block_out_channels=[64, 64, 128, 128, 128, 128])
# A two-level net for the command-line and bad-folder tests.
TINY = dict(CIFAR10_32, sample_size=8, block_out_channels=[64, 64], layers_per_block=1,
            down_block_types=['DownBlock2D', 'AttnDownBlock2D'], up_block_types=['AttnUpBlock2D', 'UpBlock2D'])
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
                 variance_type='fixed_large', clip_sample=True)
TOL = 1e-5   # max abs difference, fp32


@pytest.fixture(scope='module')
def diffusers():
    return pytest.importorskip('diffusers')


def randomize(module, seed=0):
    """Perturb every weight (the zero-initialised output convs included) so that none is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    assert all(p.abs().min() > 0 for p in module.parameters())
    return module.eval()


def diffusers_unet(diffusers, config, seed=0):
    torch.manual_seed(seed)
    return randomize(diffusers.UNet2DModel(**config), seed)


def max_diff_forward(theirs, ours, size, what, batch=2, seed=1):
    """max |diffusers(x_t, t) - ours(x_t, t)| on random x_t and t (printed: pytest -s shows it)."""
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        diff = (theirs(x_t, t).sample - ours(x_t, t)).abs().max().item()
    print(f'{what}: max abs difference {diff:.2e}')
    return diff


class CollectLogs(logging.Handler):
    """Records what diffusers logs (its loggers do not propagate to the root logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger('diffusers').addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger('diffusers').removeHandler(self)


# ----- diffusers -> ours ---------------------------------------------------------------------

def test_cifar10_32_pipeline_loads_and_computes_the_same_function(diffusers, tmp_path):
    unet = diffusers_unet(diffusers, CIFAR10_32)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**SCHEDULER)).save_pretrained(tmp_path)
    model = DDPM.from_checkpoint(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unet.parameters()) == 35_746_307
    assert (model.timesteps, model.variance, model.network.config['downsample_padding']) == (1000, 'beta', 'same')
    assert max_diff_forward(unet, model.network.eval(), 32, 'cifar10-32, diffusers -> ours') <= TOL


def test_256_family_both_ways_and_from_a_bin_with_old_attention_names(diffusers, tmp_path):
    unet = diffusers_unet(diffusers, SMALL_256)
    unet.save_pretrained(tmp_path, safe_serialization=False)
    # Releases before diffusers 0.15 (google/ddpm-* among them) named the attention weights query/key/value/proj_attn.
    weights = torch.load(tmp_path / 'diffusion_pytorch_model.bin', weights_only=True)
    old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
    for new_name, old_name in old.items():
        weights = {k.replace(f'.{new_name}.', f'.{old_name}.'): v for k, v in weights.items()}
    torch.save(weights, tmp_path / 'diffusion_pytorch_model.bin')
    model = DDPM.from_checkpoint(tmp_path)   # a bare UNet2DModel folder: the paper's schedule
    assert model.network.config['attn_resolutions'] == (4,) and model.network.image_size == 64
    assert max_diff_forward(unet, model.network.eval(), 64, '256-family (64 px), diffusers -> ours') <= TOL
    diffusers_io.save_diffusers(model, tmp_path / 'export')
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / 'export' / 'unet').eval()
    assert max_diff_forward(theirs, model.network.eval(), 64, '256-family (64 px), ours -> diffusers') <= TOL


def test_a_pipeline_saved_in_one_folder_uses_its_scheduler(diffusers, tmp_path):
    """google/ddpm-* keep config.json, the weights and scheduler_config.json side by side."""
    diffusers_unet(diffusers, TINY).save_pretrained(tmp_path)
    diffusers.DDPMScheduler(**dict(SCHEDULER, variance_type='fixed_small')).save_pretrained(tmp_path)
    assert DDPM.from_checkpoint(tmp_path).variance == 'posterior'


def test_full_size_256_config_maps_every_weight(diffusers):
    """The released 256x256 config (no weights: meta tensors) maps onto ours name for name, shape for shape."""
    with torch.device('meta'):
        theirs = diffusers.UNet2DModel(**FAMILY_256).state_dict()
        ours = DDPM(diffusers_io.UNet(**diffusers_io.unet_options(FAMILY_256))).network
    assert ours.config['attn_resolutions'] == (16,) and ours.image_size == 256
    converted = diffusers_io.from_diffusers_state_dict(theirs, ours, 'meta')
    assert {k: v.shape for k, v in converted.items()} == {f'network.{k}': v.shape for k, v in ours.state_dict().items()}


# ----- ours -> diffusers ---------------------------------------------------------------------

def test_export_loads_in_diffusers_without_warnings_and_computes_the_same_function(diffusers, tmp_path):
    torch.manual_seed(0)
    model = create_cifar10_ddpm('ddpm-paper', variance='posterior')
    randomize(model.network)
    diffusers_io.save_diffusers(model, tmp_path)
    with CollectLogs() as logs:   # low_cpu_mem_usage=False: else a note that `accelerate` is not installed
        pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False)
        unet, info = diffusers.UNet2DModel.from_pretrained(tmp_path / 'unet', output_loading_info=True,
                                                           low_cpu_mem_usage=False)
    assert logs.messages == [] and all(not v for v in info.values()), (logs.messages, info)
    for cls, config in ((diffusers.UNet2DModel, 'unet/config.json'),
                        (diffusers.DDPMScheduler, 'scheduler/scheduler_config.json')):
        _, unused, _ = cls.extract_init_dict(json.loads((tmp_path / config).read_text()))
        assert not unused, f'{config}: keys diffusers ignores: {unused}'
    assert pipe.scheduler.config.variance_type == 'fixed_small'
    assert max_diff_forward(pipe.unet.eval(), model.network.eval(), 32, 'cifar10-32, ours -> diffusers') <= TOL
    back = DDPM.from_checkpoint(tmp_path)   # and back: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_export_of_an_old_symmetric_padding_model(diffusers, tmp_path):
    model = create_cifar10_ddpm('ddpm-paper', channels=(64, 128), downsample_padding='symmetric')
    randomize(model.network)
    diffusers_io.save_diffusers(model, tmp_path)
    assert json.loads((tmp_path / 'unet' / 'config.json').read_text())['downsample_padding'] == 1
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / 'unet').eval()
    assert max_diff_forward(theirs, model.network.eval(), 32, 'symmetric padding, ours -> diffusers') <= TOL


@pytest.mark.parametrize('arch, why', [('base', 'head'), ('tiny', 'GroupNorm')])
def test_archs_diffusers_cannot_express_are_refused(tmp_path, arch, why):
    with pytest.raises(CheckpointError, match=why):
        diffusers_io.save_diffusers(create_cifar10_ddpm(arch), tmp_path)
    assert not os.listdir(tmp_path)


# ----- sampler steps against DDPMScheduler / DDIMScheduler -------------------------------------

class ToyEps(torch.nn.Module):
    """A fixed eps(x_t, t): the steps are compared, not a network."""
    in_channels, image_size = 3, 8

    def forward(self, x_t, t):
        return torch.tanh(1.3 * x_t + torch.sin(t.float() / 37)[:, None, None, None])


@pytest.fixture
def float64_schedulers(diffusers, monkeypatch):
    """diffusers' steps in float64 on the exact schedule, drawing the same float32 noise as ours.

    In float32 diffusers' own 1 - a-bar_t loses digits at small t (we measured 8.5e-5 at t = 2); the float64
    reference isolates the step formula. Its noise is our generator's float32 draw, cast.
    """
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

    def same_noise(shape, generator=None, device=None, dtype=None, **_):
        return torch.randn(shape, generator=generator).to(dtype)

    for module in (scheduling_ddpm, scheduling_ddim):
        monkeypatch.setattr(module, 'randn_tensor', same_noise)

    def make(cls, **config):
        scheduler = cls(**config)
        scheduler.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        return scheduler
    return make


def worst_step_difference(model, scheduler, step_kwargs, **sample_kwargs):
    """Run our chain; at every step give diffusers our x_t and compare its x_{t-1} with ours."""
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    worst, steps = 0.0, 0
    for t, x_prev, _ in model.sample_progressive(2, x_T=x_t, generator=ours, progress=False, **sample_kwargs):
        if t < 0:
            break
        eps = model.network(x_t, torch.full((2,), t)).double()
        expected = scheduler.step(eps, t, x_t.double(), generator=theirs, **step_kwargs).prev_sample
        worst, steps, x_t = max(worst, (expected - x_prev).abs().max().item()), steps + 1, x_prev
    return worst, steps


@pytest.mark.parametrize('variance_type, variance', [('fixed_large', 'beta'), ('fixed_small', 'posterior')])
def test_ddpm_steps_equal_ddpm_scheduler(diffusers, float64_schedulers, variance_type, variance):
    scheduler = float64_schedulers(diffusers.DDPMScheduler, **dict(SCHEDULER, variance_type=variance_type))
    worst, steps = worst_step_difference(DDPM(ToyEps(), variance=variance), scheduler, {}, sampler='ddpm')
    print(f'DDPM steps, {variance_type}: max abs difference {worst:.2e}')
    assert steps == 1000 and worst <= TOL


@pytest.mark.parametrize('prediction, prediction_type', [('x0', 'sample'), ('v', 'v_prediction')])
def test_ddpm_steps_of_x0_and_v_models_equal_ddpm_scheduler(diffusers, float64_schedulers, prediction,
                                                            prediction_type):
    """diffusers reads the same raw network output as an x_0 or v prediction: its steps are ours."""
    scheduler = float64_schedulers(diffusers.DDPMScheduler, **dict(SCHEDULER, prediction_type=prediction_type))
    worst, steps = worst_step_difference(DDPM(ToyEps(), prediction=prediction), scheduler, {}, sampler='ddpm')
    print(f'DDPM steps, {prediction_type}: max abs difference {worst:.2e}')
    assert steps == 1000 and worst <= TOL


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_ddim_steps_equal_ddim_scheduler(diffusers, float64_schedulers, eta):
    scheduler = float64_schedulers(diffusers.DDIMScheduler, clip_sample=True, set_alpha_to_one=True)
    # Our 28 steps are 999, 962, ..., 37, 0: diffusers steps back by 1000 // 27 = 37 after set_timesteps(27).
    scheduler.set_timesteps(27)
    worst, steps = worst_step_difference(DDPM(ToyEps()), scheduler, dict(eta=eta, use_clipped_model_output=True),
                                         sampler='ddim', steps=28, eta=eta)
    print(f'DDIM steps, eta={eta}: max abs difference {worst:.2e}')
    assert steps == 28 and worst <= TOL


# ----- configs we cannot represent, bad folders ----------------------------------------------

@pytest.mark.parametrize('change, named', [
    (dict(flip_sin_to_cos=True), 'flip_sin_to_cos'), (dict(freq_shift=0), 'freq_shift'),
    (dict(down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D']), 'CrossAttnDownBlock2D'),
    (dict(norm_num_groups=16), 'norm_num_groups'), (dict(norm_eps=1e-5), 'norm_eps'),
    (dict(up_block_types=['UpBlock2D', 'UpBlock2D']), 'mirror'), (dict(attention_head_dim=48), 'attention_head_dim'),
    (dict(time_embedding_type='fourier'), 'time_embedding_type'), (dict(class_embed_type='timestep'), 'class_embed'),
    (dict(_class_name='UNet2DConditionModel'), 'UNet2DConditionModel'), (dict(sample_size=[8, 16]), 'sample_size'),
])
def test_unet_configs_ours_cannot_represent_are_refused(change, named):
    with pytest.raises(CheckpointError, match=named) as e:
        diffusers_io.unet_options({**TINY, **change})
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('change, named', [
    (dict(beta_schedule='squaredcos_cap_v2'), 'beta_schedule'), (dict(variance_type='learned_range'), 'learned'),
    (dict(prediction_type='mu'), 'prediction_type'), (dict(trained_betas=[0.1]), 'trained_betas'),
    (dict(clip_sample=False), 'clip_sample'), (dict(_class_name='PNDMScheduler'), 'PNDMScheduler'),
])
def test_scheduler_configs_ours_cannot_represent_are_refused(change, named):
    with pytest.raises(CheckpointError, match=named):
        diffusers_io.ddpm_options({**SCHEDULER, **change})


def test_scheduler_config_maps_to_ddpm_options():
    assert diffusers_io.ddpm_options(SCHEDULER) == dict(timesteps=1000, beta_start=1e-4, beta_end=0.02, variance='beta',
                                                        prediction='eps')
    assert diffusers_io.ddpm_options({**SCHEDULER, 'variance_type': 'fixed_small'})['variance'] == 'posterior'
    for theirs, ours in (('sample', 'x0'), ('v_prediction', 'v')):
        assert diffusers_io.ddpm_options({**SCHEDULER, 'prediction_type': theirs})['prediction'] == ours


@pytest.mark.parametrize('options, named', [(dict(prediction='mu'), 'mu-tilde'),
                                            (dict(variance='learned', loss='vlb'), 'learned variance'),
                                            (dict(learn_sigma=True, loss='hybrid'), 'learned variance')])
def test_export_refuses_what_diffusers_cannot_express_and_writes_nothing(tmp_path, options, named):
    model = DDPM(diffusers_io.UNet(**diffusers_io.unet_options(TINY)), **options)
    with pytest.raises(CheckpointError, match=named) as e:
        diffusers_io.save_diffusers(model, str(tmp_path / 'out'))
    assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()


@pytest.mark.parametrize('prediction, prediction_type', [('eps', 'epsilon'), ('x0', 'sample'), ('v', 'v_prediction')])
def test_export_writes_the_prediction_type(tmp_path, prediction, prediction_type):
    model = DDPM(diffusers_io.UNet(**diffusers_io.unet_options(TINY)), prediction=prediction)
    diffusers_io.save_diffusers(model, str(tmp_path))
    with open(tmp_path / 'scheduler' / 'scheduler_config.json') as f:
        assert json.load(f)['prediction_type'] == prediction_type
    assert DDPM.from_checkpoint(str(tmp_path)).prediction == prediction


def tiny_pipeline(folder):
    """A small DDPMPipeline folder written by our exporter (no diffusers needed)."""
    torch.manual_seed(0)
    model = DDPM(diffusers_io.UNet(**diffusers_io.unet_options(TINY)))
    diffusers_io.save_diffusers(model, folder)
    return model


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def break_missing_config(folder):
    os.remove(folder / 'unet' / 'config.json')


def break_block_type(folder):
    config = json.loads((folder / 'unet' / 'config.json').read_text())
    config['down_block_types'][1] = 'SkipDownBlock2D'
    (folder / 'unet' / 'config.json').write_text(json.dumps(config))


def break_truncated_weights(folder):
    path = folder / 'unet' / diffusers_io.WEIGHT_FILES[0]
    path.write_bytes(path.read_bytes()[:5000])


def break_pickle_imports_code(folder):
    os.remove(folder / 'unet' / diffusers_io.WEIGHT_FILES[0])
    torch.save({'conv_in.weight': Evil()}, folder / 'unet' / diffusers_io.WEIGHT_FILES[1])


def break_not_a_model(folder):
    for name in ('unet', 'scheduler'):
        os.rename(folder / name, folder / f'{name}-old')


@pytest.mark.parametrize('damage, named', [
    (break_missing_config, 'config.json is missing'), (break_block_type, 'SkipDownBlock2D'),
    (break_truncated_weights, 'truncated'), (break_pickle_imports_code, 'posix.system'),
    (break_not_a_model, 'not a diffusers model'),
])
def test_bad_folders_get_one_line(tmp_path, capsys, damage, named):
    tiny_pipeline(tmp_path)
    damage(tmp_path)
    assert sample.main(['--checkpoint', str(tmp_path), '--device', 'cpu', '--num_samples', '1', '--quiet']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and named in err, err


# ----- the command lines ---------------------------------------------------------------------

def test_sample_and_evaluate_take_a_save_pretrained_folder(diffusers, tmp_path, capsys):
    folder = tmp_path / 'ddpm-tiny'
    unet = diffusers_unet(diffusers, TINY)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**SCHEDULER)).save_pretrained(folder)
    npz = tmp_path / 'samples.npz'
    assert sample.main(['--checkpoint', str(folder), '--device', 'cpu', '--num_samples', '2', '--sampler', 'ddim',
                        '--steps', '2', '--npz', str(npz), '--quiet']) == 0
    assert np.load(npz)['arr_0'].shape == (2, 8, 8, 3)
    assert evaluate.main(['--checkpoint', str(folder), '--bpd', '--bpd_mode', 'estimate', '--bpd_data', str(npz),
                          '--device', 'cpu', '--quiet']) == 0
    assert 'bits/dim' in capsys.readouterr().out


def test_convert_both_ways(tmp_path):
    model = tiny_pipeline(tmp_path / 'pipe')
    ckpt = tmp_path / 'tiny.pth'
    assert convert.main([str(tmp_path / 'pipe'), '--out', str(ckpt)]) == 0
    stored = torch.load(ckpt, weights_only=True)
    assert stored['config']['downsample_padding'] == 'same' and stored['config']['variance'] == 'beta'
    rebuilt = DDPM.from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    # Its one set of weights (the released ones are an EMA already) exports back without flags.
    assert convert.main([str(ckpt), '--to-diffusers', str(tmp_path / 'again')]) == 0
    assert convert.main([str(ckpt), '--to-diffusers', str(tmp_path / 'again'), '--ema']) == 2
    # A checkpoint with EMA weights exports them by default, the raw ones with --no-ema.
    raw = {k: v + 1 for k, v in model.state_dict().items()}
    torch.save({'model_state_dict': raw, 'ema_state_dict': model.state_dict(), 'config': stored['config']}, ckpt)
    for flag, expected in (([], model.state_dict()), (['--ema'], model.state_dict()), (['--no-ema'], raw)):
        assert convert.main([str(ckpt), '--to-diffusers', str(tmp_path / 'out')] + flag) == 0
        exported = load_checkpoint(tmp_path / 'out')['model_state_dict']
        assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_convert_refuses_an_arch_diffusers_cannot_express(tmp_path, capsys):
    model = create_cifar10_ddpm('tiny')
    torch.save({'model_state_dict': model.state_dict(), 'ema_state_dict': model.state_dict(),
                'config': {'arch': 'tiny'}}, tmp_path / 'tiny.pth')
    assert convert.main([str(tmp_path / 'tiny.pth'), '--to-diffusers', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'GroupNorm' in err
