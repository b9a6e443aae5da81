"""The diffusers integration on `diffusers.hooks` (issue 20), on tiny random pipelines built from configs (offline,
CPU): `enable_early_exit` registers one `ModelHook` and leaves the pipeline class alone, `disable_early_exit` gives
back exactly the plain transformer (forward, registry, images), model CPU offload composes in either order (run with
device='cpu': accelerate's hooks without an accelerator), and what cannot compose is refused in one line: diffusers'
caches (FirstBlockCache; DiT and PixArt have no `enable_cache` in diffusers 0.42), sequential offload, and hooks
already on the transformer itself."""
import pytest
import torch
from accelerate import cpu_offload
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, apply_first_block_cache

from adadiff_nb.integrations.diffusers import (HOOK_NAME, disable_early_exit, early_exit_model, enable_early_exit,
                                               exit_stats, set_exit_threshold, tiny_dit_pipeline, tiny_pixart_pipeline)

from pipeline_helpers import count_offload_calls, images, one_line   # tests/pipeline_helpers.py

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


def plain_state(tr) -> tuple:
    "The hook state of a transformer: its own forward (if any), its registry (if any), accelerate's hook (if any)."
    return tuple(tr.__dict__.get(k) for k in ('forward', '_diffusers_hook', '_hf_hook'))




def test_enable_registers_a_hook_and_disable_restores_exactly():
    pipe = tiny_dit_pipeline(num_layers=3)
    tr, cls, fwd = pipe.transformer, type(pipe), pipe.transformer.forward
    plain, before = images(pipe), plain_state(pipe.transformer)
    enable_early_exit(pipe, exit_layer=1)
    hook = tr._diffusers_hook.get_hook(HOOK_NAME)
    assert isinstance(hook, ModelHook) and type(pipe) is cls and tr._diffusers_hook._hook_order == [HOOK_NAME]
    exited = images(pipe)
    assert not torch.equal(exited, plain) and exit_stats(pipe)['steps'] == 2
    images(pipe, labels=(1, 2, 3))
    assert exit_stats(pipe)['rows'] == 6                          # reset per call: the last call's 3 x 2 rows only
    disable_early_exit(pipe)
    assert type(pipe) is cls and plain_state(tr) == before == (None, None, None) and tr.forward == fwd
    assert torch.equal(images(pipe), plain)
    with pytest.raises(ValueError, match='call enable_early_exit'):
        exit_stats(pipe)


