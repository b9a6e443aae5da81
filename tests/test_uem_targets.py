"""`bench/uem_targets.py` (UEMs retrained under each L_u target, then measured within a step) on a tiny run: the
JSON has one row per target plus the shipped model, each with its within-step and pooled numbers; bad input exits 2."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / 'bench' / 'uem_targets.py'), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_tiny_run_writes_every_target(tmp_path):
    out = tmp_path / 'ut.json'
    r = _run('--steps', 2, '--batch-size', 4, '--n', 4, '--sample-steps', 3, '--out', out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert sorted(doc['rows']) == ['final', 'noise', 'shipped']
    for name, row in doc['rows'].items():
        assert 0 < row['layer_ratio'] <= 1 and 0 <= row['threshold'] <= 1
        assert row['eta2_u'] is None or 0 <= row['eta2_u'] <= 1
        assert 'spearman' in row['pooled'] or row['pooled']
    assert doc['rows']['final']['training']['images'] == 8 and f'wrote {out}' in r.stdout


def test_bad_input_exits_2(tmp_path):
    r = _run('--steps', 0, '--out', tmp_path / 'x.json')
    assert r.returncode == 2 and '--steps' in r.stderr
    r = _run('--out', tmp_path / 'missing' / 'x.json')
    assert r.returncode == 2 and 'does not exist' in r.stderr
