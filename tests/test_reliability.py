"""Reliability and security: bad options, bad data paths, bad checkpoints, devices, crashes,
signals, NaN losses and malicious pickles. Every failure must be one clear line, never
silent damage: the CLI prints `error: <message>` with exit code 2 and no traceback.

Tiny U-Nets on 16x16 images, one CPU thread; subprocesses only where a real process
is the point (exit codes, signals, kill -9).
"""
import ast
import concurrent.futures
import errno
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error

import numpy as np
import pytest
import torch

import train
import training.loop as train_util
from diffusion import DDPM, create_cifar10_ddpm
from train import train_ddpm
from weights.checkpoint import CheckpointError, clean_state_dict, load_checkpoint, load_model_state, save_checkpoint
from conftest import ROOT, TINY_TRAIN, TRAIN_SIZE, assert_same_tensors, load, make_image_folder

SIZE, TINY = TRAIN_SIZE, TINY_TRAIN
TINY_FLAGS = ['--device', 'cpu', '--channels', '16', '32', '--num_res_blocks', '1', '--attn_resolutions', '8',
              '--time_emb_dim', '32', '--image_size', str(SIZE), '--batch_size', '8', '--lr', '0.001',
              '--warmup_steps', '2', '--save_every', '1000', '--sample_every', '1000', '--num_samples', '0',
              '--log_every', '1']
MODEL_OPTIONS = dict(channels=(16, 32), num_res_blocks=1, attn_resolutions=(8,), time_emb_dim=32, image_size=SIZE)
CUDA = torch.cuda.is_available()


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


