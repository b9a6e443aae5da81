"""Fuzz tests (issue 26) of the command lines (`adadiff-sample`, `adadiff-train`, `adadiff-bench`, `adadiff-latents`,
`adadiff-text-features`) and of the public sampling API (`sampling.sample_batches`, `sample.sample_to_dir`).

Every command line is called in-process (`main(argv)`, argparse's `SystemExit` caught); hypothesis draws argument lists
that mix valid flags with adversarial values (negative / zero / huge numbers, NaN, inf, '1e9', empty strings, ',,',
unknown names, missing paths, paths that are files, duplicated flags, unicode), derandomized and with a fixed number
of examples so that CI is reproducible and bounded. The contract checked on every run:

* the exit status is 0 or 2 (`adadiff-train` also 3: its documented non-finite-loss status), never a traceback;
* exit 2 prints one clear error line (`PROG: error: ...`) as the last line of stderr, and writes nothing that looks
  complete (no stats.json / final model / cache in a fresh --out; an existing --out or file is left as it was);
  sampling runs no model forward before the error (bad input is refused before any compute);
* exit 0 leaves complete output that loads (samples.npz + samples.png + stats.json with n images, ...);
* a value that is known to be invalid gives exit 2 (the tags of the strategies below).

The API fuzz checks: success (finite float images of the asked shape) or a ValueError / TypeError whose message names
an argument of the call, raised before any model forward. Explicit regression cases for the probes of issue 26
follow the fuzz tests."""
import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

from adadiff_nb.apps import sample_cli  # noqa: E402
from adadiff_nb.sampling.samplers import SAMPLERS  # noqa: E402
from adadiff_nb.sampling.run import sample_batches, model_image_shape  # noqa: E402

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
OK, BAD, ARGBAD, LAB = 'ok', 'bad', 'argbad', 'lab'   # tags: valid, invalid, rejected by argparse, labels (cond only)


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------- harness
class _ComputeStarted(BaseException):
    "Raised at the first model forward when a run is stopped there (`forwards(stop=True)`)."


@contextlib.contextmanager
def forwards(stop: bool = False):
    "Count `nn.Module` forwards inside the block (stop=True: raise `_ComputeStarted` at the first one)."
    calls, orig = [0], torch.nn.Module.__call__

    def call(self, *a, **k):
        calls[0] += 1
        if stop: raise _ComputeStarted()
        return orig(self, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, '__call__', call)
        yield calls


def run_cli(main, argv, stop_at_compute: bool = False) -> dict:
    "Call `main(argv)` in-process -> dict(rc, out, err, forwards, tb); rc 'compute' when stopped at the first forward."
    out, err, tb, threads = io.StringIO(), io.StringIO(), None, torch.get_num_threads()
    with forwards(stop_at_compute) as calls, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main(list(argv))
        except SystemExit as e: rc = e.code
        except _ComputeStarted: rc = 'compute'
        except Exception: rc, tb = 'traceback', traceback.format_exc()
    torch.set_num_threads(threads)
    return dict(rc=rc, out=out.getvalue(), err=err.getvalue(), forwards=calls[0], tb=tb, argv=list(argv))


def _lines(s: str) -> list:
    return [v.strip() for v in re.split(r'[\r\n]', s) if v.strip()]


def assert_clean(res: dict, prog: str, allowed=(0, 2)):
    "Exit status in `allowed`, no traceback; exit 2: one error line `PROG...: error: <message>`, the last one."
    what = f"{prog} {' '.join(map(repr, res['argv']))}"
    assert res['tb'] is None, f"{what}: traceback instead of exit status 0 / 2:\n{res['tb']}"
    assert res['rc'] in allowed, f"{what}: exit status {res['rc']!r}, expected one of {allowed}; stderr: {res['err']}"
    assert 'Traceback' not in res['err'], f"{what}: traceback on stderr:\n{res['err']}"
    if res['rc'] == 2:
        lines = _lines(res['err'])
        errs = [v for v in lines if re.match(rf'{re.escape(prog)}( [^:]*)?: error: \S', v)]
        assert len(errs) == 1 and lines[-1] == errs[0], f"{what}: exit 2 without one clear error line: {res['err']!r}"


def _snapshot(p: Path) -> dict:
    "name -> bytes of every file under p (p itself when a file); {} when absent."
    if p.is_file(): return {'.': p.read_bytes()}
    if not p.is_dir(): return {}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob('*')) if f.is_file()}


def _no_temp_files(root: Path, what: str):
    left = [str(f) for f in root.rglob('*.tmp')] if root.is_dir() else []
    assert not left, f"{what}: temporary files left behind: {left}"


# ---------------------------------------------------------------------------------------------------- fixtures
def _write_tree(root: Path) -> dict:
    "The adversarial paths of one example, under `root` (which is also the working directory)."
    from PIL import Image
    p = dict(FRESH=root / 'out', NESTED=root / 'a' / 'b' / 'c', UNICODE=root / 'ü 日本 out', FILE=root / 'afile.txt',
             UNDER_FILE=root / 'afile.txt' / 'sub', EMPTY_DIR=root / 'empty', MISSING=root / 'missing',
             NONEMPTY=root / 'prev', LAB_NEG=root / 'labels_neg.txt', LAB_BADJSON=root / 'labels.json',
             LAB_DICT=root / 'labels_dict.json', GARBAGE_NPZ=root / 'garbage.npz', IMGS=root / 'imgs',
             IMGS_TXT=root / 'imgs_txt', IMGS_BROKEN=root / 'imgs_broken', CKPT_GARBAGE=root / 'garbage.safetensors')
    p['FILE'].write_text('not a directory\n')
    p['EMPTY_DIR'].mkdir()
    p['NONEMPTY'].mkdir()
    for name in ('samples.npz', 'samples.png', 'stats.json'): (p['NONEMPTY'] / name).write_text('previous run\n')
    p['LAB_NEG'].write_text('1\n-3\n2\n')
    p['LAB_BADJSON'].write_text('[1, 2')
    p['LAB_DICT'].write_text('{"a": 1}')
    p['GARBAGE_NPZ'].write_bytes(b'garbage')
    p['CKPT_GARBAGE'].write_bytes(b'\x00garbage')
    rng = np.random.default_rng(0)
    for d in ('IMGS', 'IMGS_TXT', 'IMGS_BROKEN'):
        (p[d] / 'cls').mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p[d] / 'cls' / f'{k}.png')
    (p['IMGS_TXT'] / 'cls' / 'notes.txt').write_text('not an image')
    (p['IMGS_BROKEN'] / 'cls' / 'broken.png').write_text('not an image')
    return p


@contextlib.contextmanager
def workdir():
    "A fresh temporary working directory holding the adversarial paths -> (root, paths)."
    old = os.getcwd()
    root = Path(tempfile.mkdtemp(prefix='fuzz_'))
    try:
        os.chdir(root)
        yield root, _write_tree(root)
    finally:
        os.chdir(old)
        shutil.rmtree(root, ignore_errors=True)


def _resolve(v, paths: dict) -> str:
    "A drawn value: a placeholder name of `paths` -> its path, else the string itself."
    return str(paths[v]) if isinstance(v, str) and v in paths else v


