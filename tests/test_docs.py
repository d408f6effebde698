"""The README and docs/ pages: CI runs the README's test command, every relative link and picture exists
(headings included, as GitHub names them), and the README stays short enough to read."""
import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'\]\(([^)\s]+)\)|<img src="([^"]+)"')


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def anchors(path):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r'[^\w\- ]', '', m.group(1).strip().lower()).replace(' ', '-')
            for m in re.finditer(r'^#+\s+(.*)$', read(path), re.M)}


def test_ci_runs_the_readme_test_command():
    command = re.search(r'^## Tests\n\n    (.+)$', read('README.md'), re.M).group(1).strip()
    ci = [line.strip() for line in read('.ci/run').splitlines() if line.strip() and not line.startswith('#')]
    assert command in ci, f'.ci/run does not run the README\'s test command {command!r}'


def test_readme_is_short():
    assert len(read('README.md').splitlines()) <= 300


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_exist(page):
    missing = []
    for m in LINK.finditer(read(page)):
        link = m.group(1) or m.group(2)
        if re.match(r'[a-z]+:', link):
            continue   # a web address: not checked offline
        path, _, anchor = link.partition('#')
        target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, target)):
            missing.append(link)
        elif anchor and target.endswith('.md') and anchor not in anchors(target):
            missing.append(link)
    assert not missing, f'{page}: broken links {missing}'


def train_commands(page):
    """The indented `python train.py ...` command lines of a page, continuation lines joined, comments cut."""
    text = re.sub(r'\\\n\s*', ' ', read(page))
    return [m.group(1).split('#')[0].split() for m in re.finditer(r'^    python train\.py(.*)$', text, re.M)]


@pytest.mark.parametrize('page', PAGES)
def test_train_commands_in_the_docs_are_valid(page):
    """Every train.py command a page shows (the README's quick start included) parses and validates."""
    from train import config_from_argv
    for argv in train_commands(page):
        if '--help' in argv or '...' in argv:
            continue
        config_from_argv(argv)
