"""Caching peers (adadiff_nb.exits.caching): exact reductions, real block skipping, the layer-ratio axis,
L2C training, resets."""
import pytest
import torch
from adadiff_nb.models.uvit import uvit_tiny, timestep_embedding
from adadiff_nb.exits.early_exit import EarlyExitUViT, block_modules
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.exits.caching import (CACHE_METHODS, DeepCacheUViT, L2CUViT, AdaDiffCacheUViT, full_steps,
                                      shallow_blocks, trajectories, train_router, l2c_eval)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def bb():
    torch.manual_seed(0)
    return uvit_tiny(num_classes=3, null_class=True).eval()


@pytest.fixture(scope='module')
def ee(bb):
    return EarlyExitUViT.from_backbone(bb).eval()


def _run(model, sampler='ddim', steps=6, **kw):
    return sample_batches(model, sampler, steps, n=4, batch_size=2, seed=1, **kw)


@pytest.mark.parametrize('sampler', ['ddim', 'dpm_solver'])
def test_interval_one_and_all_on_router_are_the_full_model(bb, sampler):
    full = _run(bb, sampler).images
    assert torch.equal(_run(DeepCacheUViT(bb, interval=1, branch=1), sampler).images, full)
    assert torch.equal(_run(L2CUViT(bb, steps=6, interval=2), sampler).images, full)       # mask starts all-on


def _reference_shallow(bb, x, t, y, h_cached, k):
    "DeepCache's cached step written from the U-ViT blocks themselves (not through run_block / shallow_pass)."
    tok = torch.cat([bb.label_emb(y)[:, None], timestep_embedding(t, bb.embed_dim)[:, None], bb.patch_embed(x)], 1)
    h, skips = tok + bb.pos_embed, []
    for blk in bb.in_blocks[:k]:
        h = blk(h)
        skips.append(h)
    h = h_cached
    for blk in bb.out_blocks[len(bb.out_blocks) - k:]:
        h = blk(h, skips.pop())
    return bb.decode(h)


@torch.no_grad()
def test_cached_step_matches_an_independent_reference(bb):
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    t = torch.tensor([700.] * 3)
    for k in (1, 2):
        m = DeepCacheUViT(bb, interval=2, branch=k)
        m(x, t + 50, y)                                               # full step fills the cache
        h_cached = m.cache[bb.num_layers - 1 - k]
        assert torch.allclose(m(x, t, y).sample, _reference_shallow(bb, x, t, y, h_cached, k), atol=1e-6)


def _block_calls(bb, model, steps=5):
    "Per model call, the set of block indices that ran (forward hooks on every block)."
    calls, cur = [], set()
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: cur.add(i)) for i, b in enumerate(block_modules(bb))]
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    try:
        for s in range(steps):
            cur.clear()
            model(x, torch.full((2,), 900. - 100 * s), y)
            calls.append(sorted(cur))
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_cached_steps_really_skip_the_deep_blocks(bb, ee):
    L = list(range(bb.num_layers))
    assert _block_calls(bb, DeepCacheUViT(bb, interval=3, branch=1)) == [L, [0, 4], [0, 4], L, [0, 4]]
    l2c = L2CUViT(bb, steps=5, interval=2)
    l2c.mask[1] = torch.tensor([True, False, False, False, True])
    l2c.mask[3] = torch.tensor([False] * 5)
    assert _block_calls(bb, l2c) == [L, [0, 4], L, [], L]
    every = AdaDiffCacheUViT(ee, threshold=1., interval=5, branch=2, min_branch=1)   # every row leaves at depth 1
    assert _block_calls(ee.backbone, every)[1:] == [[0, 4]] * 4                   # from_backbone copies the weights
    assert shallow_blocks(2, 2) == [0, 1, 3, 4]


@pytest.mark.parametrize('sampler,steps', [('ddim', 7), ('dpm_solver', 6), ('ddpm', 5)])
def test_measured_layer_ratio_is_the_analytic_one(bb, ee, sampler, steps):
    models = [DeepCacheUViT(bb, interval=3, branch=1),
              DeepCacheUViT(bb, interval=3, branch=2, mode='quadratic', steps=steps),
              AdaDiffCacheUViT(ee, threshold=0., interval=2, branch=1)]
    l2c = L2CUViT(bb, steps=steps, interval=2)
    l2c.mask[1::2, 1:4] = False
    for m in [*models, l2c]:
        r = _run(m, sampler, steps)
        assert abs(r.stats['layer_ratio'] - m.analytic_layer_ratio(steps)) < 1e-12, (type(m).__name__, sampler)
        assert r.stats['layer_ratio'] < 1


def test_guided_runs_count_both_row_halves(bb):
    m = DeepCacheUViT(bb, interval=2, branch=1)
    r = _run(m, 'ddim', 4, guidance_scale=2.)
    assert abs(r.stats['layer_ratio'] - m.analytic_layer_ratio(4)) < 1e-12
    assert r.stats['rows_per_eval'] == 2