# ---------------------------------------------------------------------------------------------------- argv strategies
def _opt(flag: str, *groups):
    "(flag, value, tag) draws: `groups` are (tag, [values]) pairs or (tag, strategy)."
    alts = []
    for tag, vals in groups:
        s = vals if isinstance(vals, st.SearchStrategy) else st.sampled_from(list(vals))
        alts.append(st.tuples(st.just(flag), s, st.just(tag)))
    return st.one_of(*alts)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=12)
_WEIRD = ['', ',,', ' ', 'nan', 'inf', '-inf', '1e9', '-1', '0', 'ü日本', '\u202e', '٣', '0x10', '1_000']


def _tag_of(items: list, flag: str):
    "The tag of the last occurrence of `flag` (argparse keeps the last), None when absent."
    tags = [t for f, _, t in items if f == flag]
    return tags[-1] if tags else None


def _argv(items: list, paths: dict) -> list:
    argv = []
    for f, v, _ in items:
        argv += [f] if v is None else [f, _resolve(v, paths)]
    return argv


def _expect_bad(items: list, cond_model: bool, extra_bad=()) -> list:
    "The reasons why this argument list must be refused (exit 2); [] when it may run."
    why = [f"{f} {v!r}" for f, v, t in items if t == ARGBAD]
    for f in {f for f, _, _ in items}:
        t = _tag_of(items, f)
        if t == BAD or (t == LAB and not cond_model): why.append(f"{f} {[v for g, v, _ in items if g == f][-1]!r}")
    return why + list(extra_bad)


# ---------------------------------------------------------------------------------------------------- adadiff-sample
_SAMPLE_OPTS = [
    _opt('--sampler', (OK, sorted(SAMPLERS)), (BAD, ['nope', '', 'DDIM!']), (None, _TEXT)),
    _opt('--steps', (OK, ['1', '2']), (BAD, ['0', '-1', '-99999999999999999999']),
         (ARGBAD, ['', 'nan', '1e9', '1.5', 'x'])),
    _opt('--n', (OK, ['1', '2']), (BAD, ['0', '-3']), (ARGBAD, ['', 'inf', '1e9', ',,'])),
    _opt('--batch', (OK, ['1', '2', '16', '1000000000']), (BAD, ['0', '-1']), (ARGBAD, ['', 'x'])),
    _opt('--seed', (OK, ['0', '7']), (None, ['-1', str(2 ** 70)]), (ARGBAD, ['', 'nan'])),
    _opt('--threshold', (OK, ['0', '0.1', '1', '0,0.5']), (BAD, ['nan', 'inf', '-0.1', '1.5', '1e9', ',,', 'abc', '']),
         (None, ['0,,1'] + _WEIRD)),
    _opt('--exit-layers', (OK, ['0', '3', '9']), (BAD, ['-1', '1e9', '1.5', 'x', '', ',,', 'nan']), (None, ['10'])),
    _opt('--class', (LAB, ['0', '3', '9']), (BAD, ['10', '11', '-1', '99999999999']), (ARGBAD, ['x', '', '1.0'])),
    _opt('--labels', (LAB, ['1,2', '0', 'LAB_OK']), (BAD, ['1,,3', '-3', '10', 'x', '', ',,', 'LAB_NEG', 'LAB_BADJSON',
                                                          'LAB_DICT', 'MISSING,1', '1.5']), (None, ['٣'])),
    _opt('--guidance-scale', (LAB, ['2', '0']), (BAD, ['nan', 'inf', '-1', 'x', '', '-inf']),
         (None, ['1', '1e9', '1e30'])),
    _opt('--guidance-policy', (OK, ['joint', 'independent']), (BAD, ['x', ''])),
    _opt('--schedule', (OK, ['linear', 'cosine', 'vpsde', 'sd']), (BAD, ['x', 'nope']), (None, [''])),
    _opt('--precision', (OK, ['fp32']), (BAD, ['x', '', 'fp64']), (None, ['fp16', 'bf16'])),
    _opt('--device', (OK, ['cpu']), (BAD, ['', 'meta', 'x', 'cpu:x']), (None, ['cuda', 'cpu:0'])),
    _opt('--shard', (OK, ['0/1']), (BAD, ['1/1', '2/1', '-1/2', 'x', '0/0', '', '0/-1']), (None, ['0/2'])),
    _opt('--fid', (BAD, ['MISSING', ''])),
    _opt('--proxy-fd', (BAD, ['MISSING', 'GARBAGE_NPZ', 'FILE'])),
    _opt('--vae', (BAD, ['MISSING', 'FILE', 'EMPTY_DIR'])),
    _opt('--vae-scale', (None, ['nan', '0', '1']), (ARGBAD, ['x', ''])),
    _opt('--text-encoder', (BAD, ['MISSING', 'FILE'])),
    _opt('--prompt', (BAD, ['a cat', '', 'ü日本'])),
    _opt('--prompts', (BAD, ['MISSING', 'FILE', 'EMPTY_DIR'])),
    _opt('--preset', (BAD, ['x', 'uvit_s2_cifar10', 'DiT-XL/2', ''])),
    _opt('--compare-full', (OK, [None])),
    _opt('--clip-denoised', (OK, [None])),
    _opt('--quiet', (OK, [None])),
    _opt('--overwrite', (None, [None])),
    _opt('--resume', (None, [None])),
    _opt('--merge', (BAD, [None])),                                       # no shards in a fresh --out
    _opt('--bogus', (ARGBAD, [None, 'x'])),
]
_SAMPLE_CKPT = _opt('--checkpoint', (OK, ['default']), (OK, ['cifar10_cond']), (OK, ['cifar10_cond']),
                    (BAD, ['', 'MISSING', 'FILE', 'EMPTY_DIR', 'CKPT_GARBAGE', 'ü日本']))
_SAMPLE_OUT = _opt('--out', (OK, ['FRESH']), (OK, ['FRESH']), (OK, ['NESTED', 'UNICODE']),
                   (BAD, ['FILE', 'UNDER_FILE', 'NONEMPTY', '']))


@st.composite
def sample_argvs(draw):
    "(items, flag order) of an adadiff-sample command line: checkpoint, out, --quiet and up to 5 more options."
    items = [draw(_SAMPLE_CKPT), draw(_SAMPLE_OUT), ('--quiet', None, OK)]
    items += draw(st.lists(st.one_of(*_SAMPLE_OPTS), max_size=4))
    if not any(f == '--steps' for f, _, _ in items): items.append(('--steps', '1', OK))      # keep the work tiny
    if not any(f == '--n' for f, _, _ in items): items.append(('--n', '1', OK))
    return draw(st.permutations(items))


def _sample_expect_bad(items: list) -> list:
    flags = {f for f, _, _ in items}
    cond = _tag_of(items, '--checkpoint') == OK and _effective(items, '--checkpoint') == 'cifar10_cond'
    extra = ['--class with --labels'] if {'--class', '--labels'} <= flags else []
    if '--shard' in flags and flags & {'--fid', '--proxy-fd'}: extra.append('--shard with a metric')
    if {'--overwrite', '--resume'} <= flags: extra.append('--overwrite with --resume')
    if '--overwrite' in flags: items = [i for i in items if i[:2] != ('--out', 'NONEMPTY')]   # replacing it is asked
    return _expect_bad(items, cond, extra)


def _effective(items: list, flag: str, default=None):
    vals = [v for f, v, _ in items if f == flag]
    return vals[-1] if vals else default


