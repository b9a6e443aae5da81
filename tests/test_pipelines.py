"""`adadiff_nb.integrations.diffusers` on tiny random diffusers pipelines built from configs (offline): threshold=0
leaves the
images unchanged, threshold=1 runs no block (forward hooks count block calls), an exited row equals a head applied
to the blocks run by hand here, guidance pairs leave together under 'joint', disable restores the original forward,
adapter files round-trip and refuse a different base model, and a diffusers version outside the tested range is
reported."""
import warnings
import pytest
import torch
import torch.nn.functional as F
from adadiff_nb.integrations.diffusers import (ExitHeadsMismatchError, check_diffusers_version, disable_early_exit,
                                  early_exit_model, enable_early_exit, exit_stats, load_exit_heads, reset_exit_stats,
                                  save_exit_heads, set_exit_threshold, tiny_dit_pipeline, tiny_pixart_pipeline)

torch.set_num_threads(1)
PX = dict(num_inference_steps=2, height=8, width=8, use_resolution_binning=False, max_sequence_length=8,
          clean_caption=False, output_type='pt')


@pytest.fixture(scope='module')
def dit():
    return tiny_dit_pipeline(num_layers=4)


@pytest.fixture(scope='module')
def pixart():
    return tiny_pixart_pipeline(num_layers=3)


def dit_images(pipe, **kw):
    img = pipe(class_labels=[1, 5, 9], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type='pt', **kw).images
    return torch.as_tensor(img)                                   # older DiTPipelines give numpy for 'pt'


def block_calls(tr, fn):
    "Rows each block ran on while `fn()` ran (forward hooks)."
    calls = {i: [] for i in range(len(tr.transformer_blocks))}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls[i].append(a[0].shape[0]))
             for i, b in enumerate(tr.transformer_blocks)]
    try: fn()
    finally:
        for h in hooks: h.remove()
    return calls


def test_dit_threshold_0_and_1_and_disable(dit):
    plain = dit_images(dit)
    cls, fwd = type(dit), dit.transformer.forward
    enable_early_exit(dit, threshold=0.)
    assert torch.equal(dit_images(dit), plain)
    assert exit_stats(dit)['layer_ratio'] == 1.0
    set_exit_threshold(dit, 1.)
    calls = block_calls(dit.transformer, lambda: dit_images(dit))
    assert all(v == [] for v in calls.values())
    st = exit_stats(dit)
    assert st['layer_ratio'] == 0.0 and st['exit_layers'].shape == (3, 6) and (st['exit_layers'] == 0).all()
    disable_early_exit(dit)
    assert type(dit) is cls and 'forward' not in dit.transformer.__dict__ and dit.transformer.forward == fwd
    assert torch.equal(dit_images(dit), plain)


