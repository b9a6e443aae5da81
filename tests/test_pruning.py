"""S-Pruning (adadiff_nb.exits.pruning): a missing torch-pruning named with its extra, the FLOP target across
importances, scopes and backbones (text-conditioned U-ViT, learned-sigma DiT), the stopping rule over several batches
from the noisy end, save/load round trips, a pruned backbone inside an early-exit model, and bad input."""
import copy, sys
import pytest
import torch
import torch.nn as nn
from adadiff_nb.extras import MissingExtraError
from adadiff_nb.models.uvit import uvit_tiny
from adadiff_nb.models.dit import DiT
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.exits.pruning import (block_widths, example_inputs, measure_flops, stops_after, taylor_importance,
                                      taylor_times, prune_backbone, save_pruned, load_pruned)

torch.set_num_threads(1)
pytest.importorskip('torch_pruning')


def _dit(**kw):
    torch.manual_seed(0)
    m = DiT(**{**dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                      num_classes=3), **kw}).eval()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))      # adaLN-Zero init: no gradients otherwise
    return m


def _uvit(**kw):
    torch.manual_seed(0)
    return uvit_tiny(**{**dict(embed_dim=48, depth=4, num_heads=3), **kw}).eval()


def _data(n=4, classes=None):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 3, 8, 8, generator=g)
    return x0 if classes is None else (x0, torch.randint(0, classes, (n,), generator=g))


def test_missing_torch_pruning_names_the_extra(monkeypatch, tmp_path):
    m = _uvit()
    p = prune_backbone(m, 0.7)                                              # made while torch-pruning is there
    d = save_pruned(p, tmp_path / 'p')
    monkeypatch.setitem(sys.modules, 'torch_pruning', None)                 # as if not installed
    with pytest.raises(MissingExtraError, match=r"torch_pruning` package, which is not installed: "
                                                r"pip install 'adadiff_nb\[prune\]'"):
        prune_backbone(m, 0.7)
    assert taylor_importance(m, _data(), num_steps=2).steps == 2           # the importance needs no torch-pruning
    assert block_widths(load_pruned(d)) == block_widths(p)                 # nor does loading a pruned model


@pytest.mark.parametrize('arch', ['uvit', 'dit'])
@pytest.mark.parametrize('importance,scope,target', [('taylor', 'local', 0.5), ('magnitude', 'global', 0.65),
                                                     ('random', 'local', 0.8)])
def test_flop_target_reached(arch, importance, scope, target):
    m = _uvit() if arch == 'uvit' else _dit()
    data = _data(classes=None if arch == 'uvit' else 3)
    imp = taylor_importance(m, data, num_steps=6) if importance == 'taylor' else importance
    p = prune_backbone(m, target, importance=imp, scope=scope, tol=0.02)
    ratio = measure_flops(p) / measure_flops(m)
    assert abs(ratio - target) <= 0.02 and p.pruning['ratio'] == ratio
    assert block_widths(p) != block_widths(m) and all(w['heads'] >= 1 and w['mlp_hidden'] >= 1
                                                      for w in block_widths(p))
    x, t, y = example_inputs(m, 2)
    with torch.no_grad(): assert p(x, t, y).shape == m(x, t, y).shape


def test_text_uvit_and_learned_sigma_dit_round_trip(tmp_path):
    ctx = torch.randn(4, 4, 16)
    for m, data in ((_uvit(clip_dim=16, num_clip_token=4), (_data(), ctx)), (_dit(learn_sigma=True, num_classes=0),
                                                                            _data())):
        p = prune_backbone(m, 0.6, importance=taylor_importance(m, data, num_steps=4, threshold=0.))
        q = load_pruned(save_pruned(p, tmp_path / m.arch))
        x, t, y = example_inputs(m, 2)
        x = torch.randn_like(x)
        with torch.no_grad(): assert torch.equal(q(x, t, y), p(x, t, y))
        assert block_widths(q) == p.pruning['widths']


def test_target_near_one_and_modes():
    m = _dit()
    p = prune_backbone(m, 0.995)
    assert p.pruning['rounds'] == 0 and block_widths(p) == block_widths(m)
    x, t, y = example_inputs(m, 2)
    x = torch.randn_like(x)
    with torch.no_grad(): assert torch.equal(p(x, t, y), m(x, t, y))
    assert prune_backbone(m.train(), 0.8).training and not prune_backbone(m.eval(), 0.8).training


def test_stop_rule_from_the_noisy_end_over_batches():
    seq = [0.1, 0.4, 0.9, 0.05, 0.3]          # visited from the noisy end; 0.05 < 0.1 * 0.9 at step 3
    calls = []

    def loss_fn(model, x_t, model_t, eps, t, step, y=None):
        calls.append((step, float(model_t[0])))
        return {'loss': 0 * model(x_t, model_t, y).sum() + seq[step]}

    m = _uvit()
    r = taylor_importance(m, [_data(2), _data(3)], order='noisy_first', num_steps=5, loss_fn=loss_fn)
    assert r.steps == stops_after(seq, 0.1) == 4
    assert r.losses == pytest.approx(seq[:4])                         # the mean over the two batches
    assert [c[0] for c in calls] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert r.times == pytest.approx(taylor_times(num_steps=5, order='noisy_first')[:4].tolist())
    assert calls[0][1] > calls[-1][1]                                 # model times fall: from the noisy end


def test_pruned_backbone_inside_an_early_exit_model():
    ee = create_early_exit('adadiff_tiny').eval()
    with pytest.raises(TypeError, match='pass its `.backbone`'): prune_backbone(ee, 0.7)
    ee.backbone = prune_backbone(ee.backbone, 0.7)                    # the residual width, so the exits, stay
    x, t, y = example_inputs(ee.backbone, 2)
    with torch.no_grad(): out = ee(torch.randn_like(x), t, y).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize('call,msg', [
    (lambda m: prune_backbone(m, 1.2), r'target_flop_ratio must be a number in \(0, 1\), got 1.2'),
    (lambda m: prune_backbone(m, True), r'target_flop_ratio must be a number in \(0, 1\), got True'),
    (lambda m: prune_backbone(m, 0.5, tol=0.6), r'tol must be a number in \(0, 0.5\)'),
    (lambda m: prune_backbone(m, 0.5, min_channels=1.5), 'min_channels must be an integer >= 1'),
    (lambda m: prune_backbone(nn.Sequential(), 0.5), 'S-Pruning prunes a U-ViT'),
    (lambda m: taylor_importance(m, _data(), schedule='cosine2'), "unknown schedule 'cosine2'"),
    (lambda m: taylor_importance(m, [], num_steps=2), r'batches must be clean images x0 \(B, C, H, W\)'),
    (lambda m: taylor_importance(m, _data(), order='up'), "order='up' is not supported"),
    (lambda m: taylor_importance(m, _data(), threshold=1), r'threshold must be a number in \[0, 1\)'),
    (lambda m: prune_backbone(m, 0.5, importance=taylor_importance(_dit(), _data(classes=3), num_steps=1)),
     'computed on another model'),
])
def test_bad_input(call, msg):
    with pytest.raises((ValueError, TypeError), match=msg): call(_uvit())
