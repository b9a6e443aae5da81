"""`adadiff-bench --comparison tiny` as a real process: exit status 0, a JSON with every method row and figure
files under 200 KB; bad input exits with status 2 and one error line before anything is made or run. Tiny model
(uvit_tiny, 8x8 CIFAR-10), well under a minute."""
import json, math, os, subprocess, sys
from pathlib import Path

import pytest

PY = sys.executable
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
METHODS = ['full', 'adadiff_full', 'adadiff', 'ase', 'ase_paper', 'berxit', 'calm', 'static', 'small']


def _bench(args, timeout=300):
    return subprocess.run(
        [PY, '-m', 'adadiff_nb.experiments.bench', *args], env=ENV, capture_output=True, text=True, timeout=timeout
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


def _refused(root, argv, monkeypatch, capsys):
    "Exit status and stderr of `adadiff-bench argv` in-process, with every model forward an error (nothing may run)."
    import torch
    from adadiff_nb.experiments import controlled

    def no_forward(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} ran before the bad input was refused")
    monkeypatch.chdir(root)
    monkeypatch.setattr(torch.nn.Module, '__call__', no_forward)
    before = sorted(p.name for p in root.iterdir())
    rc = controlled.main(argv)
    assert sorted(p.name for p in root.iterdir()) == before               # no --out / --work made
    return rc, capsys.readouterr().err


def _paths(root):
    (root / 'afile').write_text('not a directory\n')
    (root / 'empty').mkdir()
    return dict(FILE=str(root / 'afile'), UNDER_FILE=str(root / 'afile' / 'sub'), EMPTY=str(root / 'empty'),
                MISSING=str(root / 'missing'))


@pytest.mark.parametrize('args, msg', [
    (['--sweep', 'x'], "--sweep 'x': not a comma list of numbers"),
    (['--sweep', '0.2,1.5'], 'sweep_targets must be layer reductions in (0, 1)'),
    (['--threads', '-1'], '--threads (0: the default) must be an integer >= 1'),
    (['--out', 'FILE'], 'is a file, not a directory'),
    (['--out', 'UNDER_FILE'], 'so no directory can be made there'),
    (['--work', 'FILE'], '--work'),
    (['--n', '1'], 'n must be an integer >= 2'),
    (['--batch', '-1'], 'batch must be an integer >= 1'),
    (['--batch-size', '0'], 'batch_size must be an integer >= 1'),
    (['--finetune-steps', '-1'], 'finetune_steps must be'),
    (['--small-steps', '-1'], 'small_steps must be'),
    (['--calib-n', '0'], 'calib_n must be'),
    (['--seed', str(2 ** 70)], 'seed must be below 2**32'),
    (['--sampler', 'nope'], "unknown sampler 'nope'"),
    (['--sampler', ''], "unknown sampler ''"),
    (['--methods', 'full,'], "--methods 'full,': not a comma list"),
    (['--adadiff-checkpoint', 'MISSING'], '--adadiff-checkpoint'),
    (['--adadiff-checkpoint', 'FILE'], 'carries no model config'),
    (['--adadiff-checkpoint', 'EMPTY'], 'holds no model.safetensors'),
    (['--backbone', 'MISSING'], 'not found'),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, msg):
    p = _paths(tmp_path)
    argv = ['--comparison', 'tiny', '--quiet', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work')]
    rc, err = _refused(tmp_path, argv + [p.get(a, a) for a in args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('adadiff-bench: error: ') and msg in lines[0], err


def test_controlled_through_bench_main_points_to_adadiff_bench(tmp_path, monkeypatch, capsys):
    from adadiff_nb.experiments import bench
    monkeypatch.chdir(tmp_path)
    assert bench.main(['--comparison', 'controlled']) == 2
    err = capsys.readouterr().err
    assert 'adadiff-bench command' in err and 'controlled.main' in err and 'unknown' not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_registered_method_is_picked_up_without_editing_other_modules():
    "A toy method registered here is listed, labelled, coloured and given its rule kind by bench, controlled, report."
    from adadiff_nb.experiments import bench
    from adadiff_nb.experiments import controlled
    from adadiff_nb.experiments import report as controlled_report
    from adadiff_nb.experiments.methods import (MethodSpec, register_method, unregister_method, method_names,
                                                method_label)
    assert 'toy_exit' not in method_names() and controlled.rule_kind('toy_exit') == 'fixed'
    register_method(MethodSpec('toy_exit', 'Toy exit', 'dynamic exit', 'threshold', 'dynamic early exit'))
    try:
        assert 'toy_exit' in method_names(harness='bench') and method_label('toy_exit') == 'Toy exit'
        assert bench.comparison_config('tiny', methods=['full', 'toy_exit'])['methods'] == ['full', 'toy_exit']
        assert bench.method_styles()['toy_exit']['family'] == 'dynamic early exit'
        assert controlled.rule_kind('toy_exit') == 'dynamic' and 'toy_exit' in controlled.known_methods()
        assert controlled_report.report_styles(['toy_exit'])['toy_exit']['family'] == 'dynamic early exit'
    finally:
        unregister_method('toy_exit')
    assert 'toy_exit' not in bench.method_styles() and 'toy_exit' not in controlled.known_methods()
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['toy_exit'\]"):
        bench.comparison_config('tiny', methods=['toy_exit'])
