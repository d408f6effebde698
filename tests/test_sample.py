"""sample.py: reproducible, resumable, sharded sampling from a checkpoint alone (CPU, tiny model)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampling.generate as generation
from sampling.generate import SampleRun
from sampling.options import SampleOptions
from data.process_cifar import to_uint8
from diffusion import DDPM, create_cifar10_ddpm
from weights.checkpoint import save_checkpoint

from conftest import ROOT

SAMPLE_PY = os.path.join(ROOT, 'sample.py')
TIMESTEPS = 10
SIZE = 8


def make_checkpoint(path, ema=True, timesteps=TIMESTEPS, image_size=SIZE):
    """A tiny checkpoint in train.py's format, with weights perturbed so that EMA and raw weights differ."""
    config = dict(arch='base', timesteps=timesteps, beta_start=1e-4, beta_end=0.02, variance='beta',
                  channels=[32, 64], num_res_blocks=1, attn_resolutions=[8], image_size=image_size, dropout=0.1,
                  batch_size=128, lr=2e-4, seed=0, dataset='synthetic', data_dir='data')
    torch.manual_seed(0)
    model = create_cifar10_ddpm(arch='base', timesteps=timesteps, channels=(32, 64), num_res_blocks=1,
                                attn_resolutions=(8,), image_size=image_size, dropout=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    ema_state = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()} if ema else None
    save_checkpoint({'model_state_dict': state, 'ema_state_dict': ema_state, 'optimizer_state_dict': {},
                     'epoch': 3, 'step': 30, 'config': config}, path)
    return str(path)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp('ckpt') / 'ddpm_latest.pth')


@pytest.fixture(scope='module')
def ckpt_no_ema(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp('ckpt_raw') / 'ddpm_raw.pth', ema=False)


def run_main(args, capsys=None):
    code = sample.main([*args, '--device', 'cpu', '--quiet'])
    return code, (capsys.readouterr() if capsys is not None else None)


def test_same_seed_same_images_other_seed_different(ckpt):
    a = generation.sample_checkpoint(ckpt, run=SampleRun(6, batch_size=4, seed=0), device='cpu', progress=False)
    b = generation.sample_checkpoint(ckpt, run=SampleRun(6, batch_size=4, seed=0), device='cpu', progress=False)
    c = generation.sample_checkpoint(ckpt, run=SampleRun(6, batch_size=4, seed=1), device='cpu', progress=False)
    assert a.dtype == np.uint8 and a.shape == (6, SIZE, SIZE, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # DDIM with eta = 0 is deterministic given x_T, and still depends on the seed.
    d = generation.sample_checkpoint(ckpt, SampleOptions(sampler='ddim', steps=3), SampleRun(4, batch_size=4, seed=0),
                                     device='cpu', progress=False)
    e = generation.sample_checkpoint(ckpt, SampleOptions(sampler='ddim', steps=3), SampleRun(4, batch_size=4, seed=0),
                                     device='cpu', progress=False)
    assert np.array_equal(d, e) and not np.array_equal(d, a[:4])


def test_a_batch_does_not_depend_on_what_ran_before(ckpt):
    model, _ = generation.load_model(ckpt, device='cpu')
    run = generation.generate(model, run=SampleRun(10, batch_size=4, seed=3), device='cpu', progress=False)
    assert [len(run[i:i + 4]) for i in (0, 4, 8)] == generation.batch_counts(10, 4) == [4, 4, 2]
    alone = generation.sample_batch(model, 8, 2, run=SampleRun(seed=3), device='cpu')   # images 8 and 9, alone
    assert np.array_equal(run[8:], alone)


def test_grid_npz_and_png_outputs(ckpt, tmp_path, capsys):
    grid, npz, out_dir = tmp_path / 'grid.png', tmp_path / 's.npz', tmp_path / 'pngs'
    code, out = run_main(['--checkpoint', ckpt, '--num_samples', '5', '--batch_size', '2', '--out', str(grid),
                          '--npz', str(npz), '--out_dir', str(out_dir)], capsys)
    assert code == 0, out.err
    with np.load(npz) as data:
        assert data.files == ['arr_0']
        images = data['arr_0']
    assert images.dtype == np.uint8 and images.shape == (5, SIZE, SIZE, 3)
    # torchvision's grid: ceil(sqrt(5)) = 3 images a row, 2 rows, 2-pixel padding.
    with Image.open(grid) as g:
        assert g.size == (3 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2) and g.mode == 'RGB'
        g = np.asarray(g)
    assert np.array_equal(g[2:2 + SIZE, 2 + SIZE + 2:2 + 2 * SIZE + 2], images[1])
    files = sorted(os.listdir(out_dir))
    assert files == [f'{i:06d}.png' for i in range(5)]
    for i, name in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(out_dir / name)), images[i])
    meta = json.loads((tmp_path / 's.npz.json').read_text())
    assert meta['num_samples'] == 5 and meta['ema'] is True and meta['steps'] == TIMESTEPS
    assert meta['shape'] == [5, SIZE, SIZE, 3]
    assert not os.path.exists(f'{npz}.parts'), 'parts are removed once the .npz is complete'
    # The same images as the library call: nothing depends on the output options.
    assert np.array_equal(images, generation.sample_checkpoint(ckpt, run=SampleRun(5, batch_size=2), device='cpu',
                          progress=False))


