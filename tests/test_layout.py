"""The module map: imports run one way (data and model at the bottom, scripts on top), and names that
moved out of diffusion.py still import from there, with a warning that names their new home."""
import ast
import os
import warnings

import pytest

from conftest import ROOT

# What each of our modules may import of ours. Anything not listed is a new arrow and needs a decision.
ALLOWED = {
    'model.Blocks': set(),
    'runtime': set(),
    'data.image_folder': {'runtime'},
    'data.process_cifar': {'data.image_folder'},
    'samplers': set(),
    'guidance': {'runtime'},
    'losses': set(),
    'schedule': set(),
    'diffusion': {'model.Blocks', 'guidance', 'losses', 'samplers', 'schedule', 'checkpoint'},   # checkpoint: only inside DDPM.from_checkpoint
    'checkpoint': {'diffusion', 'runtime', 'diffusers_io'},   # diffusers_io: only inside load_checkpoint
    'diffusers_io': {'checkpoint', 'diffusion', 'model.Blocks', 'runtime'},
    'sample_store': {'data.image_folder', 'runtime', 'samplers'},   # samplers: each one's clipping default
    'timestep_sampler': set(),
    'train_reports': {'checkpoint', 'guidance', 'runtime'},
    'train_util': {'checkpoint', 'data.process_cifar', 'diffusion', 'guidance', 'runtime', 'timestep_sampler',
                   'train_fid', 'train_reports'},
    'inception': set(),
    'fid': {'data.image_folder', 'data.process_cifar', 'inception', 'runtime'},
    'train_fid': {'checkpoint', 'fid', 'sample'},
    'train': {'checkpoint', 'diffusion', 'runtime', 'samplers', 'train_util'},
    'sample': {'checkpoint', 'data.image_folder', 'data.process_cifar', 'guidance', 'runtime', 'sample_store',
               'samplers'},
    'evaluate': {'checkpoint', 'data.process_cifar', 'fid', 'inception', 'runtime', 'sample', 'samplers'},
    'convert': {'checkpoint', 'diffusers_io', 'runtime'},
    'training.ablations': {'fid'},
    'metrics.rate_distortion': set(),
    'paper': {'checkpoint', 'data.process_cifar', 'evaluate', 'metrics.rate_distortion', 'runtime', 'sample',
              'samplers', 'train', 'training.ablations'},
}
OURS = set(ALLOWED) | {'data', 'model', 'training', 'metrics'}


def imports_of(module):
    """The modules of ours that `module` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(os.path.join(ROOT, module.replace('.', os.sep) + '.py')).read())
    found = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found.update(n for n in names if n in OURS)
    return found


@pytest.mark.parametrize('module', sorted(ALLOWED))
def test_imports_run_one_way(module):
    extra = imports_of(module) - ALLOWED[module]
    assert not extra, f'{module} imports {sorted(extra)}, against the layout in README.md'


def test_evaluate_uses_only_the_library_part_of_sample():
    """evaluate.py may reuse sample.py's sampling functions, never its command line."""
    tree = ast.parse(open(os.path.join(ROOT, 'evaluate.py')).read())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == 'sample'
             for a in node.names}
    assert names <= {'batch_seed', 'resolve_steps', 'sample_checkpoint'}, names


@pytest.mark.parametrize('name, home', [('load_checkpoint', 'checkpoint'), ('save_checkpoint', 'checkpoint'),
                                        ('CheckpointError', 'checkpoint'), ('resolve_device', 'runtime'),
                                        ('atomic_write', 'runtime'), ('amp_dtype', 'runtime')])
def test_moved_names_still_import_from_diffusion(name, home):
    import importlib

    import diffusion
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        value = getattr(diffusion, name)
    assert value is getattr(importlib.import_module(home), name)
    assert any(f'{home}.{name}' in str(w.message) for w in caught)


def test_unknown_names_are_still_attribute_errors():
    import diffusion
    with pytest.raises(AttributeError):
        diffusion.no_such_name
