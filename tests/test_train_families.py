"""`adadiff-train --diffusers-model DIR` on diffusers' flow-matching transformers (`adadiff_nb.training.flow_families`,
`adadiff_nb.training.diffusers_heads`), offline on a tiny random `StableDiffusion3Pipeline` with two tiny CLIPs and a
tiny T5, saved with `save_pretrained`: the prompt cache is the pipeline's own `encode_prompt`, the training adapter's
forward is the transformer's, the exit loss at the final head is the model's own flow-matching MSE, and a few steps
through the real command give finite losses, moved heads, an untouched transformer and an adapter directory that keeps
the pipeline's output at threshold 0 and is refused on another base. Flux, Sana and Wan train too
(tests/test_flow_train_flux.py, _sana.py, _wan.py)."""
import json, math

import pytest
import torch
import torch.nn.functional as F

from pipeline_helpers import FLOW_RUN, check_trained_heads
from adadiff_nb.integrations.transformer_adapters import tiny_sd3_pipeline
from adadiff_nb.models.autoencoder import LatentAutoencoder, precompute_latents
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.diffusers_heads import wrap_heads
from adadiff_nb.training.flow_families import FlowMatchSchedule, PromptSD3Adapter, tiny_sd3_text_pipeline
from adadiff_nb.training.loop import LoopLoss
from adadiff_nb.training.prompt_cache import precompute_prompt_embeddings, unpack_sdxl_prompts

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
RUN = FLOW_RUN
COLOURS = ['red', 'green', 'blue']


@pytest.fixture(scope='module')
def sd3(tmp_path_factory):
    "A tiny SD3 pipeline with its text encoders (saved), latents of 12 flat-colour 32x32 images, 2 captions each."
    d = tmp_path_factory.mktemp('sd3')
    pipe = tiny_sd3_text_pipeline(d / 'clip')
    pipe.save_pretrained(d / 'pipe')
    g = torch.Generator().manual_seed(0)
    col = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1]])[torch.arange(12) % 3]
    img = (0.8 * col[:, :, None, None] + 0.1 * torch.randn(12, 3, 32, 32, generator=g)).clamp(-1, 1)
    precompute_latents(img, LatentAutoencoder(pipe.vae), d / 'latents.safetensors')
    caps = [[f'a {COLOURS[i % 3]} cat', f'the {COLOURS[i % 3]} dog'] for i in range(12)]
    (d / 'captions.json').write_text(json.dumps(caps))
    return dict(dir=d, pipe=pipe, sd={k: v.clone() for k, v in pipe.transformer.state_dict().items()})


def test_sd3_prompt_cache_is_the_pipelines_encode_prompt(sd3, tmp_path):
    pipe, caps = sd3['pipe'], ['a red cat', 'the blue dog']
    path, empty = precompute_prompt_embeddings(pipe, caps, tmp_path / 'p.safetensors', max_sequence_length=8)
    c, e = TextFeatureCache(path), TextFeatureCache(empty)
    assert (c.metadata['encoder']['pooled_dim'], c.context_shape) == (64, (26, 33))
    with torch.no_grad(): pe, ne, pp, npp = pipe.encode_prompt(caps, None, None, max_sequence_length=8)
    for i in range(2):
        torch.testing.assert_close(unpack_sdxl_prompts(c.get_batch([i]), 64), (pe[i:i + 1], pp[i:i + 1]),
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(unpack_sdxl_prompts(e.get_batch([0]), 64), (ne[:1], npp[:1]), rtol=0, atol=1e-6)
    assert pe[:, 16:].abs().sum() > 0                                 # the T5 tokens are there, not zeros


def test_final_exit_loss_is_the_flow_matching_mse(sd3, tmp_path):
    "L_simple of the AdaDiff loss on train_step's inputs (q_sample, target) is the transformer's own velocity MSE."
    pipe, caps = sd3['pipe'], ['a red cat', 'the blue dog']
    path, _ = precompute_prompt_embeddings(pipe, caps, tmp_path / 'p.safetensors', max_sequence_length=8)
    y = TextFeatureCache(path).get_batch([0, 1])
    ee = wrap_heads(PromptSD3Adapter(pipe.transformer), True, {}).train()
    sch, g = FlowMatchSchedule(dict(pipe.scheduler.config)), torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 800])
    x_t, target = sch.q_sample(x0, t, eps), sch.target(x0, t, eps)   # what train_step hands the model and the loss
    terms = LoopLoss(load_train_config().loss, True)(ee.forward_train, x_t, sch.model_time(t), target, t, 0, y)
    pe, pp = unpack_sdxl_prompts(y, 64)
    s = sch.sigma(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        v = pipe.transformer((1 - s) * x0 + s * eps, encoder_hidden_states=pe, pooled_projections=pp,
                             timestep=sch.sigma(t) * 1000).sample
    torch.testing.assert_close(terms['l_simple'], F.mse_loss(v, eps - x0), rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(terms['loss'].detach())) and terms['l_simple'] > 0


def test_sd3_heads_through_the_cli(sd3, tmp_path):
    check_trained_heads(sd3, tmp_path, RUN, 'SD3Transformer2DModel', None, lambda: tiny_sd3_pipeline(seed=1),
                        lambda: tiny_sd3_pipeline(num_layers=4))
