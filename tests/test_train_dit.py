"""`adadiff-train` on DiT backbones and class-conditional models: early-exit and plain DiTs (learned sigma or not)
train with label dropout `p_uncond`, the labels the model embeds are exactly the data's labels with the drops
recomputed here from the run's noise generator, a resumed run is bit-identical, official DiT `.pt` files load,
and bad input gives exit status 2 with a message naming the fix. Tiny shapes (8x8, width 32), a few steps."""
import argparse, contextlib, io, json, math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from adadiff_nb.models.checkpoint import load_model, load_weights, save_model
from adadiff_nb.sampling.diffusion import get_schedule
from adadiff_nb.models.dit import create_dit
from adadiff_nb.training.common import DataStream, mix_seed
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.loop import read_log, train
from adadiff_nb.apps.train_cli import main

N_CLASSES, BS, SEED = 5, 16, 0
DIT_KW = dict(input_size=8, in_channels=3, hidden_size=32, depth=3, num_heads=4, num_classes=N_CLASSES)


pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


@pytest.fixture(scope='module')
def npz(tmp_path_factory) -> Path:
    "A 5-class data set in the CIFAR-10 npz layout (48 train images, labels i % 5)."
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp('data') / 'five.npz'
    np.savez(p, train_x=rng.integers(0, 256, (48, 3, 32, 32), dtype=np.uint8), train_y=np.arange(48) % N_CLASSES,
             test_x=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), test_y=np.arange(8) % N_CLASSES)
    return p


def _cfg(npz, out, **kw):
    base = dict(model='DiT-S/2', model_kw=DIT_KW, data=str(npz), batch_size=BS, seed=SEED, p_uncond=0.1,
                out=str(out), progress=False, ckpt_every=0, device='cpu')
    return load_train_config('tiny_cifar8', **{**base, **kw})


def _argv(npz, out, steps, **model_kw):
    return ['--config', 'tiny_cifar8', '--model', 'DiT-S/2', '--model-kw', json.dumps({**DIT_KW, **model_kw}),
            '--data', str(npz), '--batch-size', str(BS), '--p-uncond', '0.1', '--steps', str(steps),
            '--device', 'cpu', '--progress', 'false', '--out', str(out)]


@contextlib.contextmanager
def embedded_labels():
    "Record the labels every nn.Embedding receives (the class labels the model embeds), one tensor per call."
    seen = []
    def hook(module, args):
        if isinstance(module, nn.Embedding): seen.append(args[0].detach().cpu().clone())
    h = nn.modules.module.register_module_forward_pre_hook(hook)
    try: yield seen
    finally: h.remove()


def expected_labels(npz, steps: int, p: float, null: int, start: int = 0) -> list:
    """The labels of steps start..steps-1 as train_step should embed them: the data stream's labels, each replaced
    by `null` where a uniform draw from the run's noise generator (after the times and the noise) is below p."""
    y_all = torch.as_tensor(np.load(npz)['train_y']).long()
    stream, sch = DataStream(list(range(len(y_all))), BS, SEED, flip=True), get_schedule('linear')
    g = torch.Generator().manual_seed(mix_seed(SEED, 'noise', 0))
    out = []
    for _ in range(steps):
        idx, _ = stream.next_indices()
        sch.sample_t(BS, generator=g)
        torch.randn((BS, 3, 8, 8), generator=g)
        drop = torch.rand(BS, generator=g) < p if p else torch.zeros(BS, dtype=torch.bool)
        out.append(torch.where(drop, torch.full((BS,), null), y_all[idx]))
    return out[start:]


@pytest.mark.parametrize('learn_sigma', [False, True])
def test_early_exit_dit_trains_with_label_dropout(npz, tmp_path, learn_sigma):
    steps = 6
    with embedded_labels() as seen, contextlib.redirect_stdout(io.StringIO()) as so:
        rc = main(_argv(npz, tmp_path / 'run', steps, learn_sigma=learn_sigma))
    assert rc == 0, so.getvalue()
    assert 'arch=adadiff' in so.getvalue() and 'classes=5 p_uncond=0.1' in so.getvalue()
    rows = read_log(tmp_path / 'run' / 'logs' / 'train.csv')
    assert [r['step'] for r in rows] == [float(s) for s in range(1, steps + 1)]
    for k in ('loss', 'l_simple', 'l_u', 'l_ual'):
        v = [r[k] for r in rows]
        assert all(math.isfinite(x) for x in v) and max(v) - min(v) > 1e-4, (k, v)
    want = expected_labels(npz, steps, .1, N_CLASSES)
    assert len(seen) == steps and all(torch.equal(a, b) for a, b in zip(seen, want))
    dropped = torch.cat(want) == N_CLASSES
    assert 0 < int(dropped.sum()) < len(dropped)                    # some labels dropped, most kept
    m = load_model(tmp_path / 'run' / 'final')
    assert (m.backbone.arch, m.backbone.learn_sigma, m.null_class) == ('dit', learn_sigma, N_CLASSES)
    assert (m.record['training']['p_uncond'], m.record['training']['null_class']) == (.1, N_CLASSES)
    x, t = torch.zeros(2, 3, 8, 8), torch.full((2,), 10.)
    with torch.no_grad():
        assert m.backbone(x, t, torch.tensor([0, 5])).shape[1] == (6 if learn_sigma else 3)
        assert m.forward_train(x, t, torch.tensor([0, 5]))['eps'].shape == (2, 3, 8, 8)


