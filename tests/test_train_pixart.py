"""Exit heads trained on a frozen diffusers PixArt transformer (`adadiff_nb.training.diffusers_heads`),
offline on a tiny random
`PixArtAlphaPipeline`: the prompt-embedding cache holds exactly the pipeline's own `encode_prompt` output (captions
and the empty prompt), the rows the transformer sees in training are the drawn captions or, where the run's noise
generator drops them, the empty prompt (hidden states and mask together), the AdaDiff loss falls while the frozen
transformer's weights and its own loss stay put, the adapter file loads onto the stock pipeline (threshold=0 keeps
its images) and a caption file is encoded once through the pipeline directory. A few hundred steps at 8x8 latents."""
import json
from pathlib import Path

import pytest
import torch

from adadiff_nb.models.autoencoder import LatentAutoencoder, precompute_latents
from adadiff_nb.sampling.diffusion import get_schedule
from adadiff_nb.integrations.diffusers import (TextCond, disable_early_exit, early_exit_model, load_exit_heads,
                                  tiny_pixart_pipeline)
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.training.common import DataStream, mix_seed
from adadiff_nb.apps.train_cli import main
from adadiff_nb.training.diffusers_heads import (TrainInputError, empty_prompt_path, pack_prompts,
                                                 precompute_prompt_embeddings, train_diffusers)

N, BS, SEED, T = 48, 16, 0, 12
COLOURS = ['red', 'green', 'blue']
CAPTIONS = [[f'a {COLOURS[i % 3]} cat', f'a photo of a {COLOURS[i % 3]} bird'] for i in range(N)]
PX = dict(num_inference_steps=2, height=8, width=8, use_resolution_binning=False, max_sequence_length=T,
          clean_caption=False, output_type='pt')
RUN = dict(batch_size=BS, lr=1e-3, warmup_steps=0, ema_decay=0.9, device='cpu', seed=SEED, progress=False,
           exit_kw=dict(uem_params='shared'))


pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A tiny PixArt pipeline (also saved), latents of 48 flat-colour images, their prompt embeddings (2 captions each)."
    d = tmp_path_factory.mktemp('pixart')
    pipe = tiny_pixart_pipeline(num_layers=4)
    pipe.save_pretrained(d / 'pipe')
    g = torch.Generator().manual_seed(0)
    col = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1]])[torch.arange(N) % 3]
    img = (0.8 * col[:, :, None, None] + 0.1 * torch.randn(N, 3, 8, 8, generator=g)).clamp(-1, 1)
    lat = precompute_latents(img, LatentAutoencoder(pipe.vae), d / 'latents.safetensors')
    caps, empty = precompute_prompt_embeddings(pipe, CAPTIONS, d / 'captions.safetensors', max_sequence_length=T)
    (d / 'captions.json').write_text(json.dumps(CAPTIONS))
    return dict(dir=d, pipe=pipe, latents=lat, captions=caps, empty=empty)


def encode(pipe, prompts, cfg: bool = False, length: int = T):
    "The pipeline's own embeddings and masks (and the negative ones with `cfg`), computed here directly."
    with torch.no_grad():
        return pipe.encode_prompt(prompts, do_classifier_free_guidance=cfg, max_sequence_length=length, device='cpu')


def test_cache_holds_the_pipelines_embeddings(data):
    c = TextFeatureCache(data['captions'])
    flat = [p for ps in CAPTIONS for p in ps]
    e, m, ne, nm = encode(data['pipe'], flat[:6], cfg=True)
    ctx = c._file().get_tensor('context')
    assert (len(c), ctx.shape, c.prompts(4)) == (N, (2 * N, T, 17), CAPTIONS[4])
    torch.testing.assert_close(ctx[:6, :, :-1], e, rtol=0, atol=0)
    torch.testing.assert_close(ctx[:6, :, -1], m.float(), rtol=0, atol=0)
    em = TextFeatureCache(data['empty'])
    assert (data['empty'], em.prompts(0)) == (empty_prompt_path(data['captions']), [''])
    torch.testing.assert_close(em.get_batch([0]), pack_prompts(ne[:1], nm[:1]), rtol=0, atol=0)


def record_contexts(tr):
    "Record (caption embeddings, attention bias) of every transformer block-0 call, via forward hooks."
    seen = []
    def proj(module, args): seen.append([args[0].detach().clone()])
    def block(module, args, kwargs): seen[-1].append(kwargs['encoder_attention_mask'].detach().clone())
    return seen, [tr.caption_projection.register_forward_pre_hook(proj),
                  tr.transformer_blocks[0].register_forward_pre_hook(block, with_kwargs=True)]


def expected_drops(steps: int, p: float) -> list:
    "(indices, dropped) per step: the data stream's order, and train_step's dropout draws from the noise generator."
    stream, sch = DataStream(list(range(N)), BS, SEED, flip=False), get_schedule('linear')
    g = torch.Generator().manual_seed(mix_seed(SEED, 'noise', 0))
    out = []
    for _ in range(steps):
        idx, _ = stream.next_indices()
        sch.sample_t(BS, generator=g)
        torch.randn((BS, 4, 8, 8), generator=g)
        out.append((idx, torch.rand(BS, generator=g) < p))
    return out


