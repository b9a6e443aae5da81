"""bench/bench_tome.py end to end at a tiny size: one JSON row per ToMe setting, consistent ratios, ToMe's images
differ from the plain backbone's but stay close; bad input exits 2 before loading anything. No timing thresholds."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytest.importorskip('tomesd')
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
SCRIPT = str(ROOT / 'bench' / 'bench_tome.py')


def test_bench_tome_script(tmp_path):
    out = tmp_path / 'tome.json'
    cmd = [sys.executable, SCRIPT, '--n', '2', '--batch', '2', '--steps', '2', '--ratios', '0.3', '--schedules', 'F',
           'B', '--repeats', '1', '--warmup', '0', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [x['setting'] for x in res['rows']] == ['F5 0.3', 'B5 0.3']
    for x in res['rows']:
        assert 0 < x['flop_ratio'] < 1 and x['plain_s'] > 0 and x['tome_s'] > 0
        assert abs(x['measured_speedup'] - x['plain_s'] / x['tome_s']) < 1e-12
        assert abs(x['share_of_flop_ideal'] - x['measured_speedup'] * x['flop_ratio']) < 1e-12
        assert 0 < x['mse_vs_plain'] < 1 and x['psnr_vs_plain'] > 10
    assert res['command'].startswith('python bench/bench_tome.py') and res['settings']['steps'] == 2
    bad = subprocess.run([sys.executable, SCRIPT, '--schedules', 'X'], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert bad.returncode == 2 and "--schedules ['X'] unknown" in bad.stderr