class Payload:
    """Unpickling this calls `func(*args)`: the classic pickle code-execution attack."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture(scope='module')
def env(tmp_path_factory, one_thread):
    """A 16-image folder, a real 2-step checkpoint (channels 16 32) and a zoo of broken and hostile files."""
    d = tmp_path_factory.mktemp('reliability')
    images = make_image_folder(d / 'images', 16)
    ckpt_dir = d / 'base_ckpt'
    train_ddpm(**TINY, dataset='folder', data_dir=images, num_epochs=1, checkpoint_dir=str(ckpt_dir),
               log_dir=str(d / 'runs'), run_name='base')
    ckpt = str(ckpt_dir / 'ddpm_latest.pth')
    data = open(ckpt, 'rb').read()
    f = {'images': images, 'ckpt': ckpt, 'ckpt_dir': str(ckpt_dir), 'root': str(d),
         'missing_dir': str(d / 'no_such_folder'), 'empty_dir': str(d / 'empty'), 'missing': str(d / 'nope.pth'),
         'marker': str(d / 'PAYLOAD_RAN')}
    os.makedirs(f['empty_dir'])
    os.makedirs(d / 'empty_cifar')
    f['empty_cifar'] = str(d / 'empty_cifar')

    def write(name, content):
        f[name] = str(d / f'{name}.pth')
        with open(f[name], 'wb') as out:
            out.write(content)
    write('empty', b'')
    write('truncated', data[:len(data) // 2])
    write('text', b'hello, I am a text file, not a checkpoint\n')
    write('pickled_list', pickle.dumps([1, 2, 3], protocol=2))
    write('pickled_list4', pickle.dumps([1, 2, 3], protocol=4))
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    write('saved_list', buf.getvalue())
    full = load(ckpt)
    buf = io.BytesIO()
    torch.save(full['ema_state_dict'], buf)
    write('raw_state_dict', buf.getvalue())
    # Hostile files: unpickling would create the marker file (open(marker, 'w')) or run a shell command.
    touch, shell = Payload(open, f['marker'], 'w'), Payload(os.system, f'touch {f["marker"]}')
    evil = {**full, 'model_state_dict': touch}
    buf = io.BytesIO()
    torch.save(evil, buf)
    write('evil_torch_save', buf.getvalue())
    buf = io.BytesIO()
    torch.save({'model_state_dict': full['model_state_dict'], 'config': shell}, buf)
    write('evil_shell', buf.getvalue())
    for protocol in (0, 2, 4):
        write(f'evil_pickle{protocol}', pickle.dumps(evil, protocol=protocol))
    f['evil'] = [k for k in f if k.startswith('evil')]
    yield f
    assert not os.path.exists(f['marker']), 'a malicious pickle ran its payload'


def run(env, tmp, name='run', **overrides):
    ckpt_dir, log_dir = os.path.join(tmp, name, 'ckpt'), os.path.join(tmp, name, 'runs')
    kwargs = {**TINY, 'dataset': 'folder', 'data_dir': env['images'], 'checkpoint_dir': ckpt_dir,
              'log_dir': log_dir, 'run_name': name, **overrides}
    return train_ddpm(**kwargs), ckpt_dir


def copy_base(env, tmp):
    """A fresh copy of the 2-step checkpoint dir, to resume from or damage."""
    ckpt_dir = os.path.join(tmp, 'ckpt')
    shutil.copytree(env['ckpt_dir'], ckpt_dir)
    return ckpt_dir


# ----- options --------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    ({'lrr': 1}, "unknown option 'lrr' (did you mean 'lr'?); valid options: ['num_epochs'"),
    ({'batch_sise': 8}, "unknown option 'batch_sise' (did you mean 'batch_size'?)"),
    ({'batch_size': 0}, 'batch_size must be a positive integer, got 0'),
    ({'batch_size': -8}, 'batch_size must be a positive integer, got -8'),
    ({'lr': 0}, 'lr must be positive and finite, got 0'),
    ({'lr': -1e-4}, 'lr must be positive and finite, got -0.0001'),
    ({'lr': float('nan')}, 'lr must be positive and finite, got nan'),
    ({'lr': float('inf')}, 'lr must be positive and finite, got inf'),
    ({'sample_steps': 0}, 'sample_steps must be a positive integer, got 0'),
    ({'sample_steps': 2000}, 'sample_steps=2000 must not exceed timesteps=1000'),
    ({'num_epochs': 0}, 'num_epochs must be a positive integer, got 0'),
    ({'image_size': 18, 'channels': (16, 32, 64)},
     'image_size=18 must be divisible by 2**2 (the U-Net halves it 2 times for channels=(16, 32, 64))'),
    ({'batch_size': 64}, 'batch_size=64 is larger than the dataset (16 images); lower batch_size'),
    pytest.param({'device': 'cuda'}, "device='cuda' was asked for but CUDA is not available",
                 marks=pytest.mark.skipif(CUDA, reason='CUDA is available here')),
])
def test_bad_options_raise_value_error_in_python(env, tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        run(env, tmp_path, **{'num_epochs': 1, **kwargs})
    assert message in str(info.value)
    assert not os.path.exists(tmp_path / 'run' / 'ckpt'), 'nothing is written for a run that cannot start'


# Command-line cases: (id, extra flags, the message after 'error: '). Flags may name env's files.
CLI_CASES = [
    ('unknown-option', ['--lrr', '1'], 'unknown option --lrr (did you mean --lr?); valid options: --num_epochs, '),
    ('unknown-abbreviation', ['--num_ep', '1'], 'unknown option --num_ep (did you mean --num_epochs?)'),
    ('batch-size-0', ['--batch_size', '0'], 'batch_size must be a positive integer, got 0'),
    ('lr-0', ['--lr', '0'], 'lr must be positive and finite, got 0.0'),
    ('bad-value', ['--lr', 'abc'], "argument --lr: invalid float value: 'abc' (see --help)"),
    ('missing-value', ['--channels'], 'argument --channels: expected at least one argument (see --help)'),
    ('epochs-0', ['--num_epochs', '0'], 'num_epochs must be a positive integer, got 0'),
    ('image-size', ['--image_size', '18', '--channels', '16', '32', '64'], 'image_size=18 must be divisible by 2**2'),
    ('batch-larger-than-data', ['--batch_size', '64'], 'batch_size=64 is larger than the dataset (16 images)'),
    ('cuda-missing', ['--device', 'cuda'], "device='cuda' was asked for but CUDA is not available to this PyTorch; "
                                           "use --device cpu"),
    ('folder-missing', ['--data_dir', '{missing_dir}'], 'image folder not found: {missing_dir}'),
    ('folder-empty', ['--data_dir', '{empty_dir}'], 'no image files (.jpg, .jpeg, .png'),
    ('cifar10-no-network', ['--dataset', 'cifar10', '--data_dir', '{empty_cifar}', '--image_size', '32',
                            '--attn_resolutions', '16'],   # the tiny net's 8 is not reached at 32 px
     "CIFAR-10 is not in {empty_cifar} and could not be downloaded"),
    ('resume-missing', ['--resume', '{missing}'], 'resume checkpoint not found: {missing}'),
    ('resume-empty', ['--resume', '{empty}'], 'checkpoint {empty} is empty (0 bytes)'),
    ('resume-truncated', ['--resume', '{truncated}'], 'cannot load checkpoint {truncated}: the file is truncated or '
                                                      'corrupted'),
    ('resume-text', ['--resume', '{text}'], 'cannot load checkpoint {text}: it is not a file written by torch.save'),
    ('resume-pickled-list', ['--resume', '{pickled_list}'], 'it is not a file written by torch.save'),
    ('resume-saved-list', ['--resume', '{saved_list}'], '{saved_list} is not a checkpoint (it holds a list'),
    ('resume-raw-state-dict', ['--resume', '{raw_state_dict}'], '{raw_state_dict} holds weights only'),
    ('resume-other-arch', ['--resume', '{ckpt}', '--channels', '32', '64'],
     'the resume checkpoint was trained with a different model config (channels: checkpoint [16, 32], '
     'requested [32, 64]); drop those options'),
    ('resume-evil', ['--resume', '{evil_torch_save}'], 'it asks to import io.open'),
]
# The ones also run as real processes (each costs a Python + torch start-up).
SUBPROCESS_CASES = ('unknown-option', 'cuda-missing', 'cifar10-no-network', 'resume-other-arch')


def cli_args(env, tmp, flags):
    base = TINY_FLAGS + ['--dataset', 'folder', '--data_dir', env['images'], '--num_epochs', '1',
                         '--checkpoint_dir', os.path.join(tmp, 'ckpt'), '--log_dir', os.path.join(tmp, 'runs')]
    return base + [a.format(**env) for a in flags]


def no_network(*args, **kwargs):
    raise urllib.error.URLError('[Errno -2] Name or service not known')


def check_error_output(stderr, message):
    lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and lines[0] == stderr.rstrip('\n').splitlines()[-1], stderr[-2000:]
    assert message in lines[0], (message, lines[0])
    assert 'Traceback' not in stderr


@pytest.mark.parametrize('flags, message', [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_errors_in_process(env, tmp_path, capsys, monkeypatch, flags, message):
    """train.main(argv): one `error: ...` line, exit code 2, nothing written."""
    if CUDA and '--device' in flags:
        pytest.skip('CUDA is available here')
    import torchvision.datasets.cifar as cifar
    monkeypatch.setattr(cifar, 'download_and_extract_archive', no_network)
    with pytest.raises(SystemExit) as info:
        train.main(cli_args(env, str(tmp_path), flags))
    assert info.value.code == 2
    check_error_output(capsys.readouterr().err, message.format(**env))
    assert not os.path.exists(tmp_path / 'ckpt')


def test_debug_flag_shows_the_real_exception(env, tmp_path):
    with pytest.raises(ValueError, match='lr must be positive and finite, got 0.0'):
        train.main(cli_args(env, str(tmp_path), ['--lr', '0', '--debug']))


def cli(script, args, extra_env=None, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(extra_env or {}))
    return subprocess.run([sys.executable, script] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_and_hostile_checkpoints_in_real_processes(env, tmp_path):
    """Real processes: exit code 2, one `error:` line, no traceback; sample.py and evaluate.py refuse a
    malicious checkpoint without running it (the module fixture checks the marker file)."""
    no_net = {k: 'http://127.0.0.1:9' for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY')}
    no_net.update(no_proxy='', NO_PROXY='')  # the download must go to the closed port, and fail at once
    jobs = {}
    cases = {c[0]: c for c in CLI_CASES}
    for name in SUBPROCESS_CASES:
        if CUDA and name == 'cuda-missing':
            continue
        _, flags, message = cases[name]
        jobs[name] = (('train.py', cli_args(env, str(tmp_path / name), flags), no_net), message.format(**env))
    evil = env['evil_torch_save']
    for script, args in (('sample.py', ['--checkpoint', evil, '--device', 'cpu', '--num_samples', '1',
                                        '--out', str(tmp_path / 'x.png')]),
                         ('evaluate.py', ['--checkpoint', evil, '--bpd', '--device', 'cpu'])):
        if os.path.exists(os.path.join(ROOT, script)):
            jobs[script] = ((script, args, None), f'cannot load checkpoint {evil}: it asks to import io.open')
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, *call) for name, (call, _) in jobs.items()}
        results = {name: fut.result() for name, fut in futures.items()}
    for name, proc in results.items():
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        check_error_output(proc.stderr, jobs[name][1])
        assert 'Traceback' not in proc.stdout
    assert not os.path.exists(env['marker'])


# ----- checkpoints ----------------------------------------------------------------------------

BAD_FILES = [  # (file, exception, message)
    ('missing', FileNotFoundError, 'checkpoint not found: {missing}'),
    ('empty', CheckpointError, 'checkpoint {empty} is empty (0 bytes); it was probably cut off while writing'),
    ('truncated', CheckpointError, 'cannot load checkpoint {truncated}: the file is truncated or corrupted'),
    ('text', CheckpointError, 'cannot load checkpoint {text}: it is not a file written by torch.save'),
    ('pickled_list', CheckpointError, 'it is not a file written by torch.save'),
    ('pickled_list4', CheckpointError, 'it is not a file written by torch.save'),
    ('saved_list', CheckpointError, '{saved_list} is not a checkpoint (it holds a list, not a dict)'),
]


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('name, exc, message', BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_checkpoint_files_fail_clearly_everywhere(env, tmp_path, name, exc, message):
    """load_checkpoint, DDPM.from_checkpoint and train resume all give the same one-line reason."""
    path, message = env[name], message.format(**env)
    for load_it in (lambda: load_checkpoint(path), lambda: DDPM.from_checkpoint(path)):
        with pytest.raises(exc) as info:
            load_it()
        assert message in str(info.value) and '\n' not in str(info.value)
    with pytest.raises(exc) as info:
        run(env, tmp_path, num_epochs=2, resume=path)
    if name == 'missing':
        message = f'resume checkpoint not found: {path}'
    assert message in str(info.value)


def test_resume_with_a_different_model_config_names_the_keys(env, tmp_path):
    with pytest.raises(CheckpointError) as info:
        run(env, tmp_path, num_epochs=2, resume=env['ckpt'], channels=(32, 64), num_heads=2)
    assert 'different model config (channels: checkpoint [16, 32], requested [32, 64]; num_heads: checkpoint ' \
           'None, requested 2)' in str(info.value)
    model = create_cifar10_ddpm(**{**MODEL_OPTIONS, 'channels': (32, 64)})
    with pytest.raises(CheckpointError, match=r"does not match this model's architecture: .*wrong shape"):
        load_model_state(model, load(env['ckpt'])['model_state_dict'], source=env['ckpt'])


def test_raw_state_dict_is_accepted_by_from_checkpoint(env, tmp_path):
    """A bare state_dict (no config) loads when the model options are given; without them the error says so."""
    expected = load(env['ckpt'])['ema_state_dict']
    model = DDPM.from_checkpoint(env['raw_state_dict'], **MODEL_OPTIONS)
    assert_same_tensors(model.state_dict(), expected, 'raw state_dict')
    bare_unet = str(tmp_path / 'unet.pth')  # the network's own state_dict, without the 'network.' prefix
    torch.save({k[len('network.'):]: v for k, v in expected.items()}, bare_unet)
    assert_same_tensors(DDPM.from_checkpoint(bare_unet, **MODEL_OPTIONS).state_dict(), expected, 'bare UNet')
    with pytest.raises(CheckpointError, match="carries no config .a bare state_dict., so it was matched against the "
                                              "default 'base' model; pass the options it was trained with"):
        DDPM.from_checkpoint(env['raw_state_dict'])
    with pytest.raises(ValueError, match="unknown model option 'chanels' \\(did you mean 'channels'\\?\\)"):
        DDPM.from_checkpoint(env['raw_state_dict'], chanels=(16, 32))


@pytest.fixture(scope='module')
def resumed_reference(env, tmp_path_factory):
    """The base checkpoint resumed for one step: what a prefixed copy must reproduce."""
    tmp = tmp_path_factory.mktemp('resumed_reference')
    _, ckpt_dir = run(env, tmp, num_epochs=2, max_steps=3, resume=env['ckpt'])
    return load(os.path.join(ckpt_dir, 'ddpm_latest.pth'))


@pytest.mark.parametrize('prefix', ['_orig_mod.', 'module.', 'module._orig_mod.'],
                         ids=['torch.compile', 'DDP', 'DDP+compile'])
def test_compiled_or_ddp_checkpoints_load_and_resume(env, tmp_path, resumed_reference, prefix):
    ckpt = load(env['ckpt'])
    for key in ('model_state_dict', 'ema_state_dict'):
        ckpt[key] = {prefix + k: v for k, v in ckpt[key].items()}
    path = str(tmp_path / 'prefixed.pth')
    torch.save(ckpt, path)
    assert_same_tensors(DDPM.from_checkpoint(path).state_dict(), load(env['ckpt'])['ema_state_dict'], prefix)
    _, ckpt_dir = run(env, tmp_path, num_epochs=2, max_steps=3, resume=path)
    resumed = load(os.path.join(ckpt_dir, 'ddpm_latest.pth'))
    assert_same_tensors(resumed['model_state_dict'], resumed_reference['model_state_dict'], 'resumed weights')
    assert_same_tensors(resumed['ema_state_dict'], resumed_reference['ema_state_dict'], 'resumed EMA')


def test_clean_state_dict_strips_only_whole_wrapper_names():
    x = torch.zeros(1)
    cleaned = clean_state_dict({'module._orig_mod.network.conv_in.weight': x, 'network._orig_mod.conv_out.bias': x,
                                'network.submodule.weight': x, 'network.down.0.res.0.conv1.weight': x})
    assert list(cleaned) == ['network.conv_in.weight', 'network.conv_out.bias', 'network.submodule.weight',
                             'network.down.0.res.0.conv1.weight']
    assert list(clean_state_dict({'conv_in.weight': x})) == ['network.conv_in.weight']  # a bare UNet's


# ----- device and memory ----------------------------------------------------------------------

def test_out_of_memory_says_lower_the_batch_size(env, tmp_path, capsys, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(DDPM, 'loss', oom)
    with pytest.raises(SystemExit) as info:
        train.main(cli_args(env, str(tmp_path), []))
    assert info.value.code == 2
    check_error_output(capsys.readouterr().err, 'error: out of GPU memory at batch_size=8; lower --batch_size '
                                                '(or keep it and raise --accum_steps)')


# ----- crashes while saving ---------------------------------------------------------------------

def half_write_then(exc, fail_on_call):
    """A torch.save that writes half the bytes and raises on its fail_on_call-th call (1-based)."""
    real_save, calls = torch.save, []

    def fake_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) != fail_on_call:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()[:len(buf.getvalue()) // 2]
        if hasattr(f, 'write'):
            f.write(data)
        else:
            with open(f, 'wb') as out:
                out.write(data)
        raise exc
    return fake_save


@pytest.mark.parametrize('fail_on_call', [1, 2], ids=['epoch-file', 'latest-file'])
def test_crash_during_save_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch, fail_on_call):
    """Saves at epoch 2 write ddpm_epoch_2.pth, then ddpm_latest.pth; a crash in either leaves the old
    latest (step 2) intact and loadable, and no temp file behind."""
    ckpt_dir = copy_base(env, tmp_path)
    before = open(os.path.join(ckpt_dir, 'ddpm_latest.pth'), 'rb').read()
    monkeypatch.setattr(torch, 'save', half_write_then(RuntimeError('simulated crash'), fail_on_call))
    with pytest.raises(RuntimeError, match='simulated crash'):
        train_ddpm(**{**TINY, 'dataset': 'folder', 'data_dir': env['images'], 'num_epochs': 2, 'save_every': 1,
                      'checkpoint_dir': ckpt_dir, 'log_dir': str(tmp_path / 'runs'), 'resume': 'latest'})
    monkeypatch.undo()
    assert open(os.path.join(ckpt_dir, 'ddpm_latest.pth'), 'rb').read() == before
    assert load_checkpoint(os.path.join(ckpt_dir, 'ddpm_latest.pth'))['step'] == 2
    expected = ['ddpm_latest.pth'] if fail_on_call == 1 else ['ddpm_epoch_2.pth', 'ddpm_latest.pth']
    assert sorted(os.listdir(ckpt_dir)) == expected  # no .tmp left behind
    if fail_on_call == 2:
        assert load_checkpoint(os.path.join(ckpt_dir, 'ddpm_epoch_2.pth'))['step'] == 4


def test_full_disk_during_save_is_a_clear_error_and_keeps_the_old_file(env, tmp_path, monkeypatch, capsys):
    ckpt_dir = copy_base(env, tmp_path)
    before = open(os.path.join(ckpt_dir, 'ddpm_latest.pth'), 'rb').read()
    monkeypatch.setattr(torch, 'save', half_write_then(OSError(errno.ENOSPC, 'No space left on device'), 1))
    argv = cli_args(env, str(tmp_path), ['--num_epochs', '2', '--save_every', '1', '--resume', 'latest'])
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    monkeypatch.undo()
    assert info.value.code == 2
    target = os.path.join(ckpt_dir, 'ddpm_epoch_2.pth')
    check_error_output(capsys.readouterr().err, f'error: [Errno 28] could not write checkpoint {target} (No space '
                                                f'left on device); the previous file, if any, is unchanged')
    assert open(os.path.join(ckpt_dir, 'ddpm_latest.pth'), 'rb').read() == before
    assert sorted(os.listdir(ckpt_dir)) == ['ddpm_latest.pth']


def test_save_removes_temp_files_that_a_killed_writer_left(tmp_path):
    path = tmp_path / 'ddpm_latest.pth'
    dead = tmp_path / '.ddpm_latest.pth.tmp999999999'  # above any Linux pid_max: nobody writes it
    alive = tmp_path / f'.ddpm_latest.pth.tmp{os.getppid()}'  # a live process's: left alone
    other = tmp_path / '.ddpm_epoch_1.pth.tmp999999999'  # another target's: not ours to judge here
    for p in (dead, alive, other):
        p.write_bytes(b'half a checkpoint')
    save_checkpoint({'step': 1}, path)
    assert load(path) == {'step': 1}
    assert not dead.exists() and alive.exists() and other.exists()


# ----- signals ----------------------------------------------------------------------------------

def test_sigint_finishes_the_step_saves_and_returns(env, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2: the step completes, ddpm_latest.pth is saved at step 2, the handler is restored."""
    real_loss, calls = DDPM.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(self, *args, **kwargs)
    monkeypatch.setattr(DDPM, 'loss', loss)
    handler_before = signal.getsignal(signal.SIGINT)
    model, ckpt_dir = run(env, tmp_path, num_epochs=10)
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert model.train_stats['stopped_by'] == 'signal' and model.train_stats['step'] == 2
    assert load(os.path.join(ckpt_dir, 'ddpm_latest.pth'))['step'] == 2
    assert (f'stopped by SIGINT at step 2; saved {os.path.join(ckpt_dir, "ddpm_latest.pth")}; continue with '
            f'--resume latest') in capsys.readouterr().out