@pytest.mark.parametrize('mode', ['scratch', 'backbone'])
def test_resume_is_bit_identical(npz, tmp_path, mode):
    kw = dict(mode=mode, model_kw={**DIT_KW, 'learn_sigma': True}, ckpt_every=3)
    with embedded_labels() as full_labels:
        ra = train(_cfg(npz, tmp_path / 'full', steps=6, **kw))
    with embedded_labels() as split_labels:
        train(_cfg(npz, tmp_path / 'split', steps=3, **kw))
        rb = train(_cfg(npz, tmp_path / 'split', steps=6, **kw), resume=True)
    assert len(full_labels) == len(split_labels) == 6
    assert all(torch.equal(a, b) for a, b in zip(full_labels, split_labels))
    assert all(torch.equal(a, b) for a, b in zip(full_labels, expected_labels(npz, 6, .1, N_CLASSES)))
    for name in ('final_model', 'final_ema'):
        wa, wb = load_weights(ra[name] / 'model.safetensors'), load_weights(rb[name] / 'model.safetensors')
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    la, lb = read_log(ra['log']), read_log(rb['log'])
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]


def test_plain_dit_labels_are_dropped_once(npz, tmp_path):
    "A DiT with class_dropout_prob=0.5 in backbone mode: only p_uncond drops (none at 0, exactly the loop's at 0.3)."
    kw = dict(mode='backbone', model_kw={**DIT_KW, 'class_dropout_prob': .5}, steps=3)
    for p in (0., .3):
        with embedded_labels() as seen:
            train(_cfg(npz, tmp_path / f'p{p}', p_uncond=p, **kw))
        assert all(torch.equal(a, b) for a, b in zip(seen, expected_labels(npz, 3, p, N_CLASSES))), p
        assert len(seen) == 3


def test_uvit_class_conditional_with_p_uncond(npz, tmp_path):
    cfg = _cfg(npz, tmp_path / 'uvit', model='uvit_tiny', model_kw=dict(num_classes=N_CLASSES + 1, null_class=True),
               p_uncond=.25, steps=4)
    with embedded_labels() as seen:
        r = train(cfg)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected_labels(npz, 4, .25, N_CLASSES))) and len(seen) == 4
    assert all(math.isfinite(v) for v in r['losses'].values())
    m = load_model(r['final_model'])
    assert (m.backbone.arch, m.null_class, m.num_labels, m.record['training']['p_uncond']) == ('uvit', 5, 5, .25)


def test_unconditional_dit_takes_no_labels(npz, tmp_path):
    with embedded_labels() as seen:
        r = train(_cfg(npz, tmp_path / 'uncond', model_kw={**DIT_KW, 'num_classes': 0}, p_uncond=0., steps=2))
    assert seen == [] and all(math.isfinite(v) for v in r['losses'].values())


def test_init_from_official_dit_and_save_model(npz, tmp_path):
    torch.manual_seed(3)
    official = create_dit('DiT-S/2', **DIT_KW)
    ck = tmp_path / 'official.pt'                                     # an official training checkpoint's layout
    torch.save(dict(model={k: torch.zeros_like(v) for k, v in official.state_dict().items()},
                    ema=official.state_dict(), opt={}, args=argparse.Namespace(model='DiT-S/2')), ck)
    conf = dict(official.config)                                      # `model` as a DiT config dict
    rf = train(_cfg(npz, tmp_path / 'frozen', model=conf, model_kw={}, mode='frozen', init=str(ck), steps=2))
    mf = load_model(rf['final_model'])
    assert all(torch.equal(v, official.state_dict()[k]) for k, v in mf.backbone.state_dict().items())
    head = mf.exit_heads[0]                                           # per-layer heads start as the final layer
    assert head.linear.weight.shape == official.final_layer.linear.weight.shape
    save_model(official, tmp_path / 'dit')
    rt = train(_cfg(npz, tmp_path / 'ft', model='uvit_tiny', model_kw={}, mode='finetune', init=str(tmp_path / 'dit'),
                    steps=2))                                         # the record decides the architecture
    assert load_model(rt['final_model']).backbone.config == official.config
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        argv = _argv(npz, tmp_path / 'bad', 2, hidden_size=48) + ['--mode', 'finetune', '--init', str(ck)]
        assert main(argv) == 2
    assert "loaded as preset 'DiT-S/2' with model_kw" in err.getvalue() and 'shape mismatches' in err.getvalue()


@pytest.mark.parametrize('extra, msg', [
    (dict(num_classes=0), 'is unconditional (it takes no labels)'),
    (dict(class_dropout_prob=0.), 'this DiT has none'),
    (dict(num_classes=4), 'has labels up to 4 but the DiT has 4 classes'),
    (dict(in_channels=4), 'set model_kw in_channels=3'),
])
def test_bad_input_exits_2(npz, tmp_path, extra, msg):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert main(_argv(npz, tmp_path / 'bad', 2, **extra)) == 2
    assert msg in err.getvalue(), err.getvalue()
    assert not (tmp_path / 'bad' / 'ckpt').exists()                  # nothing trained
