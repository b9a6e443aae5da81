"""`enable_early_exit` composed with `torch.compile`, classifier-free guidance and model CPU offload (issue 23 item 4),
on the tiny random pipelines of every family it supports (offline, CPU).

torch.compile runs with an eager backend that counts the graphs dynamo hands it (what backend='eager' does, plus the
count), so the tests check that dynamo really traced the hooked forward and are fast on a CPU: a compile wrapper
(`pipe.transformer = torch.compile(...)`) or an in-place `model.compile()`, before or after enabling, gives bit for bit
what the eager pipeline gives at threshold 0, at a threshold where rows exit and after disabling; `fullgraph=True` is
refused in one line, made before enabling (when enabling) or after (at trace time, `FullgraphExitError`, before any
graph). `early_exit_model(pipe).compile_exits()` on DiT and PixArt: the same output as eager (bit for bit with an eager
backend, to float rounding with inductor). Guidance batches: threshold 0 equals the plain guided call, and per-row
thresholds where the two rows of a sample disagree show 'joint' pairing them and 'independent' not (Wan, and Flux's
true CFG, run the two halves as separate forwards: their rows always exit on their own, and an explicit
policy='joint' there is warned about once). Model CPU offload on Flux, SD3, Sana and Wan in either order: threshold 0
equals plain, accelerate's hook stays outermost, disabling restores."""
import shutil, warnings
import pytest
import torch
import torch._dynamo
from adadiff_nb.exits.runner import block_modules
from adadiff_nb.integrations.compose import FullgraphExitError
from adadiff_nb.integrations.diffusers import (HOOK_NAME, disable_early_exit, early_exit_model, enable_early_exit,
                                               exit_stats, reset_exit_stats, set_exit_threshold, tiny_dit_pipeline,
                                               tiny_pixart_pipeline)
from adadiff_nb.integrations.transformer_adapters import (tiny_call_kwargs, tiny_flux_pipeline, tiny_sana_pipeline,
                                                          tiny_sd3_pipeline, tiny_wan_pipeline)
from adadiff_nb.integrations.unet_adapters import tiny_ddpm_pipeline, tiny_sd_pipeline, tiny_unet_call_kwargs

from pipeline_helpers import count_offload_calls, one_line, unet_families   # tests/pipeline_helpers.py; the fixture
#   registers the UNet families for this module

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
PX = dict(num_inference_steps=2, height=8, width=8, use_resolution_binning=False, max_sequence_length=8,
          clean_caption=False, output_type='pt')
BUILDERS = dict(dit=lambda: tiny_dit_pipeline(num_layers=3), pixart=lambda: tiny_pixart_pipeline(num_layers=2),
                flux=tiny_flux_pipeline, sd3=tiny_sd3_pipeline, sana=tiny_sana_pipeline, wan=tiny_wan_pipeline,
                ddpm=tiny_ddpm_pipeline, sd=tiny_sd_pipeline, sdxl=lambda: tiny_sd_pipeline(xl=True))




@pytest.fixture(autouse=True)
def fresh_dynamo():
    "Each test compiles from scratch (no recompile limit reached through an earlier test's frames)."
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(graphs: list):
    "An eager torch.compile backend (what backend='eager' runs) that records each graph dynamo hands it."
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def model_of(pipe):
    return pipe.transformer if hasattr(pipe, 'transformer') else pipe.unet


def run(pipe, family: str, true_cfg: bool = False):
    "Two steps of a tiny pipeline from fixed generators (Flux with `true_cfg`: negative embeddings, true_cfg_scale 2)."
    if family == 'dit':
        return pipe(class_labels=[1, 5], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type='pt').images
    if family == 'pixart':
        return pipe(['a red cat', 'a dog'], generator=torch.Generator().manual_seed(0), **PX).images
    if family in ('ddpm', 'sd', 'sdxl'): return torch.as_tensor(pipe(**tiny_unet_call_kwargs(pipe, seed=0)).images)
    kw = tiny_call_kwargs(pipe, seed=0)
    if true_cfg:
        g = torch.Generator().manual_seed(7)
        kw.update(negative_prompt_embeds=torch.randn(kw['prompt_embeds'].shape, generator=g), true_cfg_scale=2.,
                  negative_pooled_prompt_embeds=torch.randn(kw['pooled_prompt_embeds'].shape, generator=g))
    out = pipe(**kw)
    return out.frames if hasattr(out, 'frames') else out.images


def eager_and_compiled(pipe, family, compile_on, compile_off) -> tuple:
    "(compiled output, its exit layers, eager output, its exit layers) of one call under the current exit rule."
    compile_on()
    out = run(pipe, family)
    ex = exit_stats(pipe)['exit_layers']
    compile_off()
    ref = run(pipe, family)
    return out, ex, ref, exit_stats(pipe)['exit_layers']


