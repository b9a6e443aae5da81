"""`adadiff-sample` / `sample_to_dir` / `sample_batches` refuse what they cannot do before any work, in one line that
names the problem and the fix, and a refused call changes nothing: outputs (a file, a read-only or non-empty --out,
--overwrite / --resume), labels (an empty entry, the null class, a bad entry past the n-th), guidance scales that
saturate every pixel, noise of the wrong dtype or with NaN. Also what a run records and shows: provenance in
stats.json, an upscaled side-by-side grid, progress bars that say which run they count."""
import json, os, re, sys

import numpy as np
import pytest
import torch
from PIL import Image

import adadiff_nb
from adadiff_nb.apps import sample_cli as S
from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.exits.early_exit import EarlyExitUViT
from adadiff_nb.apps.sample_cli import GRID_IMAGES, main, sample_to_dir
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.models.uvit import create_uvit

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    "A tiny class-conditional early-exit U-ViT (10 classes + the null class 10), 8x8 images, saved."
    root = tmp_path_factory.mktemp('safety')
    torch.manual_seed(0)
    save_model(EarlyExitUViT.from_backbone(create_uvit('uvit_tiny', num_classes=11, null_class=True)).eval(),
               root / 'cfg')
    return root / 'cfg'


@pytest.fixture
def no_compute(monkeypatch):
    "Fail the test if the model is loaded or anything is sampled."
    def boom(*a, **k): raise AssertionError('compute started before the error')
    monkeypatch.setattr(S, 'load_sampling_model', boom)
    monkeypatch.setattr(S, 'sample_batches', boom)


def _args(ckpt, out, *extra):
    return ['--checkpoint', str(ckpt), '--sampler', 'ddim', '--steps', '2', '--n', '2', '--out', str(out), '--quiet',
            *map(str, extra)]


def _bad(capsys, args, msg):
    "main(args) exits 2 with one line naming `msg`, no traceback."
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('adadiff-sample: error: ') and err.count('\n') == 1 and msg in err, err
    return err


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}


def test_out_errors_come_before_any_compute(ckpt, tmp_path, capsys, no_compute):
    (tmp_path / 'file').write_text('keep')
    _bad(capsys, _args(ckpt, tmp_path / 'file'), 'is an existing file, not a directory; pass a new or empty directory')
    _bad(capsys, _args(ckpt, tmp_path / 'file' / 'sub'), 'is a file, not a directory')
    (tmp_path / 'd' / 'samples.png').mkdir(parents=True)
    _bad(capsys, _args(ckpt, tmp_path / 'd', '--overwrite'), 'is a directory where adadiff-sample writes a file')
    _bad(capsys, _args(ckpt, tmp_path / 'new', '--overwrite', '--resume'), 'exclude each other')
    _bad(capsys, _args(ckpt, tmp_path / 'new', '--resume'), '--resume continues a sharded run')
    assert (tmp_path / 'file').read_text() == 'keep' and not (tmp_path / 'new').exists()


def test_read_only_out(ckpt, tmp_path, capsys, monkeypatch):
    "A directory that takes no files: the write probe fails, before any compute (root ignores modes: simulated)."
    def denied(*a, **k): raise PermissionError(13, 'Permission denied')
    with monkeypatch.context() as m:
        m.setattr(S.tempfile, 'TemporaryFile', denied)
        m.setattr(S, 'sample_batches', lambda *a, **k: pytest.fail('sampled'))
        _bad(capsys, _args(ckpt, tmp_path / 'ro' / 'out'), f"cannot write in {tmp_path} (Permission denied); pass "
             "a writable directory")
    if os.geteuid() == 0: return                                               # root writes anywhere
    (tmp_path / 'ro').mkdir()
    (tmp_path / 'ro').chmod(0o555)
    try: _bad(capsys, _args(ckpt, tmp_path / 'ro' / 'out'), 'cannot write in')
    finally: (tmp_path / 'ro').chmod(0o755)


def test_non_empty_out_needs_overwrite_and_nothing_changes(ckpt, tmp_path, capsys):
    out = tmp_path / 'o'
    assert main(_args(ckpt, out, '--class', 3)) == 0
    before = _snapshot(out)
    err = _bad(capsys, _args(ckpt, out, '--class', 4), 'is not empty (it holds samples.npz, samples.png, stats.json)')
    assert '--overwrite' in err
    assert _snapshot(out) == before                                            # the refused call changed nothing
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    _bad(capsys, _args(ckpt, tmp_path / 'other', '--class', 4), 'it holds notes.txt')
    assert main(_args(ckpt, out, '--class', 4, '--overwrite')) == 0
    assert np.load(out / 'samples.npz')['labels'].tolist() == [4, 4]
    assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine'


