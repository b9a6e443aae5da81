"""`adadiff-train` and `adadiff-sample` on the UNet family (models.unet, exits.unet_exits): the backbone stage and the
exit stage (finetune and frozen) through the CLI, resume, the early-exit UNet's checkpoint round trip (strict load,
identical outputs, the same model `EarlyExitUNet` builds), sampling it, and bad configs named with their fix.
Micro shapes (unet_test8 at 8x8, batch 8), two or three steps each."""
import contextlib, io, json
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_nb.apps.sample_cli import main as sample_main
from adadiff_nb.apps.train_cli import main
from adadiff_nb.evaluation.cost import layer_costs
from adadiff_nb.exits.early_exit import EarlyExitModel
from adadiff_nb.exits.unet_exits import create_unet_early_exit, unet_exit_costs
from adadiff_nb.models.checkpoint import load_model, save_model
from adadiff_nb.models.unet import UNet

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


@pytest.fixture(scope='module')
def npz(tmp_path_factory) -> Path:
    "48 random 32x32 images in the CIFAR-10 npz layout (the run resizes them to the UNet's 8x8)."
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp('data') / 'imgs.npz'
    np.savez(p, train_x=rng.integers(0, 256, (48, 3, 32, 32), dtype=np.uint8), train_y=np.arange(48) % 10,
             test_x=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), test_y=np.arange(8) % 10)
    return p


def _run(config, npz, out, steps, *extra) -> tuple[int, str]:
    "adadiff-train CONFIG on unet_test8 at 8x8 -> (exit status, stdout + stderr)."
    argv = ['--config', config, '--model', 'unet_test8', '--img-size', '8', '--data', str(npz), '--batch-size', '8',
            '--steps', str(steps), '--device', 'cpu', '--progress', 'false', '--sample-every', '0', '--out', str(out),
            *extra]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf): rc = main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope='module')
def backbone_run(npz, tmp_path_factory) -> Path:
    "A 3-step cpu16_unet_backbone run (the module's UNet to add exits to)."
    out = tmp_path_factory.mktemp('runs') / 'unet_bb'
    rc, log = _run('cpu16_unet_backbone', npz, out, 3, '--ckpt-every', '1')
    assert rc == 0, log
    return out


@pytest.fixture(scope='module')
def exit_run(npz, backbone_run, tmp_path_factory) -> Path:
    "A 2-step cpu16_unet_adadiff run from the backbone run."
    out = tmp_path_factory.mktemp('runs') / 'unet_ee'
    rc, log = _run('cpu16_unet_adadiff', npz, out, 2, '--init', str(backbone_run / 'final'))
    assert rc == 0, log
    assert 'arch=adadiff' in log and 'init=' in log and '(backbone)' in log, log
    return out


def test_backbone_stage_saves_a_unet(backbone_run):
    rec = json.loads((backbone_run / 'final' / 'config.json').read_text())
    assert rec['arch'] == 'unet' and rec['config']['ch'] == 8 and rec['config']['img_size'] == 8
    m = load_model(backbone_run / 'final_ema')
    assert isinstance(m, UNet)
    with torch.no_grad(): y = m(torch.randn(2, 3, 8, 8), torch.tensor([10., 900.]))
    assert y.shape == (2, 3, 8, 8) and torch.isfinite(y).all()


def test_backbone_resume_is_bit_identical(npz, backbone_run, tmp_path):
    "2 steps, then resume to 3: the same weights as the uninterrupted 3-step run."
    out = tmp_path / 'resumed'
    assert _run('cpu16_unet_backbone', npz, out, 2)[0] == 0
    rc, log = _run('cpu16_unet_backbone', npz, out, 3, '--resume')
    assert rc == 0 and 'resumed from' in log, log
    a, b = load_model(out / 'final').state_dict(), load_model(backbone_run / 'final').state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exit_stage_builds_the_early_exit_unet(exit_run):
    rec = json.loads((exit_run / 'final' / 'config.json').read_text())
    assert rec['arch'] == 'adadiff' and rec['config']['backbone_arch'] == 'unet'
    m = load_model(exit_run / 'final')
    assert type(m) is EarlyExitModel and type(m.uem).__name__ == 'UNetUEM'
    ref = create_unet_early_exit('unet_test8')                     # the same model as exits.unet_exits builds
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert layer_costs(m)['uem_exits'] == unet_exit_costs(ref)['uem_exits']


def test_checkpoint_round_trip_gives_identical_outputs(exit_run, tmp_path):
    m = load_model(exit_run / 'final').eval()
    save_model(m, tmp_path / 'again')
    m2 = load_model(tmp_path / 'again').eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5., 300., 600., 990.])
    with torch.no_grad():
        for kw in (dict(threshold=0.5), dict(threshold=torch.tensor([0., 1., .5, .5])),
                   dict(exit_layers=torch.tensor([0, 1, 2, 3]))):
            o1, o2 = m(x, t, **kw), m2(x, t, **kw)
            assert torch.equal(o1.sample, o2.sample) and torch.equal(o1.exit_layer, o2.exit_layer), kw
        assert torch.equal(m(x, t, threshold=0.).sample, m.backbone(x, t))


def test_frozen_stage_keeps_the_unet(npz, backbone_run, tmp_path):
    rc, log = _run('cpu16_unet_frozen', npz, tmp_path / 'fr', 2, '--init', str(backbone_run / 'final'))
    assert rc == 0, log
    m, bb = load_model(tmp_path / 'fr' / 'final'), load_model(backbone_run / 'final')
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in m.backbone.state_dict().items())
    ref = create_unet_early_exit('unet_test8', backbone=bb)        # adapters start as copies of backbone blocks
    assert not torch.equal(m.exit_heads[0].adapter.conv1.weight, ref.exit_heads[0].adapter.conv1.weight)


def test_adadiff_sample_on_the_early_exit_unet(exit_run, tmp_path):
    out = tmp_path / 'samples'
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = sample_main(['--checkpoint', str(exit_run / 'final_ema'), '--threshold', '0.1', '--sampler', 'ddim',
                          '--steps', '3', '--n', '2', '--out', str(out), '--device', 'cpu'])
    assert rc == 0, buf.getvalue()
    assert 'wrote' in buf.getvalue() and any(out.iterdir())


@pytest.mark.parametrize('config, extra, msg', [
    ('cpu16_unet_adadiff', ['--exit-kw', '{"exit_head": "shared"}'], "use exit_head='per_layer'"),
    ('cpu16_unet_adadiff', ['--exit-kw', '{"uem_params": "shared"}'], "choose one of ['per_layer'"),
    ('cpu16_unet_backbone', ['--p-uncond', '0.1'], 'set p_uncond=0'),
    ('cpu16_unet_backbone', ['--model-kw', '{"img_size": 10}', '--img-size', 'none'], 'divisible by 2'),
    ('cpu16_unet_backbone', ['--img-size', '16'], 'img_size=16 but the model is built for 8x8'),
])
def test_bad_configs_named_with_fix(npz, backbone_run, tmp_path, config, extra, msg):
    init = ['--init', str(backbone_run / 'final')] if 'adadiff' in config else []
    rc, log = _run(config, npz, tmp_path / 'bad', 1, *init, *extra)
    assert rc == 2 and msg in log, log
    assert not (tmp_path / 'bad' / 'final').exists()
