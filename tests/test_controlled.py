"""`adadiff-bench --comparison controlled --quick` as real processes on uvit_tiny (8x8): the rows the issue asks for,
equal training images inside each budget group, the staged budget and seed plan, an interrupted run that resumes
exactly (only the missing unit is redone, the other rows are read back unchanged), and every other comparison still
handed to the old harness. Checks the pipeline, not the numbers; well under two minutes on one core."""
import json, math, os, re, subprocess, sys
from pathlib import Path

import pytest

from adadiff_nb.experiments.controlled import BOOTSTRAP, FD_REASON

PY = sys.executable
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
FIELDS = ('method', 'train_images', 'layer_ratio', 'measured_speedup', 'ideal_speedup', 'proxy_fd', 'proxy_fd_ci95',
          'kid', 'psnr_vs_full', 'n_samples', 'seeds')
ABLATIONS = ('adadiff_no_ual', 'adadiff_uem_timestep', 'adadiff_uem_layer_timestep', 'adadiff_uem_attention',
             'adadiff_frozen', 'adadiff_l_layer', 'adadiff_detach_u')


def _run(args, timeout=240):
    code = 'import sys; from adadiff_nb.experiments.controlled import main; sys.exit(main(sys.argv[1:]))'
    return subprocess.run([PY, '-c', code, *args], env=ENV, capture_output=True, text=True, timeout=timeout)


def _quick(tmp, *extra):
    out, work = tmp / 'out', tmp / 'work'
    p = _run(['--comparison', 'controlled', '--quick', '--out', str(out), '--work', str(work), *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / 'controlled_quick.json').read_text()), p.stdout, work


def _check_rows(res):
    rows = res['rows']
    for r in rows:
        for k in FIELDS:
            assert k in r, (r['method'], k)
        for k in ('layer_ratio', 'proxy_fd', 'kid', 'measured_speedup', 'ideal_speedup'):
            assert math.isfinite(r[k]), (r['method'], k)
        lo, hi = r['proxy_fd_ci95']
        assert lo <= hi and r['n_samples'] == res['config']['n'] and r['speedup_source'] == 'interleaved'
        assert (r['psnr_vs_full'] is None) == (r['method'] == 'full')
        assert (r['own_full'] is None) == (r['seeds'][0] != res['config']['seeds'][0]), (r['method'], r['own_full'])
        want = {'proxy_fd', 'kid'} | ({'psnr_vs_full', 'proxy_fd_vs_full'} if r['method'] != 'full' else set())
        want |= {'psnr_vs_own_full'} if r['own_full'] else set()
        assert set(r['ci_method']) == want and all(m.split()[0] in ('BCa', 'basic', 'percentile', 'identical')
                                                   for m in r['ci_method'].values()), r['ci_method']
        miss = abs(1 - r['layer_ratio'] - r['target_reduction']) > res['config']['target_tol'] + 1e-9
        assert r['off_target'] == (miss and r['method'] not in ('full', 'full_ft', 'adadiff_full'))
        fd_keys = want - {'kid', 'psnr_vs_full', 'psnr_vs_own_full'}
        assert all(r['ci_method'][k] == f'basic (BCa: {FD_REASON})' for k in fd_keys)
    assert res['config']['bootstrap'] == BOOTSTRAP                    # part of the cache key: FD's interval
    for steps in {r['budget_steps'] for r in rows}:                 # equal training images per budget group
        assert len({r['train_images'] for r in rows if r['budget_steps'] == steps}) == 1
    b0 = res['config']['budgets'][0]
    assert {r['train_images'] for r in rows if r['budget_steps'] == b0} == {b0 * res['config']['batch_size']}


def _check_own_full(res):
    "Fidelity to each method's own full depth: 100 dB where the row is that model, the backbone's for a cache on it."
    s0, rows = res['config']['seeds'][0], res['rows']
    first = [r for r in rows if r['seeds'][0] == s0]
    for r in first:
        if r['method'] in ('full', 'full_ft', 'adadiff_full', 'small'):
            assert r['psnr_vs_own_full'] == 100. and r['ci_method']['psnr_vs_own_full'] == 'identical images', r
        if r['method'] in ('deepcache', 'l2c'):
            assert r['own_full'] == 'backbone' and abs(r['psnr_vs_own_full'] - r['psnr_vs_full']) < 1e-9
        own = dict(adadiff="adadiff's model at threshold 0", calm="calm's model at threshold 0",
                   ase="ase's model at every layer")
        own.update(dict.fromkeys(('static', 'adadiff_cache', 'adadiff_cache_exit'), own['adadiff']))
        if r['method'] in own:
            assert r['own_full'] == own[r['method']], (r['method'], r['own_full'])
            assert r['psnr_vs_own_full'] < 100.
    ft = [r for r in first if r['method'] == 'full_ft']
    assert {r['budget_steps'] for r in ft} == set(res['config']['budgets']) and all(r['psnr_vs_full'] < 100 for r in ft)


