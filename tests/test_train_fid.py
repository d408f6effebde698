"""FID during training (training/fid.py via train_ddpm(fid_every=...)): eval/fid, ddpm_best_fid.pth, and the
recorded FID is what evaluate.py measures for the saved EMA weights. A stand-in feature extractor keeps it
fast; the real Inception network runs in tests/test_fid.py."""
import os

import numpy as np
import pytest

import evaluate
import metrics.fid as fid
import training.fid as train_fid
from conftest import TINY_TRAIN, load, make_image_folder
from data.process_cifar import load_dataset
from tiny_extractor import TINY, registered_tiny_extractor  # noqa: F401 (an autouse fixture)
from test_train import run, scalars


@pytest.fixture
def tiny_inception(monkeypatch, tmp_path):
    """train_fid's Inception replaced by the stand-in; statistics cached under tmp_path."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setattr(train_fid, 'load_feature_extractor',
                        lambda name, weights, device, cache_dir=None: fid.load_feature_extractor(TINY))


def test_fid_every_epoch_logs_and_keeps_the_best(tmp_path, tiny_inception, capsys):
    folder = make_image_folder(tmp_path / 'images', 16)
    options = dict(fid_every=1, fid_samples=20, fid_steps=2, seed=3, amp='fp32')   # fp32: layouts agree closely
    _, ckpt_dir, log_dir = run(tmp_path, folder, num_epochs=3, **options)
    _, fids = scalars(os.path.join(log_dir, 'run'), 'eval/fid')
    assert len(fids) == 3 and all(np.isfinite(fids)) and len(set(fids)) == 3   # the EMA model changes
    out = capsys.readouterr().out
    assert out.count('FID ') == 3 and 'best' in out

    best = load(os.path.join(ckpt_dir, 'ddpm_best_fid.pth'))
    record = best['fid']
    assert record['fid'] == pytest.approx(min(fids), rel=1e-6)   # TensorBoard keeps float32
    assert record['epoch'] == 1 + int(np.argmin(fids))
    assert record['step'] == 2 * record['epoch'] and best['step'] == record['step']   # 2 steps an epoch
    assert record['num_samples'] == 20 and record['sampler'] == 'ddim' and record['steps'] == 2

    # evaluate.py, from the saved EMA weights and the training images as an .npz, measures the same FID.
    ref = tmp_path / 'train.npz'
    np.savez(ref, load_dataset('folder', folder, image_size=TINY_TRAIN['image_size']).permute(0, 2, 3, 1).numpy())
    assert evaluate.main(['--checkpoint', os.path.join(ckpt_dir, 'ddpm_best_fid.pth'), '--fid', '--num_samples', '20',
                          '--batch_size', '20', '--sampler', 'ddim', '--steps', '2', '--seed', '3', '--ref', str(ref),
                          '--feature_extractor', TINY, '--cache_dir', str(tmp_path / 'c'), '--device', 'cpu',
                          '--amp', 'fp32', '--quiet']) == 0
    (entry,) = evaluate.read_json(str(tmp_path / 'run' / 'ckpt' / 'ddpm_best_fid.eval.json')).values()
    assert entry['results']['fid'] == pytest.approx(record['fid'], rel=1e-6)


def test_resumed_run_keeps_a_better_earlier_best(tmp_path, tiny_inception, monkeypatch):
    folder = make_image_folder(tmp_path / 'images', 16)
    options = dict(fid_every=1, fid_samples=20, fid_steps=2)
    _, ckpt_dir, _ = run(tmp_path, folder, num_epochs=1, **options)
    path = os.path.join(ckpt_dir, 'ddpm_best_fid.pth')
    first = load(path)['fid']['fid']
    monitor_best = []
    real = train_fid.FIDDuringTraining._previous_best
    monkeypatch.setattr(train_fid.FIDDuringTraining, '_previous_best',
                        lambda self: monitor_best.append(real(self)) or monitor_best[-1])
    run(tmp_path, folder, num_epochs=2, resume='latest', **options)
    assert monitor_best == [first]           # the resumed run starts from the recorded best ...
    assert load(path)['fid']['fid'] <= first  # ... and replaces it only with a better one


def test_off_by_default_with_a_hint_and_missing_weights_fail_before_training(tmp_path, capsys):
    folder = make_image_folder(tmp_path / 'images', 8)
    run(tmp_path, folder, name='off', num_epochs=1)
    out = capsys.readouterr().out
    assert train_fid.OFF_HINT in out and '--fid_every' in train_fid.OFF_HINT
    assert not os.path.exists(tmp_path / 'off' / 'ckpt' / 'ddpm_best_fid.pth')
    with pytest.raises(ValueError, match='weights not found'):
        run(tmp_path, folder, name='missing', num_epochs=1, fid_every=1, fid_weights=str(tmp_path / 'nope.pt'))
    assert not os.path.exists(tmp_path / 'missing' / 'ckpt' / 'ddpm_latest.pth')
    for bad in (dict(fid_every=-1), dict(fid_every=1, fid_samples=1), dict(fid_every=1, fid_steps=5000),
                dict(fid_every=1, fid_sampler='euler')):
        with pytest.raises(ValueError, match='fid_'):
            run(tmp_path, folder, name='bad', **bad)