# --- torch.compile --------------------------------------------------------------------------------------------------

def test_compile_wrapper_before_enabling_dit():
    "pipe.transformer = torch.compile(...), one compiled plain call, then enable: the cached frame does not bypass it."
    pipe = tiny_dit_pipeline(num_layers=3)
    tr, graphs = pipe.transformer, []
    plain = run(pipe, 'dit')
    wrapped = torch.compile(tr, backend=counting_backend(graphs))
    pipe.transformer = wrapped
    assert torch.equal(run(pipe, 'dit'), plain) and graphs
    torch.manual_seed(0)                                          # the new UEMs' random init
    enable_early_exit(pipe, threshold=0.)
    assert tr._diffusers_hook.get_hook(HOOK_NAME) is not None and pipe.transformer is wrapped
    assert torch.equal(run(pipe, 'dit'), plain) and exit_stats(pipe)['layer_ratio'] == 1.0
    n = len(graphs)
    set_exit_threshold(pipe, 0.5)
    def on(): pipe.transformer = wrapped
    def off(): pipe.transformer = tr
    out, ex, ref, ex_ref = eager_and_compiled(pipe, 'dit', on, off)
    assert len(graphs) > n                                       # dynamo traced the exits (with graph breaks)
    assert 0 < ex.float().mean() < 3 and torch.equal(ex, ex_ref) and torch.equal(out, ref)
    pipe.transformer = wrapped
    disable_early_exit(pipe)                                     # found through the wrapper
    assert 'forward' not in tr.__dict__ and torch.equal(run(pipe, 'dit'), plain)


def test_compile_in_place_after_enabling_flux():
    "enable, then model.compile(): threshold 0 = plain, a static exit and a threshold = eager; disabling restores."
    family = 'flux'
    pipe = BUILDERS[family]()
    tr, graphs = model_of(pipe), []
    plain = run(pipe, family)
    torch.manual_seed(0)
    enable_early_exit(pipe, threshold=0.)
    tr.compile(backend=counting_backend(graphs))
    impl = tr._compiled_call_impl
    assert torch.equal(run(pipe, family), plain) and graphs
    def on(): tr._compiled_call_impl = impl
    def off(): tr._compiled_call_impl = None
    for rule in (dict(exit_layer=1), dict(threshold=0.5)):
        set_exit_threshold(pipe, **rule)
        out, ex, ref, ex_ref = eager_and_compiled(pipe, family, on, off)
        assert torch.equal(ex, ex_ref) and torch.equal(out, ref) and not torch.equal(out, plain), rule
    on()
    disable_early_exit(pipe)
    assert torch.equal(run(pipe, family), plain) and tr._compiled_call_impl is impl


def test_compile_in_place_before_enabling_sd():
    "An SD UNet compiled in place and run before enabling (a guidance batch): the same as eager after enabling."
    pipe = tiny_sd_pipeline()
    tr, graphs = pipe.unet, []
    plain = run(pipe, 'sd')
    tr.compile(backend=counting_backend(graphs))
    impl = tr._compiled_call_impl
    assert torch.equal(run(pipe, 'sd'), plain)
    torch.manual_seed(0)
    enable_early_exit(pipe, exit_layer=1)
    def on(): tr._compiled_call_impl = impl
    def off(): tr._compiled_call_impl = None
    out, ex, ref, ex_ref = eager_and_compiled(pipe, 'sd', on, off)
    assert (ex == 1).all() and torch.equal(ex, ex_ref) and torch.equal(out, ref) and not torch.equal(out, plain)
    assert exit_stats(pipe)['guidance']
    on()
    disable_early_exit(pipe)
    assert torch.equal(run(pipe, 'sd'), plain)


@pytest.mark.parametrize('family', list(BUILDERS))
@pytest.mark.parametrize('how', ['wrapper', 'in place'])
def test_fullgraph_refused_before_anything_changes(family, how):
    pipe = BUILDERS[family]()
    tr = model_of(pipe)
    attr = 'transformer' if hasattr(pipe, 'transformer') else 'unet'
    if how == 'wrapper': setattr(pipe, attr, torch.compile(tr, backend='eager', fullgraph=True))
    else: tr.compile(backend='eager', fullgraph=True)
    with pytest.raises(RuntimeError, match=r'fullgraph=True\) of') as e:
        enable_early_exit(pipe, threshold=0.)
    assert 'compile it without fullgraph=True' in one_line(e)
    assert '_diffusers_hook' not in tr.__dict__ and 'forward' not in tr.__dict__
    with pytest.raises(RuntimeError, match='fullgraph'):
        enable_early_exit(tr if how == 'in place' else getattr(pipe, attr))    # the bare model too