def test_exited_rows_skip_blocks_and_match_heads(dit):
    "Static exit at 2 of 4: blocks 0-1 run every row, 2-3 none; the output is head 2 on blocks run by hand."
    tr = dit.transformer
    enable_early_exit(tr, exit_layer=2)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([900., 600., 300., 10.]), torch.tensor([0, 7, 1000, 3])
    calls = block_calls(tr, lambda: tr(x, timestep=t, class_labels=y))
    assert calls == {0: [4], 1: [4], 2: [], 3: []}
    with torch.no_grad():
        out = tr(x, timestep=t, class_labels=y, return_dict=False)[0]
        h = tr.pos_embed(x)
        for blk in tr.transformer_blocks[:2]: h = blk(h, timestep=t, class_labels=y)
        head = early_exit_model(tr).exit_heads[2]
        cond = tr.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
        shift, scale = head.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        z = head.proj_out_2(F.layer_norm(h, (h.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        ref = torch.einsum('nhwpqc->nchpwq', z.reshape(4, 4, 4, 2, 2, 8)).reshape(4, 8, 8, 8)
    torch.testing.assert_close(out, ref)
    assert exit_stats(tr)['seconds'] is None and exit_stats(tr)['steps'] == 2
    reset_exit_stats(tr)
    assert exit_stats(tr)['steps'] == 0
    disable_early_exit(tr)


def test_guidance_policies(dit):
    "Per-row thresholds: under 'joint' row i and i + B/2 leave together; 'independent' lets them differ."
    tr = dit.transformer
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    xx, t, y = torch.cat([x, x]), torch.full((6,), 500.), torch.tensor([1, 2, 3, 1000, 1000, 1000])
    tau = torch.tensor([1., 0., 1., 0., 1., 0.])                  # the pair members disagree
    for policy, same in (('joint', True), ('independent', False)):
        enable_early_exit(tr, threshold=tau, policy=policy)
        with torch.no_grad(): tr(xx, timestep=t, class_labels=y)
        e = exit_stats(tr)['exit_layers'][0]
        assert torch.equal(e[:3], e[3:]) == same, (policy, e)
        disable_early_exit(tr)
    enable_early_exit(tr, threshold=tau)                          # not a guidance batch: no pairing
    with torch.no_grad(): tr(torch.randn(6, 4, 8, 8), timestep=t, class_labels=y)
    assert exit_stats(tr)['exit_layers'][0].tolist() == [0, 4, 0, 4, 0, 4]
    disable_early_exit(tr)


def test_pixart_prompt(pixart):
    run = lambda: pixart(['a red cat', 'a small dog'], generator=torch.Generator().manual_seed(0), **PX).images
    plain = run()
    enable_early_exit(pixart, threshold=0.)
    assert torch.equal(run(), plain)
    set_exit_threshold(pixart, 1.)
    calls = block_calls(pixart.transformer, run)
    assert all(v == [] for v in calls.values()) and exit_stats(pixart)['guidance']
    set_exit_threshold(pixart, exit_layer=1)
    calls = block_calls(pixart.transformer, run)
    assert calls[0] == [4, 4] and calls[1] == calls[2] == []
    disable_early_exit(pixart)
    assert torch.equal(run(), plain)


def test_adapter_file_round_trip_and_mismatch(dit, pixart, tmp_path):
    enable_early_exit(dit, threshold=0.4)
    with torch.no_grad():
        for p in early_exit_model(dit).parameters(): p.add_(0.01 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in early_exit_model(dit).state_dict().items()}
    save_exit_heads(dit, tmp_path / 'h', command='adadiff-train ...', layer_ratio=0.5)
    disable_early_exit(dit)
    assert (tmp_path / 'h' / 'README.md').read_text().count('| layer ratio | 0.5 |') == 1
    load_exit_heads(dit, tmp_path / 'h', threshold=0.4)
    sd2 = early_exit_model(dit).state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not any(k.startswith('backbone') for k in sd2)         # the transformer is not in the file
    disable_early_exit(dit)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        load_exit_heads(tiny_dit_pipeline(num_layers=4, head_dim=4), tmp_path / 'h')
    with pytest.raises(ExitHeadsMismatchError, match='PixArtTransformer2DModel'):
        load_exit_heads(pixart, tmp_path / 'h')


def test_version_and_bad_input(dit, monkeypatch):
    import diffusers
    monkeypatch.setattr(diffusers, '__version__', '0.99.0')
    with pytest.warns(UserWarning, match=r'diffusers 0.99.0 is outside the range .*>=0.35,<0.43'):
        enable_early_exit(dit)
    disable_early_exit(dit)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert check_diffusers_version()
    with pytest.raises(ValueError, match="choose one of"):
        enable_early_exit(dit, policy='both')
    with pytest.raises(ValueError, match=r'exit_layer must be an integer in \[0, 4\]'):
        enable_early_exit(dit, exit_layer=5)
    with pytest.raises(ValueError, match='is outside'):
        enable_early_exit(dit, threshold=1.5)
    with pytest.raises(TypeError, match='early exit supports the diffusers transformers'):
        enable_early_exit(torch.nn.Linear(2, 2))
    assert 'forward' not in dit.transformer.__dict__              # nothing was left attached
