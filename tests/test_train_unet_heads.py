"""`adadiff-train --diffusers-model DIR` on diffusers UNets (`adadiff_nb.training.diffusers_heads`), offline on tiny
random pipelines saved with `save_pretrained`: a `DDPMPipeline` (pixel space, the embedded CIFAR-10 slice at its 8x8
sample size) and a `StableDiffusionPipeline` with a tiny CLIP text encoder (latents of its VAE, captions encoded by
its own `encode_prompt`). A few steps through the real command: finite losses, the exit adapters moved away from the
UNet ResNets they start as, the UNet's weights untouched, the adapter directory loads onto the same pipeline (threshold
0 keeps its output exactly) and is refused on another UNet; bad input is refused before any training."""
import csv, json, math

import pytest
import torch
from safetensors.torch import load_file

from adadiff_nb.apps.train_cli import main
from adadiff_nb.integrations.diffusers import ExitHeadsMismatchError, disable_early_exit, enable_early_exit
from adadiff_nb.integrations.unet_adapters import (tiny_ddpm_pipeline, tiny_sd_pipeline, tiny_unet_call_kwargs)
from adadiff_nb.models.autoencoder import LatentAutoencoder, precompute_latents
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.integrations.diffusers import adapter_forward
from adadiff_nb.training.prompt_cache import (PromptSDXLAdapter, precompute_prompt_embeddings, sdxl_time_ids,
                                              tiny_sd_text_pipeline, tiny_sdxl_text_pipeline, unpack_sdxl_prompts)

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
RUN = ['--steps', '6', '--batch-size', '8', '--lr', '1e-3', '--warmup-steps', '0', '--ema-decay', '0.5',
       '--log-every', '2', '--device', 'cpu', '--progress', 'false']
COLOURS = ['red', 'green', 'blue']


@pytest.fixture(scope='module')
def ddpm(tmp_path_factory):
    d = tmp_path_factory.mktemp('ddpm')
    pipe = tiny_ddpm_pipeline()
    pipe.save_pretrained(d / 'pipe')
    return dict(dir=d, pipe=pipe, sd={k: v.clone() for k, v in pipe.unet.state_dict().items()})


@pytest.fixture(scope='module')
def sd(tmp_path_factory):
    "A tiny SD pipeline with its CLIP (saved), latents of 24 flat-colour images and a caption file (2 per image)."
    d = tmp_path_factory.mktemp('sd')
    pipe = tiny_sd_text_pipeline(d / 'clip')
    pipe.save_pretrained(d / 'pipe')
    flat_colour_data(d, pipe)
    return dict(dir=d, pipe=pipe)


@pytest.fixture(scope='module')
def sdxl(tmp_path_factory):
    "A tiny SDXL pipeline with its two CLIPs (saved), latents of 24 flat-colour images and the same captions."
    d = tmp_path_factory.mktemp('sdxl')
    pipe = tiny_sdxl_text_pipeline(d / 'clip')
    pipe.save_pretrained(d / 'pipe')
    flat_colour_data(d, pipe)
    return dict(dir=d, pipe=pipe, sd={k: v.clone() for k, v in pipe.unet.state_dict().items()})


def flat_colour_data(d, pipe):
    "Latents (pipe's VAE) of 24 noisy flat-colour 8x8 images in d/latents.safetensors, 2 captions each (captions.json)"
    g = torch.Generator().manual_seed(0)
    col = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1]])[torch.arange(24) % 3]
    img = (0.8 * col[:, :, None, None] + 0.1 * torch.randn(24, 3, 8, 8, generator=g)).clamp(-1, 1)
    precompute_latents(img, LatentAutoencoder(pipe.vae), d / 'latents.safetensors')
    caps = [[f'a {COLOURS[i % 3]} cat', f'the {COLOURS[i % 3]} dog'] for i in range(24)]
    (d / 'captions.json').write_text(json.dumps(caps))


def losses(out) -> list[float]:
    with open(out / 'logs' / 'train.csv') as f: return [float(r['loss']) for r in csv.DictReader(f)]


def adapters_moved(heads, unet, levels: int) -> bool:
    "True when every trained exit adapter differs from the UNet ResNet it started as a copy of."
    sd, own = load_file(heads / 'exit_heads.safetensors'), unet.state_dict()
    src = [f'down_blocks.{d + 1}.resnets.0.conv1.weight' for d in range(levels - 1)]
    src += ['mid_block.resnets.0.conv1.weight']
    return all(not torch.equal(sd[f'exit_heads.{d}.adapter.conv1.weight'], own[s]) for d, s in enumerate(src))


