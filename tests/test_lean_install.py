"""The lean core install: `pip install adadiff_nb` without extras imports the model, the samplers and the CLI and
samples the default model; optional packages are declared in extras, and a missing one is named with its extra.

Here the optional packages are hidden from a fresh interpreter (`sys.modules[name] = None` makes importing them fail
as if they were not installed); .ci/run also installs the built wheel without extras into a fresh venv."""
import os, re, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip('tomllib' if sys.version_info >= (3, 11) else 'tomli')

# what the extras install (import names), hidden from the lean interpreter
OPTIONAL = ['plotly', 'ipywidgets', 'anywidget', 'accelerate', 'pytorch_fid', 'diffusers', 'transformers', 'nbdev',
            'tomesd', 'torch_pruning', 'cache_dit', 'DeepCache', 'smalldocs', 'IPython', 'pandas', 'hypothesis',
            'playwright', 'jupyterlab']
CORE_MODULES = ['extras', 'diffusion', 'uvit', 'dit', 'checkpoint', 'early_exit', 'default_model', 'samplers', 'cost',
                'losses', 'metrics', 'sampling', 'official_adadiff', 'sample', 'baselines', 'calibrate', 'caching',
                'exits.token_merging', 'exits.pruning']


def project():
    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']


def names(reqs):
    "Distribution names of requirement strings (markers and versions dropped; `adadiff_nb[a,b]` -> extras a, b)."
    return {re.split(r'[\s;<>=!~\[]', r, maxsplit=1)[0].lower().replace('_', '-') for r in reqs}


def self_extras(reqs):
    "The extras of this package that `reqs` pull in (`adadiff_nb[app,docs]` -> app, docs)."
    own = [r[len('adadiff_nb['):r.index(']')] for r in reqs if r.startswith('adadiff_nb[')]
    return {e.strip() for r in own for e in r.split(',')}


def test_core_dependencies_are_lean():
    core = names(project()['dependencies'])
    heavy = {'plotly', 'ipywidgets', 'anywidget', 'accelerate', 'pytorch-fid', 'diffusers', 'transformers', 'nbdev'}
    assert not core & heavy, f'optional packages in the core dependencies: {sorted(core & heavy)}'
    assert {'torch', 'torchvision', 'numpy', 'scipy', 'safetensors', 'packaging', 'tomli'} <= core
    tomli = [r for r in project()['dependencies'] if r.startswith('tomli')]
    assert tomli and "python_version<'3.11'" in tomli[0].replace(' ', ''), tomli


def test_extras_cover_the_optional_packages():
    from adadiff_nb.extras import EXTRAS
    extras = project()['optional-dependencies']
    assert set(EXTRAS) <= set(extras), f'extras named in errors but not declared: {set(EXTRAS) - set(extras)}'
    want = {'app': {'plotly', 'ipywidgets', 'anywidget'}, 'metrics': {'pytorch-fid'}, 'train': {'accelerate'},
            'diffusers': {'diffusers'}, 't2i': {'diffusers', 'transformers'}, 'docs': {'nbdev', 'smalldocs'},
            'tome': {'tomesd'}, 'prune': {'torch-pruning'}, 'market': {'cache-dit'}, 'deepcache': {'deepcache'}}
    for extra, pkgs in want.items():
        assert pkgs <= names(extras[extra]), f'[{extra}] lacks {pkgs - names(extras[extra])}'
    dev = extras['dev']
    assert {'app', 'metrics', 'train', 't2i', 'docs', 'tome', 'prune', 'market', 'deepcache'} <= self_extras(dev), \
        'the dev extra must pull in every extra'
    assert {'hypothesis', 'pytest', 'playwright', 'nbdev', 'jupyterlab'} <= names(dev)
    assert 'quarto' not in self_extras(dev), 'quarto-cli downloads Quarto at install: it cannot be in dev (offline CI)'


LEAN = textwrap.dedent('''
    import sys
    for name in {optional!r}: sys.modules[name] = None          # as if not installed
    import importlib
    for m in {modules!r}: importlib.import_module('adadiff_nb.' + m)
    from adadiff_nb.models.default_model import load_default
    from adadiff_nb.apps.sample_cli import main
    load_default('cpu')
    main(['--checkpoint', 'default', '--steps', '2', '--n', '2', '--out', 'lean', '--quiet'])
    from adadiff_nb.evaluation.metrics import fid_inception
    try: fid_inception('random')
    except ImportError as e: print('FID:', e)
''')


def test_core_works_without_extras(tmp_path):
    code = LEAN.format(optional=OPTIONAL, modules=CORE_MODULES)
    res = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES=''))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / 'lean' / 'samples.png').is_file() and (tmp_path / 'lean' / 'stats.json').is_file()
    assert "FID: FID's Inception-v3 needs the `pytorch_fid` package, which is not installed: " \
           "pip install 'adadiff_nb[metrics]'" in res.stdout, res.stdout