def test_a_registry_that_was_there_stays():
    "Hooks registered after early exit wrap it and stay when it goes; a registry that existed before is kept."
    pipe = tiny_dit_pipeline(num_layers=3)
    tr = pipe.transformer
    plain = images(pipe)
    seen = []
    class Spy(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(args[0].shape[0] if args else kwargs['hidden_states'].shape[0])
            return args, kwargs
    enable_early_exit(pipe, threshold=0.)
    HookRegistry.check_if_exists_or_initialize(tr).register_hook(Spy(), 'spy')
    assert torch.equal(images(pipe), plain) and seen == [4, 4] and exit_stats(pipe)['steps'] == 2
    disable_early_exit(pipe)
    assert tr._diffusers_hook._hook_order == ['spy'] and torch.equal(images(pipe), plain) and len(seen) == 4
    with pytest.raises(RuntimeError, match=r"already has the diffusers hooks \['spy'\]") as e:
        enable_early_exit(pipe)                                   # its new_forward would replace the spy
    assert 'register them again' in one_line(e) and tr._diffusers_hook._hook_order == ['spy']


@pytest.mark.parametrize('offload_first', [True, False])
def test_model_cpu_offload_composes(offload_first):
    "Either order: offload's hook stays outermost and runs every forward; threshold 0 gives the plain images."
    pipe = tiny_dit_pipeline(num_layers=3)
    tr = pipe.transformer
    plain = images(pipe)
    if offload_first: pipe.enable_model_cpu_offload(device='cpu')
    enable_early_exit(pipe, threshold=0.)
    if not offload_first: pipe.enable_model_cpu_offload(device='cpu')
    calls = count_offload_calls(tr)
    assert torch.equal(images(pipe), plain) and len(calls) == 2
    calls = count_offload_calls(tr)                               # diffusers re-applied the offload after the call
    set_exit_threshold(pipe, exit_layer=1)
    exited = images(pipe)
    assert len(calls) == 2 and exit_stats(pipe)['layer_ratio'] == pytest.approx(1 / 3)
    assert tr._diffusers_hook.get_hook(HOOK_NAME) is not None     # still under the re-applied offload hook
    disable_early_exit(pipe)
    assert type(tr._hf_hook).__name__ == 'CpuOffload' and tr._old_forward == type(tr).forward.__get__(tr)
    assert not hasattr(tr, '_diffusers_hook') and torch.equal(images(pipe), plain)
    enable_early_exit(pipe, exit_layer=1)
    assert torch.equal(images(pipe), exited)


def test_offload_with_pixart():
    pipe = tiny_pixart_pipeline(num_layers=2)
    kw = dict(num_inference_steps=2, height=8, width=8, use_resolution_binning=False, max_sequence_length=8,
              clean_caption=False, output_type='pt')
    def run(): return pipe('a red cat', generator=torch.Generator().manual_seed(0), **kw).images
    plain = run()
    enable_early_exit(pipe, threshold=0.)
    pipe.enable_model_cpu_offload(device='cpu')
    assert torch.equal(run(), plain) and exit_stats(pipe)['guidance']
    disable_early_exit(pipe)
    assert torch.equal(run(), plain)


def test_a_failure_under_offload_restores():
    pipe = tiny_dit_pipeline(num_layers=3)
    tr = pipe.transformer
    pipe.enable_model_cpu_offload(device='cpu')
    enable_early_exit(pipe, exit_layer=1)
    exited, before = images(pipe), plain_state(tr) + (tr._old_forward, tr._diffusers_hook.get_hook(HOOK_NAME))
    real = HookRegistry.register_hook
    def boom(self, hook, name):
        real(self, hook, name)
        raise RuntimeError('registration failed')
    HookRegistry.register_hook = boom
    try:
        with pytest.raises(RuntimeError, match='registration failed'):
            enable_early_exit(pipe, exit_layer=2)
    finally:
        HookRegistry.register_hook = real
    assert plain_state(tr) + (tr._old_forward, tr._diffusers_hook.get_hook(HOOK_NAME)) == before
    assert torch.equal(images(pipe), exited) and exit_stats(pipe)['exit_layer'] == 1


def test_sequential_offload_refused_in_either_order():
    pipe = tiny_dit_pipeline(num_layers=3)
    cpu_offload(pipe.transformer, execution_device='cpu')        # what enable_sequential_cpu_offload attaches
    with pytest.raises(RuntimeError, match='use pipe.enable_model_cpu_offload') as e:
        enable_early_exit(pipe)
    assert "accelerate's AlignDevicesHook" in one_line(e) and not hasattr(pipe.transformer, '_diffusers_hook')
    pipe = tiny_dit_pipeline(num_layers=3)
    enable_early_exit(pipe)
    cpu_offload(pipe.transformer, execution_device='cpu')
    with pytest.raises(RuntimeError, match='sequential or disk offload'):
        images(pipe)


def test_diffusers_caches_refused_in_either_order():
    pipe = tiny_dit_pipeline(num_layers=3)
    tr = pipe.transformer
    assert not hasattr(tr, 'enable_cache')                        # no CacheMixin on DiT: the generic cache it is
    plain = images(pipe)
    enable_early_exit(pipe, exit_layer=1)
    ee = early_exit_model(pipe)
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=0.2))
    with pytest.raises(RuntimeError, match="does not compose with diffusers' caches") as e:
        images(pipe)
    assert 'transformer_blocks.0:fbc_leader_block_hook' in one_line(e) and early_exit_model(pipe) is ee
    disable_early_exit(pipe)
    with pytest.raises(RuntimeError, match='remove the cache first'):
        enable_early_exit(pipe)
    assert not hasattr(tr, '_diffusers_hook')
    for block in tr.transformer_blocks:
        reg = block._diffusers_hook
        for name in list(reg.hooks): reg.remove_hook(name)
    enable_early_exit(pipe, threshold=0.)                         # the cache gone: early exit works again
    assert torch.equal(images(pipe), plain)
    disable_early_exit(pipe)