def test_merge_does_not_replace_without_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / 's'
    for r in (0, 1): assert main(_args(ckpt, out, '--shard', f'{r}/2', '--batch', 1)) == 0
    merge = ['--checkpoint', str(ckpt), '--out', str(out), '--merge']
    assert main(merge) == 0
    before = _snapshot(out)
    _bad(capsys, merge, 'holds samples.png, samples.npz, stats.json (an earlier run or merge); pass --overwrite')
    assert _snapshot(out) == before
    assert main(merge + ['--resume']) == 0 and main(merge + ['--overwrite']) == 0


def test_fid_without_pytorch_fid_is_one_line(ckpt, tmp_path, capsys, monkeypatch, no_compute):
    "--fid on a lean install (no pytorch-fid): one error line naming the `metrics` extra, before any work."
    monkeypatch.setitem(sys.modules, 'pytorch_fid.inception', None)           # its import fails: not installed
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2), sigma=np.eye(2))
    msg = ("adadiff-sample --fid needs the `pytorch_fid` package, which is not installed: "
           "pip install 'adadiff_nb[metrics]'")
    _bad(capsys, _args(ckpt, tmp_path / 'o', '--fid', tmp_path / 'ref.npz'), msg)
    merge = ['--checkpoint', str(ckpt), '--out', str(tmp_path / 'o'), '--merge', '--fid', str(tmp_path / 'ref.npz')]
    _bad(capsys, merge, msg)
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('extra, msg', [
    (['--labels', '1,,3'], "labels '1,,3' has an empty entry (entry 2); pass comma-separated integers"),
    (['--class', 10], "10 is this model's null class"),
    (['--labels', '2,10'], 'or guidance scale 0 (--guidance-scale 0) for unconditional samples'),
    (['--guidance-scale', '1e9'], 'guidance_scale=1e+09 is above 50: it amplifies eps_c - eps_u so much that every'),
    (['--guidance-scale', 'inf'], 'is infinite'),
    (['--seed', '1', '--n', '0'], 'n must be an integer >= 1'),
])
def test_label_and_guidance_errors(ckpt, tmp_path, capsys, extra, msg):
    _bad(capsys, _args(ckpt, tmp_path / 'x', *extra), msg)
    assert not (tmp_path / 'x').exists()


def test_every_label_of_a_file_is_checked(ckpt, tmp_path, capsys):
    "Only the first n labels are used, but a bad one further down is an error, not silently ignored."
    f = tmp_path / 'labels.txt'
    f.write_text('1\n2\n-3\n')
    _bad(capsys, _args(ckpt, tmp_path / 'x', '--labels', f), 'got values in [-3, 2]')
    f.write_text('1\n2\n7\n')
    assert main(_args(ckpt, tmp_path / 'y', '--labels', f)) == 0
    assert np.load(tmp_path / 'y' / 'samples.npz')['labels'].tolist() == [1, 2]


def test_api_validates_where_values_enter(ckpt, tmp_path):
    model = S.load_sampling_model(ckpt)
    xT = torch.randn(2, 3, 8, 8)
    nan = xT.clone()
    nan[0, 0, 0, 0] = float('nan')
    for x, msg in ((xT.double(), 'x_T is float64, but the samplers take float32 noise; pass x_T.float()'),
                   (xT.long(), 'x_T is int64'), (nan, 'x_T holds 1 NaN or infinite values'),
                   (xT[:, :1], 'x_T has shape (2, 1, 8, 8), but the model takes (n, 3, 8, 8)')):
        with pytest.raises(ValueError, match=re.escape(msg)): sample_batches(model, 'ddim', 1, x_T=x, labels=[0, 1])
    with pytest.raises(ValueError, match='null class'): sample_batches(model, 'ddim', 1, n=2, labels=10)
    with pytest.raises(ValueError, match='is above 50'): sample_batches(model, 'ddim', 1, n=2, guidance_scale=51)
    with pytest.raises(ValueError, match='seed must be an integer'):
        sample_to_dir(ckpt, tmp_path / 'a', steps=1, n=1, seed=1.5, progress=False)
    sample_to_dir(ckpt, tmp_path / 'a', steps=1, n=1, labels=3, progress=False)
    with pytest.raises(ValueError, match='is not empty'): sample_to_dir(ckpt, tmp_path / 'a', steps=1, n=1, labels=3)
    assert not (tmp_path / 'b').exists()


