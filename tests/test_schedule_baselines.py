"""The static baselines of a dynamic exit (issue 21, item 2): `calibrate_step_schedule` (a per-step schedule calibrated
to a budget by exact dynamic programming), `schedule_baselines` (dynamic exits vs the compiled and the calibrated
schedule on the same noise) and bench/schedule_baselines.py, all at tiny sizes. No timing thresholds."""
import itertools, json, math, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.exits.schedule import calibrate_step_schedule, min_error_exits, step_exit_errors
from adadiff_nb.experiments.exit_bench import randomize_zero_init, spread_uem_weights
from adadiff_nb.experiments.schedule_baselines import (METHODS, SCHEDULES, paired_bootstrap, schedule_baselines,
                                                       schedule_baselines_table)
from adadiff_nb.sampling.run import sample_batches

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / 'bench' / 'schedule_baselines.py')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return spread_uem_weights(randomize_zero_init(create_early_exit('adadiff_tiny'))).eval()   # 5 blocks


@pytest.fixture(scope='module')
def table(tiny):
    return step_exit_errors(tiny, 'ddim', 4, n=4, batch_size=4, seed=3, weight_n=2)


def test_dp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        E = np.concatenate([rng.random((3, 2)), np.zeros((3, 1))], 1)       # 3 steps x exits 0, 1, 2 (2: full)
        budget = int(rng.integers(0, 7))
        best = min((c for c in itertools.product(range(3), repeat=3) if sum(c) <= budget),
                   key=lambda c: (sum(E[k, j] for k, j in enumerate(c)), -sum(c)))
        assert min_error_exits(E, budget) == list(best)


def test_calibrated_schedule_budget_and_optimality(tiny, table):
    L = tiny.num_layers
    for r in (.25, .5, .75):
        s = calibrate_step_schedule(tiny, r, 'ddim', 4, n=4, batch_size=4, seed=3, table=table)
        assert s.layer_ratio <= r + 1e-12 and s.source['target_layer_ratio'] == r
        assert s.source['method'] == 'calibrated' and s.source['seed'] == 3 and s.source['n'] == 4
        uniform = int(math.floor(r * 4 * L + 1e-9)) // 4                   # the same exit at every step, same budget
        assert s.source['summed_error'] <= table['errors'][:, uniform].sum() + 1e-12
        run = sample_batches(tiny, 'ddim', 4, n=2, batch_size=2, exit_layers=s, seed=9)
        assert abs(run.stats['layer_ratio'] - s.layer_ratio) < 1e-9
    assert calibrate_step_schedule(tiny, 1., 'ddim', 4, n=4, batch_size=4, seed=3, table=table).exits == [L] * 4


def test_calibration_errors_before_compute(tiny):
    with pytest.raises(ValueError, match='layer_ratio must be'):
        calibrate_step_schedule(tiny, 1.5, 'ddim', 4)
    with pytest.raises(ValueError, match='one-evaluation'):
        calibrate_step_schedule(tiny, .5, 'dpm_solver', 4)
    with pytest.raises(ValueError, match='early-exit model'):
        calibrate_step_schedule(tiny.backbone, .5, 'ddim', 4)


def test_paired_bootstrap():
    ci = paired_bootstrap(np.arange(10.) + 1., np.arange(10.))
    assert (ci['mean'], ci['low'], ci['high']) == (1., 1., 1.)
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    ci = paired_bootstrap(a + .5 + rng.normal(0, .05, 50), a)
    assert 0 < ci['low'] < .5 < ci['high']


def test_schedule_baselines_tiny(tiny):
    res = schedule_baselines(tiny, [.3, .38], 'ddim', 3, n=4, batch=2, repeats=1, weight_n=2)
    json.dumps(res, allow_nan=False)
    assert [e['threshold'] for e in res['thresholds']] == [.3, .38]
    assert res['calibration']['seed'] == 1 and res['settings']['seed'] == 0
    for e in res['thresholds']:
        m = e['methods']
        assert list(m) == list(METHODS) and m['plain']['mse'] == 0.
        assert m['calibrated']['layer_ratio'] <= m['dynamic']['layer_ratio'] + 1e-12
        for s in SCHEDULES:
            ci = e['vs_dynamic'][s]['mse']
            assert abs(ci['mean'] - (np.mean(m[s]['mse_per_image']) - np.mean(m['dynamic']['mse_per_image']))) < 1e-9
            assert (e['verdict']['fidelity'][s] == 'dynamic better') == (ci['low'] > 0)
        beats = all(e['verdict']['fidelity'][s] == 'dynamic better' and e['verdict']['dynamic_not_slower'][s]
                    for s in SCHEDULES)
        assert e['verdict']['dynamic_beats_both'] == beats
    table = schedule_baselines_table(res)
    assert table.count('\n| 0.38 |') == len(METHODS) and table.count('\n- threshold') == 2
    with pytest.raises(ValueError, match='other noise'):
        schedule_baselines(tiny, [.3], 'ddim', 3, n=4, calibration_seed=0)


def test_script_tiny(tmp_path):
    out = tmp_path / 'sb.json'
    cmd = [sys.executable, SCRIPT, '--n', '4', '--batch', '4', '--steps', '3', '--repeats', '1', '--weight-n', '2',
           '--thresholds', '0.075', '0.15', '--out', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc['command'].startswith('python bench/schedule_baselines.py --n 4') and doc['model'] == 'default'
    assert [e['threshold'] for e in doc['thresholds']] == [.075, .15]
    assert doc['sampler_opts'] == {'clip_denoised': True} and f'wrote {out}' in r.stdout and '| threshold |' in r.stdout


def test_script_errors(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, '--n', '1', '--out', str(tmp_path / 'x.json')], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and '--n must be >= 2' in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, '--out', str(tmp_path / 'missing' / 'x.json')], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and 'does not exist' in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, '--sampler', 'dpm_solver', '--n', '4', '--steps', '2', '--out',
                        str(tmp_path / 'x.json')], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and 'one-evaluation' in r.stderr
