"""One-second environment check: `python test_imports.py`.

Imports every dependency, prints its version and the device training would
pick, and exits non-zero with one line per missing package.
"""

import importlib
import platform
import sys

# (import name, pip name, what it is for)
DEPENDENCIES = [
    ('torch', 'torch', 'the model and training'),
    ('torchvision', 'torchvision', 'CIFAR-10 download and image grids'),
    ('numpy', 'numpy', 'arrays and .npz sample files'),
    ('PIL', 'pillow', 'reading image folders, writing PNGs'),
    ('tqdm', 'tqdm', 'progress bars'),
    ('tensorboard', 'tensorboard', 'training logs'),
    ('scipy', 'scipy', 'the Frechet distance in evaluate.py'),
    ('torch_fidelity', 'torch-fidelity', 'FID / IS in evaluate.py'),
    ('safetensors', 'safetensors', 'diffusers folders (weights/diffusers_format.py, convert.py)'),
]


def main():
    print(f'python       {platform.python_version()} ({sys.executable})')
    missing = []
    for module, pip_name, purpose in DEPENDENCIES:
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken binary raising something else
            missing.append(f'{pip_name} ({purpose}): {type(e).__name__}: {e}')
            continue
        print(f'{pip_name:<12} {getattr(mod, "__version__", "?")}')
    if missing:
        for line in missing:
            print(f'MISSING {line}', file=sys.stderr)
        print('fix: pip install -r requirements.txt', file=sys.stderr)
        return 1

    import torch
    # The repo's own modules must import too (the entry points import the whole library); train.py decides the device.
    for module in ('diffusion', 'train', 'sample', 'evaluate', 'convert'):
        importlib.import_module(module)
    from runtime import resolve_device
    device = resolve_device(None).type
    detail = f' ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s))' if device == 'cuda' else ''
    print(f'device       {device}{detail}   (what python train.py would use)')
    print(f'threads      {torch.get_num_threads()}')
    print('ok')
    return 0


if __name__ == '__main__':
    sys.exit(main())