def check_sample_output(res: dict, out: Path, before: dict, n: int | None, shard=None):
    "Exit 0: complete, loadable output of n images; exit 2: `out` as it was, nothing that looks complete."
    what = f"adadiff-sample {' '.join(map(repr, res['argv']))}"
    _no_temp_files(out if out.is_dir() else out.parent, what)
    if res['rc'] == 2:
        assert _snapshot(out) == before, f"{what}: exit 2 but {out} changed"
        return
    if shard is not None:
        d = out / 'shards' / f'rank{shard[0]}_of_{shard[1]}'
        assert d.with_suffix('.npz').is_file() and d.with_suffix('.json').is_file(), f"{what}: shard files missing"
        json.loads(d.with_suffix('.json').read_text())
        return
    from PIL import Image
    for name in ('samples.npz', 'samples.png', 'stats.json'):
        assert (out / name).is_file(), f"{what}: exit 0 but {out / name} is missing"
    stats = json.loads((out / 'stats.json').read_text())
    with np.load(out / 'samples.npz') as z: images = z['images']
    with Image.open(out / 'samples.png') as im: im.load()
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3, f"{what}: images {images.shape}"
    if n is not None: assert len(images) == n == stats['n'], f"{what}: {len(images)} images, stats n {stats['n']}"


def _run_sample_items(items: list):
    with workdir() as (root, paths):
        paths['LAB_OK'] = root / 'labels_ok.txt'
        paths['LAB_OK'].write_text('3\n1\n')
        paths['MISSING,1'] = f"{paths['MISSING']},1"
        argv = _argv(items, paths)
        out = Path(_resolve(_effective(items, '--out'), paths) or '.')
        before = _snapshot(out)
        res = run_cli(sample_cli.main, argv)
        assert_clean(res, 'adadiff-sample')
        bad = _sample_expect_bad(items)
        assert not (bad and res['rc'] == 0), f"adadiff-sample {argv}: exit 0 although {bad} is invalid"
        assert not (res['rc'] == 2 and res['forwards']), \
            f"adadiff-sample {argv}: the error came after {res['forwards']} model forwards: {_lines(res['err'])[-1]}"
        n = _effective(items, '--n', '16')
        shard = _effective(items, '--shard')
        check_sample_output(res, out, before, int(n) if str(n).isdigit() and shard is None else None,
                            tuple(int(v) for v in shard.split('/')) if res['rc'] == 0 and shard else None)


_S0 = [('--checkpoint', 'default', OK), ('--out', 'FRESH', OK), ('--quiet', None, OK), ('--steps', '1', OK)]


@settings(max_examples=120, **FUZZ)
@given(sample_argvs())
@example(_S0 + [('--n', '1', OK), ('--proxy-fd', 'FILE', BAD)])
@example(_S0 + [('--n', '1', OK), ('--out', 'FILE', BAD)])
@example(_S0 + [('--n', '1', OK), ('--out', 'NONEMPTY', BAD)])
@example(_S0 + [('--n', '1', OK), ('--out', '', BAD)])
@example(_S0 + [('--n', '3', OK), ('--checkpoint', 'cifar10_cond', OK), ('--labels', '1,,3', BAD)])
def test_fuzz_sample_cli(items):
    _run_sample_items(items)


# ---------------------------------------------------------------------------------------------------- sampling API
_MODELS: dict = {}


def _model(name: str):
    "The embedded model `name`, loaded once (eval mode)."
    if name not in _MODELS: _MODELS[name] = sample_cli.load_sampling_model(name)
    return _MODELS[name]


_NAMES = dict(x_T=('x_t', 'noise'), labels=('label', 'class'), threshold=('threshold',), exit_layers=('exit',),
              steps=('step',), n=('images',), batch_size=('batch',), seed=('seed',), sampler=('sampler',),
              guidance_scale=('guidance',), guidance_policy=('policy', 'guidance'), precision=('precision',),
              schedule=('schedule',), device=('device',), sampler_opts=('option', 'sampler'), shard=('shard',),
              decode_batch_size=('decode', 'batch'), out=('out', 'directory', 'file'), batch=('batch',),
              checkpoint=('checkpoint',), compare_full=('full',))


def _names_an_argument(msg: str, kw: dict) -> bool:
    "Whether the error message names one of the arguments of the call (or a synonym of it)."
    m = msg.lower()
    words = [w for k in kw for w in (k.lower(),) + _NAMES.get(k, ())]
    words += [str(v).lower() for v in kw.values() if isinstance(v, (str, Path)) and len(str(v)) > 2]   # a named path
    opts = kw.get('sampler_opts')
    words += [str(o).lower() for o in opts] if isinstance(opts, dict) else []
    return any(re.search(rf'(?<!\w){re.escape(w)}' if len(w) > 2 else rf'(?<!\w){w}(?!\w)', m) for w in words)


def _tensor(kind: str, shape) -> object:
    "An x_T of `shape`: float32 / float64 / float16 / int64 / bool, with NaN or inf, numpy, list, ... "
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if kind in ('nan', 'inf'): return x.flatten().index_fill(0, torch.tensor([0]), float(kind)).view(shape) \
        if x.numel() else x
    make = {'f32': lambda: x, 'f64': x.double, 'f16': x.half, 'i64': x.long, 'bool': lambda: x > 0, 'numpy': x.numpy,
            'list': x.tolist, 'grad': lambda: x.clone().requires_grad_(),
            'noncontig': lambda: x.transpose(-1, -2) if x.ndim > 1 else x}
    return make[kind]()


_XT = st.one_of(st.none(), st.tuples(st.sampled_from(['f32', 'f64', 'f16', 'i64', 'bool', 'nan', 'inf', 'numpy', 'list',
                                                       'grad', 'noncontig']),
                                     st.sampled_from(['ok', (0,), (5,), (1, 3, 5, 5), (2, 1, 16, 16), (0, 3, 16, 16)])))
_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([2 ** 70, -2 ** 70]),
                 st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(['', ',,', 'x', '1', 'ü']),
                 st.lists(st.integers(-2, 11), max_size=3), st.just(torch.tensor([1.5])), st.just(np.array([1, 2])))
_API_KW = dict(
    sampler=st.one_of(st.sampled_from(sorted(SAMPLERS)), _ANY), steps=st.one_of(st.sampled_from([1, 2]), _ANY),
    n=st.one_of(st.sampled_from([1, 2]), _ANY), batch_size=st.one_of(st.sampled_from([1, 2, 10 ** 9]), _ANY),
    threshold=st.one_of(st.sampled_from([0., 0.1, 1., [0., 0.5]]), _ANY),
    exit_layers=st.one_of(st.sampled_from([0, 3, 9, [0, 9]]), _ANY), seed=_ANY,
    labels=st.one_of(st.sampled_from([3, [1, 2], 10]), _ANY),
    guidance_scale=st.one_of(st.sampled_from([0., 2., 1e9, 1e30, 3e38]), _ANY),
    guidance_policy=st.one_of(st.sampled_from(['joint', 'independent']), _ANY),
    precision=st.one_of(st.sampled_from(['fp32', 'fp16']), _ANY), schedule=st.one_of(st.sampled_from(['cosine']), _ANY),
    device=st.one_of(st.sampled_from(['cpu', 'meta', torch.device('cpu')]), _ANY),
    sampler_opts=st.one_of(st.sampled_from([{'clip_denoised': True}, {'x': 1}, {'eta': float('nan')}, [1]]), _ANY),
    shard=st.one_of(st.sampled_from([(0, 1), (1, 1), (0, 2), '0/1']), _ANY),
)


