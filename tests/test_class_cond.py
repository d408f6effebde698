"""Class-conditional training and sampling end to end: labels from the data, the loader, label dropout,
checkpoints that carry the class names, sample.py --class_label / --classes all, and the refusals."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampling.generate as generation
from sampling.generate import SampleRun
from data.process_cifar import InMemoryLoader, load_dataset, to_model_range
from diffusion import DDPM, create_cifar10_ddpm
from sampling.guidance import drop_labels
from sampling.options import SampleOptions
from sampling.store import meta_difference, run_meta
from train import train_ddpm
from training.timestep_sampler import stream_seed
from weights.checkpoint import CheckpointError, save_checkpoint

from conftest import TINY_TRAIN, assert_same_tensors, load, make_image_folder


@pytest.fixture(scope='module')
def classes_folder(tmp_path_factory):
    """train/cat (10 images) and train/dog (6 images, plus one corrupt file): 2 steps per epoch at batch 8."""
    root = tmp_path_factory.mktemp('pets')
    make_image_folder(root / 'train' / 'cat', 10, seed=1)
    make_image_folder(root / 'train' / 'dog', 6, seed=2)
    (root / 'train' / 'dog' / 'broken.png').write_bytes(b'not an image')
    return str(root)


# ----- labels from the data -------------------------------------------------------------------------

def test_folder_labels_come_from_sorted_class_subfolders(classes_folder, tmp_path):
    images, labels, classes = load_dataset('folder', classes_folder, image_size=16, labels=True)
    assert classes == ['cat', 'dog'] and labels.dtype == torch.int64
    assert labels.tolist() == [0] * 10 + [1] * 6   # the corrupt dog file is skipped in both
    assert torch.equal(images, load_dataset('folder', classes_folder, image_size=16))   # the unlabelled images
    cats = load_dataset('folder', os.path.join(classes_folder, 'train', 'cat'), image_size=16)
    assert torch.equal(images[labels == 0], cats)
    again = load_dataset('folder', classes_folder, image_size=16, labels=True)   # from the cache
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)


def test_a_cache_from_before_labels_is_used_only_when_it_skipped_nothing(classes_folder, tmp_path):
    folder = shutil.copytree(classes_folder, tmp_path / 'pets')
    split = os.path.join(folder, 'train')
    _, labels, _ = load_dataset('folder', str(folder), image_size=16, labels=True)
    cache = [os.path.join(split, f) for f in os.listdir(split) if f.startswith('.ddpm_cache_')]
    assert len(cache) == 1
    old = load(cache[0])
    torch.save({'images': old['images'], 'key': old['key']}, cache[0])   # no 'failed': an older cache
    _, again, _ = load_dataset('folder', str(folder), image_size=16, labels=True)
    assert torch.equal(again, labels)    # decoded afresh: that cache cannot say which file it skipped


def test_class_cond_needs_class_subfolders(tmp_path):
    folder = make_image_folder(tmp_path / 'flat', 4)
    with pytest.raises(ValueError, match='class subfolders'):
        load_dataset('folder', folder, image_size=16, labels=True)


def test_synthetic_labels_split_dark_from_light():
    images, labels, classes = load_dataset('synthetic', None, image_size=16, num_synthetic=64, labels=True)
    assert classes == ['dark', 'light'] and labels.sum() == 32
    brightness = images.float().mean(dim=(1, 2, 3))
    assert brightness[labels == 1].min() > brightness[labels == 0].max()


@pytest.mark.parametrize('world_size', [1, 2])
def test_loader_yields_each_images_label_and_the_same_images(world_size):
    """Image i is filled with the value i, so its index can be read back from the batch (flips included)."""
    n = 40
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(0))
    for rank in range(world_size):
        plain = InMemoryLoader(images, 8, seed=3, rank=rank, world_size=world_size)
        labelled = InMemoryLoader(images, 8, seed=3, rank=rank, world_size=world_size, labels=labels)
        for epoch in range(3):
            plain.set_epoch(epoch)
            labelled.set_epoch(epoch)
            for x, (x_l, y) in zip(plain, labelled, strict=True):
                assert torch.equal(x, x_l)
                index = ((x_l[:, 0, 0, 0] + 1) * 127.5).round().long()
                assert torch.equal(y, labels[index])
    with pytest.raises(ValueError, match='one per image'):
        InMemoryLoader(images, 8, labels=labels[:-1])


def test_label_dropout_is_seeded_global_and_has_rate_p():
    g = torch.Generator()
    labels = torch.randint(0, 10, (512,), generator=torch.Generator().manual_seed(1))
    at = {step: stream_seed('cond', 0, step) for step in (5, 6)}
    a = drop_labels(g, at[5], labels, 0.1, 10)
    assert torch.equal(a, drop_labels(g, at[5], labels, 0.1, 10))
    assert not torch.equal(a, drop_labels(g, at[6], labels, 0.1, 10))
    kept = a != 10
    assert torch.equal(a[kept], labels[kept]) and 0.07 < (~kept).float().mean() < 0.13
    halves = [drop_labels(g, at[5], labels[r * 256:(r + 1) * 256], 0.1, 10, 512, r) for r in range(2)]
    assert torch.equal(torch.cat(halves), a)   # two ranks' shares form the one-process batch
    assert torch.equal(drop_labels(g, at[5], labels, 0.0, 10), labels)
    assert (drop_labels(g, at[5], labels, 1.0, 10) == 10).all()


# ----- training ---------------------------------------------------------------------------------------

def run(tmp, data_dir, name='run', **overrides):
    ckpt_dir, log_dir = os.path.join(tmp, name, 'ckpt'), os.path.join(tmp, name, 'runs')
    kwargs = {**TINY_TRAIN, 'dataset': 'folder', 'data_dir': data_dir, 'checkpoint_dir': ckpt_dir,
              'log_dir': log_dir, 'run_name': name, 'amp': 'fp32', 'class_cond': True, **overrides}
    return train_ddpm(**kwargs), ckpt_dir, log_dir


@pytest.fixture(scope='module')
def cond_run(tmp_path_factory, classes_folder, one_thread):
    """4 steps (2 epochs) of a class-conditional run with a per-class grid at the end."""
    tmp = tmp_path_factory.mktemp('cond')
    model, ckpt_dir, log_dir = run(tmp, classes_folder, num_epochs=2, num_samples=5, p_uncond=0.5)
    return model, os.path.join(ckpt_dir, 'ddpm_latest.pth'), log_dir


def test_checkpoint_carries_classes_and_rebuilds_a_conditional_model(cond_run):
    model, path, log_dir = cond_run
    ckpt = load(path)
    assert ckpt['step'] == 4
    assert ckpt['config']['num_classes'] == 2 and ckpt['config']['class_names'] == ['cat', 'dog']
    assert ckpt['config']['class_cond'] is True and ckpt['config']['p_uncond'] == 0.5
    assert ckpt['ema_state_dict']['network.class_embedding.weight'].shape == (3, 32)
    rebuilt = DDPM.from_checkpoint(path)
    assert rebuilt.num_classes == 2
    # One row per class: 5 samples over 2 classes -> 2 per class, a 2 x 2 grid of 16 px images, padding 2.
    grid = Image.open(os.path.join(log_dir, 'run', 'samples', 'epoch_0002.png'))
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)


def test_labels_are_dropped_to_the_null_class_in_training(tmp_path, classes_folder, monkeypatch):
    seen = []
    loss = DDPM.loss

    def spy(self, x_0, t=None, noise=None, reduction='mean', labels=None):
        seen.append(labels.clone())
        return loss(self, x_0, t, noise, reduction, labels)
    monkeypatch.setattr(DDPM, 'loss', spy)
    run(tmp_path, classes_folder, num_epochs=4, num_samples=0, p_uncond=0.5)
    seen = torch.cat(seen)
    assert set(seen.tolist()) == {0, 1, 2} and 0.25 < (seen == 2).float().mean() < 0.75


def test_class_cond_resume_is_exact(tmp_path, classes_folder, cond_run):
    """Stop after 3 steps, resume to 4 (without repeating --class_cond: it comes from the checkpoint)."""
    run(tmp_path, classes_folder, num_epochs=2, num_samples=5, p_uncond=0.5, max_steps=3)
    _, ckpt_dir, _ = run(tmp_path, classes_folder, num_epochs=2, num_samples=5, p_uncond=0.5, resume='latest',
                         class_cond=False)
    resumed, straight = load(os.path.join(ckpt_dir, 'ddpm_latest.pth')), load(cond_run[1])
    assert resumed['step'] == 4
    assert_same_tensors(resumed['model_state_dict'], straight['model_state_dict'], 'model weights')
    assert_same_tensors(resumed['ema_state_dict'], straight['ema_state_dict'], 'EMA weights')


def test_a_conditional_run_resumes_only_on_the_same_classes(tmp_path, classes_folder):
    run(tmp_path, classes_folder, num_epochs=1, num_samples=0, max_steps=1)
    other = tmp_path / 'other'
    shutil.copytree(classes_folder, other)
    os.rename(other / 'train' / 'dog', other / 'train' / 'fox')
    with pytest.raises(ValueError, match=r"classes \['cat', 'dog'\].*\['cat', 'fox'\]"):
        run(tmp_path, str(other), num_epochs=1, num_samples=0, resume='latest')


def test_an_unconditional_checkpoint_does_not_resume_as_conditional(tmp_path, classes_folder):
    run(tmp_path, classes_folder, num_epochs=1, num_samples=0, class_cond=False, max_steps=1)
    with pytest.raises(CheckpointError, match='class_cond'):
        run(tmp_path, classes_folder, num_epochs=1, num_samples=0, resume='latest')


# ----- sampling from the checkpoint alone ----------------------------------------------------------

def sample_main(args, capsys):
    code = sample.main([*args, '--device', 'cpu', '--quiet', '--sampler', 'dpm-solver', '--steps', '3'])
    return code, capsys.readouterr()


def test_sample_py_class_label_by_name_and_all_classes(cond_run, tmp_path, capsys):
    path = cond_run[1]
    npz = str(tmp_path / 'cats.npz')
    code, _ = sample_main(['--checkpoint', path, '--class_label', 'cat', '--num_samples', '3', '--npz', npz,
                           '--guidance_scale', '1'], capsys)
    with np.load(npz) as data:
        assert code == 0 and data['arr_0'].shape == (3, 16, 16, 3) and data['labels'].tolist() == [0, 0, 0]
    by_index = generation.sample_checkpoint(path, SampleOptions(sampler='dpm-solver', steps=3, guidance_scale=1),
                                            SampleRun(3, class_label=0), device='cpu', progress=False)
    assert np.array_equal(by_index, np.load(npz)['arr_0'])
    dogs = generation.sample_checkpoint(path, SampleOptions(sampler='dpm-solver', steps=3, guidance_scale=1),
                                        SampleRun(3, class_label='dog'), device='cpu', progress=False)
    assert not np.array_equal(dogs, by_index)
    grid = str(tmp_path / 'all.png')
    code, _ = sample_main(['--checkpoint', path, '--classes', 'all', '--num_samples', '6', '--out', grid], capsys)
    assert code == 0 and Image.open(grid).size == (2 + 3 * 18, 2 + 2 * 18)   # 2 rows (classes) of 3


def test_sample_py_refuses_what_a_checkpoint_cannot_take(cond_run, tmp_path, capsys):
    torch.manual_seed(0)
    plain = create_cifar10_ddpm(arch='tiny', channels=(16, 32), attn_resolutions=(), image_size=8, timesteps=10)
    uncond = str(tmp_path / 'uncond.pth')
    save_checkpoint({'model_state_dict': plain.state_dict(), 'config': dict(
        arch='tiny', channels=[16, 32], attn_resolutions=[], image_size=8, timesteps=10)}, uncond)
    cases = [(uncond, ['--class_label', '3'], 'unconditional'),
             (uncond, ['--guidance_scale', '3'], 'unconditional .* --guidance_scale 3 does not apply'),   # issue 22
             (cond_run[1], ['--class_label', 'bird'], "unknown class 'bird'"),
             (cond_run[1], ['--class_label', '2'], r'0\.\.1'),
             (cond_run[1], ['--guidance_scale', '2'], 'needs a class')]
    for path, args, message in cases:
        code, out = sample_main(['--checkpoint', path, *args, '--num_samples', '2', '--out',
                                 str(tmp_path / 'x.png')], capsys)
        err = out.err.strip()
        assert code == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, (args, err)
        assert re.search(message, err), (args, err)
    assert not os.path.exists(tmp_path / 'x.png')


def test_run_meta_keeps_runs_with_other_labels_or_guidance_apart(cond_run):
    model = DDPM.from_checkpoint(cond_run[1])

    def meta(class_label=None, guidance_scale=0.0):
        options = SampleOptions('ddim', 5, guidance_scale=guidance_scale).resolve(model)
        return run_meta(model, {'sha256': 'x'}, options, SampleRun(batch_size=4, class_label=class_label, amp='fp32'))
    a = meta(class_label=0, guidance_scale=1.0)
    assert 'class_label' in meta_difference(a, meta(class_label=1, guidance_scale=1.0))
    assert 'guidance_scale' in meta_difference(a, meta(class_label=0, guidance_scale=2.0))
    unconditional = meta()
    older = {k: v for k, v in unconditional.items() if k not in ('class_label', 'guidance_scale')}
    assert meta_difference(older, unconditional) == ''   # runs recorded before the keys were unconditional


def test_diffusers_export_refuses_a_conditional_model(cond_run, tmp_path):
    from weights.diffusers_format import save_diffusers
    with pytest.raises(CheckpointError, match='class-conditional'):
        save_diffusers(DDPM.from_checkpoint(cond_run[1]), str(tmp_path / 'out'))


def test_grid_order_puts_each_class_in_its_own_row():
    from sampling.guidance import class_grid_order, cycled_labels
    labels = cycled_labels(7, 3)   # 0 1 2 0 1 2 0: class 0 has one sample more than fits a row
    order, nrow = class_grid_order(labels, 3)
    assert nrow == 2 and order.tolist() == [0, 3, 1, 4, 2, 5]
    order, nrow = class_grid_order(cycled_labels(2, 3), 3)   # fewer samples than classes: one row
    assert nrow == 2 and order.tolist() == [0, 1]
