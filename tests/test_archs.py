"""Every architecture the project saves loads back with no prior import: through `load_model` in a fresh
interpreter that imported nothing else, and through the `adadiff-sample` CLI (which imports only what it needs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS='1')
DYNAMIC = {'adadiff', 'berxit', 'calm', 'adadiff_official'}          # archs that take an early-exit threshold


def _models() -> dict:
    from adadiff_nb.models.uvit import UViT, create_uvit
    from adadiff_nb.exits.early_exit import create_early_exit
    from adadiff_nb.exits.baselines import StaticDropUViT, BERxiTUViT, CALMUViT
    from adadiff_nb.models.dit import DiT
    from adadiff_nb.models.official_adadiff import OfficialAdaDiffUViT
    from adadiff_nb.models.unet import create_unet
    torch.manual_seed(0)
    bb = dict(create_uvit('uvit_tiny').config)
    return dict(uvit=UViT(**bb), adadiff=create_early_exit('adadiff_tiny'),
                ase=StaticDropUViT(backbone=bb, schedule='D1'), berxit=BERxiTUViT(backbone=bb),
                calm=CALMUViT(backbone=bb),
                dit=DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                        num_classes=10),                                          # learned sigma, as officially
                adadiff_official=OfficialAdaDiffUViT(**bb), unet=create_unet('unet_test8'))


@pytest.fixture(scope='module')
def saved(tmp_path_factory) -> dict:
    "arch name -> directory written by save_model."
    from adadiff_nb.models.checkpoint import save_model
    root = tmp_path_factory.mktemp('archs')
    out = {}
    for name, model in _models().items():
        assert model.arch == name
        out[name] = save_model(model.eval(), root / name)
    return out


def test_table_covers_every_saved_arch():
    "The backbone families with a class (adadiff_nb.models.registry) and ARCHS are exactly the archs saved here."
    from adadiff_nb.models.checkpoint import project_archs
    assert sorted(project_archs()) == sorted(_models())


def test_load_model_in_a_fresh_interpreter(saved):
    "Only adadiff_nb.models.checkpoint is imported; each arch's module is found through the fixed table."
    code = ("import json, sys\n"
            "from adadiff_nb.models.checkpoint import load_model\n"
            "before = {m for m in sys.modules if m.startswith('adadiff_nb.')}\n"
            "out = {}\n"
            "for name, path in json.loads(sys.argv[1]).items():\n"
            "    m = load_model(path)\n"
            "    out[name] = [m.arch, type(m).__module__ + ':' + type(m).__name__, m.training]\n"
            "print(json.dumps(dict(before=sorted(before), models=out)))\n")
    paths = json.dumps({k: str(v) for k, v in saved.items()})
    r = subprocess.run([sys.executable, '-c', code, paths], capture_output=True, text=True, env=ENV,
                       cwd=saved['uvit'].parent, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 'adadiff_nb.exits.early_exit' not in res['before'] and 'adadiff_nb.exits.baselines' not in res['before']
    from adadiff_nb.models.checkpoint import project_archs
    for name, (arch, cls, training) in res['models'].items():
        assert arch == name and cls == project_archs()[name] and training is False


def test_loaded_models_match_the_saved_ones(saved):
    from adadiff_nb.models.checkpoint import load_model
    models = _models()
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10., 700.])
    for name, path in saved.items():
        m = load_model(path)
        assert type(m) is type(models[name])
        for k, v in models[name].state_dict().items(): torch.testing.assert_close(m.state_dict()[k], v)
        with torch.no_grad():
            a, b = models[name].eval()(x, t), m(x, t)
        a, b = getattr(a, 'sample', a), getattr(b, 'sample', b)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', ['uvit', 'adadiff', 'ase', 'berxit', 'calm', 'dit', 'adadiff_official', 'unet'])
def test_adadiff_sample_cli_round_trip(saved, name, tmp_path):
    out = tmp_path / 'out'
    cmd = [str(BIN / 'adadiff-sample'), '--checkpoint', str(saved[name]), '--steps', '2', '--n', '2', '--out', str(out),
           '--quiet']
    if name in DYNAMIC: cmd += ['--threshold', '0.5']
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / 'samples.png').stat().st_size > 0
    with np.load(out / 'samples.npz') as f: assert f['images'].shape[0] == 2 and f['images'].dtype == np.uint8
    stats = json.loads((out / 'stats.json').read_text())
    assert stats['arch'] == name and stats['n'] == 2 and stats['steps'] == 2


def test_unknown_arch_names_the_known_ones(tmp_path):
    from adadiff_nb.models.checkpoint import CheckpointError, load_model, save_safetensors
    rec = {'adadiff_nb': dict(arch='mystery', config={})}
    save_safetensors({'w': torch.zeros(1)}, tmp_path / 'model.safetensors', rec)
    known = (r"unknown architecture 'mystery'.*'adadiff', 'adadiff_official', 'ase', 'berxit', 'calm', 'dit', "
             r"'unet', 'uvit'")
    with pytest.raises(CheckpointError, match=known):
        load_model(tmp_path)