@st.composite
def api_calls(draw):
    "(model name, keyword arguments of sample_batches, x_T spec): up to 3 adversarial keywords, tiny work."
    kw = dict(steps=1, n=1)
    for k in draw(st.lists(st.sampled_from(sorted(_API_KW)), max_size=3, unique=True)): kw[k] = draw(_API_KW[k])
    return draw(st.sampled_from(['default', 'cifar10_cond'])), kw, draw(_XT)


def _run_api(name: str, kw: dict, xt):
    "sample_batches(model, **kw): success with finite images of the asked shape, or a clear ValueError / TypeError."
    model = _model(name)
    kw = dict(kw)
    if xt is not None:
        kind, shape = xt
        kw['x_T'] = _tensor(kind, (2, *model_image_shape(model)) if shape == 'ok' else shape)
    big = [k for k in ('steps', 'n') if isinstance(kw.get(k), int) and not isinstance(kw.get(k), bool) and kw[k] > 2]
    if big or (xt is None and kw.get('n') is None): return                 # a valid large run: not a fuzz case
    what = f"sample_batches({name}, {', '.join(f'{k}={_short(v)}' for k, v in kw.items())})"
    with forwards() as calls:
        try: run = sample_batches(model, **kw)
        except (ValueError, TypeError) as e:
            assert str(e).strip(), f"{what}: {type(e).__name__} without a message"
            assert _names_an_argument(str(e), kw), f"{what}: the message names no argument of the call: {e}"
            assert calls[0] == 0, f"{what}: {type(e).__name__} after {calls[0]} model forwards: {e}"
            return
        except Exception as e:
            pytest.fail(f"{what}: {type(e).__name__} instead of a ValueError / TypeError: {e}")
    n = len(kw['x_T']) if 'x_T' in kw else kw.get('n', 16)
    assert run.images.dtype == torch.float32 and tuple(run.images.shape) == (n, *model_image_shape(model)), \
        f"{what}: images {run.images.dtype} {tuple(run.images.shape)}, expected ({n}, ...) float32"
    assert torch.isfinite(run.images).all(), f"{what}: returned non-finite images (NaN / inf) without an error"


def _short(v) -> str:
    if torch.is_tensor(v): return f"tensor({v.dtype}, {tuple(v.shape)})"
    if isinstance(v, np.ndarray): return f"ndarray({v.dtype}, {v.shape})"
    r = repr(v)
    return r if len(r) < 40 else r[:37] + '...'


@settings(max_examples=150, **FUZZ)
@given(api_calls())
@example(('default', dict(steps=1, n=1, seed=None), None))                       # the findings of earlier rounds
@example(('cifar10_cond', dict(steps=1, n=1, labels=-2 ** 70), None))
@example(('default', dict(steps=1, n=1, sampler_opts=[1]), None))
@example(('cifar10_cond', dict(steps=1, n=1, labels='x'), None))
@example(('default', dict(steps=1, n=1, schedule=[-1]), None))
@example(('default', dict(steps=1, n=1, exit_layers=[]), None))
@example(('default', dict(steps=1, n=1, device='meta'), None))
@example(('default', dict(steps=1, n=1, device=0), None))
@example(('default', dict(steps=1), ('nan', 'ok')))
@example(('default', dict(steps=1), ('f64', 'ok')))
def test_fuzz_sample_batches(call):
    _run_api(*call)


_DIR_KW = dict(
    sampler=_API_KW['sampler'], steps=_API_KW['steps'], n=_API_KW['n'], batch=_API_KW['batch_size'],
    threshold=st.one_of(st.sampled_from([0.1, '0,0.5', 'nan', ',,', '1,,']), _ANY),
    exit_layers=st.one_of(st.sampled_from([3, '0,9', '-1', '']), _ANY), seed=_ANY,
    labels=st.one_of(st.sampled_from([3, 10, '1,,3', '1,2', 'LAB_NEG', 'LAB_DICT', 'MISSING']), _ANY),
    guidance_scale=_API_KW['guidance_scale'], guidance_policy=_API_KW['guidance_policy'],
    precision=_API_KW['precision'], device=_API_KW['device'], shard=_API_KW['shard'],
    compare_full=st.one_of(st.booleans(), _ANY), schedule=_API_KW['schedule'], overwrite=st.one_of(st.booleans(), _ANY),
)


@st.composite
def dir_calls(draw):
    "(checkpoint name, out placeholder, keyword arguments of sample_to_dir): up to 3 adversarial keywords."
    kw = dict(steps=1, n=1, progress=False)
    for k in draw(st.lists(st.sampled_from(sorted(_DIR_KW)), max_size=3, unique=True)): kw[k] = draw(_DIR_KW[k])
    out = draw(st.sampled_from(['FRESH', 'FRESH', 'NESTED', 'FILE', 'UNDER_FILE', 'NONEMPTY', 'UNICODE']))
    return draw(st.sampled_from(['default', 'cifar10_cond', 'MISSING', 'FILE'])), out, kw


def _run_dir(ckpt: str, out_key: str, kw: dict):
    "sample_to_dir: complete output, or a ValueError / TypeError / FileNotFoundError naming an argument, pre-compute."
    big = [k for k in ('steps', 'n') if isinstance(kw.get(k), int) and not isinstance(kw.get(k), bool) and kw[k] > 2]
    if big or kw.get('n', 1) is None: return                                # a valid large run: not a fuzz case
    with workdir() as (root, paths):
        kw = {k: _resolve(v, paths) for k, v in kw.items()}
        out = paths[out_key]
        what = f"sample_to_dir({ckpt}, {out_key}, {', '.join(f'{k}={_short(v)}' for k, v in kw.items())})"
        before = _snapshot(out)
        with forwards() as calls:
            try: stats = sample_to_dir(_resolve(ckpt, paths), out, **kw)
            except (ValueError, TypeError, FileNotFoundError) as e:
                assert str(e).strip(), f"{what}: {type(e).__name__} without a message"
                assert _names_an_argument(str(e), dict(kw, out=str(out), checkpoint=_resolve(ckpt, paths))), \
                    f"{what}: the message names no argument of the call: {e}"
                assert calls[0] == 0, f"{what}: {type(e).__name__} after {calls[0]} model forwards: {e}"
                assert _snapshot(out) == before, f"{what}: raised {type(e).__name__} but changed {out}"
                return
            except Exception as e:
                pytest.fail(f"{what}: {type(e).__name__} instead of a ValueError / TypeError: {e}")
        assert out_key not in ('FILE', 'UNDER_FILE') and (out_key != 'NONEMPTY' or kw.get('overwrite') is True), \
            f"{what}: wrote into {out_key} without an error"
        shard = stats.get('shard')
        check_sample_output(dict(rc=0, argv=[what]), out, before, None if shard else kw['n'], shard)


from adadiff_nb.apps.sample_cli import sample_to_dir  # noqa: E402


