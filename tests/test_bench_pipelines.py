"""bench/bench_pipelines.py at tiny size: it runs, prints the table, writes its JSON with the static exits' layer
ratios and the ideal speed-ups they imply. No timing thresholds: timings are only checked to be positive."""
import importlib.util, json
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def load_bench():
    spec = importlib.util.spec_from_file_location('bench_pipelines', ROOT / 'bench' / 'bench_pipelines.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_pipelines_tiny(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / 'b.json'
    assert bench.main(['--size', 'tiny', '--batches', '1,2', '--steps', '2', '--repeats', '1', '--warmup', '0',
                       '--ratios', '0.5,0.25', '--device', 'cpu', '--out', str(out)]) == 0
    assert 'exit@2/4' in capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = {(r['batch'], r['mode']): r for r in res['rows']}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ('plain', 'exit@2/4', 'exit@1/4')}
    for b in (1, 2):
        r = rows[(b, 'exit@2/4')]
        assert r['layer_ratio'] == 0.5 and r['ideal_speedup'] == pytest.approx(2.0) and r['rows'] == 2 * b
        assert rows[(b, 'exit@1/4')]['ideal_speedup'] == pytest.approx(4.0)
        assert 1 < r['gflops_speedup'] < 2 and r['seconds'] > 0 and r['measured_speedup'] > 0
    assert res['command'].startswith('python bench/bench_pipelines.py --size tiny')