@pytest.mark.parametrize('family', ['dit', 'flux'])
@pytest.mark.parametrize('how', ['wrapper', 'in place'])
def test_fullgraph_compiled_after_enabling_refused_in_one_line(family, how):
    """A fullgraph compile made after enabling: our one-line error at trace time (no graph reached the backend, no
    forward recorded), naming both fixes; without fullgraph the same pipeline then runs and equals eager."""
    pipe = BUILDERS[family]()
    tr, graphs = model_of(pipe), []
    enable_early_exit(pipe, exit_layer=1)
    ref = run(pipe, family)
    if how == 'wrapper': pipe.transformer = torch.compile(tr, backend=counting_backend(graphs), fullgraph=True)
    else: tr.compile(backend=counting_backend(graphs), fullgraph=True)
    reset_exit_stats(pipe)
    with pytest.raises(FullgraphExitError, match=r'^early exit cannot run under a torch.compile\(fullgraph') as e:
        run(pipe, family)
    msg = one_line(e)
    assert 'compile it without fullgraph=True' in msg and 'early_exit_model(pipe).compile_exits()' in msg
    assert isinstance(e.value, RuntimeError) and graphs == [] and exit_stats(pipe)['steps'] == 0
    torch._dynamo.reset()
    if how == 'wrapper': pipe.transformer = torch.compile(tr, backend=counting_backend(graphs))
    else: tr.compile(backend=counting_backend(graphs))
    assert torch.equal(run(pipe, family), ref) and graphs and (exit_stats(pipe)['exit_layers'] == 1).all()


# --- compile_exits: the blocks compiled in place ---------------------------------------------------------------------

@pytest.mark.parametrize('family', ['dit', 'pixart'])
def test_compile_exits_on_dit_and_pixart(family):
    """early_exit_model(pipe).compile_exits() (the adapters' `block_modules`): threshold 0 = plain, a threshold where
    some rows exit = eager, bit for bit (an eager backend); uncompiling restores the blocks."""
    pipe = BUILDERS[family]()
    plain = run(pipe, family)
    torch.manual_seed(0)
    enable_early_exit(pipe, threshold=0.)
    ee, graphs = early_exit_model(pipe), []
    blocks = block_modules(ee.backbone)
    assert blocks == list(model_of(pipe).transformer_blocks)
    ee.compile_exits(backend=counting_backend(graphs))
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert torch.equal(run(pipe, family), plain) and graphs
    set_exit_threshold(pipe, 0.5)
    def on(): ee.compile_exits(backend=counting_backend(graphs))
    out, ex, ref, ex_ref = eager_and_compiled(pipe, family, on, ee.uncompile_exits)
    L = ee.num_layers
    assert (ex < L).any() and (ex == L).any() and torch.equal(ex, ex_ref) and torch.equal(out, ref)
    assert all(b._compiled_call_impl is None for b in blocks)


@pytest.mark.skipif(shutil.which('g++') is None and shutil.which('c++') is None,
                    reason="inductor on the CPU needs a C++ compiler (apt-get install g++); .ci/run installs it")
def test_compile_exits_inductor_dit():
    "One real inductor compile of a DiT pipeline's blocks: the same exits as eager, outputs to float rounding."
    pipe = tiny_dit_pipeline(num_layers=2)
    torch.manual_seed(0)
    enable_early_exit(pipe, threshold=0.5)
    ref = run(pipe, 'dit')
    ex_ref = exit_stats(pipe)['exit_layers']
    assert len(ex_ref.unique()) > 1                                # rows exit at different layers
    early_exit_model(pipe).compile_exits(buckets=(1, 2, 4))
    out = run(pipe, 'dit')
    assert torch.equal(exit_stats(pipe)['exit_layers'], ex_ref) and (out - ref).abs().max() < 1e-4
    early_exit_model(pipe).uncompile_exits()


