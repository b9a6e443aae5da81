"""The CLIP text encoder against transformers' own tokenizer and model calls, on a tiny random CLIP and a
tokenizer built from a vocabulary the test writes, saved to a folder and loaded back by path: the (B, 77, D)
context, the empty prompt, the text-feature cache and its pairing with latents, and the missing-package error."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip('transformers')

from adadiff_nb.models.autoencoder import (TINY_VAE_CONFIG, CacheError, LatentAutoencoder, LatentCache,
                                           precompute_latents)
from adadiff_nb.models.text_encoder import (LatentTextDataset, TextEncoder, TextFeatureCache, precompute_text_features,
                                     read_prompts, write_tiny_clip)
from adadiff_nb.models.uvit import uvit_tiny


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp('clip'))


def test_context_is_the_last_hidden_state_of_77_padded_tokens(clip_dir):
    enc = TextEncoder.from_pretrained(clip_dir)
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    model = transformers.CLIPTextModel.from_pretrained(str(clip_dir)).eval()
    prompts = ['the cat', 'a cat on a mat', '']
    ids = tok(prompts, truncation=True, max_length=77, padding='max_length', return_tensors='pt')['input_ids']
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    ctx = enc.encode(prompts)
    assert ctx.shape == (3, 77, 32) and torch.allclose(ctx, ref, atol=1e-6)
    assert torch.allclose(enc.empty_context, ref[2:], atol=1e-6)
    long = enc.tokenize('cat ' * 200)                                         # truncated to 77, ends with the end token
    assert long.shape == (1, 77) and long[0, -1].item() == tok.eos_token_id


def test_context_conditions_a_t2i_uvit_and_bad_prompts_are_named(clip_dir):
    enc = TextEncoder.from_pretrained(clip_dir)
    m = uvit_tiny(in_chans=4, clip_dim=32, num_clip_token=77)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0])
    with torch.no_grad():
        out = m(x, t, enc.encode(['the cat', 'cat']))
        uncond = m(x, t, enc.empty_context.expand(2, -1, -1))
    assert out.shape == (2, 4, 8, 8) and not torch.allclose(out, uncond)
    with pytest.raises(ValueError, match='prompts must be strings'):
        enc.encode(['a', 1])
    with pytest.raises(FileNotFoundError, match='vocab.json'):
        TextEncoder.from_pretrained(clip_dir.parent / 'missing')


def test_missing_transformers_names_the_extra(clip_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, 'transformers', None)                   # `import transformers` now fails
    with pytest.raises(ImportError, match=r"pip install 'adadiff_nb\[t2i\]'"):
        TextEncoder.from_pretrained(clip_dir)


def test_text_cache_round_trip_and_pairing(clip_dir, tmp_path):
    enc = TextEncoder.from_pretrained(clip_dir)
    prompts = [['the cat', 'a cat'], 'cat', '']
    path = precompute_text_features(prompts, enc, tmp_path / 'text.safetensors', batch_size=2, dtype=torch.float16)
    cache = TextFeatureCache(path, generator=torch.Generator().manual_seed(0))
    assert (len(cache), cache.prompts(0), cache.context_shape) == (3, ['the cat', 'a cat'], (77, 32))
    assert torch.allclose(cache[1], enc.encode('cat')[0], atol=2e-3)           # float16 storage
    picks = cache.get_batch([0] * 10)
    both = enc.encode(['the cat', 'a cat'])
    which = {int((both - p).abs().amax((1, 2)).argmin()) for p in picks}
    assert which == {0, 1}
    ae = LatentAutoencoder.from_config(TINY_VAE_CONFIG)
    lat = LatentCache(precompute_latents(torch.zeros(3, 3, 16, 16), ae, tmp_path / 'lat.safetensors'))
    pairs = LatentTextDataset(lat, cache)
    z, c = pairs.get_batch([0, 2])
    assert z.shape == (2, 4, 8, 8) and c.shape == (2, 77, 32)
    pairs.check_model(uvit_tiny(in_chans=4, clip_dim=32, num_clip_token=77))
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match='truncated or corrupt'):
        TextFeatureCache(bad)


def test_cli_encodes_a_prompt_file(clip_dir, tmp_path):
    (tmp_path / 'p.txt').write_text('the cat\na cat\n')
    assert read_prompts(tmp_path / 'p.txt') == ['the cat', 'a cat']
    cmd = [sys.executable, '-m', 'adadiff_nb.models.text_encoder', str(tmp_path / 'p.txt'),
           '--text-encoder', str(clip_dir),
           '--out', str(tmp_path / 't.safetensors'), '--device', 'cpu']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])['n'] == 2
    assert TextFeatureCache(tmp_path / 't.safetensors').prompts(1) == ['a cat']
