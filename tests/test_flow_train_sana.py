"""`adadiff-train --diffusers-model DIR` on a tiny random `SanaPipeline` (DC-AE autoencoder, a tiny Gemma 2 text
encoder, Sana's DPM-Solver scheduler on flow sigmas), saved with `save_pretrained` (`adadiff_nb.training.
flow_pipelines`, `adadiff_nb.training.diffusers_heads`): the prompt cache is the pipeline's own `encode_prompt` with its
complex human instruction, the final exit's loss is the transformer's own flow-matching MSE, and a few steps on CIFAR
images through the real command give finite losses, moved heads, an untouched transformer and an adapter directory
that keeps the pipeline's output at threshold 0 and is refused on another base; a latent cache of another autoencoder
is refused before training."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_helpers import FLOW_RUN, check_trained_heads, saved_flow_family
from adadiff_nb.apps.train_cli import main
from adadiff_nb.integrations.transformer_adapters import tiny_sana_pipeline, tiny_sd3_pipeline
from adadiff_nb.models.autoencoder import LatentAutoencoder, precompute_latents
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.diffusers_heads import flow_run_schedule, wrap_heads
from adadiff_nb.training.flow_families import FlowMatchSchedule
from adadiff_nb.training.flow_pipelines import PromptSanaAdapter, call_default, prompt_encoder, tiny_sana_text_pipeline
from adadiff_nb.training.loop import LoopLoss
from adadiff_nb.training.prompt_cache import pack_prompts, precompute_prompt_embeddings

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
RUN = FLOW_RUN


@pytest.fixture(scope='module')
def sana(tmp_path_factory):
    "A tiny Sana pipeline (saved), DC-AE latents of 8 CIFAR images at 16x16, a caption each."
    d = tmp_path_factory.mktemp('sana')
    return saved_flow_family(d, tiny_sana_text_pipeline(), 16)


def test_sana_prompt_cache_is_the_pipelines_encode_prompt(sana, tmp_path):
    pipe, caps = sana['pipe'], ['a red cat', 'the blue dog']
    path, empty = precompute_prompt_embeddings(prompt_encoder(pipe, 8), caps, tmp_path / 'p.safetensors')
    chi = call_default(pipe, 'complex_human_instruction')
    with torch.no_grad():
        e, m, ne, nm = pipe.encode_prompt(caps, max_sequence_length=8, complex_human_instruction=chi)
    torch.testing.assert_close(TextFeatureCache(path).get_batch([0, 1]), pack_prompts(e, m), rtol=0, atol=1e-6)
    torch.testing.assert_close(TextFeatureCache(empty).get_batch([0]), pack_prompts(ne[:1], nm[:1]), rtol=0, atol=1e-6)
    assert TextFeatureCache(path).metadata['encoder']['complex_human_instruction'] is True


def test_final_exit_loss_is_the_sana_flow_matching_mse(sana, tmp_path):
    pipe = sana['pipe']
    path, _ = precompute_prompt_embeddings(prompt_encoder(pipe, 8), ['a red cat', 'the dog'],
                                           tmp_path / 'p.safetensors')
    y = TextFeatureCache(path).get_batch([0, 1])
    ee = wrap_heads(PromptSanaAdapter(pipe.transformer), True, {}).train()
    sch, g = FlowMatchSchedule(dict(shift=3.0)), torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 800])
    x_t, target = sch.q_sample(x0, t, eps), sch.target(x0, t, eps)
    terms = LoopLoss(load_train_config().loss, True)(ee.forward_train, x_t, sch.model_time(t), target, t, 0, y)
    with torch.no_grad():
        v = pipe.transformer(x_t, encoder_hidden_states=y[..., :-1], encoder_attention_mask=y[..., -1].long(),
                             timestep=sch.sigma(t) * 1000).sample
    torch.testing.assert_close(terms['l_simple'], F.mse_loss(v, eps - x0), rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(terms['loss'].detach())) and terms['l_simple'] > 0


def test_schedule_is_the_dpm_solvers_flow_sigmas(sana):
    bb = PromptSanaAdapter(sana['pipe'].transformer)
    bb.img_size = 8
    sch = flow_run_schedule(sana['dir'] / 'pipe', bb)
    torch.testing.assert_close(sch.sigmas, FlowMatchSchedule(dict(shift=3.0)).sigmas)
    assert sch.time_scale == 1.0


def test_sana_heads_through_the_cli(sana, tmp_path):
    check_trained_heads(sana, tmp_path, RUN, 'SanaTransformer2DModel', 3, lambda: tiny_sana_pipeline(seed=1),
                        lambda: tiny_sana_pipeline(num_layers=4))


def test_latents_of_another_autoencoder_are_refused(sana, tmp_path, capsys):
    kl = tiny_sd3_pipeline().vae                                     # 4 latent channels too, but an AutoencoderKL
    precompute_latents(sana['img'][:, :, :8, :8], LatentAutoencoder(kl), tmp_path / 'kl.safetensors')
    argv = ['--diffusers-model', str(sana['dir'] / 'pipe'), '--data', str(tmp_path / 'kl.safetensors'),
            '--text-features', str(sana['dir'] / 'captions.json'), '--out', str(tmp_path / 'run'), *RUN]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'flow_autoencoder(pipe.vae)' in err, err
    assert not (tmp_path / 'run' / 'logs').exists()
