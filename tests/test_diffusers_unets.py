"""Early exit on diffusers' UNets (`UNet2DModel` in `DDPMPipeline`, `UNet2DConditionModel` in Stable Diffusion and
SDXL) through their stock pipelines, on tiny random pipelines built from configs (offline; SD / SDXL prompts passed as
embeddings): threshold=0 gives the plain pipeline's output to the bit, threshold=1 runs only the outermost level
(forward hooks on the down / up / mid blocks' modules), a static exit runs exactly levels 0..d, disable restores the
pipeline exactly, exit_stats counts the FLOPs of U-shaped exits, adapter files round-trip and are refused on another
base, and what early exit cannot honour is refused in one line."""
import pytest
import torch
from adadiff_nb.evaluation.cost import count_flops, exit_flops_table
from adadiff_nb.integrations.diffusers import (ExitHeadsMismatchError, disable_early_exit, early_exit_model,
                                               enable_early_exit, exit_stats, load_exit_heads, save_exit_heads,
                                               set_exit_threshold)
from adadiff_nb.integrations.adapters import adapter_forward
from adadiff_nb.integrations.unet_adapters import (DDPM_CIFAR10_CONFIG, UNet2DAdapter, load_ddpm_pipeline,
                                                   tiny_ddpm_pipeline, tiny_sd_pipeline, tiny_unet_call_kwargs)
from pipeline_helpers import unet_families   # tests/pipeline_helpers.py: registers the UNet families for this module

torch.set_num_threads(1)
BUILDERS = dict(ddpm=tiny_ddpm_pipeline, sd=tiny_sd_pipeline, sdxl=lambda: tiny_sd_pipeline(xl=True))
FAMILIES = list(BUILDERS)




@pytest.fixture(scope='module')
def pipes(unet_families):
    return {f: b() for f, b in BUILDERS.items()}


def run(pipe, seed: int = 0):
    return torch.as_tensor(pipe(**tiny_unet_call_kwargs(pipe, seed=seed)).images)


def level_modules(unet) -> dict:
    "The modules of each part of the U: down level l's ResNets / attentions, its downsampler, up level l, the mid."
    n, mods = len(unet.down_blocks), {}
    for l, blk in enumerate(unet.down_blocks):
        mods[f'down{l}'] = [*blk.resnets, *(getattr(blk, 'attentions', None) or [])]
        if blk.downsamplers is not None: mods[f'downsample{l}'] = list(blk.downsamplers)
        mods[f'up{l}'] = [unet.up_blocks[n - 1 - l]]
    mods['mid'] = [unet.mid_block]
    return mods


def parts_run(unet, fn):
    "The parts of the U (`level_modules`) that ran while `fn()` ran, and fn's result."
    ran, hooks = set(), []
    for name, ms in level_modules(unet).items():
        hooks += [m.register_forward_hook(lambda *a, name=name: ran.add(name)) for m in ms]
    try: res = fn()
    finally:
        for h in hooks: h.remove()
    return ran, res


@pytest.mark.parametrize('family', FAMILIES)
def test_threshold_0_identical_threshold_1_outer_level_disable_restores(pipes, family):
    pipe = pipes[family]
    unet, plain = pipe.unet, run(pipe)
    fwd, before = unet.forward, dict(unet.__dict__)
    enable_early_exit(pipe, threshold=0.)
    ran, out = parts_run(unet, lambda: run(pipe))
    assert torch.equal(out, plain)
    assert ran == set(level_modules(unet))                                       # the full U ran
    st = exit_stats(pipe)
    assert st['layer_ratio'] == 1.0 and st['flop_ratio'] >= 1.0 and st['steps'] == 2
    set_exit_threshold(pipe, 1.)
    ran, out = parts_run(unet, lambda: run(pipe))
    assert ran == {'down0', 'up0'}, ran                                          # only the outermost level
    assert not torch.equal(out, plain)
    st = exit_stats(pipe)
    assert st['layer_ratio'] == 0.0 and (st['exit_layers'] == 0).all() and 0.3 < st['flop_ratio'] < 0.8
    disable_early_exit(pipe)
    assert unet.forward == fwd and unet.__dict__.keys() == before.keys()
    assert all(unet.__dict__[k] is v for k, v in before.items())
    assert not hasattr(unet, '_diffusers_hook') and torch.equal(run(pipe), plain)