def _check_report(res):
    "The report reads the run: the backbone's quality both ways, the probes, a verdict per claim, the figures."
    from adadiff_nb.experiments.report import claims, VERDICTS, matched_table, pareto_figure, probe_figure
    assert [(q['model'], q['clip_denoised']) for q in res['backbone_quality']] == [('backbone', False),
                                                                                  ('backbone', True)]
    assert {'layer_mse', 'loss_by_timestep', 'uncertainty_by_t', 'exit_trend', 'ase_data_easy'} <= set(res['probes'])
    assert len(res['probes']['exit_trend']['exit_layer_mean']) == res['config']['steps']
    cl = claims(res)
    assert len(cl) == 12 and all(c['verdict'] in VERDICTS and c['evidence'] for c in cl)
    untestable = {c['source'] + ': ' + c['claim'] for c in cl if c['verdict'] == VERDICTS[2]}
    assert 'AdaDiff Table 4: AdaDiff beats a small model of matched GFLOPs trained from scratch' in untestable
    assert all('small model' in u or 'noise-easy' in u for u in untestable), untestable   # the tiny ASE is symmetric
    assert {r['method'] for r in matched_table(res)} >= {'adadiff', 'ase', 'deepcache', 'l2c', 'adadiff_cache',
                                                        'adadiff_cache_exit', 'full_ft'}
    fig = pareto_figure(res, x='layer_ratio')
    assert len(pareto_figure(res).data) > 10 and sum(' steps, ' in a.text for a in fig.layout.annotations) == 2
    assert sum(d.showlegend is not False for d in fig.data) == len({d.name for d in fig.data})   # one entry each
    for c in cl:
        if c['figure'] not in (None, 'pareto', 'noise_easy'): probe_figure(res, c['figure'])


def test_quick_run_plan_and_resume(tmp_path):
    res, out, work = _quick(tmp_path)
    assert res['complete'] and 'timing' in res and res['command'].startswith('adadiff-bench --comparison controlled')
    _check_rows(res)
    rows = res['rows']
    small, big = res['budgets']
    assert set(ABLATIONS) <= set(small['methods']) and {'ase', 'berxit', 'calm', 'small'} <= set(small['methods'])
    assert 'adadiff' in big['methods'] and small['best_baseline'] in big['methods']
    assert len(big['methods']) < len(small['methods'])               # the big budget only for the leaders
    assert 'full_ft' in small['methods'] and 'full_ft' in big['methods']   # the fine-tuned full model: every budget
    _check_own_full(res)
    for plan in res['budgets']:                                        # two seeds: AdaDiff and the best baseline
        for m in plan['repeat_seeds']:
            seeds = {r['seeds'][0] for r in rows if r['method'] == m and r['budget_steps'] == plan['steps']}
            assert seeds == {0, 1}, (m, plan['steps'], seeds)
    summ = [s for s in res['summary'] if s['method'] == 'adadiff' and s['budget_steps'] == 4]
    assert summ and all(s['seeds'] == [0, 1] for s in summ)
    assert {r['target_reduction'] for r in rows if r['method'] == 'adadiff'} == {0.4, 0.2}
    _check_report(res)

    # interrupt: one unit's rows and the results lost -> only that unit is redone, the rest read back unchanged
    (work / 'rows' / 'calm_b4_s0.json').unlink()
    (tmp_path / 'out' / 'controlled_quick.json').unlink()
    res2, out2, _ = _quick(tmp_path)
    assert 'calm b4 s0: done before' not in out2 and 'adadiff b4 s0: done before' in out2
    assert 'calm: cached' in out2 and 'fine-tuning' not in out2, out2   # the calm model itself was on disk
    key = lambda r: (r['method'], r['budget_steps'], r['seeds'][0], r['target_reduction'])
    before = {key(r): r['proxy_fd'] for r in rows}
    assert {key(r): r['proxy_fd'] for r in res2['rows']} == before    # same noise, same models: the same numbers


def test_options_and_delegation(tmp_path):
    res, _, _ = _quick(tmp_path, '--methods', 'full,adadiff,static,ase', '--budgets', '3,6', '--seeds', '0',
                       '--no-timing')
    _check_rows(dict(res, rows=[dict(r, speedup_source='interleaved') for r in res['rows']]))
    assert not res['complete'] and res['timing'] is None
    assert {r['method'] for r in res['rows']} == {'full', 'adadiff', 'static', 'ase'}
    assert {r['train_images'] for r in res['rows'] if r['budget_steps'] == 3} == {3 * res['config']['batch_size']}
    p = _run(['--comparison', 'controlled', '--quick', '--budgets', '6,3', '--out', str(tmp_path)])
    assert p.returncode == 2 and 'increasing positive' in p.stderr
    p = _run(['--comparison', 'nope', '--out', str(tmp_path)])              # handed to bench.main unchanged
    assert p.returncode == 2 and 'unknown comparison' in p.stderr


