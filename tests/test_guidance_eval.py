"""The guidance-policy comparison on a tiny random class-conditional early-exit model: the same noise and labels for
both policies, every metric recomputed here from samples drawn with `sample_batches` directly, and the equal-ratio
interpolation against numpy on a made-up result."""
import numpy as np
import pytest
import torch
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.evaluation.metrics import ProxyClassifier, compute_activations, kid_from_activations, proxy_fd, psnr
from adadiff_nb.evaluation.analysis import analysis_data
from adadiff_nb.experiments.guidance import compare_guidance_policies, policy_curves_at_equal_ratio, guidance_table

TAUS, N, STEPS, S = [0., 0.5, 1.], 6, 2, 2.5


@pytest.fixture(scope='module')
def setup():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_early_exit('adadiff_tiny', num_classes=11, null_class=True).eval()
    with torch.no_grad():
        for p in model.uem.parameters(): p.mul_(30.)                   # spread u around 0.5: exits vary at tau 0.5
    clf = ProxyClassifier().eval()                                    # random weights: the plumbing, not the quality
    ref = analysis_data(model, n=40)[0]
    res = compare_guidance_policies(model, TAUS, guidance_scale=S, n=N, batch_size=4, steps=STEPS, seed=3,
                                    reference=ref, proxy=clf)
    return model, clf, ref, res


@pytest.mark.parametrize('policy', ['joint', 'independent'])
def test_metrics_equal_a_direct_recomputation(setup, policy):
    model, clf, ref, res = setup
    y = torch.arange(N) % 10
    kw = dict(n=N, batch_size=4, seed=3, labels=y, guidance_scale=S, guidance_policy=policy)
    with torch.no_grad():
        full = sample_batches(model, 'ddim', STEPS, **kw).images.clamp(-1, 1)
        d = res['by_policy'][policy]
        for i, tau in enumerate(TAUS):
            run = sample_batches(model, 'ddim', STEPS, threshold=tau, **kw)
            x = run.images.clamp(-1, 1)
            assert d['layer_ratio'][i] == pytest.approx(run.stats['layer_ratio'])
            assert d['proxy_fd'][i] == pytest.approx(proxy_fd(x, ref, clf), rel=1e-6)
            assert d['psnr_vs_full'][i] == pytest.approx(float(psnr(x, full)))
            acc = (clf(((x + 1) / 2 * 255).round().clamp(0, 255) / 255).argmax(1) == y).float().mean().item()
            assert d['accuracy'][i] == pytest.approx(acc)
            kid = kid_from_activations(compute_activations(x, clf), compute_activations(ref, clf), subset_size=N)[0]
            assert d['proxy_kid'][i] == pytest.approx(kid, rel=1e-6)
    assert res['full']['proxy_fd'] == pytest.approx(proxy_fd(full, ref, clf), rel=1e-6)


def test_policies_share_noise_and_labels(setup):
    _, _, _, res = setup
    J, I = res['by_policy']['joint'], res['by_policy']['independent']
    assert res['labels'].tolist() == [0, 1, 2, 3, 4, 5]
    for k in ('layer_ratio', 'proxy_fd', 'proxy_kid', 'accuracy', 'psnr_vs_full'):   # no exit / all at exit 0
        np.testing.assert_allclose(J[k][[0, 2]], I[k][[0, 2]])
    assert J['layer_ratio'][0] == 1. and J['layer_ratio'][2] == 0. and np.isinf(J['psnr_vs_full'][0])
    assert 0 < I['layer_ratio'][1] <= J['layer_ratio'][1] < 1                       # here joint pays for the later row
    assert len(guidance_table(res).splitlines()) == 2 + 2 * len(TAUS) + 1


def test_equal_ratio_interpolation_against_numpy():
    rng = np.random.default_rng(0)
    lj, li = np.array([1., .7, .5, .2]), np.array([.9, .6, .3, .1])
    fj, fi = rng.uniform(5, 50, 4), rng.uniform(5, 50, 4)
    res = dict(policies=['joint', 'independent'], guidance_scale=3., by_policy=dict(
        joint=dict(layer_ratio=lj, proxy_fd=fj), independent=dict(layer_ratio=li, proxy_fd=fi)))
    eq = policy_curves_at_equal_ratio(res, metrics=('proxy_fd',))
    at = np.array([.2, .3, .5, .6, .7, .9])                               # measured ratios inside [.2, .9]
    np.testing.assert_allclose(eq['layer_ratio'], at)
    pj = np.interp(at, lj[::-1], fj[::-1])
    pi = np.interp(at, li[::-1], fi[::-1])
    np.testing.assert_allclose(eq['by_policy']['joint']['proxy_fd'], pj)
    np.testing.assert_allclose(eq['by_policy']['independent']['proxy_fd'], pi)
    assert eq['better']['proxy_fd'] == ('joint' if (pj - pi).mean() < 0 else 'independent')
    out = policy_curves_at_equal_ratio(res, ratios=[0.05, 0.95], metrics=('proxy_fd',))
    assert np.isnan(out['by_policy']['joint']['proxy_fd'][0])                      # below joint's range: NaN
    assert np.isnan(out['by_policy']['independent']['proxy_fd'][1])                # above independent's range


def test_bad_input(setup):
    model = setup[0]
    with pytest.raises(ValueError, match='both policies are the same'):
        compare_guidance_policies(model, [0.], guidance_scale=0., n=2)
    with pytest.raises(ValueError, match='negative'):
        compare_guidance_policies(model, [0.], guidance_scale=-1., n=2)
    with pytest.raises(ValueError, match='no null class'):
        compare_guidance_policies(create_early_exit('adadiff_tiny', num_classes=10), [0.], n=2)
