"""bench/bench_sampling.py end to end at a tiny size (whole sampling runs of the embedded default model), and
`bench_sampling_runs` on a tiny random early-exit model: rows per method, consistent ratios, threshold 0 == plain
exactly. No timing thresholds: timings are only checked to exist and be positive."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.experiments.exit_bench import randomize_zero_init, spread_uem_weights
from adadiff_nb.experiments.sampling_bench import bench_sampling_runs, matched_static_exit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
SCRIPT = str(ROOT / 'bench' / 'bench_sampling.py')


def _check_ratios(r):
    assert r['plain_s'] > 0 and r['method_s'] > 0 and 0 < r['layer_ratio'] <= 1
    assert abs(r['measured_speedup'] - r['plain_s'] / r['method_s']) < 1e-12
    assert abs(r['ideal_speedup'] - 1 / r['layer_ratio']) < 1e-12
    assert abs(r['share_of_ideal'] - r['measured_speedup'] / r['ideal_speedup']) < 1e-12


def test_bench_sampling_script(tmp_path):
    out = tmp_path / 'sampling.json'
    cmd = [sys.executable, SCRIPT, '--batches', '2', '--threads', '1', '--steps', '3', '--repeats', '1', '--warmup',
           '0', '--schedule-n', '2', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert 'measured' in r.stdout and 'scheduled' in r.stdout and f'wrote {out}' in r.stdout
    res = json.loads(out.read_text())
    rows = {x['method']: x for x in res['rows']}
    assert list(rows) == ['dynamic', 'points', 'scheduled', 'static', 'zero']
    assert rows['dynamic']['max_abs_diff_threshold0_vs_plain'] == 0.             # threshold 0 is the full model
    assert rows['zero']['layer_ratio'] == 1 and rows['zero']['host_syncs_per_forward'] == 0   # and runs no UEM
    assert 0 <= rows['points']['exits_changed'] <= 1 and rows['dynamic']['exits_changed'] is None
    assert 0 < res['models']['default']['points']['tested_share'] <= 1
    assert rows['static']['max_abs_diff_threshold0_vs_plain'] is None
    L = res['models']['default']['num_layers']
    assert rows['static']['rule'] == f"exit_layers={matched_static_exit(rows['dynamic']['layer_ratio'], L)}"
    assert len(res['models']['default']['schedule']['exits']) == 3                  # one exit per ddim step
    for x in res['rows']:
        assert (x['model'], x['batch'], x['threads'], x['mode'], x['precision'], x['steps']) == \
            ('default', 2, 1, 'eager', 'fp32', 3)
        _check_ratios(x)
    assert res['command'].startswith('python bench/bench_sampling.py') and res['device_name'] == 'CPU'
    assert res['environment']['device'] == 'cpu' and res['settings']['batches'] == [2]


def test_bench_sampling_script_errors():
    bad = subprocess.run([sys.executable, SCRIPT, '--methods', 'static', '--batches', '1'], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and 'add dynamic' in bad.stderr
    bad = subprocess.run([sys.executable, SCRIPT, '--batches', '0', '--methods', 'dynamic', '--steps', '2'],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and '--batches must be integers >= 1' in bad.stderr


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return spread_uem_weights(randomize_zero_init(create_early_exit('adadiff_tiny'))).eval()


def test_bench_sampling_runs_tiny(tiny):
    torch.set_num_threads(1)
    every2 = lambda mt: torch.full(mt.shape, 2, dtype=torch.long)
    rows = bench_sampling_runs(tiny, 2, threshold=.38, schedule=every2, static_exits=4, steps=3, repeats=1, warmup=0)
    assert [r['method'] for r in rows] == ['dynamic', 'scheduled', 'static', 'zero']
    assert rows[0]['max_abs_diff_threshold0_vs_plain'] == 0.
    assert 0 < rows[0]['layer_ratio'] < 1 and rows[0]['host_syncs_per_forward'] >= 1
    assert (rows[1]['layer_ratio'], rows[2]['layer_ratio']) == (.4, .8)             # 2 of 5 and 4 of 5 blocks
    for r in rows:
        _check_ratios(r)
    only = bench_sampling_runs(tiny, 1, threshold=.38, static_exits=None, steps=2, repeats=1, warmup=0)
    assert [r['method'] for r in only] == ['dynamic', 'zero']
    with pytest.raises(ValueError, match='static_exits must be None'):
        bench_sampling_runs(tiny, 1, threshold=.38, static_exits=6, steps=2)
