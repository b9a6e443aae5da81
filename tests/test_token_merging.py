"""Token Merging (adadiff_nb.exits.token_merging): a missing tomesd named with its extra, sampling with guidance,
merging around the MLP, gradients, random dst tokens per seed."""
import importlib.util, sys
import pytest
import torch
from adadiff_nb.extras import MissingExtraError
from adadiff_nb.models.uvit import uvit_tiny
from adadiff_nb.exits.runner import block_modules
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.exits.token_merging import apply_tome, remove_tome, tome_state, tome_matching, tome_flop_ratio

torch.set_num_threads(1)
needs_tomesd = pytest.mark.skipif(importlib.util.find_spec('tomesd') is None,
                                  reason="tomesd is not installed (pip install 'adadiff_nb[tome]')")


@pytest.fixture
def uv():
    torch.manual_seed(0)
    return uvit_tiny(depth=8, num_classes=3, null_class=True).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([900., 300.]), torch.tensor([0, 1])


def test_missing_tomesd_names_the_extra(uv, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tomesd', None)            # as if not installed
    monkeypatch.delitem(sys.modules, 'tomesd.merge', raising=False)
    with pytest.raises(MissingExtraError, match=r"needs the `tomesd` package.*pip install 'adadiff_nb\[tome\]'"):
        apply_tome(uv, 0.5)
    assert tome_state(uv) is None                               # nothing applied
    apply_tome(uv, 0.)                                          # nothing to merge: no tomesd needed
    assert tome_state(uv).handles == []


@needs_tomesd
def test_merge_mlp_merges_the_mlp_input(uv):
    seen = {}
    apply_tome(uv, 0.5, 'F', 1, merge_mlp=True)
    blk = block_modules(uv)[0]
    h = blk.mlp.register_forward_pre_hook(lambda m, a: seen.update(mlp=a[0].shape[1]))
    h2 = blk.mlp.register_forward_hook(lambda m, a, o: seen.update(out=o.shape[1]))
    uv(*_inputs())
    h.remove()
    h2.remove()
    assert seen == dict(mlp=2 + 16 - 8, out=2 + 16)              # time + class tokens kept, 8 of 16 patches merged
    assert tome_flop_ratio(uv) < tome_flop_ratio(uv, 0.5, 'F', 1)


@needs_tomesd
def test_sampling_with_guidance(uv):
    """A guided DDIM run through the ToMe'd model: finite, its own images, and the plain ones back after removal."""
    kw = dict(n=2, batch_size=2, seed=0, labels=torch.tensor([0, 1]), guidance_scale=2.)
    plain = sample_batches(uv, 'ddim', 3, **kw).images
    apply_tome(uv, 0.5, 'R', 3, use_rand=False)
    merged = sample_batches(uv, 'ddim', 3, **kw).images
    assert merged.shape == plain.shape and torch.isfinite(merged).all() and not torch.equal(merged, plain)
    remove_tome(uv)
    assert torch.equal(sample_batches(uv, 'ddim', 3, **kw).images, plain)


@needs_tomesd
def test_gradients_flow_through_merging(uv):
    uv.train()
    apply_tome(uv, 0.5, 'B', 4)
    uv(*_inputs()).square().mean().backward()
    g = [p.grad for p in block_modules(uv)[0].attn.qkv.parameters()]
    assert all(v is not None and torch.isfinite(v).all() and v.abs().sum() > 0 for v in g)


@needs_tomesd
def test_random_dst_depends_on_the_generator():
    torch.manual_seed(0)
    tok = torch.randn(1, 16, 8)
    draw = lambda seed: tome_matching(tok, (4, 4), 6, generator=torch.Generator().manual_seed(seed))[0](tok)
    assert torch.equal(draw(5), draw(5))
    outs = {tuple(draw(s).flatten().tolist()) for s in range(6)}
    assert len(outs) > 1                                        # the dst token of a window changes with the draw
    fixed = tome_matching(tok, (4, 4), 6)[0](tok)               # no generator: the top-left dst tokens
    assert fixed.shape == (1, 10, 8)
