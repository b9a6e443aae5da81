"""`adadiff-bench --comparison tiny` as a real process: exit status 0, a JSON with every method row and figure
files under 200 KB; bad input exits with status 2. Tiny model (uvit_tiny, 8x8 CIFAR-10), well under a minute."""
import json, math, os, subprocess, sys
from pathlib import Path

PY = sys.executable
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
METHODS = ['full', 'adadiff_full', 'adadiff', 'ase', 'ase_paper', 'berxit', 'calm', 'static', 'small']


def _bench(args, timeout=300):
    return subprocess.run(
        [PY, '-m', 'adadiff_nb.bench', *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def test_tiny_comparison_writes_every_row(tmp_path):
    out, work = tmp_path / 'results', tmp_path / 'work'
    p = _bench(['--comparison', 'tiny', '--out', str(out), '--work', str(work)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / 'tiny.json').read_text())
    assert [r['method'] for r in res['rows']] == METHODS
    for r in res['rows']:
        for k in ('proxy_fd', 'layer_ratio', 'gflops_per_eval', 'ideal_speedup', 'measured_speedup', 'gflops_speedup'):
            assert r[k] is not None and math.isfinite(r[k]), (r['method'], k)
    assert res['command'].startswith('adadiff-bench --comparison tiny')
    for f in res['figures'].values():
        assert (out / f).stat().st_size < 200_000
    assert 'U-ViT (full)' in p.stdout and 'measured x' in p.stdout          # the printed table


def test_bad_input_exits_2(tmp_path):
    p = _bench(['--comparison', 'nope', '--out', str(tmp_path)])
    assert p.returncode == 2 and 'unknown comparison' in p.stderr
    p = _bench(['--comparison', 'tiny', '--backbone', str(tmp_path / 'missing'), '--out', str(tmp_path)])
    assert p.returncode == 2 and 'not found' in p.stderr
