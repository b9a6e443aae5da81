"""`adadiff-train --diffusers-model DIR` on a tiny random `WanPipeline` (Wan video VAE, a tiny UMT5 text encoder, Wan's
UniPC scheduler on flow sigmas), saved with `save_pretrained` (`adadiff_nb.training.flow_pipelines`,
`adadiff_nb.training.diffusers_heads`): CIFAR images become one-frame video latents normalised as the pipeline
normalises them, the final exit's loss is the transformer's own flow-matching MSE on (B, C, 1, H, W) latents, and a few
steps through the real command give finite losses, moved heads, an untouched transformer and an adapter directory
that keeps the pipeline's (5-frame) output at threshold 0 and is refused on another base; Wan 2.2's TI2V pipeline is
refused before training."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_helpers import FLOW_RUN, check_trained_heads, saved_flow_family
from adadiff_nb.apps.train_cli import main
from adadiff_nb.integrations.transformer_adapters import tiny_wan_pipeline
from adadiff_nb.models.autoencoder import LatentCache
from adadiff_nb.models.text_encoder import TextFeatureCache
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.diffusers_heads import wrap_heads
from adadiff_nb.training.flow_families import FlowMatchSchedule
from adadiff_nb.training.flow_pipelines import (PromptWanAdapter, prompt_encoder, tiny_wan_text_pipeline,
                                                transformer_latents)
from adadiff_nb.training.loop import LoopLoss
from adadiff_nb.training.prompt_cache import pack_prompts, precompute_prompt_embeddings

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py
RUN = FLOW_RUN


@pytest.fixture(scope='module')
def wan(tmp_path_factory):
    "A tiny Wan pipeline (saved), one-frame latents of 8 CIFAR images (32x32), a caption each."
    d = tmp_path_factory.mktemp('wan')
    return saved_flow_family(d, tiny_wan_text_pipeline(), 32)


def test_latents_are_the_pipelines_normalised_one_frame_latents(wan):
    "What the transformer trains on is (z - latents_mean) / latents_std of the one-frame clip's posterior mean."
    pipe = wan['pipe']
    ds = transformer_latents(LatentCache(wan['dir'] / 'latents.safetensors', sample=False, flip=False), pipe.vae)
    c = pipe.vae.config
    with torch.no_grad(): z = pipe.vae.encode(wan['img'][:2, :, None]).latent_dist.mean
    want = (z - torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(ds.get_batch([0, 1])[0], want[:, :, 0], rtol=1e-5, atol=1e-5)


def test_wan_prompt_cache_is_the_pipelines_encode_prompt(wan, tmp_path):
    pipe, caps = wan['pipe'], ['a red cat', 'the blue dog']
    path, empty = precompute_prompt_embeddings(prompt_encoder(pipe, 8), caps, tmp_path / 'p.safetensors')
    with torch.no_grad(): e, ne = pipe.encode_prompt(caps, max_sequence_length=8)
    torch.testing.assert_close(TextFeatureCache(path).get_batch([0, 1]), pack_prompts(e), rtol=0, atol=1e-6)
    torch.testing.assert_close(TextFeatureCache(empty).get_batch([0]), pack_prompts(ne[:1]), rtol=0, atol=1e-6)


def test_final_exit_loss_is_the_wan_flow_matching_mse(wan, tmp_path):
    pipe = wan['pipe']
    path, _ = precompute_prompt_embeddings(prompt_encoder(pipe, 8), ['a red cat', 'the dog'],
                                           tmp_path / 'p.safetensors')
    y = TextFeatureCache(path).get_batch([0, 1])
    ee = wrap_heads(PromptWanAdapter(pipe.transformer), True, {}).train()
    sch, g = FlowMatchSchedule(dict(shift=3.0)), torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g), torch.tensor([5, 800])
    x_t, target = sch.q_sample(x0, t, eps), sch.target(x0, t, eps)
    terms = LoopLoss(load_train_config().loss, True)(ee.forward_train, x_t, sch.model_time(t), target, t, 0, y)
    with torch.no_grad():
        v = pipe.transformer(x_t[:, :, None], encoder_hidden_states=y[..., :-1], timestep=sch.sigma(t) * 1000).sample
    torch.testing.assert_close(terms['l_simple'], F.mse_loss(v[:, :, 0], eps - x0), rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(terms['loss'].detach())) and terms['l_simple'] > 0


def test_wan_heads_through_the_cli(wan, tmp_path):
    check_trained_heads(wan, tmp_path, RUN, 'WanTransformer3DModel', 3, lambda: tiny_wan_pipeline(seed=1),
                        lambda: tiny_wan_pipeline(num_layers=4), field='frames')


def test_wan22_ti2v_pipeline_is_refused(wan, tmp_path, capsys):
    from diffusers import WanPipeline
    p = wan['pipe']
    WanPipeline(**p.components, expand_timesteps=True).save_pretrained(tmp_path / 'ti2v')
    argv = ['--diffusers-model', str(tmp_path / 'ti2v'), '--data', str(wan['dir'] / 'latents.safetensors'),
            '--text-features', str(wan['dir'] / 'captions.json'), '--out', str(tmp_path / 'run'), *RUN]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Wan 2.2's TI2V pipeline (expand_timesteps)" in err, err
    assert not (tmp_path / 'run' / 'logs').exists()
