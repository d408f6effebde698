"""runtime.py: the precision choice for each kind of device, and the one device check every script uses."""
import pytest
import torch

import evaluate
import runtime
import sample
import train

CUDA, CPU = torch.device('cuda'), torch.device('cpu')


@pytest.mark.parametrize('bf16_supported, expected', [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda_asks_whether_the_gpu_has_bf16(monkeypatch, bf16_supported, expected):
    """A T4 or V100 (no bf16) gets fp16, for which train.py turns on its GradScaler; Ampere and newer get bf16."""
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16_supported)
    assert runtime.amp_dtype('auto', CUDA) is expected


@pytest.mark.parametrize('native, expected', [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_is_bf16_only_with_native_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: native)
    assert runtime.amp_dtype('auto', CPU) is expected


@pytest.mark.parametrize('device', [CPU, CUDA])
def test_explicit_choices_are_obeyed(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    monkeypatch.setattr(runtime, 'cpu_has_native_bf16', lambda: True)
    assert runtime.amp_dtype('bf16', device) is torch.bfloat16
    assert runtime.amp_dtype('fp16', device) is torch.float16
    assert runtime.amp_dtype('fp32', device) is None
    assert runtime.amp_dtype('auto', torch.device('mps')) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message of a machine without CUDA')
@pytest.mark.parametrize('script', ['train', 'sample', 'evaluate'])
def test_cuda_asked_for_without_a_gpu_is_one_line_in_every_script(script, tmp_path, capsys):
    """All three scripts check the device the same way (runtime.resolve_device), before any other work."""
    ckpt = str(tmp_path / 'missing.pth')
    args = {'train': ['--device', 'cuda', '--dataset', 'synthetic', '--num_epochs', '1'],
            'sample': ['--checkpoint', ckpt, '--device', 'cuda'],
            'evaluate': ['--checkpoint', ckpt, '--bpd', '--device', 'cuda']}[script]
    open(ckpt, 'wb').close()
    module = {'train': train, 'sample': sample, 'evaluate': evaluate}[script]
    try:
        code = module.main(args)
    except SystemExit as e:   # train.py's CLI exits through argparse's parser.exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count('\n') == 1 and 'CUDA is not available' in err and '--device cpu' in err, err