def _options_without_help(text):
    "The options of an argparse --help text with an empty help: nothing after the invocation and nothing below it."
    lines, bad, seen = text.splitlines(), [], []
    start = next(i for i, l in enumerate(lines) if l.startswith('options:'))
    for k in range(start + 1, len(lines)):
        if lines[k] and not lines[k].startswith(' '): break                    # the next section
        if not lines[k].startswith('  -'): continue
        inv, *hlp = re.split(r'\s{2,}', lines[k].strip(), maxsplit=1)
        seen += re.findall(r'(?:^|, )(--?[\w-]+)', inv)                       # '-h, --help', '--out OUT'
        if not hlp and not (k + 1 < len(lines) and re.match(r' {6,}\S', lines[k + 1])): bad.append(inv)
    return bad, set(seen)


def test_help_lists_every_comparison_and_every_option_has_help():
    from adadiff_nb.experiments import bench
    from adadiff_nb.experiments import controlled
    env = {**ENV, 'COLUMNS': '100'}
    code = 'import sys; from adadiff_nb.experiments.controlled import main; sys.exit(main(sys.argv[1:]))'
    top = subprocess.run([PY, '-c', code, '--help'], env=env, capture_output=True, text=True, timeout=60)
    own = subprocess.run([PY, '-c', code, '--comparison', 'controlled', '--help'], env=env, capture_output=True,
                         text=True, timeout=60)
    assert top.returncode == own.returncode == 0, top.stderr + own.stderr
    lines = top.stdout.splitlines()
    k = lines.index('comparisons (--comparison NAME):')
    listed = dict(l.split(None, 1) for l in lines[k + 1:] if l.strip())
    assert set(listed) == {'tiny', 'cifar16_cpu', 'controlled'} and all(v.strip() for v in listed.values()), listed
    for text, parser in ((top.stdout, bench.build_parser()), (own.stdout, controlled.build_parser())):
        bad, seen = _options_without_help(text)
        assert not bad, bad
        assert seen == {o for a in parser._actions for o in a.option_strings}      # every option was read
    assert _options_without_help('options:\n  --x X       has help\n  --y Y\n  --z Z       z\n')[0] == ['--y Y']


@pytest.mark.parametrize('args, msg', [
    (['--promote', '-1'], 'promote must be an integer >= 0'),
    (['--batch-size', '0'], 'batch_size must be an integer >= 1'),
    (['--n', '1'], 'n must be an integer >= 2'),
    (['--n-boot', '-1'], 'n_boot must be'),
    (['--budgets', 'x'], "--budgets 'x': not a comma list of integers"),
    (['--budgets', '4,4'], 'increasing positive'),
    (['--seeds', '1.5'], "--seeds '1.5': not a comma list of integers"),
    (['--targets', '0.4,nan'], 'targets must be layer reductions'),
    (['--threads', '-1'], '--threads'),
    (['--out', 'UNDER_FILE'], 'so no directory can be made there'),
    (['--work', 'FILE'], 'is a file, not a directory'),
    (['--backbone', 'EMPTY'], 'holds no model.safetensors'),
    (['--compare-backbones', 'MISSING'], '--compare-backbones'),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, msg):
    "In-process, every model forward an error: each bad option exits 2 with one line, and nothing is made."
    import torch
    from adadiff_nb.experiments.controlled import main
    (tmp_path / 'afile').write_text('not a directory\n')
    (tmp_path / 'empty').mkdir()
    paths = dict(FILE=tmp_path / 'afile', UNDER_FILE=tmp_path / 'afile' / 'sub', EMPTY=tmp_path / 'empty',
                 MISSING=tmp_path / 'missing')

    def no_forward(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} ran before the bad input was refused")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.nn.Module, '__call__', no_forward)
    argv = ['--comparison', 'controlled', '--quick', '--quiet', '--out', str(tmp_path / 'out'), '--work',
            str(tmp_path / 'work')]
    rc = main(argv + [str(paths.get(a, a)) for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith('adadiff-bench: error: ') and msg in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile', 'empty']


def test_committed_comparison_backbone_loads():
    "The comparison backbone in the repository (issue 21 item 5) is a uvit_cpu16 that the comparison loads as given."
    import torch
    from adadiff_nb.data import repo_root
    from adadiff_nb.experiments.bench import load_backbone
    from adadiff_nb.models.uvit import UViT, create_uvit
    d = repo_root() / 'adadiff_nb' / 'assets' / 'cifar16_backbone'
    b = load_backbone(d)
    assert isinstance(b, UViT) and dict(b.config) == dict(create_uvit('uvit_cpu16').config)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in b.parameters())
    rec = json.loads((d / 'config.json').read_text())
    assert 'adadiff-train --config cpu16_backbone --steps 4500' in rec['recipe'][0]