def test_interrupted_run_resumes_where_it_stopped(ckpt, tmp_path, monkeypatch, capsys):
    args = ['--checkpoint', ckpt, '--num_samples', '10', '--batch_size', '4', '--seed', '5']
    reference = tmp_path / 'reference.npz'
    assert run_main([*args, '--npz', str(reference)])[0] == 0

    real = generation.sample_batch
    calls = []

    def interrupted_after_two(model, index, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        return real(model, index, *a, **k)

    npz = tmp_path / 'run.npz'
    monkeypatch.setattr(generation, 'sample_batch', interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_main([*args, '--npz', str(npz)])
    parts = f'{npz}.parts'
    assert sorted(os.listdir(parts)) == ['images_000000_000004.npz', 'images_000004_000004.npz', 'meta.json']
    assert not npz.exists()

    # Other options must not be mixed into the partial run.
    monkeypatch.setattr(generation, 'sample_batch', real)
    code, out = run_main([*args[:-2], '--seed', '6', '--npz', str(npz)], capsys)
    assert code == 2
    assert out.err.startswith('error: ') and 'other options' in out.err and 'seed: 5 then, 6 now' in out.err
    assert len(out.err.strip().splitlines()) == 1
    # The network's precision changes the images too (bf16 and fp32 round differently).
    code, out = run_main([*args, '--amp', 'fp32', '--npz', str(npz)], capsys)
    assert code == 2 and "amp: 'auto' then, 'fp32' now" in out.err

    calls.clear()

    def counted(model, index, *a, **k):
        calls.append(index)
        return real(model, index, *a, **k)

    monkeypatch.setattr(generation, 'sample_batch', counted)
    assert run_main([*args, '--npz', str(npz)])[0] == 0
    assert calls == [8], 'only the missing batch (images 8 and 9) is sampled'
    with np.load(npz) as a, np.load(reference) as b:
        assert np.array_equal(a['arr_0'], b['arr_0'])
    assert not os.path.exists(parts)

    # A finished run is reused, also for a prefix made of whole batches.
    calls.clear()
    assert run_main([*args, '--npz', str(npz)])[0] == 0
    assert calls == []
    eight = generation.sample_checkpoint(ckpt, run=SampleRun(8, batch_size=4, seed=5), device='cpu', npz=str(npz),
                                         progress=False)
    assert calls == [] and np.array_equal(eight, np.load(reference)['arr_0'][:8])


def test_parts_of_a_run_seeded_per_batch_are_refused_and_batch_size_is_not_identity(ckpt, tmp_path, capsys):
    """A parts folder from before seeds were per image (format 1) is refused in one line; a finished run is
    reused at another batch size (its images do not depend on it), and 7 of them are a prefix of 9."""
    npz = tmp_path / 'run.npz'
    args = ['--checkpoint', ckpt, '--num_samples', '9', '--seed', '2', '--npz', str(npz)]
    os.makedirs(f'{npz}.parts')
    with open(os.path.join(f'{npz}.parts', 'meta.json'), 'w') as f:
        json.dump({'format': 1, 'sampler': 'ddpm', 'seed': 2, 'batch_size': 4}, f)
    code, out = run_main([*args, '--batch_size', '4'], capsys)
    assert code == 2 and out.err.startswith('error: ') and 'seeded per batch' in out.err
    assert len(out.err.strip().splitlines()) == 1 and not npz.exists()
    os.remove(os.path.join(f'{npz}.parts', 'meta.json'))
    assert run_main([*args, '--batch_size', '4'])[0] == 0
    nine = np.load(npz)['arr_0']
    again = generation.sample_checkpoint(ckpt, run=SampleRun(9, batch_size=2, seed=2), device='cpu', npz=str(npz),
                                         progress=False)
    assert np.array_equal(again, nine)
    seven = generation.sample_checkpoint(ckpt, run=SampleRun(7, batch_size=5, seed=2), device='cpu', progress=False)
    assert np.array_equal(seven, nine[:7])


def test_ema_weights_by_default_and_checkpoint_without_ema(ckpt, ckpt_no_ema, capsys):
    default = generation.sample_checkpoint(ckpt, run=SampleRun(3, batch_size=3), device='cpu', progress=False)
    ema = generation.sample_checkpoint(ckpt, run=SampleRun(3, batch_size=3), ema=True, device='cpu', progress=False)
    raw = generation.sample_checkpoint(ckpt, run=SampleRun(3, batch_size=3), ema=False, device='cpu', progress=False)
    assert np.array_equal(default, ema) and not np.array_equal(ema, raw)
    # Independently: the EMA model from the checkpoint with images 0-2's generators (in fp32, which
    # sample_checkpoint's amp='auto' is not on CPUs with native bf16).
    fp32 = generation.sample_checkpoint(ckpt, run=SampleRun(3, batch_size=3, amp='fp32'), ema=True, device='cpu',
                                        progress=False)
    model = DDPM.from_checkpoint(ckpt, ema=True)
    x = model.sample(3, generator=[torch.Generator().manual_seed(generation.batch_seed(0, i)) for i in range(3)],
                     progress=False)
    assert np.array_equal(to_uint8(x).permute(0, 2, 3, 1).numpy(), fp32)

    images = generation.sample_checkpoint(ckpt_no_ema, run=SampleRun(3, batch_size=3), device='cpu', progress=False)
    assert images.shape == (3, SIZE, SIZE, 3)
    assert np.array_equal(images, generation.sample_checkpoint(ckpt_no_ema, run=SampleRun(3, batch_size=3),
                          ema=False, device='cpu', progress=False))
    code, out = run_main(['--checkpoint', ckpt_no_ema, '--ema', '--num_samples', '2'], capsys)
    assert code == 2 and 'has no EMA weights' in out.err and '--no-ema' in out.err


def test_trajectory_shows_the_chain(ckpt, tmp_path, capsys):
    model, _ = generation.load_model(ckpt, device='cpu')
    ts, frames = generation.trajectory(model, 3, seed=2, progress=False)
    assert ts == list(range(TIMESTEPS, -1, -1))            # T = 10: every state fits in 11 columns
    assert frames.shape == (3, 11, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[:, -1], generation.sample_batch(model, 0, 3, run=SampleRun(seed=2)))
    x_T = torch.stack([torch.randn(model.image_shape, generator=torch.Generator().manual_seed(generation.batch_seed(2, i)))
                       for i in range(3)])   # image i's x_T: the first draw of its own generator
    assert np.array_equal(frames[:, 0], to_uint8(x_T.clamp(-1, 1)).permute(0, 2, 3, 1).numpy())

    ts, frames = generation.trajectory(model, 2, SampleOptions(sampler='ddim', steps=4), progress=False)
    assert ts[0] == TIMESTEPS and ts[-1] == 0 and len(ts) == 5 and frames.shape[1] == 5

    path = tmp_path / 'chain.png'
    code, out = run_main(['--checkpoint', ckpt, '--num_samples', '4', '--trajectory', str(path)], capsys)
    assert code == 0 and 'chain.png' in out.out
    assert Image.open(path).size == (11 * (SIZE + 2) + 2, 4 * (SIZE + 2) + 2)


def test_bad_input_is_one_line_error_without_traceback(ckpt, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    missing = tmp_path / 'nope.pth'
    proc = subprocess.run([sys.executable, SAMPLE_PY, '--checkpoint', str(missing)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f'error: checkpoint not found: {missing}'
    assert 'Traceback' not in proc.stderr

    code = sample.main(['--checkpoint', ckpt, '--steps', '100000', '--device', 'cpu', '--quiet'])
    assert code == 2
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'not a checkpoint')
    assert sample.main(['--checkpoint', str(garbage), '--device', 'cpu']) == 2


def test_seeds_per_image_same_images_at_batch_7_batch_64_and_two_ranks(ckpt, tmp_path):
    """Image i's noise depends only on (seed, i): two gloo ranks at batch 2, one process at batch 7 and at
    batch 64 give the same 7 images (eta = 1, so every step draws noise too)."""
    npz = tmp_path / 'sharded.npz'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': ROOT}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', SAMPLE_PY,
           '--checkpoint', ckpt, '--num_samples', '7', '--batch_size', '2', '--sampler', 'ddim', '--steps', '4',
           '--eta', '1', '--npz', str(npz), '--device', 'cpu', '--quiet']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch_7, batch_64 = (generation.sample_checkpoint(ckpt, SampleOptions(sampler='ddim', steps=4, eta=1.0),
                         SampleRun(7, batch_size=b), device='cpu', progress=False) for b in (7, 64))
    assert np.array_equal(batch_7, batch_64)
    with np.load(npz) as data:
        assert np.array_equal(data['arr_0'], batch_7)
    assert not os.path.exists(f'{npz}.parts')


def test_clip_denoised_is_an_option_of_every_sampler_and_part_of_a_runs_identity(ckpt, tmp_path):
    """--clip_denoised / --no-clip_denoised override the sampler's default (ddpm and ddim clip the predicted x_0,
    dpm-solver does not) and give DDPM.sample's images with that setting; the run's metadata records the
    resolved value, and runs recorded before the option existed had their sampler's default."""
    from sampling.store import meta_difference
    from sampling.generate import batch_seed
    model, _ = generation.load_model(ckpt, device='cpu')
    for sampler, default in (('ddim', True), ('dpm-solver', False), ('ddpm', True)):
        npz = {flag: tmp_path / f'{sampler}-{flag}.npz' for flag in ('default', 'on', 'off')}
        base = ['--checkpoint', ckpt, '--num_samples', '3', '--batch_size', '3', '--sampler', sampler,
                '--steps', '4', '--amp', 'fp32']
        assert run_main([*base, '--npz', str(npz['default'])])[0] == 0
        assert run_main([*base, '--clip_denoised', '--npz', str(npz['on'])])[0] == 0
        assert run_main([*base, '--no-clip_denoised', '--npz', str(npz['off'])])[0] == 0
        images = {k: np.load(v)['arr_0'] for k, v in npz.items()}
        meta = {k: json.loads(open(f'{v}.json').read()) for k, v in npz.items()}
        assert meta['default']['clip_denoised'] is default
        assert (meta['on']['clip_denoised'], meta['off']['clip_denoised']) == (True, False)
        same, other = ('on', 'off') if default else ('off', 'on')
        assert np.array_equal(images['default'], images[same]), sampler
        assert not np.array_equal(images['default'], images[other]), sampler   # the option does something
        for flag, clip in (('on', True), ('off', False)):   # ... and it is DDPM.sample's clip_denoised
            with torch.inference_mode():
                x = model.sample(3, device='cpu', sampler=sampler, steps=4, clip_denoised=clip,
                                 generator=[torch.Generator().manual_seed(batch_seed(0, i)) for i in range(3)],
                                 progress=False)
            assert np.array_equal(images[flag], to_uint8(x).permute(0, 2, 3, 1).numpy()), (sampler, flag)
        assert "clip_denoised: True then, False now" in meta_difference(meta['on'], meta['off'])
        legacy = {k: v for k, v in meta['default'].items() if k != 'clip_denoised'}
        assert meta_difference(legacy, meta['default']) == ''
        assert meta_difference(legacy, meta[other]) != ''


def test_dpm_solver_runs_record_their_spacing_and_refuse_to_mix(ckpt, tmp_path, capsys):
    """sample.py --sampler dpm-solver --steps K writes its sampler, steps and spacing into the run's metadata;
    a partial run is continued only with the same spacing; runs recorded before spacing existed were
    uniform DDIM; --steps 0, steps above T and DDIM noise for dpm-solver are one-line errors."""
    from sampling.store import meta_difference
    npz = tmp_path / 'dpm.npz'
    args = ['--checkpoint', ckpt, '--num_samples', '4', '--batch_size', '2', '--sampler', 'dpm-solver',
            '--steps', '3', '--npz', str(npz)]
    assert run_main(args, capsys)[0] == 0   # (capsys: its few-steps warning is read here, not by the checks below)
    meta = json.loads((tmp_path / 'dpm.npz.json').read_text())
    assert (meta['sampler'], meta['steps'], meta['spacing']) == ('dpm-solver', 3, 'logsnr')
    other = {**meta, 'spacing': 'quadratic'}
    assert "spacing: 'logsnr' then, 'quadratic' now" in meta_difference(meta, other)
    old_ddim = {k: v for k, v in {**meta, 'sampler': 'ddim'}.items() if k != 'spacing'}
    assert meta_difference(old_ddim, {**meta, 'sampler': 'ddim', 'spacing': 'uniform'}) == ''
    assert meta_difference(old_ddim, {**meta, 'sampler': 'ddim', 'spacing': 'quadratic'}) != ''
    for bad in (['--steps', '0'], ['--steps', str(TIMESTEPS + 1)], ['--eta', '1']):
        code, out = run_main([*args[:-2], *bad, '--quiet'], capsys)
        assert code == 2 and out.err.startswith('error: ') and len(out.err.strip().splitlines()) == 1, bad


# ----- editing a picture: --inpaint / --init_image (editing/) ---------------------------------------------------

def write_png(path, pixels):
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope='module')
def picture(tmp_path_factory):
    """An 8x8 RGB picture and a mask keeping its left half."""
    folder = tmp_path_factory.mktemp('edit')
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[:, :SIZE // 2] = 255
    return pixels, write_png(folder / 'image.png', pixels), write_png(folder / 'mask.png', mask)


def grid_tiles(path, n):
    """The n tiles of a one-row save_grid PNG (2-pixel padding), uint8 [n, SIZE, SIZE, 3]."""
    grid = np.asarray(Image.open(path).convert('RGB'))
    return np.stack([grid[2:2 + SIZE, 2 + i * (SIZE + 2):2 + i * (SIZE + 2) + SIZE] for i in range(n)])


def test_inpaint_keeps_the_white_of_the_mask_and_repeats_with_the_seed(ckpt, picture, tmp_path):
    pixels, image, mask = picture
    args = ['--checkpoint', ckpt, '--inpaint', image, '--mask', mask, '--num_samples', '3', '--jump_length', '2',
            '--resamplings', '2']
    for name, seed in (('a.png', '0'), ('b.png', '0'), ('c.png', '1')):
        assert run_main([*args, '--seed', seed, '--out', str(tmp_path / name)])[0] == 0
    tiles = grid_tiles(tmp_path / 'a.png', 4)
    assert (tiles[1:, :, :SIZE // 2] == pixels[:, :SIZE // 2]).all()   # known pixels exactly
    assert (tiles[0, :, SIZE // 2:] == 128).all()   # the input shows the hole, grey
    assert not (tiles[1:, :, SIZE // 2:] == pixels[:, SIZE // 2:]).all()
    assert (tmp_path / 'a.png').read_bytes() == (tmp_path / 'b.png').read_bytes()
    assert (tmp_path / 'a.png').read_bytes() != (tmp_path / 'c.png').read_bytes()


def test_init_image_is_sdedit_from_the_seed_and_other_sizes_are_resized(ckpt, tmp_path, capsys):
    from editing.sdedit import sdedit
    from data.process_cifar import to_model_range, to_uint8
    big = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = write_png(tmp_path / 'big.png', big)
    code, out = run_main(['--checkpoint', ckpt, '--init_image', image, '--strength', '0.6', '--num_samples', '2',
                          '--seed', '3', '--out', str(tmp_path / 'sd.png')], capsys)
    assert code == 0 and 'resized' in out.err and '16x12' in out.err and len(out.err.strip().splitlines()) == 1
    model = DDPM.from_checkpoint(ckpt).eval()
    from data.image_folder import decode_image
    x = to_model_range(torch.from_numpy(decode_image(image, SIZE).copy()).permute(2, 0, 1)).unsqueeze(0)
    ref = sdedit(model, x.expand(2, -1, -1, -1), 0.6, torch.Generator().manual_seed(generation.batch_seed(3, 0)))
    assert (grid_tiles(tmp_path / 'sd.png', 3)[1:] == to_uint8(ref).permute(0, 2, 3, 1).numpy()).all()


@pytest.mark.parametrize('extra, message', [
    (['--inpaint', 'IMAGE', '--mask', 'SMALLMASK'], 'draw the mask at the image'),
    (['--inpaint', 'TEXT', '--mask', 'MASK'], 'is not an image file'),
    (['--init_image', 'TEXT'], 'is not an image file'),
    (['--init_image', 'IMAGE', '--strength', '0'], r'strength must be in \(0, 1\]'),
    (['--init_image', 'IMAGE', '--strength', '1.5'], r'strength must be in \(0, 1\]'),
    (['--inpaint', 'IMAGE'], 'needs --mask'),
    (['--strength', '0.5'], 'goes with --init_image'),
    (['--inpaint', 'IMAGE', '--mask', 'MASK', '--sampler', 'ddim'], 'drop --sampler ddim'),
])
def test_bad_editing_inputs_are_one_line_and_write_nothing(ckpt, picture, tmp_path, capsys, extra, message):
    import re
    _, image, mask = picture
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    small = write_png(tmp_path / 'small.png', np.zeros((4, 4), dtype=np.uint8))
    names = {'IMAGE': image, 'MASK': mask, 'SMALLMASK': small, 'TEXT': str(text)}
    out = tmp_path / 'out.png'
    code, captured = run_main(['--checkpoint', ckpt, '--out', str(out), *[names.get(a, a) for a in extra]], capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error:') and re.search(message, lines[0])
    assert not out.exists()


def test_dpm_solver_below_ten_steps_warns_in_one_line(ckpt, tmp_path, capsys):
    """Issue 22, item 6: sample.py --sampler dpm-solver --steps 1 says that the README recommends 10 or more."""
    base = ['--checkpoint', ckpt, '--num_samples', '2', '--sampler', 'dpm-solver', '--out', str(tmp_path / 'g.png')]
    code, out = run_main([*base, '--steps', '1'], capsys)
    assert code == 0 and out.err.strip() == ('warning: dpm-solver with 1 step gives poor images; the README '
                                             'recommends at least 10 (20 for final samples)'), out.err
    code, out = run_main([*base, '--steps', '10'], capsys)   # TIMESTEPS = 10: the fewest recommended steps
    assert code == 0 and 'warning' not in out.err, out.err



def test_every_sample_option_is_part_of_a_runs_identity_and_batch_size_is_not(ckpt):
    """run_meta records the resolved SampleOptions as asdict: another value of any one field is another run."""
    from sampling.store import meta_difference, run_meta
    model, info = generation.load_model(ckpt, device='cpu')
    info['sha256'] = 'x'

    def meta(options, run=SampleRun()):
        return run_meta(model, info, options.resolve(model), run)
    base = SampleOptions('ddim', 4)
    others = {'sampler': 'dpm-solver', 'steps': 5, 'spacing': 'quadratic', 'eta': 0.5, 'clip_denoised': False,
              'guidance_scale': 1.0}
    assert set(others) == set(base.asdict())   # every field is tried
    for field, value in others.items():
        assert field in meta_difference(meta(base), meta(dataclasses.replace(base, **{field: value}))), field
    assert meta_difference(meta(base), meta(base, SampleRun(batch_size=3))) == ''