@pytest.mark.parametrize('family', ['ddpm', 'sdxl'])
def test_static_exit_runs_levels_0_to_d_and_flops_add_up(pipes, family):
    pipe = pipes[family]
    enable_early_exit(pipe, exit_layer=1)
    try:
        ran, _ = parts_run(pipe.unet, lambda: run(pipe))
        assert ran == {'down0', 'downsample0', 'down1', 'up1', 'up0'}, ran
        st = exit_stats(pipe)
        ee = early_exit_model(pipe)
        costs = ee.flop_costs()
        rows = st['rows'] * st['steps']
        assert st['gflops'] * 1e9 == pytest.approx(float(exit_flops_table(costs)[1]) * rows)
        bb, (x, t, y) = ee.backbone, ee.backbone._probe                      # the table is what a forward counts
        with torch.no_grad():
            counted = count_flops(lambda: ee(x, t, y, exit_layers=torch.ones(len(x), dtype=torch.long)))['total']
        assert counted == int(exit_flops_table(costs)[1]) * len(x)
    finally:
        disable_early_exit(pipe)


def test_adapter_files_round_trip_and_refused_on_another_base(pipes, tmp_path):
    pipe = pipes['sd']
    enable_early_exit(pipe, threshold=0.5)
    with torch.no_grad():
        for p in early_exit_model(pipe).parameters(): p.add_(torch.randn_like(p) * .01)
    sd = {k: v.clone() for k, v in early_exit_model(pipe).state_dict().items()}
    assert sd and all(k.startswith('uem.') or '.adapter.' in k for k in sd)     # adapters and UEMs only
    out = run(pipe)
    save_exit_heads(pipe, tmp_path / 'heads')
    disable_early_exit(pipe)
    load_exit_heads(pipe, tmp_path / 'heads', threshold=0.5)
    sd2 = early_exit_model(pipe).state_dict()
    assert sorted(sd2) == sorted(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(run(pipe), out)
    disable_early_exit(pipe)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        load_exit_heads(pipes['sdxl'], tmp_path / 'heads')
    with pytest.raises(ExitHeadsMismatchError, match='were trained on other weights'):
        load_exit_heads(tiny_sd_pipeline(seed=1), tmp_path / 'heads')
    assert not hasattr(pipes['sdxl'].unet, '_diffusers_hook')


@pytest.mark.parametrize('kw, match', [
    (dict(cross_attention_kwargs=dict(scale=0.5)), 'pipe.fuse_lora()'),
    (dict(timestep_cond=torch.zeros(2, 4)), 'timestep_cond'),
    (dict(down_block_additional_residuals=[torch.zeros(1)], mid_block_additional_residual=torch.zeros(1)),
     'ControlNet'),
    (dict(down_intrablock_additional_residuals=[torch.zeros(1)]), 'T2I-Adapter')])
def test_refused_in_one_line(pipes, kw, match):
    pipe = pipes['sd']
    enable_early_exit(pipe)
    try:
        x, enc = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
        with pytest.raises(ValueError, match=match) as e:
            pipe.unet(x, torch.tensor(10), encoder_hidden_states=enc, **kw)
        assert '\n' not in str(e.value) and 'disable_early_exit(pipe)' in str(e.value)
    finally:
        disable_early_exit(pipe)


def test_ddpm_cifar10_config_exact_and_strict_local_folder(unet_families, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_CONFIG).eval()                      # the official config, random weights
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 35.7
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(adapter_forward(UNet2DAdapter(unet), x, t), unet(x, t).sample)
    unet.save_pretrained(tmp_path / 'unet')
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / 'scheduler')
    pipe = load_ddpm_pipeline(tmp_path)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    kw = lambda: dict(batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type='np')
    plain = pipe(**kw()).images
    enable_early_exit(pipe, threshold=0.)
    assert (pipe(**kw()).images == plain).all()                            # the DDPM CIFAR-10 UNet, to the bit
    set_exit_threshold(pipe, 1.)
    ran, _ = parts_run(pipe.unet, lambda: pipe(**kw()))
    assert ran == {'down0', 'up0'} and exit_stats(pipe)['flop_ratio'] < 0.6     # its outermost level only
    disable_early_exit(pipe)
    (tmp_path / 'unet' / 'diffusion_pytorch_model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='has no diffusion_pytorch_model'):
        load_ddpm_pipeline(tmp_path)


def test_model_cpu_offload_composes_and_rows_exit_independently(pipes):
    pipe = pipes['sd']
    plain = run(pipe)
    enable_early_exit(pipe, threshold=0., policy='independent')
    pipe.enable_model_cpu_offload(device='cpu')
    try:
        assert torch.equal(run(pipe), plain) and torch.equal(run(pipe), plain)   # after diffusers re-applied offload
        set_exit_threshold(pipe, 0.5)
        run(pipe)
        st = exit_stats(pipe)
        assert not st['guidance'] and st['exit_layers'].shape == (2, 4)          # 2 steps, 2 x 2 guidance rows
    finally:
        disable_early_exit(pipe)
        assert type(pipe.unet._hf_hook).__name__ == 'CpuOffload'
        pipe.remove_all_hooks()
    assert torch.equal(run(pipe), plain)
