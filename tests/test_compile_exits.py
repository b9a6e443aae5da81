"""The compiled early-exit path (`compile_exits`, inductor on the CPU): same exits and outputs as eager within 1e-4,
and a bounded number of compilations however the samples exit (dynamo's counters)."""
import shutil
import pytest
import torch
from torch._dynamo.utils import counters
from adadiff_nb.exits.early_exit import create_early_exit, block_modules


def _model():
    torch.manual_seed(0)
    m = create_early_exit('adadiff_tiny').eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.uem.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * .5)      # spread the uncertainties: exits vary by sample
    return m


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('c++') is None,
                    reason="inductor on the CPU needs a C++ compiler (apt-get install g++); .ci/run installs it")
def test_compiled_exits_match_eager_and_compile_a_bounded_number_of_times():
    m = _model()
    x, t = torch.randn(8, 3, 8, 8), torch.rand(8) * 999
    taus = (0., .3, .45, .5, .55, 1.)
    with torch.no_grad():
        eager = [m(x, t, threshold=tau) for tau in taus]
    assert len({tuple(o.exit_layer.tolist()) for o in eager}) >= 4          # the batch shrinks in different ways
    torch._dynamo.reset()
    counters.clear()
    m.compile_exits(buckets=(1, 2, 4, 8))
    assert all(b._compiled_call_impl is not None for b in block_modules(m.backbone))
    with torch.no_grad():
        first = [m(x, t, threshold=tau) for tau in taus]
        graphs = counters['stats']['unique_graphs']
        again = [m(x, t, threshold=tau) for tau in reversed(taus)][::-1]
    for e, c1, c2 in zip(eager, first, again):
        assert torch.equal(c1.exit_layer, e.exit_layer) and torch.equal(c2.exit_layer, e.exit_layer)
        assert (c1.sample - e.sample).abs().max() < 1e-4 and (c2.sample - e.sample).abs().max() < 1e-4
    # U-ViT blocks come in two variants (with / without a long skip); batch sizes: the buckets (the batch is one)
    assert 0 < graphs <= 2 * 4, graphs
    assert counters['stats']['unique_graphs'] == graphs                      # nothing recompiled the second time
    m.uncompile_exits()
    assert all(b._compiled_call_impl is None for b in block_modules(m.backbone)) and m._buckets is None
