"""`bench/bench_guidance_policies.py` end to end on a tiny random class-conditional early-exit model saved to a
temporary directory: the JSON it writes holds both policies, the equal-ratio curves and the paired bootstrap, and
bad input exits with status 2."""
import importlib.util, json
from pathlib import Path
import numpy as np
import torch
from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.exits.early_exit import create_early_exit

SCRIPT = Path(__file__).resolve().parents[1] / 'bench' / 'bench_guidance_policies.py'


def _script():
    spec = importlib.util.spec_from_file_location('bench_guidance_policies', SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_both_policies_and_intervals(tmp_path):
    torch.manual_seed(0)
    model = create_early_exit('adadiff_tiny', num_classes=11, null_class=True).eval()
    with torch.no_grad():
        for p in model.uem.parameters(): p.mul_(30.)                   # exits vary at tau 0.5
    save_model(model, tmp_path / 'm')
    out = tmp_path / 'g.json'
    rc = _script().main(['--model', str(tmp_path / 'm'), '--thresholds', '0,0.5,1', '--n', '6', '--batch', '3',
                         '--steps', '2', '--threads', '1', '--clip-denoised', '--out', str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    r = d['result']
    assert r['policies'] == ['joint', 'independent'] and r['n'] == 6 and r['guidance_scale'] == 3.
    assert r['sampler_opts'] == {'clip_denoised': True}
    for p in r['policies']:
        assert len(r['by_policy'][p]['psnr_vs_full']) == 3 and 'psnr_images' not in r['by_policy'][p]
        assert r['by_policy'][p]['layer_ratio'][0] == 1.0 and r['by_policy'][p]['layer_ratio'][2] == 0.0
    b = d['bootstrap']['psnr_vs_full']
    assert len(b['layer_ratio']) == len(b['mean']) == len(b['lo']) == len(b['hi']) >= 1
    assert d['command'].startswith('python bench/bench_guidance_policies.py --model')


def test_bad_input_exits_2(tmp_path, capsys):
    assert _script().main(['--model', 'default', '--n', '2', '--steps', '1']) == 2       # unconditional model
    assert 'no null class' in capsys.readouterr().err
    assert _script().main(['--model', str(tmp_path / 'missing'), '--n', '2']) == 2