def same_output(pipe, heads) -> bool:
    "Threshold 0 with the trained heads gives exactly the plain pipeline's output."
    plain = pipe(**tiny_unet_call_kwargs(pipe)).images
    enable_early_exit(pipe, heads=heads, threshold=0.)
    try: ee = pipe(**tiny_unet_call_kwargs(pipe)).images
    finally: disable_early_exit(pipe)
    return bool((torch.as_tensor(ee) == torch.as_tensor(plain)).all())


def test_ddpm_heads_through_the_cli(ddpm, tmp_path):
    out = tmp_path / 'run'
    assert main(['--diffusers-model', str(ddpm['dir'] / 'pipe'), '--data', 'cifar10_slice', '--out', str(out),
                 *RUN]) == 0
    ls = losses(out)
    assert len(ls) == 3 and all(math.isfinite(v) for v in ls)
    heads, unet = out / 'exit_heads', ddpm['pipe'].unet
    assert all(torch.equal(v, ddpm['sd'][k]) for k, v in unet.state_dict().items())
    assert json.loads((heads / 'config.json').read_text())['base']['model_class'] == 'UNet2DModel'
    assert adapters_moved(heads, unet, 3)
    assert same_output(ddpm['pipe'], heads)       # also: the fingerprint of the UNet on disk is the trained one's
    with pytest.raises(ExitHeadsMismatchError, match='other weights'):
        enable_early_exit(tiny_ddpm_pipeline(seed=1), heads=heads)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        enable_early_exit(tiny_ddpm_pipeline(block_out_channels=(8, 16, 32)), heads=heads)


def test_sd_heads_through_the_cli(sd, tmp_path):
    out, d = tmp_path / 'run', sd['dir']
    argv = ['--diffusers-model', str(d / 'pipe'), '--data', str(d / 'latents.safetensors'), '--schedule', 'sd',
            '--text-features', str(d / 'captions.json'), '--p-uncond', '0.1', '--out', str(out), *RUN]
    assert main(argv) == 0
    assert all(math.isfinite(v) for v in losses(out))
    heads, pipe = out / 'exit_heads', sd['pipe']
    conf = json.loads((heads / 'config.json').read_text())
    assert (conf['base']['model_class'], conf['card']['p_uncond']) == ('UNet2DConditionModel', 0.1)
    assert (out / 'prompts.safetensors').is_file() and (out / 'prompts.empty.safetensors').is_file()
    assert adapters_moved(heads, pipe.unet, 3)
    assert same_output(pipe, heads)
    with pytest.raises(ExitHeadsMismatchError, match='other weights'):
        enable_early_exit(tiny_sd_pipeline(seed=1), heads=heads)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        enable_early_exit(tiny_sd_pipeline(xl=True), heads=heads)


def test_bad_unet_input_refused_before_training(sd, ddpm, tmp_path, capsys):
    d = sd['dir']
    base = ['--data', str(d / 'latents.safetensors'), '--text-features', str(d / 'captions.json'), *RUN]
    assert main(['--diffusers-model', str(d / 'pipe'), '--out', str(tmp_path / 'a'), *base]) == 2
    assert 'pass --schedule sd' in capsys.readouterr().err
    tiny_sd_pipeline(xl=True).save_pretrained(tmp_path / 'xl')            # an SDXL pipeline without text encoders
    assert main(['--diffusers-model', str(tmp_path / 'xl'), '--schedule', 'sd', '--out', str(tmp_path / 'b'),
                 *base]) == 2
    assert 'text encoder' in capsys.readouterr().err
    assert main(['--diffusers-model', str(ddpm['dir'] / 'pipe'), '--data', 'cifar10_slice', '--out',
                 str(tmp_path / 'c'), '--text-features', str(d / 'captions.json'), *RUN]) == 2
    assert 'text_features' in capsys.readouterr().err
    for run in 'abc': assert not (tmp_path / run / 'logs').exists()


def test_sdxl_prompt_cache_is_the_pipelines_encode_prompt(sdxl, tmp_path):
    pipe, caps = sdxl['pipe'], ['a red cat', 'the blue dog']
    path, empty = precompute_prompt_embeddings(pipe, [[caps[0]], [caps[1]]], tmp_path / 'p.safetensors')
    c, e = TextFeatureCache(path), TextFeatureCache(empty)
    assert (c.metadata['encoder']['pooled_dim'], c.context_shape, e.prompts(0)) == (32, (17, 33), [''])
    with torch.no_grad(): pe, ne, pp, npp = pipe.encode_prompt(caps, device='cpu', do_classifier_free_guidance=True)
    for i in range(2):
        emb, pooled = unpack_sdxl_prompts(c.get_batch([i]), 32)
        torch.testing.assert_close((emb, pooled), (pe[i:i + 1], pp[i:i + 1]), rtol=0, atol=1e-6)
    emb, pooled = unpack_sdxl_prompts(e.get_batch([0]), 32)          # the pipeline's unconditional (negative) one
    torch.testing.assert_close((emb, pooled), (ne[:1], npp[:1]), rtol=0, atol=0)
    assert pe.abs().sum() > 0 and pp.abs().sum() > 0


