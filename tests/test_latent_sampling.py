"Sampling latent class-conditional checkpoints: latent.json records, decoding, guidance with exits, CLI errors."
import json

import numpy as np
import pytest
import torch

from adadiff_nb.models.autoencoder import (LATENT_RECORD, TINY_VAE_CONFIG, LatentAutoencoder, load_latent_record,
                                    save_latent_record)
from adadiff_nb.models.checkpoint import CheckpointError, save_model
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.apps.sample_cli import main, sample_to_dir
from adadiff_nb.sampling.run import images_uint8, sample_batches

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def latent_ckpt(tmp_path_factory):
    "(checkpoint dir, VAE dir, model, autoencoder): a tiny latent class-conditional early-exit U-ViT with a null class."
    root = tmp_path_factory.mktemp('latent')
    torch.manual_seed(0)
    ae = LatentAutoencoder.from_config(TINY_VAE_CONFIG)
    ae.vae.save_pretrained(str(root / 'vae'))
    ae = LatentAutoencoder.from_pretrained(root / 'vae')
    model = create_early_exit('adadiff_tiny', in_chans=4, num_classes=11, null_class=True).eval()
    save_model(model, root / 'ckpt')
    save_latent_record(root / 'ckpt', ae, vae_path=root / 'vae')
    return root / 'ckpt', root / 'vae', model, ae


def test_record_round_trip(latent_ckpt, tmp_path):
    ckpt, vae, _, ae = latent_ckpt
    rec = load_latent_record(ckpt)
    assert rec['autoencoder'] == json.loads(json.dumps(ae.record())) and rec['text_encoder'] is None
    assert rec['vae_path'] == str(vae)
    assert load_latent_record(tmp_path) is None                           # pixel space
    (tmp_path / LATENT_RECORD).write_text('{"format": "adadiff-latent/1"}')
    with pytest.raises(CheckpointError, match='save_latent_record'):
        load_latent_record(tmp_path)


def test_sample_to_dir_decodes_with_guidance_and_exits(latent_ckpt, tmp_path):
    ckpt, vae, model, ae = latent_ckpt
    kw = dict(sampler='ddim', steps=2, n=3, batch=2, seed=1, labels=[1, 2, 3], guidance_scale=2., progress=False)
    st = sample_to_dir(ckpt, tmp_path, threshold=0.3, vae=vae, compare_full=True, **kw)
    z = np.load(tmp_path / 'samples.npz')
    assert z['images'].shape == (3, 16, 16, 3) and z['latents'].shape == (3, 4, 8, 8)
    assert z['images_full'].shape == (3, 16, 16, 3) and (tmp_path / 'samples.png').is_file()
    assert st['guided'] and st['rows_per_eval'] == 2. and st['latent_shape'] == [4, 8, 8]
    assert st['decode_seconds'] > 0 and st['denoise_seconds'] == st['wall_s']
    assert st['autoencoder']['recorded'] and st['autoencoder']['scale_factor'] == ae.scale_factor
    # the same run by hand: sample latents, decode them
    run = sample_batches(model, 'ddim', 2, n=3, batch_size=2, seed=1, labels=[1, 2, 3], guidance_scale=2.,
                         threshold=0.3)
    np.testing.assert_array_equal(z['images'], images_uint8(ae.decode(run.images)))
    assert json.loads((tmp_path / 'stats.json').read_text())['decode_seconds'] == st['decode_seconds']


def test_threshold_zero_is_the_full_model(latent_ckpt, tmp_path):
    ckpt, vae, _, _ = latent_ckpt
    st = sample_to_dir(ckpt, tmp_path, sampler='ddim', steps=2, n=2, batch=2, labels=4, guidance_scale=3.,
                       threshold=0., vae=vae, compare_full=True, progress=False)
    assert st['max_abs_diff_vs_full'] == 0. and st['layer_ratio'] == 1.


def test_bad_input(latent_ckpt, tmp_path, capsys):
    ckpt, vae, _, _ = latent_ckpt
    base = ['--checkpoint', str(ckpt), '--out', str(tmp_path), '--n', '1', '--steps', '1', '--quiet']
    assert main(base) == 2
    err = capsys.readouterr().err
    assert '--vae DIR' in err and 'diffusion_pytorch_model.safetensors' in err
    assert main(base + ['--vae', str(vae), '--prompt', 'a cat']) == 2
    assert 'class-conditional model (not text-to-image)' in capsys.readouterr().err
    assert main(base + ['--vae', str(tmp_path / 'nothing')]) == 2
    assert 'config.json' in capsys.readouterr().err
    assert main(base + ['--vae', str(vae), '--vae-scale', '0.5', '--class', '3']) == 0   # an explicit scale wins
    assert json.loads((tmp_path / 'stats.json').read_text())['autoencoder']['scale_factor'] == 0.5


def test_pixel_checkpoint_with_vae_of_other_channels(tmp_path, latent_ckpt):
    _, vae, _, _ = latent_ckpt
    save_model(create_early_exit('adadiff_tiny').eval(), tmp_path / 'px')
    with pytest.raises(ValueError, match='takes 3-channel inputs'):
        sample_to_dir(tmp_path / 'px', tmp_path / 'o', steps=1, n=1, vae=vae, progress=False)
