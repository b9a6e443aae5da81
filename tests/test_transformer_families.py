"""Early exit on diffusers' token transformers (Flux, SD3, Sana, Wan) through their stock pipelines, on tiny random
pipelines built from configs (offline, prompts passed as embeddings): threshold=0 gives the plain pipeline's output
to the bit, threshold=1 runs no block (forward hooks count block calls), a static exit runs exactly the blocks before
it and returns that exit's head on them, disable restores the pipeline exactly, adapter files round-trip and are
refused on another base, and what early exit cannot honour is refused in one line."""
from types import SimpleNamespace

import pytest
import torch
from adadiff_nb.integrations.adapters import make_adapter
from adadiff_nb.integrations.diffusers import (ExitHeadsMismatchError, disable_early_exit, early_exit_model,
                                               enable_early_exit, exit_stats, load_exit_heads, save_exit_heads,
                                               set_exit_threshold)
from adadiff_nb.integrations.transformer_adapters import (tiny_call_kwargs, tiny_flux_pipeline, tiny_sana_pipeline,
                                                          tiny_sd3_pipeline, tiny_wan_pipeline)

torch.set_num_threads(1)
BUILDERS = dict(flux=tiny_flux_pipeline, sd3=tiny_sd3_pipeline, sana=tiny_sana_pipeline, wan=tiny_wan_pipeline)
FAMILIES = list(BUILDERS)


@pytest.fixture(scope='module')
def pipes():
    return {f: b() for f, b in BUILDERS.items()}


def run(pipe, seed: int = 0):
    out = pipe(**tiny_call_kwargs(pipe, seed=seed))
    return out.frames if hasattr(out, 'frames') else out.images


def blocks_of(tr):
    return make_adapter(tr).block_modules()


def block_calls(tr, fn):
    "Rows each block ran on while `fn()` ran (forward hooks), and fn's result."
    blocks = blocks_of(tr)
    calls = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_hook(lambda m, a, kw, o, i=i: calls[i].append(1), with_kwargs=True)
             for i, b in enumerate(blocks)]
    try: res = fn()
    finally:
        for h in hooks: h.remove()
    return calls, res


@pytest.mark.parametrize('family', FAMILIES)
def test_threshold_0_identical_threshold_1_no_block_disable_restores(pipes, family):
    pipe = pipes[family]
    tr, plain = pipe.transformer, run(pipe)
    fwd, before = tr.forward, dict(tr.__dict__)
    enable_early_exit(pipe, threshold=0.)
    assert torch.equal(run(pipe), plain)
    st = exit_stats(pipe)
    assert st['layer_ratio'] == 1.0 and st['gflops'] >= st['gflops_full'] > 0          # + UEMs under 'joint' CFG
    assert st['steps'] == (4 if family == 'wan' else 2)               # Wan runs cond and uncond as two forwards
    set_exit_threshold(pipe, 1.)
    calls, out = block_calls(tr, lambda: run(pipe))
    assert all(v == [] for v in calls.values()), calls
    assert out.shape == plain.shape and not torch.equal(out, plain)
    st = exit_stats(pipe)
    assert st['layer_ratio'] == 0.0 and (st['exit_layers'] == 0).all() and 0 < st['gflops'] < st['gflops_full']
    disable_early_exit(pipe)
    assert 'forward' not in tr.__dict__ and tr.forward == fwd
    assert tr.__dict__.keys() == before.keys() and all(tr.__dict__[k] is v for k, v in before.items())
    assert torch.equal(run(pipe), plain)