@settings(max_examples=60, **FUZZ)
@given(dir_calls())
@example(('default', 'FRESH', dict(steps=1, n=1, progress=False, precision=[])))
@example(('default', 'FRESH', dict(steps=1, n=1, progress=False, schedule=[])))
@example(('default', 'FRESH', dict(steps=1, n=1, progress=False, exit_layers=[])))
@example(('default', 'FRESH', dict(steps=1, n=1, progress=False, compare_full=np.array([1, 2]))))
@example(('default', 'NONEMPTY', dict(steps=1, n=1, progress=False, overwrite=[4, -2])))
@example(('default', 'FILE', dict(steps=1, n=1, progress=False)))
@example(('cifar10_cond', 'FRESH', dict(steps=1, n=1, progress=False, labels='1,,3')))
@example(('cifar10_cond', 'FRESH', dict(steps=1, n=1, progress=False, labels=2 ** 70)))
def test_fuzz_sample_to_dir(call):
    _run_dir(*call)


# ---------------------------------------------------------------------------------------------------- adadiff-train
from adadiff_nb.apps import train_cli  # noqa: E402

_TRAIN_OPTS = [
    _opt('--steps', (OK, ['1', '2']), (BAD, ['0', '-1', 'x', '', '1e9', 'nan', '1.5'])),
    _opt('--batch-size', (OK, ['1', '2', '4']), (BAD, ['0', '-1', 'x', '', '1e9'])),
    _opt('--lr', (OK, ['1e-3', '0.01']), (BAD, ['nan', 'inf', '-1', '0', 'x', '']), (None, ['1e9'])),
    _opt('--img-size', (OK, ['8']), (BAD, ['-1', '0', 'x', '', '16', str(10 ** 12)]), (None, ['none'])),
    _opt('--data', (OK, ['cifar10_partial', 'IMGS', 'IMGS_TXT']),
         (BAD, ['MISSING', 'FILE', 'EMPTY_DIR', 'IMGS_BROKEN', '', 'nope', 'GARBAGE_NPZ'])),
    _opt('--model', (OK, ['uvit_tiny']), (BAD, ['x', 'DiT-S/3', '{', '', '{"embed_dim": 8}'])),
    _opt('--model-kw', (OK, ['{}']), (BAD, ['{"embed_dim": -1}', '[1]', '{"embed_dim": 0}', '{"nope": 1}', '', 'x',
                                             '{"depth": -2}', '{"num_heads": 0}'])),
    _opt('--mode', (OK, ['scratch', 'backbone']), (BAD, ['x', '', 'frozen', 'finetune'])),
    _opt('--init', (BAD, ['MISSING', 'FILE', 'EMPTY_DIR', ''])),
    _opt('--set', (OK, ['steps=2', 'optim.lr=0.001']), (BAD, ['lr=nan', 'lr', 'nope=1', '=', '', 'steps=', 'ü=1'])),
    _opt('--seed', (OK, ['0', '3']), (BAD, ['x', '']), (None, ['-5', str(2 ** 70)])),
    _opt('--ckpt-every', (OK, ['1', str(10 ** 12)]), (BAD, ['-1', 'x']), (None, ['0'])),
    _opt('--log-every', (OK, ['1', str(10 ** 12)]), (BAD, ['-1', 'x']), (None, ['0'])),
    _opt('--warmup-steps', (OK, ['0', '1', str(10 ** 12)]), (BAD, ['-1', 'x', 'nan'])),
    _opt('--ema-decay', (OK, ['0.9']), (BAD, ['1.5', 'nan', '-0.1', 'x'])),
    _opt('--grad-clip', (OK, ['1.0']), (BAD, ['nan', '-1', 'x']), (None, ['none', '0'])),
    _opt('--p-uncond', (BAD, ['0.1', 'nan', '-1', '2'])),
    _opt('--keep-ckpts', (OK, ['1', str(10 ** 12)]), (BAD, ['-1', 'x']), (None, ['0'])),
    _opt('--betas', (OK, ['0.9,0.999']), (BAD, ['1,,2', '', 'x', '2,3', 'nan,0.9', '[0.9]'])),
    _opt('--device', (OK, ['cpu']), (BAD, ['meta', '', 'x']), (None, ['auto', 'cuda'])),
    _opt('--progress', (OK, ['false']), (BAD, ['maybe', ''])),
    _opt('--schedule', (OK, ['linear', 'cosine']), (BAD, ['x', ''])),
    _opt('--resume', (None, [None]), (BAD, ['MISSING', 'FILE', 'EMPTY_DIR', 'CKPT_CORRUPT'])),
    _opt('--overwrite', (OK, [None])),
    _opt('--config', (OK, ['tiny_cifar8']), (BAD, ['nope', '', 'FILE', 'LAB_BADJSON', 'LAB_DICT', 'MISSING'])),
    _opt('--bogus', (ARGBAD, [None])),
]
_TRAIN_OUT = _opt('--out', (OK, ['FRESH']), (OK, ['FRESH', 'NESTED', 'UNICODE']),
                  (BAD, ['FILE', 'UNDER_FILE', '', 'CORRUPT_RUN']))


@st.composite
def train_argvs(draw):
    "The items of an adadiff-train command line: the tiny preset, 1 step, no progress bar, up to 4 more options."
    items = [('--config', 'tiny_cifar8', OK), ('--steps', '1', OK), ('--progress', 'false', OK),
             ('--device', 'cpu', OK), draw(_TRAIN_OUT)]
    return items + draw(st.lists(st.one_of(*_TRAIN_OPTS), max_size=4))


def _corrupt_run(root: Path) -> Path:
    "A run folder whose newest checkpoint's state.json is corrupt (its model files are there)."
    d = root / 'corrupt_run' / 'ckpt' / 'step_00000002'
    d.mkdir(parents=True)
    (d / 'state.json').write_text('{corrupt')
    (d / 'model.safetensors').write_bytes(b'garbage')
    return d


def _train_expect_bad(items: list) -> list:
    flags = {f for f, _, _ in items}
    extra = []
    if _tag_of(items, '--out') == BAD and '--resume' in flags: extra.append('--resume in a corrupt --out')
    if [v for f, v, _ in items if f == '--out'][-1] == 'CORRUPT_RUN' and '--resume' not in flags and \
            '--overwrite' not in flags: extra.append('--out holds checkpoints')
    return _expect_bad([i for i in items if not (i[0] == '--out' and i[1] == 'CORRUPT_RUN')], False, extra)


def _run_train_items(items: list):
    with workdir() as (root, paths):
        paths['CKPT_CORRUPT'] = _corrupt_run(root)
        paths['CORRUPT_RUN'] = paths['CKPT_CORRUPT'].parent.parent
        argv = _argv(items, paths)
        out = Path(_resolve([v for f, v, _ in items if f == '--out'][-1], paths) or '.')
        res = run_cli(train_cli.main, argv)
        assert_clean(res, 'adadiff-train', allowed=(0, 2, 3))
        bad = _train_expect_bad(items)
        assert not (bad and res['rc'] == 0), f"adadiff-train {argv}: exit 0 although {bad} is invalid"
        what = f"adadiff-train {argv}"
        _no_temp_files(out if out.is_dir() else out.parent, what)
        final = out / 'final' / 'model.safetensors'
        if res['rc'] == 0:
            from adadiff_nb.models.checkpoint import load_model
            for d in ('final', 'final_ema'):
                assert (out / d / 'model.safetensors').is_file(), f"{what}: exit 0 but no {out / d}"
            load_model(out / 'final')
        else:
            assert not final.exists() or out == paths['CORRUPT_RUN'], f"{what}: exit {res['rc']} but {final} written"