def test_stats_record_provenance(ckpt, tmp_path, monkeypatch):
    st = sample_to_dir(ckpt, tmp_path / 'o', steps=1, n=1, labels=1, progress=False)
    pv = json.loads((tmp_path / 'o' / 'stats.json').read_text())['provenance']
    assert pv == st['provenance']
    assert (pv['adadiff_nb'], pv['torch'], pv['threads'], pv['device']) == \
        (adadiff_nb.__version__, torch.__version__, torch.get_num_threads(), 'cpu')
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00', pv['utc'])
    assert pv['git_commit'] is None or re.fullmatch('[0-9a-f]{40}', pv['git_commit'])
    # outside a git checkout (an installed wheel), or without git: no commit, no failure
    S._git_state.cache_clear()
    try:
        with monkeypatch.context() as m:
            m.setattr(adadiff_nb, '__file__', str(tmp_path / 'site-packages' / 'adadiff_nb' / '__init__.py'))
            assert S.provenance()['git_commit'] is None
        S._git_state.cache_clear()
        with monkeypatch.context() as m:
            m.setattr(S.subprocess, 'run', lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError('git')))
            assert S._git_state() == (None, None)
    finally: S._git_state.cache_clear()


def test_grid_is_upscaled_side_by_side_and_capped(ckpt, tmp_path):
    sample_to_dir(ckpt, tmp_path / 'g', sampler='ddim', steps=1, n=GRID_IMAGES + 6, batch=GRID_IMAGES + 6, labels=2,
                  threshold=.5, compare_full=True, progress=False)
    z = np.load(tmp_path / 'g' / 'samples.npz')
    assert len(z['images']) == GRID_IMAGES + 6                                 # the npz holds them all
    g = np.asarray(Image.open(tmp_path / 'g' / 'samples.png'))
    side = 8 * 66 + 2                                                          # 8 x 8 grid of 64 px images (8 px x 8)
    head, right = g.shape[0] - side, g.shape[1] - side
    assert head > 10 and right >= side + 8 and (g[:head] < 100).any()          # the header text
    for col, key in ((2, 'images'), (right + 2, 'images_full')):
        np.testing.assert_array_equal(g[head + 2:head + 66, col:col + 64], z[key][0].repeat(8, 0).repeat(8, 1))
    last = g[head + 2 + 7 * 66:head + 66 + 7 * 66, 2 + 7 * 66:66 + 7 * 66]      # grid cell 63: the 64th image
    np.testing.assert_array_equal(last, z['images'][GRID_IMAGES - 1].repeat(8, 0).repeat(8, 1))


def test_progress_bars_say_which_run(ckpt, tmp_path, capsys):
    args = [a for a in _args(ckpt, tmp_path / 'p', '--threshold', .5, '--compare-full', '--class', 1) if a != '--quiet']
    assert main(args) == 0
    err = capsys.readouterr().err
    assert 'early exit ddim' in err and 'full ddim' in err, err


@pytest.mark.parametrize('ref, n, msg', [
    ('garbage.npz', 2, 'garbage.npz is not a statistics .npz that can be read'),
    ('notes.txt', 2, 'notes.txt is neither a statistics .npz nor a folder of images'),
    ('missing.npz', 2, '--proxy-fd reference'),
    ('ref.npz', 1, '--proxy-fd needs --n >= 2'),
])
def test_bad_metric_reference_is_refused_before_compute(ckpt, tmp_path, capsys, no_compute, ref, n, msg):
    "A --proxy-fd reference that cannot be used, or n < 2: one line naming the flag (and the file), before sampling."
    (tmp_path / 'garbage.npz').write_bytes(b'garbage')
    (tmp_path / 'notes.txt').write_text('not statistics')
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(2), sigma=np.eye(2))
    args = _args(ckpt, tmp_path / 'o', '--proxy-fd', tmp_path / ref) + ['--n', str(n)]
    err = _bad(capsys, args, msg)
    assert '--proxy-fd' in err
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('kw, msg', [
    (dict(sampler_opts=[1]), "sampler_opts must be a dict of the sampler's options"),
    (dict(sampler_opts=np.array([1, 2])), 'sampler_opts must be a dict'),
    (dict(seed=None), 'seed must be an integer in [-2**63, 2**64)'),
    (dict(seed=2 ** 70), 'seed must be an integer'),
    (dict(labels=-0.0), 'labels must be an int (the class of every image) or a list of ints'),
    (dict(labels='x'), 'labels must be an int'),
    (dict(schedule=[-1]), 'schedule [-1] is not understood; pass a name of SCHEDULES'),
    (dict(exit_layers=[]), 'exit_layers [] must be a number or a non-empty list of numbers'),
    (dict(threshold=['x']), "threshold ['x'] must be a number"),
    (dict(device='meta'), "device 'meta': the models run on 'cpu' or 'cuda' only"),
    (dict(device='cpu:x'), "device 'cpu:x' is not a device"),
    (dict(precision=[]), 'unknown precision []'),
    (dict(shard=(2, 2)), 'the rank must lie in 0..1'),
])
def test_sample_batches_checks_its_arguments_before_compute(ckpt, monkeypatch, kw, msg):
    model = S.load_sampling_model(ckpt)
    def boom(*a, **k): raise AssertionError('model forward before the error')
    monkeypatch.setattr(model, 'forward', boom)
    with pytest.raises(ValueError, match=re.escape(msg)): sample_batches(model, 'ddim', 1, n=2, batch_size=1, **kw)