class Reader(threading.Thread):
    """Collects a pipe's text so the test can wait for a marker without blocking."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.text = pipe, ''
        self.start()

    def run(self):
        for chunk in iter(lambda: self.pipe.read(1), ''):
            self.text += chunk


def wait_for(condition, timeout, what, proc=None):
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f'process ended (rc {proc.returncode}) before {what}')
        if time.time() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.05)


def test_sigterm_then_kill_9_then_resume_matches_an_uninterrupted_run(env, tmp_path):
    """SIGTERM: exit 0, path printed, ddpm_latest.pth at step > 0. `--resume latest` continues; kill -9 of
    that run leaves a loadable checkpoint; resuming from it in Python gives, bit for bit, the weights of
    a run that was never interrupted."""
    ckpt_dir = str(tmp_path / 'ckpt')
    args = TINY_FLAGS + ['--dataset', 'folder', '--data_dir', env['images'], '--num_epochs', '1000',
                         '--checkpoint_dir', ckpt_dir, '--log_dir', str(tmp_path / 'runs'), '--run_name', 'sig']
    # Unbuffered, so lines printed before a kill -9 reach us.
    popen_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')

    # 1. SIGTERM once the training loop (and its signal handler) is running.
    proc = subprocess.Popen([sys.executable, 'train.py'] + args, cwd=ROOT, env=popen_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Reader(proc.stdout), Reader(proc.stderr)
    try:
        wait_for(lambda: 'epoch 1/1000' in err.text, 120, 'the first training step', proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out.join(5)
    err.join(5)
    latest = os.path.join(ckpt_dir, 'ddpm_latest.pth')
    assert proc.returncode == 0, err.text[-3000:]
    stopped_at = load(latest)['step']
    assert stopped_at > 0
    assert f'stopped by SIGTERM at step {stopped_at}; saved {latest}; continue with --resume latest' in out.text
    assert 'Traceback' not in err.text

    # 2. --resume latest continues; kill -9 once it has saved an epoch checkpoint (save_every=1).
    proc = subprocess.Popen([sys.executable, 'train.py'] + args + ['--resume', 'latest', '--save_every', '1'],
                            cwd=ROOT, env=popen_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Reader(proc.stdout)
    try:
        wait_for(lambda: any(n.startswith('ddpm_epoch_') for n in os.listdir(ckpt_dir)), 120,
                 'an epoch checkpoint', proc)
        proc.kill()  # SIGKILL: no handler, no cleanup; possibly in the middle of writing ddpm_latest.pth
        proc.wait(timeout=60)
    finally:
        proc.kill()
    out.join(5)
    assert proc.returncode == -signal.SIGKILL
    assert f'resumed from {latest} at step {stopped_at}' in out.text
    killed_at = load_checkpoint(latest)['step']  # whatever moment the kill hit, latest is a whole checkpoint
    assert killed_at >= stopped_at

    # 3. Resume in Python to 2 steps past the kill, and compare with a straight run of as many steps.
    total = killed_at + 2
    common = {**TINY, 'dataset': 'folder', 'data_dir': env['images'], 'num_epochs': 1000, 'max_steps': total}
    model = train_ddpm(**common, checkpoint_dir=ckpt_dir, log_dir=str(tmp_path / 'runs'), resume='latest')
    assert model.train_stats['step'] == total
    assert not [n for n in os.listdir(ckpt_dir) if '.tmp' in n], 'the killed save left a temp file'
    straight = train_ddpm(**common, checkpoint_dir=str(tmp_path / 'straight'), log_dir=str(tmp_path / 'runs2'))
    resumed, ref = load(latest), load(str(tmp_path / 'straight' / 'ddpm_latest.pth'))
    assert_same_tensors(resumed['model_state_dict'], ref['model_state_dict'], 'weights after SIGTERM + kill -9')
    assert_same_tensors(resumed['ema_state_dict'], ref['ema_state_dict'], 'EMA after SIGTERM + kill -9')
    assert_same_tensors(model.state_dict(), straight.state_dict(), 'returned models')


# ----- NaN / inf losses -------------------------------------------------------------------------

def poison_loss(monkeypatch, bad_calls, how):
    """Make DDPM.loss non-finite on the given (1-based) calls."""
    real_loss, calls = DDPM.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value = real_loss(self, *args, **kwargs)
        if len(calls) in bad_calls:
            return value + float('nan') if how == 'nan' else value * float('inf')
        return value
    monkeypatch.setattr(DDPM, 'loss', loss)


@pytest.mark.parametrize('how', ['nan', 'inf'], ids=['nan-loss-finite-grads', 'inf-loss-nonfinite-grads'])
def test_persistent_nan_stops_after_5_and_keeps_good_weights(env, tmp_path, monkeypatch, how):
    """Good steps 1-2 (saved at epoch 1), then every loss is bad: steps 3-7 are skipped and the run stops.
    `loss + nan` has finite gradients, so only a check of the loss itself catches it."""
    poison_loss(monkeypatch, range(3, 100), how)
    with pytest.raises(FloatingPointError) as info:
        run(env, tmp_path, num_epochs=10, save_every=1)
    ckpt_dir = tmp_path / 'run' / 'ckpt'
    latest = str(ckpt_dir / 'ddpm_latest.pth')
    assert str(info.value) == (f'training stopped: 5 non-finite losses in a row at step 7; the last good '
                               f'checkpoint is kept ({latest}); lower lr or check the data')
    good, last = load(str(ckpt_dir / 'ddpm_epoch_1.pth')), load(latest)
    for key in ('model_state_dict', 'ema_state_dict'):
        assert all_finite(last[key]), key
        assert_same_tensors(last[key], good[key], f'{key}: skipped steps must not change the weights')
    for state in last['optimizer_state_dict']['state'].values():
        assert all_finite(state)
    # Epochs 2 and 3 were still saved (steps 4 and 6, with 2 and 4 skipped steps), with the good weights.
    assert last['step'] == 6 and last['nan_skipped'] == 4


def test_weights_that_became_nan_are_never_saved(env, tmp_path, monkeypatch):
    """A finite-loss update that still leaves NaN in the weights (simulated after step 3): the epoch-2 save
    refuses to write them, and ddpm_latest.pth stays the good epoch-1 checkpoint."""
    real_update, calls = train_util.ema_update, []

    def ema_update(ema_params, params, decay):
        real_update(ema_params, params, decay)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                params[0].fill_(float('nan'))
    monkeypatch.setattr(train_util, 'ema_update', ema_update)
    with pytest.raises(FloatingPointError) as info:
        run(env, tmp_path, num_epochs=10, save_every=1)
    latest = str(tmp_path / 'run' / 'ckpt' / 'ddpm_latest.pth')
    assert str(info.value) == (f'training stopped: the weights became NaN/inf by step 4 and were not saved; the last '
                               f'good checkpoint is kept ({latest}); lower lr or check the data')
    assert load(latest)['step'] == 2 and all_finite(load(latest)['model_state_dict'])
    assert sorted(os.listdir(tmp_path / 'run' / 'ckpt')) == ['ddpm_epoch_1.pth', 'ddpm_latest.pth']


def test_nan_before_any_checkpoint_says_so_on_the_command_line(env, tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, range(1, 100), 'nan')
    with pytest.raises(SystemExit) as info:
        train.main(cli_args(env, str(tmp_path), ['--num_epochs', '10']))
    assert info.value.code == 2
    check_error_output(capsys.readouterr().err, 'error: training stopped: 5 non-finite losses in a row at step 5; '
                                                'no checkpoint had been saved yet; lower lr or check the data')
    assert not os.path.exists(tmp_path / 'ckpt' / 'ddpm_latest.pth')


def test_a_few_nan_steps_are_skipped_and_counted(env, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    poison_loss(monkeypatch, {2, 3}, 'nan')
    model, ckpt_dir = run(env, tmp_path, num_epochs=3)
    assert model.train_stats == {'step': 6, 'nan_skipped': 2, 'scale_skipped': 0, 'stopped_by': None}
    ckpt = load(os.path.join(ckpt_dir, 'ddpm_latest.pth'))
    assert ckpt['nan_skipped'] == 2 and all_finite(ckpt['model_state_dict']) and all_finite(ckpt['ema_state_dict'])
    acc = EventAccumulator(str(tmp_path / 'run' / 'runs' / 'run'))
    acc.Reload()
    logged = acc.Scalars('train/loss')
    assert [e.step for e in logged] == [1, 4, 5, 6]  # the skipped steps 2 and 3 log nothing
    assert all(np.isfinite(e.value) for e in logged)


# ----- security ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
def test_malicious_pickles_are_refused_by_every_loader(env, tmp_path):
    """torch.save'd and plain pickles whose unpickling would run code: refused by load_checkpoint,
    DDPM.from_checkpoint and train resume (sample.py / evaluate.py: the real-process test); the payload
    never runs (the module fixture asserts its marker file never appears)."""
    for name in env['evil']:
        path = env[name]
        for load_it in (lambda: load_checkpoint(path), lambda: DDPM.from_checkpoint(path),
                        lambda: run(env, tmp_path, num_epochs=1, resume=path)):
            with pytest.raises(CheckpointError) as info:
                load_it()
            assert f'cannot load checkpoint {path}: ' in str(info.value), name
            assert not os.path.exists(env['marker']), name
        if name in ('evil_torch_save', 'evil_pickle2'):  # protocols 0 and 4 fail earlier, on an opcode
            assert 'it asks to import io.open' in str(info.value) and 'could run code' in str(info.value)
    assert 'it asks to import posix.system' in str(pytest.raises(CheckpointError, load_checkpoint,
                                                                  env['evil_shell']).value)


def python_files():
    skip = {'.git', '__pycache__', 'node_modules', 'build', 'dist'}
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith('.') and 'venv' not in d
                   and not os.path.exists(os.path.join(root, d, 'pyvenv.cfg'))]
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(root, name)


def test_no_unsafe_loading_or_code_execution_in_the_repo():
    """Every torch.load passes weights_only=True (tests included); outside tests/ there is no eval, exec,
    os.system, os.popen, shell=True, pickle.load(s) or np.load(allow_pickle=True)."""
    problems = []
    for path in python_files():
        rel = os.path.relpath(path, ROOT)
        in_tests = rel.split(os.sep)[0] == 'tests'
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), filename=rel)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, where = node.func, f'{rel}:{node.lineno}'
            name = func.id if isinstance(func, ast.Name) else None
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            attr = func.attr if isinstance(func, ast.Attribute) else None
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner == 'torch' and attr == 'load':
                weights_only = kwargs.get('weights_only')
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f'{where}: torch.load without weights_only=True')
            if in_tests:
                continue
            if name in ('eval', 'exec') or (owner == 'os' and attr in ('system', 'popen')):
                problems.append(f'{where}: {name or owner + "." + attr}(')
            if owner == 'pickle' and attr in ('load', 'loads'):
                problems.append(f'{where}: pickle.{attr}')
            shell = kwargs.get('shell')
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f'{where}: shell=')
            allow = kwargs.get('allow_pickle')
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f'{where}: allow_pickle=')
    assert not problems, '\n'.join(problems)