def test_training_sees_captions_or_the_empty_prompt(data, tmp_path):
    pipe, steps = data['pipe'], 3
    flat = [p for ps in CAPTIONS for p in ps]
    e, m = encode(pipe, flat)[:2]
    (ne, nm), bias = encode(pipe, [''])[:2], lambda k: (1 - k.float()) * -10000.0
    seen, hooks = record_contexts(pipe.transformer)
    try: train_diffusers(pipe, data=str(data['latents']), text_features=str(data['captions']), p_uncond=0.5,
                         steps=steps, out=str(tmp_path), log_every=1, **RUN)
    finally:
        for h in hooks: h.remove()
    n_drop = 0
    for (idx, drop), (ctx, mask) in zip(expected_drops(steps, 0.5), seen[:steps]):
        for r, i in enumerate(idx.tolist()):
            options = [(ne[0], nm[0])] if drop[r] else [(e[2 * i + j], m[2 * i + j]) for j in range(2)]
            assert any(torch.equal(ctx[r], a) and torch.equal(mask[r, 0], bias(k)) for a, k in options), (r, i)
        n_drop += int(drop.sum())
    assert 0 < n_drop < steps * BS


def test_heads_train_on_the_frozen_transformer(data, tmp_path):
    pipe = data['pipe']
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = train_diffusers(pipe, data=str(data['latents']), text_features=str(data['captions']), p_uncond=0.1,
                          steps=200, out=str(tmp_path), log_every=20, **RUN)
    first, last = res['rows'][0], res['rows'][-1]
    assert last['loss'] < 0.8 * first['loss'] and last['l_ual'] < 0.5 * first['l_ual']
    assert abs(last['l_simple'] - first['l_simple']) < 0.1 * first['l_simple']          # the frozen model's own loss
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    card = (res['heads'] / 'README.md').read_text()
    assert '| steps | 200 |' in card and 'PixArtTransformer2DModel' in card and 'captions.safetensors' in card

    p2 = tiny_pixart_pipeline(num_layers=4)                         # the same random weights, built afresh
    plain = p2('a red cat', generator=torch.Generator().manual_seed(1), **PX).images
    load_exit_heads(p2, res['heads'], threshold=0.)
    same = p2('a red cat', generator=torch.Generator().manual_seed(1), **PX).images
    assert torch.equal(same, plain)
    ee, trained = early_exit_model(p2), res['model']
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in ee.state_dict().items())
    x, t = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([50, 300, 600, 900])
    e, m = encode(pipe, ['a red cat', 'a blue bird', 'the green dog', ''])[:2]
    at = dict(exit_layers=torch.tensor([0, 1, 2, 4]))                        # every head, and the full model
    with torch.no_grad():
        a, b = ee(x, t, TextCond(e, m), **at), trained(x, t, pack_prompts(e, m), **at)
    assert torch.equal(a.exit_layer, at['exit_layers']) and torch.equal(a.sample, b.sample)
    disable_early_exit(p2)


def test_caption_file_through_the_pipeline_directory(data, tmp_path):
    "A caption file is encoded once by the pipeline's own T5 at its default length (120), and reused."
    kw = dict(data=str(data['latents']), p_uncond=0.1, steps=2, out=str(tmp_path), log_every=1, **RUN)
    train_diffusers(data['dir'] / 'pipe', text_features=str(data['dir'] / 'captions.json'), **kw)
    made = TextFeatureCache(tmp_path / 'prompts.safetensors')
    e, m = encode(data['pipe'], CAPTIONS[0] + CAPTIONS[1], length=120)[:2]
    assert (made.context_shape, made.prompts(1)) == ((120, 17), CAPTIONS[1])
    assert empty_prompt_path(made.path).is_file()
    torch.testing.assert_close(made._file().get_tensor('context')[:4], pack_prompts(e, m), rtol=0, atol=0)
    stamp = made.path.stat().st_mtime_ns
    train_diffusers(data['dir'] / 'pipe', text_features=str(data['dir'] / 'captions.json'), **kw)
    assert made.path.stat().st_mtime_ns == stamp                              # the same captions: reused
    (tmp_path / 'other.txt').write_text('\n'.join(f'a small {c} dog' for c in COLOURS * (N // 3)))
    train_diffusers(data['dir'] / 'pipe', text_features=str(tmp_path / 'other.txt'), **kw)
    assert TextFeatureCache(made.path).prompts(0) == ['a small red dog']


def test_bad_input_names_the_fix(data, tmp_path):
    base = dict(data=str(data['latents']), steps=1, out=str(tmp_path), **RUN)
    with pytest.raises(TrainInputError, match='text-conditioned: pass text_features'):
        train_diffusers(data['pipe'], **base)
    lone = tmp_path / 'lone.safetensors'
    lone.write_bytes(data['captions'].read_bytes())                          # no .empty.safetensors beside it
    with pytest.raises(TrainInputError, match='replaces dropped captions by the empty prompt'):
        train_diffusers(data['pipe'], text_features=str(lone), p_uncond=0.1, **base)
    with pytest.raises(TrainInputError, match='no pipeline directory'):
        train_diffusers(data['dir'] / 'pipe' / 'transformer', text_features=str(data['dir'] / 'captions.json'), **base)


def test_cli(data, tmp_path, capsys):
    argv = ['--diffusers-model', str(data['dir'] / 'pipe'), '--data', str(data['latents']), '--p-uncond', '0.1',
            '--steps', '2', '--batch-size', str(BS), '--device', 'cpu', '--progress', 'false',
            '--exit-kw', '{"uem_params": "shared"}']
    assert main(argv + ['--text-features', str(data['captions']), '--out', str(tmp_path / 'a')]) == 0
    conf = json.loads((tmp_path / 'a' / 'exit_heads' / 'config.json').read_text())
    assert conf['base']['model_class'] == 'PixArtTransformer2DModel'
    assert conf['card']['captions'] == str(data['captions'])
    assert main(argv + ['--out', str(tmp_path / 'b')]) == 2
    assert 'text-conditioned' in capsys.readouterr().err