# --- classifier-free guidance ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('family', ['dit', 'pixart', 'sd3', 'sana', 'sd', 'sdxl', 'wan', 'flux'])
def test_guidance_threshold_0_and_pairing(family):
    """Threshold 0 = the plain guided call. Per-row thresholds 1 / 0 that disagree within each sample's pair: 'joint'
    keeps a pair together (one forward holds both halves), 'independent' does not; Wan and Flux's true CFG run the
    halves as two forwards, so their rows exit on their own under either policy and `guidance` is False."""
    pipe = BUILDERS[family]()
    true_cfg = family == 'flux'
    plain = run(pipe, family, true_cfg)
    enable_early_exit(pipe, threshold=0.)
    assert torch.equal(run(pipe, family, true_cfg), plain)
    one_forward = family not in ('wan', 'flux')
    st = exit_stats(pipe)
    assert st['guidance'] == one_forward
    assert (st['steps'], st['rows']) == ((2, 4) if one_forward else (4, 2))    # 2 steps of 2 samples
    tau = torch.tensor([1., 0., 0., 1.] if one_forward else [1., 0.])
    for policy in ('joint', 'independent'):
        enable_early_exit(pipe, threshold=tau, policy=policy)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')                       # Wan / Flux under 'joint': the test below
            run(pipe, family, true_cfg)
        st = exit_stats(pipe)
        e = st['exit_layers']
        assert st['guidance'] == (one_forward and policy == 'joint')
        if not one_forward: assert (e[:, 0] == 0).all() and (e[:, 1] == st['num_layers']).all()
        elif policy == 'joint': assert torch.equal(e[:, :2], e[:, 2:]) and (e == st['num_layers']).all()
        else: assert torch.equal(e[:, 2:], e[:, [1, 0]]) and (e[:, 0] == 0).all() and (e[:, 1] > 0).all()
    disable_early_exit(pipe)
    assert torch.equal(run(pipe, family, true_cfg), plain)


def joint_warnings(pipe, family, **enable) -> list:
    "The split-guidance warnings of one call after enable_early_exit(pipe, **enable) (and of a second call)."
    enable_early_exit(pipe, **enable)
    out = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            run(pipe, family, true_cfg=family == 'flux')
        out.append([str(x.message) for x in w if "policy='joint' cannot pair" in str(x.message)])
    return out


@pytest.mark.parametrize('family', ['wan', 'flux'])
def test_explicit_joint_on_two_forward_guidance_warns_once(family):
    """Wan and Flux's true CFG run the halves as two forwards, so 'joint' cannot act: asking for it explicitly warns,
    once per enable_early_exit (the fix in the message); the default policy and 'independent' say nothing."""
    pipe = BUILDERS[family]()
    first, second = joint_warnings(pipe, family, threshold=0.5, policy='joint')
    assert len(first) == 1 and second == [] and "pass policy='independent'" in first[0]
    assert exit_stats(pipe)['policy'] == 'joint' and not exit_stats(pipe)['guidance']
    assert joint_warnings(pipe, family, threshold=0.5) == [[], []]
    assert joint_warnings(pipe, family, threshold=0.5, policy='independent') == [[], []]


def test_explicit_joint_where_it_acts_does_not_warn():
    "DiT batches both halves in one forward ('joint' pairs them); Flux without true CFG has no second forward."
    assert joint_warnings(BUILDERS['dit'](), 'dit', threshold=0.5, policy='joint') == [[], []]
    flux = BUILDERS['flux']()
    enable_early_exit(flux, threshold=0.5, policy='joint')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        run(flux, 'flux')
    assert not [x for x in w if 'cannot pair' in str(x.message)] and exit_stats(flux)['steps'] == 2


# --- model CPU offload ----------------------------------------------------------------------------------------------



@pytest.mark.parametrize('family', ['flux', 'sd3', 'sana', 'wan'])
@pytest.mark.parametrize('offload_first', [True, False])
def test_model_cpu_offload_composes(family, offload_first):
    pipe = BUILDERS[family]()
    tr = pipe.transformer
    plain = run(pipe, family)
    if offload_first: pipe.enable_model_cpu_offload(device='cpu')
    enable_early_exit(pipe, threshold=0.)
    if not offload_first: pipe.enable_model_cpu_offload(device='cpu')
    calls = count_offload_calls(tr)
    assert torch.equal(run(pipe, family), plain) and len(calls) == exit_stats(pipe)['steps'] > 0
    calls = count_offload_calls(tr)                               # diffusers re-applied the offload after the call
    set_exit_threshold(pipe, exit_layer=1)
    exited = run(pipe, family)
    st = exit_stats(pipe)
    assert len(calls) == st['steps'] and (st['exit_layers'] == 1).all() and not torch.equal(exited, plain)
    # outermost: the forward is accelerate's, and the forward it wraps is diffusers' hook registry's (early exit's)
    assert type(tr._hf_hook).__name__ == 'CpuOffload' and 'add_hook_to_module' in tr.forward.func.__qualname__
    assert 'HookRegistry' in tr._old_forward.func.__qualname__ and tr._diffusers_hook._hook_order == [HOOK_NAME]
    disable_early_exit(pipe)
    assert type(tr._hf_hook).__name__ == 'CpuOffload' and tr._old_forward == type(tr).forward.__get__(tr)
    assert tr.__dict__.get('_diffusers_hook') is None or tr._diffusers_hook.get_hook(HOOK_NAME) is None
    assert torch.equal(run(pipe, family), plain)
    pipe.remove_all_hooks()