_T0 = [('--config', 'tiny_cifar8', OK), ('--steps', '1', OK), ('--progress', 'false', OK), ('--device', 'cpu', OK)]


@settings(max_examples=40, **FUZZ)
@given(train_argvs())
@example(_T0 + [('--out', '', BAD)])
@example(_T0 + [('--out', 'FRESH', OK), ('--init', 'MISSING', BAD)])
@example(_T0 + [('--out', 'FILE', BAD)])
@example(_T0 + [('--out', 'FRESH', OK), ('--model-kw', '{"embed_dim": -1}', BAD)])
@example(_T0 + [('--out', 'FRESH', OK), ('--data', 'IMGS_BROKEN', BAD)])
def test_fuzz_train_cli(items):
    _run_train_items(items)


# ---------------------------------------------------------------------------------------------------- adadiff-bench
from adadiff_nb.experiments import controlled  # noqa: E402

_BENCH_COMMON = [
    _opt('--methods', (OK, ['full', 'full,adadiff']), (BAD, ['nope', 'full,nope', 'ü'])),
    _opt('--n', (OK, ['4', '32']), (BAD, ['0', '-1']), (ARGBAD, ['x', '', '1e9'])),
    _opt('--steps', (OK, ['2']), (BAD, ['0', '-1']), (ARGBAD, ['x', '', 'nan'])),
    _opt('--batch', (OK, ['2']), (BAD, ['0', '-1']), (ARGBAD, ['x'])),
    _opt('--batch-size', (OK, ['2']), (BAD, ['0', '-1']), (ARGBAD, ['x'])),
    _opt('--backbone', (BAD, ['MISSING', 'FILE', 'EMPTY_DIR', 'CKPT_GARBAGE'])),
    _opt('--out', (OK, ['FRESH', 'NESTED']), (BAD, ['FILE', 'UNDER_FILE'])),
    _opt('--work', (OK, ['FRESH']), (BAD, ['FILE', 'UNDER_FILE'])),
    _opt('--threads', (OK, ['0', '1']), (BAD, ['-1']), (ARGBAD, ['x', '1.5'])),
    _opt('--quiet', (OK, [None])),
    _opt('--bogus', (ARGBAD, [None])),
]
_BENCH_BASE = _BENCH_COMMON + [
    _opt('--target-reduction', (OK, ['0.3']), (BAD, ['1.5', '0', 'nan', 'inf', '-0.2', '1']), (ARGBAD, ['x', ''])),
    _opt('--sweep', (OK, ['0.2', '0.2,0.3']), (BAD, ['x', '1.5', 'nan', '0', ',x'])),
    _opt('--sampler', (OK, ['ddim']), (BAD, ['nope', ''])),
    _opt('--adadiff-checkpoint', (BAD, ['MISSING', 'FILE', 'EMPTY_DIR'])),
    _opt('--finetune-steps', (OK, ['2']), (BAD, ['0', '-1'])),
    _opt('--small-steps', (OK, ['2']), (BAD, ['-1']), (None, ['0'])),
    _opt('--calib-n', (OK, ['4']), (BAD, ['0', '-1'])),
    _opt('--seed', (OK, ['0']), (None, ['-1', str(2 ** 70)])),
]
_BENCH_CONTROLLED = _BENCH_COMMON + [
    _opt('--quick', (OK, [None])),
    _opt('--budgets', (OK, ['4,8', '4']), (BAD, ['8,4', '0', '-1', 'x', ',,', '4,4', 'nan'])),
    _opt('--seeds', (OK, ['0', '0,1']), (BAD, [',,', 'x', '1.5'])),
    _opt('--targets', (OK, ['0.4', '0.4,0.2']), (BAD, ['1.5', '0', 'x', ',,', 'nan', 'inf'])),
    _opt('--promote', (OK, ['2']), (BAD, ['-1']), (None, ['0'])),
    _opt('--n-boot', (OK, ['20']), (BAD, ['-1']), (None, ['0'])),
    _opt('--compare-backbones', (OK, ['none', 'default']), (BAD, ['MISSING', 'FILE'])),
    _opt('--clip-denoised', (OK, [None])),
    _opt('--no-timing', (OK, [None])),
]


@st.composite
def bench_argvs(draw):
    "The items of an adadiff-bench command line: a comparison and up to 4 options."
    comp = draw(st.sampled_from(['tiny', 'tiny', 'controlled', 'controlled', 'cifar16_cpu', 'nope', '']))
    items = [('--comparison', comp, OK if comp in ('tiny', 'controlled') else BAD)]
    if comp == 'controlled' and draw(st.booleans()): items.append(('--n', '1', BAD))           # n >= 2 there
    return items + draw(st.lists(st.one_of(*(_BENCH_CONTROLLED if comp == 'controlled' else _BENCH_BASE)), max_size=4))


def _run_bench_items(items: list):
    "A valid command line runs until its first model forward (stopped there); an invalid one exits 2 before it."
    with workdir() as (root, paths):
        argv = _argv(items, paths)
        res = run_cli(controlled.main, argv, stop_at_compute=True)
        what = f"adadiff-bench {argv}"
        bad = _expect_bad(items, False)
        assert res['tb'] is None, f"{what}: traceback instead of exit status 0 / 2:\n{res['tb']}"
        if res['rc'] == 'compute':
            assert not bad, f"{what}: started computing although {bad} is invalid (bad input must exit 2 first)"
            return
        assert_clean(res, 'adadiff-bench')
        if res['rc'] == 2:
            names = ('tiny.json', 'cifar16_cpu.json', 'controlled.json', 'controlled_quick.json')
            done = [str(p) for p in root.rglob('*.json') if p.name in names]
            assert not done, f"{what}: exit 2 but wrote {done}"


@settings(max_examples=60, **FUZZ)
@given(bench_argvs())
@example([('--comparison', 'tiny', OK), ('--sweep', 'x', BAD)])
@example([('--comparison', 'tiny', OK), ('--threads', '-1', BAD)])
@example([('--comparison', 'tiny', OK), ('--out', 'FILE', BAD)])
@example([('--comparison', 'controlled', OK), ('--out', 'UNDER_FILE', BAD)])
@example([('--comparison', 'tiny', OK), ('--n', '0', BAD)])
@example([('--comparison', 'tiny', OK), ('--sampler', 'nope', BAD)])
@example([('--comparison', 'tiny', OK), ('--adadiff-checkpoint', 'MISSING', BAD)])
@example([('--comparison', 'controlled', OK), ('--quick', None, OK), ('--promote', '-1', BAD)])
def test_fuzz_bench_cli(items):
    _run_bench_items(items)


# ---------------------------------------------------------------------------------------------------- latents / text
@pytest.fixture(scope='module')
def tiny_vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip('diffusers')
    from adadiff_nb.models.autoencoder import TINY_VAE_CONFIG
    d = tmp_path_factory.mktemp('vae')
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()): diffusers.AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(d)
    return d


