"""bench/bench_exits.py end to end at a tiny size: it prints the table and writes JSON rows whose skipped shares,
host syncs and ratios are consistent (no timing thresholds: timings are only checked to exist and be positive)."""
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}


def test_bench_exits_script(tmp_path):
    out = tmp_path / 'exits.json'
    cmd = [sys.executable, str(ROOT / 'bench' / 'bench_exits.py'), '--archs', 'U-ViT-S/2', '--reduced', '--batches',
           '4', '--skips', '0', '0.45', '--precisions', 'fp32', '--modes', 'eager', '--rules', 'static', 'threshold',
           '--sync-policies', 'every', '2', '--repeats', '1', '--warmup', '0', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'measured' in r.stdout and 'static 0.45' in r.stdout
    res = json.loads(out.read_text())
    rows = {x['run']: x for x in res['runs']}
    assert set(rows) == {'static 0', 'threshold 0 every', 'threshold 0 2', 'static 0.45', 'threshold 0.45 every',
                         'threshold 0.45 2'}
    assert rows['static 0']['layer_reduction'] == 0 and abs(rows['static 0.45']['layer_reduction'] - .45) < .05
    assert rows['static 0.45']['host_syncs'] == 1
    for k in ('threshold 0 every', 'threshold 0 2'):                            # no row can leave: no criterion runs,
        assert rows[k]['host_syncs'] == 0 and rows[k]['layer_reduction'] == 0  # nothing is read, the full model
    assert rows['threshold 0.45 2']['host_syncs'] < rows['threshold 0.45 every']['host_syncs']
    for x in res['runs']:
        assert x['full_ms'] > 0 and x['exits_ms'] > 0
        assert abs(x['efficiency'] - x['measured_speedup'] / x['ideal_speedup']) < 1e-9
    assert res['command'].startswith('python bench/bench_exits.py') and res['device_name'] == 'CPU'
    bad = subprocess.run([*cmd[:2], '--archs', 'nope', '--batches', '2'], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and 'unknown benchmark model' in bad.stderr
