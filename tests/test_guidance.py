"""Classifier-free guidance across modules: a tiny early-exit DiT (learned sigma, adaLN) saved and sampled through
`adadiff-sample`, `sampling.sample_batches` and the `CostMeter`, under both guidance policies."""
import io, json, contextlib
import numpy as np
import pytest
import torch
from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.evaluation.cost import forward_flops
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.apps.sample_cli import main
from adadiff_nb.sampling.run import sample_batches, images_uint8
from adadiff_nb.sampling.samplers import GUIDANCE_POLICIES

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def dit():
    "A tiny class-conditional early-exit DiT (5 classes, null class 5) with random backbone and spread-out UEMs."
    torch.manual_seed(2)
    m = create_early_exit('adadiff_DiT-S/2', input_size=8, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                          num_classes=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.backbone.named_parameters():
            if name != 'pos_embed': p.normal_(std=.3)             # a fresh DiT outputs zeros (adaLN-Zero)
        for p in m.uem.parameters(): p.copy_(torch.randn(p.shape, generator=g) * .5)
    return m.eval()


def _run(*args):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): code = main([str(a) for a in args])
    return code, o.getvalue(), e.getvalue()


@pytest.mark.parametrize('policy', GUIDANCE_POLICIES)
def test_meter_counts_both_rows(dit, policy):
    "The meter's GFLOPs are the analytic cost of every evaluation's 2B rows; 'joint' ties a sample's two rows."
    infos = []
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = sample_batches(dit, 'dpm_solver_2', steps=4, x_T=x, labels=[0, 2, 4], guidance_scale=4., threshold=.5,
                       guidance_policy=policy, callback=lambda d: infos.extend(d['exits']))
    assert len(infos) == 4 and all(i['guided'] and i['exit_layer'].shape == (6,) for i in infos)
    total = sum(forward_flops(dit, i)['total'] for i in infos)
    assert r.stats['gflops_per_image'] == pytest.approx(total / 3 / 1e9, rel=1e-12)
    assert (r.stats['evaluations'], r.stats['rows_per_eval'], r.stats['layers_total']) == (24, 2., 24 * 4)
    ex = torch.stack([i['exit_layer'] for i in infos])
    assert (ex < 4).any()
    if policy == 'joint': assert torch.equal(ex[:, :3], ex[:, 3:])


@pytest.mark.parametrize('policy', GUIDANCE_POLICIES)
def test_batch_invariance_through_sample_batches(dit, policy):
    "A sample's image does not depend on the batch it is guided in (deterministic sampler, given noise)."
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(x_T=x, labels=[1, 3, 0, 4], guidance_scale=2., threshold=.5, guidance_policy=policy)
    together = sample_batches(dit, 'ddim', 4, batch_size=4, **kw).images
    alone = sample_batches(dit, 'ddim', 4, batch_size=1, **kw).images
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5 * float(together.abs().max()))


def test_cli_on_a_dit_checkpoint(dit, tmp_path):
    "adadiff-sample --class / --guidance-scale on a saved DiT: the images of sample_batches, settings in stats.json."
    save_model(dit, tmp_path / 'dit')
    out = tmp_path / 'o'
    code, text, err = _run('--checkpoint', tmp_path / 'dit', '--sampler', 'ddim', '--steps', 3, '--n', 3, '--class', 4,
                           '--guidance-scale', 4, '--threshold', .5, '--out', out, '--quiet')
    assert (code, err) == (0, ''), err
    st = json.loads((out / 'stats.json').read_text())
    assert (st['guidance_scale'], st['guidance_policy'], st['labels_spec'], st['labels']['counts']) == \
        (4., 'joint', 4, {'4': 3})
    ref = sample_batches(dit, 'ddim', 3, n=3, labels=4, guidance_scale=4., threshold=.5)
    z = np.load(out / 'samples.npz')
    assert z['labels'].tolist() == [4, 4, 4]
    np.testing.assert_array_equal(z['images'], images_uint8(ref.images))
    code, _, err = _run('--checkpoint', tmp_path / 'dit', '--n', 2, '--steps', 2, '--labels', '1,6', '--out',
                        tmp_path / 'bad', '--quiet')
    assert code == 2 and 'the model has 5 classes' in err and not (tmp_path / 'bad').exists()
