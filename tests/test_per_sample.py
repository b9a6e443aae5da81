"""`bench/per_sample.py` (issue 21: does any exit criterion adapt per sample?) on a tiny run of the embedded default
model: one entry per criterion with its within-step discrimination, the allocation test and the sampled comparison
against the per-step schedule; bad input exits 2 before anything loads."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'bench' / 'per_sample.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_tiny_run(tmp_path):
    out = tmp_path / 'ps.json'
    r = _run('--variants', 'shipped', 'delta_final', '--train-steps', 2, '--train-batch', 4, '--n', 4, '--steps', 3,
             '--repeats', 0, '--out', out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc['command'].startswith('python bench/per_sample.py --variants') and doc['model'] == 'default'
    assert [v['name'] for v in doc['variants']] == ['shipped', 'delta_final']
    assert doc['settings']['sampler_opts'] == {'clip_denoised': True} and len(doc['schedule']['exits']) == 3
    for v in doc['variants']:
        a = v['allocation']['mean_removed']
        assert a['oracle'] >= a['oracle_rule'] - 1e-9 and set(v['runs']) == {'schedule', 'dynamic', 'step_thresholds'}
        assert 'seconds' not in v['runs']['dynamic'] and v['name'] in doc['findings']
    d = doc['variants'][1]['training']
    assert (d['kind'], d['u_target'], d['images']) == ('delta', 'final', 8) and len(d['l_u']) == 2
    assert f'wrote {out}' in r.stdout and '| criterion |' in r.stdout


def test_bad_input_exits_2(tmp_path):
    r = _run('--train-steps', 0, '--out', tmp_path / 'x.json')
    assert r.returncode == 2 and '--train-steps' in r.stderr
    r = _run('--out', tmp_path / 'missing' / 'x.json')
    assert r.returncode == 2 and 'does not exist' in r.stderr