@pytest.mark.parametrize('family', FAMILIES)
def test_static_exit_runs_the_blocks_before_it_and_its_head(pipes, family):
    "A static exit at k: blocks < k run every forward, the rest none; the output is head k on those blocks."
    pipe = pipes[family]
    tr, k = pipe.transformer, 2
    enable_early_exit(pipe, exit_layer=k)
    try:
        calls, _ = block_calls(tr, lambda: run(pipe))
        n = exit_stats(pipe)['steps']                                  # transformer forwards (Wan: 2 per step)
        assert all(len(v) == n for i, v in calls.items() if i < k) and all(v == [] for i, v in calls.items() if i >= k)
        ee = early_exit_model(pipe)
        bb, head = ee.backbone, ee.exit_heads[k]
        seen = {}
        def grab(m, args, kw, out): seen.update(args=args, kw=kw, out=out[0])
        h0 = tr.register_forward_hook(grab, with_kwargs=True)
        try: run(pipe)
        finally: h0.remove()
        kw = dict(seen['kw'])
        x, t = seen['args'][0] if seen['args'] else kw.pop('hidden_states'), kw.pop('timestep')
        kw.pop('return_dict', None)
        with torch.no_grad():
            y = bb.cond_from_kwargs(kw, t)
            tt = bb.model_timesteps(t.expand(x.shape[0]) if t.ndim == 0 else t)
            h, state = bb.embed(x, tt, y)
            for i in range(k): h = bb.run_block(i, h, state)
            ref = head(h, state)
        torch.testing.assert_close(seen['out'], ref)
        torch.testing.assert_close(seen['out'], bb.decode(h, state))     # new heads are copies of the output layer
        for i in range(k, bb.num_layers): h = bb.run_block(i, h, state)
        assert not torch.allclose(ref, bb.decode(h, state))           # not the full model's output
    finally:
        disable_early_exit(pipe)


@pytest.mark.parametrize('family', FAMILIES)
def test_adapter_files_round_trip_and_refuse_another_base(pipes, family, tmp_path):
    pipe = pipes[family]
    enable_early_exit(pipe, threshold=0.5, uem_params='shared')
    with torch.no_grad():
        for p in early_exit_model(pipe).exit_heads.parameters(): p.add_(0.01 * torch.randn_like(p))
    mine, sd = run(pipe), early_exit_model(pipe).state_dict()
    save_exit_heads(pipe, tmp_path / 'heads', data='tiny')
    disable_early_exit(pipe)
    twin = BUILDERS[family]()                                       # same seed: the same weights
    load_exit_heads(twin, tmp_path / 'heads', threshold=0.5)
    sd2 = early_exit_model(twin).state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(run(twin), mine)
    other = BUILDERS[family](seed=1)                                # same config, other weights
    with pytest.raises(ExitHeadsMismatchError, match='trained on other weights'):
        load_exit_heads(other, tmp_path / 'heads')
    deeper = BUILDERS[family](num_layers=4)                          # another config
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        load_exit_heads(deeper, tmp_path / 'heads')
    with pytest.raises(ValueError, match='not enabled'):           # a refused load changes nothing
        early_exit_model(deeper)


def test_flux_guidance_embeds_and_model_time(pipes):
    "FLUX.1-dev style (guidance embedded): identical at threshold 0; the UEMs see the model time 0..1000."
    pipe = tiny_flux_pipeline(guidance_embeds=True)
    plain = run(pipe)
    enable_early_exit(pipe, threshold=0.)
    assert torch.equal(run(pipe), plain)
    ts = exit_stats(pipe)['timesteps']
    assert ts[0] == pytest.approx(float(pipe.scheduler.timesteps[0]), rel=1e-5) and ts[0] > 100
    disable_early_exit(pipe)


def test_refusals(pipes):
    flux, sd3, wan = pipes['flux'], pipes['sd3'], pipes['wan']
    enable_early_exit(flux, threshold=0.)
    try:
        with pytest.raises(ValueError, match='does not apply joint_attention_kwargs'):
            flux(**tiny_call_kwargs(flux), joint_attention_kwargs=dict(scale=0.5))
    finally:
        disable_early_exit(flux)
    tr = sd3.transformer
    enable_early_exit(tr, threshold=0.)
    try:
        kw = dict(encoder_hidden_states=torch.randn(1, 6, 32), pooled_projections=torch.randn(1, 64))
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.])
        with pytest.raises(ValueError, match=r"does not take \['skip_layers'\]"):
            tr(x, timestep=t, skip_layers=[1], **kw)
        with pytest.raises(ValueError, match=r"does not take \['block_controlnet_hidden_states'\]"):
            tr(x, timestep=t, block_controlnet_hidden_states=[x], **kw)
    finally:
        disable_early_exit(tr)
    two = SimpleNamespace(transformer=wan.transformer, transformer_2=tiny_wan_pipeline(seed=1).transformer)
    with pytest.raises(ValueError, match='two transformers'):                 # Wan 2.2's two experts
        enable_early_exit(two)
    with pytest.raises(ValueError, match='not enabled'):
        early_exit_model(wan)
    other = type('CogVideoXTransformer3DModel', (torch.nn.Linear,), {})(2, 2)  # a family without an adapter
    with pytest.raises(TypeError, match=r"got a CogVideoXTransformer3DModel, which has no adapter"):
        enable_early_exit(other)
