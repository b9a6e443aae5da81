"""The early-exit DiT benchmark (`experiments.bench.bench_dit_exits`, `bench/bench_dit_exits.py`) on tiny DiTs: the
static exits skip what was asked, each row's output is `forward_train`'s at its exit, the ideal speed-ups match a
FLOP count written here, and the command line writes its JSON. No timing thresholds: timings are only checked to
exist and be positive."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from adadiff_nb.experiments.bench import bench_dit_exits, build_bench_dit, exit_bench_inputs
from adadiff_nb.models.dit import FinalLayer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
TINY = dict(input_size=8, in_channels=4, depth=4, hidden_size=32, num_heads=2, num_classes=10)
torch.set_num_threads(1)


@pytest.fixture(scope='module')
def res():
    return bench_dit_exits(batch=4, skip_fraction=0.4, repeats=2, warmup=1, **TINY)


def test_skipped_fraction_and_ideal(res):
    L, B = 4, 4
    assert res['rows'] == B and res['layers_total'] == B * L and sum(res['exit_histogram']) == B
    assert res['layers_run'] == B * L - round(0.4 * B * L)                         # 10 of 16 evaluations
    assert abs(res['layer_reduction'] - 0.4) <= 1 / (B * L)
    assert res['ideal_speedup'] == pytest.approx(B * L / res['layers_run'])
    # the FLOP ideal from the DiT's pieces, counted here: embed + blocks run + one head per row
    D, P, C, p = 32, 16, 4, 2
    block = 2 * P * D * 4 * D + 4 * P * P * D + 2 * 2 * P * D * 4 * D + 2 * D * 6 * D
    embed, head = 2 * P * C * p * p * D + 2 * (256 * D + D * D), 2 * D * 2 * D + 2 * P * D * p * p * 2 * C
    full = B * (embed + L * block + head)
    exits = B * (embed + head) + res['layers_run'] * block
    assert res['ideal_speedup_flops'] == pytest.approx(full / exits)
    assert 1 < res['ideal_speedup_flops'] < res['ideal_speedup'] and res['ideal_speedup_parts'] > 1
    assert all(v > 0 for v in res['seconds'].values()) and res['measured_speedup'] > 0
    assert res['efficiency'] == pytest.approx(res['measured_speedup'] / res['ideal_speedup'])
    assert res['check']['max_abs_diff_vs_forward_train'] < 1e-5
    assert res['peak_memory_bytes']['full'] > 0 and res['peak_memory_bytes']['exits'] > 0


@torch.inference_mode()
def test_exited_rows_equal_forward_train():
    m = build_bench_dit('DiT-S/2', **TINY)
    inp = exit_bench_inputs(m, 6, 0.5, seed=3)
    x, t, y, e = inp['x'], inp['t'], inp['y'], inp['exit_layers']
    assert len(e.unique()) > 1 and int(e.sum()) == 6 * 4 - 12
    out = m(x, t, y, exit_layers=e)
    ft = m.forward_train(x, t, y)
    for r in range(6):
        ref = ft['eps'][r] if e[r] == 4 else ft['exits'][e[r], r]
        torch.testing.assert_close(out.sample[r, :4], ref, atol=1e-5, rtol=1e-5)
    assert out.sample.abs().mean() > 1e-3                                       # non-zero (randomised adaLN-Zero)
    assert all(isinstance(h, FinalLayer) and h.adaLN_modulation[-1].weight.any() for h in m.exit_heads)


def test_guided_batch_doubles_rows():
    g = bench_dit_exits(batch=3, skip_fraction=0.25, repeats=1, warmup=0, guidance=True, **TINY)
    assert g['rows'] == 6 and g['samples'] == 3 and g['layers_run'] == 6 * 4 - 2 * round(0.25 * 12)
    assert g['check']['max_abs_diff_vs_forward_train'] < 1e-5


def _cli(args):
    return subprocess.run([sys.executable, str(ROOT / 'bench' / 'bench_dit_exits.py'), *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_json(tmp_path):
    out = tmp_path / 'sub' / 'bench.json'
    p = _cli(['--preset', 'DiT-S/4', '--input-size', '8', '--num-classes', '10', '--batch', '4', '--skip', '0.25',
              '--repeats', '1', '--warmup', '0', '--threads', '1', '--guidance', '--out', str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    js = json.loads(out.read_text())
    assert [r['guidance'] for r in js['runs']] == [False, True] and [r['rows'] for r in js['runs']] == [4, 8]
    assert js['runs'][0]['backbone']['patch_size'] == 4 and js['runs'][0]['layers_run'] == 48 - 12
    assert js['command'].startswith('python bench/bench_dit_exits.py --preset DiT-S/4')
    assert 'plain' in p.stdout and 'guided' in p.stdout and 'ideal L' in p.stdout


def test_cli_bad_input_exits_2(tmp_path):
    p = _cli(['--input-size', '8', '--batch', '2', '--skip', '1.5', '--out', str(tmp_path / 'x.json')])
    assert p.returncode == 2 and 'skip_fraction must lie in [0, 1)' in p.stderr
    assert not (tmp_path / 'x.json').exists()
