"""The module map: no import cycle anywhere (lazy imports inside functions included), no library module
importing an entry-point script, at most 8 .py files at the root, and names that moved still import from
their old module with a warning that names their new home."""
import ast
import importlib
import os
import warnings

import pytest

from conftest import ROOT

ENTRY_POINTS = {'train', 'sample', 'evaluate', 'convert', 'paper', 'test_imports'}
MAX_ROOT_MODULES = 8
NOT_OURS = {'tests', 'bench', 'docs'}   # folders of scripts that are no part of the importable library


def our_modules(root=ROOT):
    """{dotted module name: file path} for the root's .py files and every package (a folder with __init__.py)."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == '.' else rel.split(os.sep)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and not (not parts and d in NOT_OURS))
        if parts and '__init__.py' not in filenames:
            dirnames[:] = []   # not a package: nothing below it is importable as ours
            continue
        for name in filenames:
            if name.endswith('.py'):
                stem = name[:-3]
                dotted = '.'.join(parts if stem == '__init__' else parts + [stem])
                modules[dotted] = os.path.join(dirpath, name)
    return modules


def imported_names(tree, module, is_package):
    """Every module name an import in `tree` may load, anywhere in the file (functions included)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:   # relative: resolved against this module's package
                package = module.split('.') if is_package else module.split('.')[:-1]
                base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names += [base] + [f'{base}.{a.name}' for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'import_module'
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


def import_graph(modules):
    """{module: the set of our modules it imports}; importing a.b.c also imports the packages a and a.b."""
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        edges = set()
        for name in imported_names(tree, module, path.endswith('__init__.py')):
            parts = name.split('.')
            edges.update(p for p in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1)) if p in modules)
        edges.discard(module)
        graph[module] = edges
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


@pytest.fixture(scope='module')
def graph():
    return import_graph(our_modules())


def test_the_graph_sees_imports_at_every_level(graph):
    """Guards the checks below against an empty graph: known arrows, top level and inside a function."""
    assert 'weights.checkpoint' in graph['diffusion']              # a top-level `from ... import`
    assert {'weights', 'weights.checkpoint'} <= graph['train']        # the package comes with the module
    assert 'sampling.generate' in graph['sample']
    assert {'sample', 'train', 'evaluate', 'convert', 'test_imports'} <= set(graph)


def test_there_is_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f'import cycle: {" -> ".join(cycle)}'


def test_find_cycle_finds_a_lazy_cycle(tmp_path):
    """The detector itself: a cycle made only by an import inside a function is still a cycle."""
    (tmp_path / 'pkg').mkdir()
    (tmp_path / 'pkg' / '__init__.py').write_text('')
    (tmp_path / 'pkg' / 'a.py').write_text('from pkg.b import f\n')
    (tmp_path / 'pkg' / 'b.py').write_text('def f():\n    from pkg import a\n')
    (tmp_path / 'c.py').write_text('import pkg.a\n')
    assert find_cycle(import_graph(our_modules(str(tmp_path)))) == ['pkg.a', 'pkg.b', 'pkg.a']


def test_no_library_module_imports_an_entry_point(graph):
    bad = {m: sorted(graph[m] & ENTRY_POINTS) for m in graph if m not in ENTRY_POINTS and graph[m] & ENTRY_POINTS}
    assert not bad, f'library modules import entry-point scripts: {bad}'


def test_the_root_holds_at_most_8_modules():
    root = sorted(f for f in os.listdir(ROOT) if f.endswith('.py'))
    assert len(root) <= MAX_ROOT_MODULES, f'{len(root)} .py files at the root (at most {MAX_ROOT_MODULES}): {root}'


MOVED_NAMES = [
    ('diffusion', 'load_checkpoint', 'weights.checkpoint'), ('diffusion', 'save_checkpoint', 'weights.checkpoint'),
    ('diffusion', 'CheckpointError', 'weights.checkpoint'), ('diffusion', 'resolve_device', 'runtime'),
    ('diffusion', 'atomic_write', 'runtime'), ('diffusion', 'amp_dtype', 'runtime'),
    ('sample', 'generate', 'sampling.generate'), ('sample', 'sample_checkpoint', 'sampling.generate'),
    ('sample', 'sample_batch', 'sampling.generate'), ('sample', 'batch_seed', 'sampling.generate'),
    ('sample', 'load_model', 'sampling.generate'), ('evaluate', 'bits_per_dim', 'metrics.bpd'),
]


@pytest.mark.parametrize('old, name, home', MOVED_NAMES)
def test_moved_names_still_import_from_their_old_module(old, name, home):
    module = importlib.import_module(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(home), name)
    assert any(issubclass(w.category, DeprecationWarning) and f'has moved to {home}.{name}' in str(w.message)
               for w in caught), [str(w.message) for w in caught]


@pytest.mark.parametrize('module', ['diffusion', 'sample', 'evaluate'])
def test_unknown_names_are_still_attribute_errors(module):
    with pytest.raises(AttributeError):
        getattr(importlib.import_module(module), 'no_such_name')