def test_l2c_training_lowers_its_objective_and_respects_the_budget(bb):
    traj = trajectories(bb, 'ddim', 6, n=6, seed=2)
    scores = {}
    for l1 in (0., 0.5):
        m = L2CUViT(bb, steps=6, interval=2)
        before = l2c_eval(m, traj, l1)
        hist = train_router(m, traj, train_steps=40, batch=4, lr=0.2, l1_weight=l1, seed=0)
        assert len(hist) == 40 and l2c_eval(m, traj, l1) < before
        scores[l1] = float(m.router()[1::2].mean().detach())
        for remove in (0.1, 0.3, 0.5):
            m.set_budget(remove=remove)
            assert int((~m.mask).sum()) == round(remove * 30)
            assert bool(m.mask[0::2].all())                                       # full steps untouched
    assert scores[0.5] < scores[0.]                                               # the L1 term buys sparsity
    built = CACHE_METHODS['l2c'](bb, dict(steps=6, remove=0.4, train_steps=4, train_rows=4))
    assert abs(built.analytic_layer_ratio(6) - 0.6) < 1e-12
    r = _run(built, 'ddim', 6)
    assert abs(r.stats['layer_ratio'] - 0.6) < 1e-12


def test_l2c_accepts_a_runner_training_callable(bb):
    seen = []
    m = CACHE_METHODS['l2c'](bb, dict(steps=4, remove=0.2), train=lambda model, cfg: seen.append(cfg) or ['ok'])
    assert seen and m.history == ['ok'] and int((~m.mask).sum()) == 4


def test_combination_at_threshold_zero_is_deepcache(bb, ee):
    for sampler in ('ddim', 'dpm_solver'):
        dc = _run(DeepCacheUViT(bb, interval=3, branch=2), sampler, 6)
        ac = _run(CACHE_METHODS['adadiff_cache'](ee, dict(interval=3, branch=2, threshold=0.)), sampler, 6)
        assert torch.equal(ac.images, dc.images)
        assert ac.stats['layer_ratio'] == dc.stats['layer_ratio']
    some = _run(AdaDiffCacheUViT(ee, threshold=0.5, interval=3, branch=2), 'ddim', 6)
    assert some.stats['layer_ratio'] <= dc.stats['layer_ratio']


def test_reset_between_runs_gives_identical_results(bb):
    m = DeepCacheUViT(bb, interval=3, branch=1)
    a = _run(m, 'ddim', 5, warmup=True).images
    b = _run(m, 'ddim', 5).images
    assert torch.equal(a, b)
    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.full((2,), 500.)
    first = m(x, t, y).sample
    m(x, t - 100, y)
    assert m.step == 2
    assert torch.equal(m(x, t, y).sample, first) and m.step == 1          # a non-decreasing time starts a new run
    m.reset()
    assert m.step == 0 and not m.cache
    m2 = DeepCacheUViT(bb, interval=3, branch=1, auto_reset=False)
    m2(x, t, y)
    assert m2(x, t, y).cached                                               # without auto_reset: the same run


def test_bad_options_give_clear_errors(bb, ee):
    cases = [
        (lambda: DeepCacheUViT(bb, interval=0), 'interval must be an integer >= 1'),
        (lambda: DeepCacheUViT(bb, branch=3), 'branch must be an integer [0, 2]'),
        (lambda: DeepCacheUViT(bb, mode='cubic'), "choose one of ['uniform', 'quadratic']"),
        (lambda: DeepCacheUViT(bb, mode='quadratic'), 'pass steps'),
        (lambda: CACHE_METHODS['deepcache'](bb, dict(brnach=1)), "unknown deepcache option(s) ['brnach']"),
        (lambda: CACHE_METHODS['adadiff_cache'](bb, {}), 'needs an EarlyExitModel'),
        (lambda: CACHE_METHODS['adadiff_cache'](ee, dict(threshold=-1)), 'outside [0, 1]'),
        (lambda: CACHE_METHODS['adadiff_cache'](ee, dict(branch=1, min_branch=2)), 'min_branch must be'),
        (lambda: CACHE_METHODS['l2c'](bb, {}), 'l2c needs steps'),
        (lambda: CACHE_METHODS['l2c'](bb, dict(steps=4, remove=0.1, router_threshold=0.5)), 'not both'),
        (lambda: CACHE_METHODS['l2c'](bb, dict(steps=4, remove=0.9, train_steps=0)), 'lower remove or raise'),
        (lambda: full_steps(0, 2), 'steps must be an integer >= 1'),
    ]
    for fn, msg in cases:
        with pytest.raises((ValueError, TypeError)) as e:
            fn()
        assert msg in str(e.value), (msg, str(e.value))
    m = L2CUViT(bb, steps=2)
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([0])
    m(x, torch.tensor([900.]), y)
    m(x, torch.tensor([800.]), y)
    with pytest.raises(ValueError, match='past the 2 model calls'):
        m(x, torch.tensor([700.]), y)
    with pytest.raises(ValueError, match='takes no'):
        m(x, torch.tensor([900.]), y, threshold=0.5)
