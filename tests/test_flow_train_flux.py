"""`adadiff-train --diffusers-model DIR` on a tiny random `FluxPipeline` (FLUX.1-dev style: guidance embedding, a
dynamic-shifting scheduler) with a tiny CLIP and a tiny T5, saved with `save_pretrained` (`adadiff_nb.training.
flow_pipelines`, `adadiff_nb.training.diffusers_heads`): the final exit's loss is the transformer's own flow-matching
MSE on the pipeline's packed tokens, the schedule is shifted at the training latents' size as the pipeline shifts it,
and a few steps on CIFAR images through the real command give finite losses, moved heads, an untouched transformer
and an adapter directory that keeps the pipeline's output at threshold 0 and is refused on another base."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_helpers import FLOW_RUN, check_trained_heads, saved_flow_family
from adadiff_nb.integrations.transformer_adapters import tiny_flux_pipeline
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.diffusers_heads import flow_run_schedule, wrap_heads
from adadiff_nb.training.flow_families import FlowMatchSchedule
from adadiff_nb.training.flow_pipelines import (PromptFluxAdapter, pack_flux_latents, flux_image_ids, prompt_encoder,
                                                tiny_flux_text_pipeline, transformer_latents, unpack_flux_latents)
from adadiff_nb.training.loop import LoopLoss
from adadiff_nb.training.prompt_cache import precompute_prompt_embeddings, unpack_sdxl_prompts

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
RUN = FLOW_RUN


@pytest.fixture(scope='module')
def flux(tmp_path_factory):
    "A tiny guidance-distilled Flux pipeline (saved), latents of 8 CIFAR images at 16x16, a caption each."
    d = tmp_path_factory.mktemp('flux')
    return saved_flow_family(d, tiny_flux_text_pipeline(d / 'clip', guidance_embeds=True), 16)


def test_final_exit_loss_is_the_flux_flow_matching_mse(flux, tmp_path):
    "L_simple on train_step's inputs is the transformer's own velocity MSE on the packed tokens (guidance 3.5)."
    pipe = flux['pipe']
    path, _ = precompute_prompt_embeddings(prompt_encoder(pipe, 8), ['a red cat', 'the dog'],
                                           tmp_path / 'p.safetensors')
    y = TextFeatureCache(path).get_batch([0, 1])
    ee = wrap_heads(PromptFluxAdapter(pipe.transformer), True, {}).train()
    sch, g = FlowMatchSchedule(dict(pipe.scheduler.config), mu=0.7), torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 800])
    x_t, target = sch.q_sample(x0, t, eps), sch.target(x0, t, eps)
    terms = LoopLoss(load_train_config().loss, True)(ee.forward_train, x_t, sch.model_time(t), target, t, 0, y)
    pe, pp = unpack_sdxl_prompts(y, 32)
    s = sch.sigma(t)
    with torch.no_grad():
        v = pipe.transformer(pack_flux_latents(x_t), encoder_hidden_states=pe, pooled_projections=pp, timestep=s,
                             guidance=torch.full((2,), 3.5), txt_ids=torch.zeros(8, 3),
                             img_ids=flux_image_ids(x_t)).sample
    torch.testing.assert_close(terms['l_simple'], F.mse_loss(unpack_flux_latents(v, (8, 8)), eps - x0),
                               rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(terms['loss'].detach())) and terms['l_simple'] > 0


def test_schedule_is_shifted_at_the_training_resolution(flux):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    bb = PromptFluxAdapter(flux['pipe'].transformer)
    bb.img_size = 16                                                   # 16x16 latents: 64 packed tokens
    sch = flow_run_schedule(flux['dir'] / 'pipe', bb)
    assert sch.mu == pytest.approx(calculate_shift(64))
    assert not torch.allclose(sch.sigmas, FlowMatchSchedule().sigmas)


def test_latents_are_shifted_as_the_pipeline_does(flux):
    vae = flux['pipe'].vae
    ds = transformer_latents(_Ones(), vae, vae.config.scaling_factor)
    z = ds.get_batch([0])[0]
    torch.testing.assert_close(z, torch.full_like(z, 1 - vae.config.shift_factor * vae.config.scaling_factor))


class _Ones:
    def __len__(self): return 1
    def get_batch(self, idx): return torch.ones(len(idx), 1, 4, 4), torch.zeros(len(idx))


def test_flux_heads_through_the_cli(flux, tmp_path):
    conf = check_trained_heads(flux, tmp_path, RUN, 'FluxTransformer2DModel', 4,
                               lambda: tiny_flux_pipeline(seed=1, guidance_embeds=True),
                               lambda: tiny_flux_pipeline(num_layers=3, guidance_embeds=True))
    assert conf['card']['guidance'] == 3.5