def test_sdxl_adapter_forward_is_the_unets(sdxl):
    pipe, caps = sdxl['pipe'], ['a red cat', 'the blue dog']
    seen = {}
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad(): pipe(caps[0], num_inference_steps=1, height=8, width=8, output_type='latent')
    hook.remove()
    ids = sdxl_time_ids(pipe.unet, 8)
    assert torch.equal(seen['added_cond_kwargs']['time_ids'][:1], ids) and ids.tolist() == [[8., 8, 0, 0, 8, 8]]
    with torch.no_grad(): pe, _, pp, _ = pipe.encode_prompt(caps, device='cpu', do_classifier_free_guidance=False)
    path, _ = precompute_prompt_embeddings(pipe, caps, sdxl['dir'] / 'two.safetensors')
    y = TextFeatureCache(path).get_batch([0, 1])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700])
    ref = pipe.unet(x, t, encoder_hidden_states=pe, added_cond_kwargs=dict(text_embeds=pp, time_ids=ids.repeat(2, 1)))
    torch.testing.assert_close(adapter_forward(PromptSDXLAdapter(pipe.unet, image_size=8), x, t, y), ref.sample,
                               rtol=1e-4, atol=1e-5)
    big = dict(text_embeds=pp, time_ids=sdxl_time_ids(pipe.unet, 64).repeat(2, 1))
    other = pipe.unet(x, t, encoder_hidden_states=pe, added_cond_kwargs=big)
    assert not torch.allclose(other.sample, ref.sample, atol=1e-4)                # the time ids matter


def test_sdxl_heads_through_the_cli(sdxl, tmp_path):
    out, d = tmp_path / 'run', sdxl['dir']
    argv = ['--diffusers-model', str(d / 'pipe'), '--data', str(d / 'latents.safetensors'), '--schedule', 'sd',
            '--text-features', str(d / 'captions.json'), '--p-uncond', '0.2', '--out', str(out), *RUN]
    assert main(argv) == 0
    ls = losses(out)
    assert len(ls) == 3 and all(math.isfinite(v) for v in ls)
    heads, pipe = out / 'exit_heads', sdxl['pipe']
    assert all(torch.equal(v, sdxl['sd'][k]) for k, v in pipe.unet.state_dict().items())
    conf = json.loads((heads / 'config.json').read_text())
    assert (conf['base']['model_class'], conf['card']['p_uncond']) == ('UNet2DConditionModel', 0.2)
    assert TextFeatureCache(out / 'prompts.safetensors').metadata['encoder']['pooled_dim'] == 32
    assert adapters_moved(heads, pipe.unet, 3)
    assert same_output(pipe, heads)
    with pytest.raises(ExitHeadsMismatchError, match='other weights'):
        enable_early_exit(tiny_sd_pipeline(seed=1, xl=True), heads=heads)
    with pytest.raises(ExitHeadsMismatchError, match='were made for'):
        enable_early_exit(tiny_sd_pipeline(), heads=heads)


def test_prompt_caches_without_pooled_embeddings_refused_on_sdxl(sd, sdxl, tmp_path, capsys):
    "An SD cache (same 32-wide hidden states, no pooled embeddings) on SDXL, and an SDXL cache on SD: refused."
    sd_cache, _ = precompute_prompt_embeddings(sd['pipe'], ['a red cat'] * 24, tmp_path / 'sd.safetensors')
    xl_cache, _ = precompute_prompt_embeddings(sdxl['pipe'], ['a red cat'] * 24, tmp_path / 'xl.safetensors')
    for pipe, cache, run in ((sdxl, sd_cache, 'a'), (sd, xl_cache, 'b')):
        assert main(['--diffusers-model', str(pipe['dir'] / 'pipe'), '--data', str(pipe['dir'] / 'latents.safetensors'),
                     '--schedule', 'sd', '--text-features', str(cache), '--out', str(tmp_path / run), *RUN]) == 2
        err = capsys.readouterr().err
        assert 'pooled text embeddings' in err and 'precompute_prompt_embeddings' in err, err
        assert not (tmp_path / run / 'logs').exists()
