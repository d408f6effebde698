"""training/config.py: the frozen TrainConfig, the keywords and flags generated from it, names borrowed
from other repos, and output folders checked before anything is created."""
import dataclasses
import inspect
import os

import pytest

import train
from train import train_ddpm
from training.config import ALIASES, DEFAULTS, FIELDS, OPTIONS, TrainConfig, batch_split, suggestion
from conftest import TINY_TRAIN


def test_config_is_frozen_and_replace_validates_again():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(ValueError, match='lr must be positive and finite, got 0'):
        dataclasses.replace(config, lr=0)
    assert TrainConfig(channels=[16, 32]).channels == (16, 32)   # lists from JSON / argparse: stored as tuples


def test_train_ddpm_shows_every_field_as_a_keyword_with_its_default():
    params = inspect.signature(train_ddpm).parameters
    assert tuple(params) == OPTIONS and len(OPTIONS) == 51   # 49 + prediction, min_snr_gamma (issue 25)
    assert {name: p.default for name, p in params.items()} == DEFAULTS
    assert DEFAULTS['lr'] == 2e-4 and DEFAULTS['batch_size'] == 128 and DEFAULTS['ema_decay'] == 0.9999


def test_help_lists_every_option_with_its_line_of_help():
    text = ' '.join(train.build_parser().format_help().split())   # argparse wraps lines
    for f in FIELDS:
        assert f'--{f.name}' in text
        assert ' '.join(f.metadata['help'].split()[:4]) in text, f.name


def test_batch_is_divided_in_one_place():
    assert batch_split(TrainConfig(batch_size=128, accum_steps=2), 4) == (32, 16)
    with pytest.raises(ValueError, match=r'batch_size=12 must be divisible by world_size x accum_steps = 1 x 8'):
        batch_split(TrainConfig(batch_size=12, accum_steps=8), 1)


# ----- names users bring from other repos (issue 22, item 4) -------------------------------------------

BORROWED = {'learning_rate': 'lr', 'epochs': 'num_epochs', 'n_epochs': 'num_epochs', 'bs': 'batch_size',
            'lr_warmup_steps': 'warmup_steps', 'ema': 'ema_decay', 'batchsize': 'batch_size'}


def test_every_alias_points_at_a_real_option():
    assert all(target in OPTIONS for target in ALIASES.values())
    assert not set(ALIASES) & set(OPTIONS)


@pytest.mark.parametrize('name, meant', sorted(BORROWED.items()))
def test_borrowed_names_get_a_suggestion_in_python(name, meant):
    assert suggestion(name) == meant
    with pytest.raises(ValueError, match=f"unknown option '{name}' \\(did you mean '{meant}'\\?\\); valid options: "):
        train_ddpm(**{name: 1})


@pytest.mark.parametrize('flag, meant', [('--learning_rate', 'lr'), ('--epochs=3', 'num_epochs'),
                                         ('--bs', 'batch_size'), ('--lr_warmup_steps', 'warmup_steps')])
def test_borrowed_flags_get_a_suggestion_and_create_nothing(tmp_path, monkeypatch, capsys, flag, meant):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        train.main([flag, '3', '--device', 'cpu', '--dataset', 'synthetic'])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: unknown option {flag.split("=")[0]} '
                                                   f'(did you mean --{meant}?); valid options: --num_epochs'), err
    assert os.listdir(tmp_path) == []


# ----- output folders (issue 22, item 3) ---------------------------------------------------------------

def unwritable_dirs(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    cases = [(str(a_file / 'ckpt'), 'cannot be created'), (str(a_file), 'is a file, not a folder')]
    if os.path.isdir('/proc'):   # the case the issue found: even root cannot make folders in /proc
        cases.append(('/proc/nope', 'cannot be created'))
    return cases


@pytest.mark.parametrize('key', ['checkpoint_dir', 'log_dir'])
def test_unwritable_output_folder_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys, key):
    monkeypatch.chdir(tmp_path)
    for path, message in unwritable_dirs(tmp_path):
        flags = {'checkpoint_dir': str(tmp_path / 'ckpt'), 'log_dir': str(tmp_path / 'runs'), key: path}
        argv = [f'--{k}={v}' for k, v in flags.items()]
        with pytest.raises(SystemExit) as info:
            train.main(argv + ['--device', 'cpu', '--dataset', 'synthetic', '--num_epochs', '1'])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(f'error: {key}={path!r} {message}'), err
        assert f'--{key}' in err
        assert sorted(os.listdir(tmp_path)) == ['a_file'], 'nothing is created for a run that cannot start'


def test_runs_config_is_the_one_it_was_given(tmp_path):
    """The stored record is the config's fields as plain types, in order, with the resolved run name."""
    from conftest import load
    kwargs = {**TINY_TRAIN, 'dataset': 'synthetic', 'max_steps': 1, 'checkpoint_dir': str(tmp_path / 'c'),
              'log_dir': str(tmp_path / 'r')}
    train_ddpm(**kwargs)
    stored = load(tmp_path / 'c' / 'ddpm_latest.pth')['config']
    assert list(stored) == list(OPTIONS)
    expected = {**TrainConfig(**kwargs).to_dict(), 'run_name': stored['run_name']}
    assert stored == expected and stored['run_name'].startswith('ddpm_')