@pytest.fixture(scope='module')
def tiny_clip_dir(tmp_path_factory):
    pytest.importorskip('transformers')
    from adadiff_nb.models.text_encoder import write_tiny_clip
    with contextlib.redirect_stderr(io.StringIO()): return write_tiny_clip(tmp_path_factory.mktemp('clip'))


_LAT_OPTS = [
    _opt('--img-size', (OK, ['8', '16']), (BAD, ['15', '0', '-1']), (ARGBAD, ['x', '', 'nan'])),
    _opt('--batch-size', (OK, ['1', '2', '1000000']), (BAD, ['0', '-1']), (ARGBAD, ['x'])),
    _opt('--limit', (OK, ['1', '2']), (BAD, ['-1']), (ARGBAD, ['x']), (None, ['0'])),
    _opt('--num-workers', (OK, ['0']), (BAD, ['-1']), (ARGBAD, ['x'])),
    _opt('--scale-factor', (OK, ['0.18', '1']), (BAD, ['nan', '0', '-1', 'inf']), (ARGBAD, ['x', ''])),
    _opt('--dtype', (OK, ['float32', 'float16', 'bfloat16']), (ARGBAD, ['float64', ''])),
    _opt('--device', (OK, ['cpu']), (BAD, ['meta', 'x']), (None, [''])),
    _opt('--split', (None, ['train', 'x'])),
    _opt('--no-flip', (OK, [None])),
    _opt('--no-labels', (OK, [None])),
    _opt('--bogus', (ARGBAD, [None])),
]


@st.composite
def latents_argvs(draw):
    "The items of an adadiff-latents command line: data, --vae, --out, --img-size 8, up to 3 more options."
    items = [draw(_opt('data', (OK, ['IMGS', 'IMGS_TXT']), (BAD, ['IMGS_BROKEN', 'EMPTY_DIR', 'nope', 'FILE',
                                                                  'GARBAGE_NPZ', '']))),
             draw(_opt('--vae', (OK, ['VAE']), (OK, ['VAE']), (BAD, ['MISSING', 'FILE', 'EMPTY_DIR', 'CLIP']))),
             draw(_opt('--out', (OK, ['LAT_OUT']), (OK, ['LAT_OUT', 'LAT_UNICODE']),
                       (BAD, ['EMPTY_DIR', 'UNDER_FILE', '']))),
             ('--img-size', '8', OK), ('--device', 'cpu', OK)]
    return items + draw(st.lists(st.one_of(*_LAT_OPTS), max_size=3))


_TXT_OPTS = [
    _opt('--max-length', (OK, ['8', '77']), (BAD, ['0', '1', '-1', '78', '100000']), (ARGBAD, ['x', ''])),
    _opt('--batch-size', (OK, ['1', '2']), (BAD, ['0', '-1']), (ARGBAD, ['x'])),
    _opt('--dtype', (OK, ['float32', 'float16', 'bfloat16']), (ARGBAD, ['float64', ''])),
    _opt('--device', (OK, ['cpu']), (BAD, ['meta', 'x']), (None, [''])),
    _opt('--bogus', (ARGBAD, [None])),
]


@st.composite
def text_argvs(draw):
    "The items of an adadiff-text-features command line: prompts, --text-encoder, --out, up to 3 more options."
    items = [draw(_opt('prompts', (OK, ['P_OK', 'P_UNICODE']), (BAD, ['P_EMPTY', 'LAB_DICT', 'P_INTS', 'LAB_BADJSON',
                                                                       'MISSING', 'EMPTY_DIR', '']))),
             draw(_opt('--text-encoder', (OK, ['CLIP']), (OK, ['CLIP']), (BAD, ['MISSING', 'FILE', 'VAE']))),
             draw(_opt('--out', (OK, ['TXT_OUT']), (OK, ['TXT_OUT']), (BAD, ['EMPTY_DIR', 'UNDER_FILE', '']))),
             ('--device', 'cpu', OK)]
    return items + draw(st.lists(st.one_of(*_TXT_OPTS), max_size=3))


def _positional_argv(items: list, paths: dict) -> list:
    "argv with the items named without '--' as positionals (first)."
    pos = [_resolve(v, paths) for f, v, _ in items if not f.startswith('--')]
    return pos + _argv([i for i in items if i[0].startswith('--')], paths)


def _run_cache_items(items: list, prog: str, main, extra: dict, load):
    "One adadiff-latents / adadiff-text-features run: exit 0 with a cache that loads, or exit 2 with no cache file."
    with workdir() as (root, paths):
        paths.update(extra, LAT_OUT=root / 'lat.safetensors', LAT_UNICODE=root / 'ü 日本.safetensors',
                     TXT_OUT=root / 'txt.safetensors', P_OK=root / 'p.txt', P_UNICODE=root / 'pu.txt',
                     P_EMPTY=root / 'pe.txt', P_INTS=root / 'pi.json')
        paths['P_OK'].write_text('a cat\nthe dog\n')
        paths['P_UNICODE'].write_text('日本語 ünïcode\n' + 'x ' * 300 + '\n')
        paths['P_EMPTY'].write_text('')
        paths['P_INTS'].write_text('[1, 2]')
        argv = _positional_argv(items, paths)
        out = Path(_resolve([v for f, v, _ in items if f == '--out'][-1], paths) or '.')
        before = _snapshot(out)
        res = run_cli(main, argv)
        assert_clean(res, prog)
        what = f"{prog} {argv}"
        bad = _expect_bad(items, False)
        assert not (bad and res['rc'] == 0), f"{what}: exit 0 although {bad} is invalid"
        _no_temp_files(root, what)
        if res['rc'] == 0:
            assert out.is_file(), f"{what}: exit 0 but no cache at {out}"
            assert len(load(out)) >= 1, f"{what}: exit 0 but the cache {out} is empty"
        else:
            assert _snapshot(out) == before, f"{what}: exit 2 but {out} was written / changed"


def _run_latents_items(items, vae, clip=None):
    from adadiff_nb.models.autoencoder import LatentCache, main
    _run_cache_items(items, 'adadiff-latents', main, dict(VAE=vae, CLIP=clip or vae / 'none'), LatentCache)


def _run_text_items(items, clip, vae=None):
    from adadiff_nb.models.text_encoder import TextFeatureCache, main
    _run_cache_items(items, 'adadiff-text-features', main, dict(CLIP=clip, VAE=vae or clip / 'none'), TextFeatureCache)


_L0 = [('data', 'IMGS', OK), ('--vae', 'VAE', OK), ('--img-size', '8', OK), ('--device', 'cpu', OK)]


@settings(max_examples=40, **FUZZ)
@given(items=latents_argvs())
@example(items=_L0 + [('--out', 'EMPTY_DIR', BAD)])
@example(items=_L0 + [('--out', '', BAD)])
@example(items=_L0 + [('--out', 'UNDER_FILE', BAD)])
@example(items=_L0 + [('--out', 'LAT_OUT', OK), ('--batch-size', '0', BAD)])
@example(items=_L0 + [('--out', 'LAT_OUT', OK), ('--device', 'meta', BAD)])
@example(items=_L0 + [('--out', 'LAT_OUT', OK), ('--scale-factor', 'inf', BAD)])
@example(items=[('data', 'IMGS_BROKEN', BAD)] + _L0[1:] + [('--out', 'LAT_OUT', OK)])
def test_fuzz_latents_cli(tiny_vae_dir, items):
    _run_latents_items(items, tiny_vae_dir)