@pytest.mark.parametrize('kw, msg', [
    (dict(precision=[]), 'unknown precision []'),
    (dict(schedule=[]), 'schedule [] is not understood'),
    (dict(exit_layers=[]), 'exit_layers [] must be a number'),
    (dict(compare_full=np.array([1, 2])), 'compare_full must be True or False'),
    (dict(overwrite=[4, -2]), 'overwrite must be True or False, got [4, -2]'),
    (dict(seed=''), 'seed must be an integer'),
    (dict(device=''), "--device '' is empty; pass 'cpu' or 'cuda'"),
    (dict(device=0 if not torch.cuda.is_available() else 'meta'), '--device'),
])
def test_sample_to_dir_checks_its_arguments_before_compute(ckpt, tmp_path, no_compute, kw, msg):
    (tmp_path / 'o').mkdir()
    (tmp_path / 'o' / 'stats.json').write_text('keep')
    with pytest.raises(ValueError, match=re.escape(msg)):
        sample_to_dir(ckpt, tmp_path / 'o', steps=1, n=1, labels=1, progress=False, **kw)
    assert (tmp_path / 'o' / 'stats.json').read_text() == 'keep'


@pytest.fixture
def checks(monkeypatch):
    "Count the calls of the threshold check and of the early-exit test wherever they are bound (`calls[name]`)."
    from adadiff_nb.exits import early_exit as EE, runner as RN
    from adadiff_nb.sampling import samplers as SP, denoisers as DN
    calls = {'check_threshold': 0, 'is_early_exit_model': 0}
    def counted(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f
    for name in calls:
        f = counted(name, getattr(EE, name))
        for mod in (EE, RN, SP, DN, S):
            if hasattr(mod, name): monkeypatch.setattr(mod, name, f)
    return calls


@pytest.mark.parametrize('threshold, guidance_scale, per_run', [(.1, None, 1), (.1, 2., 1), ([.05, .2], None, 2)])
def test_exit_rule_is_checked_where_it_enters_not_per_step(ckpt, checks, threshold, guidance_scale, per_run):
    "sample_batches checks the threshold once (a schedule: once per bucket), however many steps and batches it runs."
    model = S.load_sampling_model(ckpt)
    seen = []
    for steps in (1, 4):
        for k in checks: checks[k] = 0
        sample_batches(model, 'ddim', steps, n=2, batch_size=1, threshold=threshold, labels=[1, 2],
                       guidance_scale=guidance_scale)
        seen.append(dict(checks))
    assert seen[0] == seen[1], seen                                            # independent of the number of steps
    assert seen[0] == {'check_threshold': per_run, 'is_early_exit_model': 1}, seen


def test_cli_checks_the_threshold_where_it_enters(ckpt, tmp_path, checks):
    "sample_to_dir: once when the value is parsed (before anything is loaded), once at sample_batches; not per step."
    seen = []
    for steps in (1, 3):
        checks['check_threshold'] = 0
        sample_to_dir(ckpt, tmp_path / str(steps), steps=steps, n=2, batch=1, labels=1, threshold=.2,
                      compare_full=True, progress=False)
        seen.append(checks['check_threshold'])
    assert seen == [2, 2], seen