_X0 = [('prompts', 'P_OK', OK), ('--text-encoder', 'CLIP', OK), ('--device', 'cpu', OK)]


@settings(max_examples=40, **FUZZ)
@given(items=text_argvs())
@example(items=_X0 + [('--out', 'EMPTY_DIR', BAD)])
@example(items=_X0 + [('--out', '', BAD)])
@example(items=_X0 + [('--out', 'UNDER_FILE', BAD)])
@example(items=_X0 + [('--out', 'TXT_OUT', OK), ('--batch-size', '-1', BAD)])
@example(items=_X0 + [('--out', 'TXT_OUT', OK), ('--device', 'x', BAD)])
def test_fuzz_text_features_cli(tiny_clip_dir, tiny_vae_dir, items):
    _run_text_items(items, tiny_clip_dir, tiny_vae_dir)


# ---------------------------------------------------------------------------------------------------- issue 26 probes
def _sample_run(root: Path, extra: list, out: Path | None = None, ckpt: str = 'cifar10_cond', n: int = 1):
    out = root / 'out' if out is None else out
    argv = ['--checkpoint', ckpt, '--steps', '1', '--n', str(n), '--quiet', '--out', str(out)] + extra
    before = _snapshot(out)
    res = run_cli(sample_cli.main, argv)
    assert_clean(res, 'adadiff-sample')
    check_sample_output(res, out, before, n)
    return res


def _error(res) -> str:
    return _lines(res['err'])[-1] if res['err'].strip() else ''


@pytest.mark.parametrize('extra, n, names', [
    (['--class', '10'], 1, '10'),                       # the null class of cifar10_cond is not a class to sample
    (['--labels', '1,,3'], 3, '1,,3'),                  # an empty entry is a typo, not a label
    (['--labels', 'LAB_NEG'], 1, '-3'),                 # a bad label later in the file than n
    (['--class', '-1'], 1, '-1'),
    (['--class', str(2 ** 70)], 1, 'class|label'),      # beyond int64: the message must still say what is wrong
])
def test_sample_refuses_bad_labels(tmp_path, extra, n, names):
    (tmp_path / 'labels_neg.txt').write_text('1\n-3\n2\n')
    extra = [str(tmp_path / 'labels_neg.txt') if v == 'LAB_NEG' else v for v in extra]
    res = _sample_run(tmp_path, extra, n=n)
    assert res['rc'] == 2, f"adadiff-sample {extra}: exit {res['rc']}, expected 2 (invalid labels)"
    assert re.search(names if '|' in names else re.escape(names), _error(res)), \
        f"the error should name {names!r}: {_error(res)}"
    assert res['forwards'] == 0


def test_sample_huge_guidance_scale(tmp_path):
    res = _sample_run(tmp_path, ['--guidance-scale', '1e9'])          # a clean exit 0 or 2 (checked in _sample_run)
    assert res['rc'] in (0, 2)


@pytest.mark.parametrize('scale', [1e30, 3e38])
def test_sample_batches_huge_guidance_is_refused_or_finite(scale):
    _run_api('cifar10_cond', dict(steps=2, n=1, guidance_scale=scale), None)


def test_sample_out_is_a_file(tmp_path):
    (tmp_path / 'f').write_text('keep me')
    res = _sample_run(tmp_path, [], out=tmp_path / 'f')
    assert res['rc'] == 2 and (tmp_path / 'f').read_text() == 'keep me' and res['forwards'] == 0


def test_sample_out_in_read_only_dir(tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o555)
    try:
        try:
            (ro / 'probe').write_text('x')
            (ro / 'probe').unlink()
            pytest.skip('this user can write into a read-only directory (root): the probe cannot fail here')
        except PermissionError:
            pass
        res = _sample_run(tmp_path, [], out=ro / 'out')
        assert res['rc'] == 2 and 'ro' in _error(res) and res['forwards'] == 0, res['err']
    finally:
        ro.chmod(0o755)


def test_sample_nonempty_out_needs_overwrite(tmp_path):
    out = tmp_path / 'out'
    assert _sample_run(tmp_path, [], out=out)['rc'] == 0
    before = _snapshot(out)
    res = _sample_run(tmp_path, ['--seed', '5'], out=out)
    assert res['rc'] == 2 and 'overwrite' in _error(res), f"a second run into {out}: exit {res['rc']} {res['err']}"
    assert _snapshot(out) == before and res['forwards'] == 0
    res = _sample_run(tmp_path, ['--seed', '5', '--overwrite'], out=out)
    assert res['rc'] == 0 and _snapshot(out) != before


@pytest.mark.parametrize('kind', ['nan', 'inf', 'f64', 'i64', 'bool', 'numpy', 'list'])
def test_sample_batches_x_T(kind):
    "NaN / inf x_T: a ValueError naming x_T before compute; other dtypes: sampled (finite) or a clear error."
    model = _model('default')
    if kind in ('nan', 'inf'):
        with forwards() as calls, pytest.raises(ValueError, match='x_T'):
            sample_batches(model, 'ddim', steps=1, x_T=_tensor(kind, (2, *model_image_shape(model))))
        assert calls[0] == 0
    else: _run_api('default', dict(steps=1), (kind, 'ok'))


def _train(root: Path, extra: list, out: Path) -> dict:
    res = run_cli(train_cli.main, ['--config', 'tiny_cifar8', '--progress', 'false', '--device', 'cpu',
                                   '--out', str(out)] + extra)
    assert_clean(res, 'adadiff-train')
    return res


def test_train_data_folder_with_a_broken_image(tmp_path):
    with workdir() as (root, paths):
        res = _train(root, ['--steps', '1', '--batch-size', '2', '--data', str(paths['IMGS_BROKEN'])], root / 'run')
        assert res['rc'] == 2 and 'broken.png' in _error(res), res['err']
        assert not (root / 'run' / 'final').exists()
        res = _train(root, ['--steps', '1', '--batch-size', '2', '--data', str(paths['IMGS_TXT'])], root / 'run2')
        if res['rc'] == 0: assert (root / 'run2' / 'final' / 'model.safetensors').is_file()


@pytest.mark.parametrize('how', ['newest', 'dir'])
def test_train_resume_with_a_corrupt_state_json(tmp_path, how):
    run = tmp_path / 'run'
    assert _train(tmp_path, ['--steps', '2', '--ckpt-every', '2'], run)['rc'] == 0
    ck = sorted((run / 'ckpt').iterdir())[-1]
    (ck / 'state.json').write_text('{corrupt')
    res = _train(tmp_path, ['--steps', '4', '--resume'] + ([str(ck)] if how == 'dir' else []), run)
    assert res['rc'] == 2 and 'state.json' in _error(res), res['err']


@pytest.mark.parametrize('ref, n', [('garbage', 2), ('garbage', 1), ('missing', 2)])
def test_sample_bad_proxy_fd_reference_is_refused_before_sampling(tmp_path, ref, n):
    (tmp_path / 'garbage.npz').write_bytes(b'garbage')
    res = _sample_run(tmp_path, ['--proxy-fd', str(tmp_path / f'{ref}.npz')], ckpt='default', n=n)
    assert res['rc'] == 2 and res['forwards'] == 0, f"exit {res['rc']} after {res['forwards']} forwards: {res['err']}"
