"Latent and text-to-image training through `adadiff-latents`, `adadiff-text-features` and `adadiff-train` (offline)."
import json

import numpy as np
import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from adadiff_nb.models.autoencoder import LatentAutoencoder, TINY_VAE_CONFIG, load_latent_record, main as latents_main
from adadiff_nb.data import CIFAR10_CLASSES, resolve_cifar10_npz
from adadiff_nb.models.text_encoder import TextFeatureCache, write_tiny_clip, main as text_main
from adadiff_nb.apps.train_cli import main as train_main
from adadiff_nb.training.loop import read_log

N = 96            # CIFAR-10 training images encoded (16x16 -> 4x8x8 latents)


@pytest.fixture(scope='module')
def caches(tmp_path_factory):
    "A tiny random VAE folder, the latent cache of N CIFAR images, their captions' text features, the empty prompt's."
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp('latent')
    torch.manual_seed(0)
    LatentAutoencoder.from_config(TINY_VAE_CONFIG).vae.save_pretrained(str(d / 'vae'))
    npz = resolve_cifar10_npz()
    assert latents_main([str(npz), '--vae', str(d / 'vae'), '--out', str(d / 'lat.safetensors'), '--img-size', '16',
                         '--limit', str(N), '--device', 'cpu']) == 0
    write_tiny_clip(d / 'clip', width=16)
    labels = np.load(npz)['train_y'][:N]
    caps = [[f'a photo of a {CIFAR10_CLASSES[y]}', f'the {CIFAR10_CLASSES[y]} number {i}']
            for i, y in enumerate(labels)]
    (d / 'caps.json').write_text(json.dumps(caps))
    (d / 'empty.json').write_text('[""]')
    for src, out in (('caps.json', 'text.safetensors'), ('empty.json', 'empty.safetensors')):
        assert text_main([str(d / src), '--text-encoder', str(d / 'clip'), '--out', str(d / out), '--max-length', '8',
                          '--device', 'cpu']) == 0
    return d


def _train(d, out, *args) -> int:
    return train_main(['--out', str(d / out), '--progress', 'false', '--log-every', '1', '--device', 'cpu', *args])


def _falls(log, key='loss', k=10) -> tuple[float, float]:
    rows = read_log(log)
    return float(np.mean([r[key] for r in rows[:k]])), float(np.mean([r[key] for r in rows[-k:]]))


def test_class_conditional_latent_training(caches):
    d = caches
    assert _train(d, 'c', '--config', 'tiny_latent_c', '--data', str(d / 'lat.safetensors'), '--vae', str(d / 'vae'),
                  '--steps', '60', '--batch-size', '32', '--lr', '2e-3', '--sample-every', '60', '--sample-n', '4',
                  '--sample-steps', '2', '--ckpt-every', '30') == 0
    first, last = _falls(d / 'c' / 'logs' / 'train.csv')
    print(f"loss first 10 steps {first:.4f}, last 10 {last:.4f}")
    assert last < 0.8 * first, (first, last)
    for f in ('final_ema', 'final', 'ckpt/step_00000030'):
        rec = load_latent_record(d / 'c' / f)
        assert rec['autoencoder']['latent_channels'] == 4 and rec['autoencoder']['downsample'] == 2
        assert rec['vae_path'] == str(d / 'vae') and rec['text_encoder'] is None
    from PIL import Image
    assert Image.open(d / 'c' / 'samples' / 'step_00000060.png').size == (2 * 16 + 6, 2 * 16 + 6)  # decoded 16x16


def test_text_to_image_latent_training(caches):
    d = caches
    assert _train(d, 't', '--config', 'tiny_t2i', '--data', str(d / 'lat.safetensors'), '--text-features',
                  str(d / 'text.safetensors'), '--empty-context', str(d / 'empty.safetensors'), '--steps', '60',
                  '--batch-size', '32', '--lr', '2e-3', '--p-uncond', '0.3') == 0
    first, last = _falls(d / 't' / 'logs' / 'train.csv')
    print(f"loss first 10 steps {first:.4f}, last 10 {last:.4f}")
    assert last < 0.8 * first, (first, last)
    rec = load_latent_record(d / 't' / 'final_ema')
    assert rec['text_encoder'] == TextFeatureCache(d / 'text.safetensors').metadata['encoder']
    assert rec['text_encoder']['context_shape'] == [8, 16]
    from adadiff_nb.training.config import load_train_config
    from adadiff_nb.training.loop import _setup
    cfg = load_train_config('tiny_t2i', data=str(d / 'lat.safetensors'), text_features=str(d / 'text.safetensors'),
                            empty_context=str(d / 'empty.safetensors'), out=str(d / 't_setup'), progress=False)
    step = _setup(cfg, False, False, None).step_cfg
    assert step.labels and step.p_uncond == 0.1                  # contexts go to the model, dropped as configured
    assert torch.equal(step.null_context, TextFeatureCache(d / 'empty.safetensors').get_batch([0])[0])


def test_latent_resume_is_exact(caches):
    d, base = caches, ['--config', 'tiny_latent_c', '--data', str(caches / 'lat.safetensors'), '--batch-size', '32',
                       '--ckpt-every', '3']
    assert _train(d, 'full', *base, '--steps', '6') == 0
    assert _train(d, 'split', *base, '--steps', '3') == 0
    assert _train(d, 'split', *base, '--steps', '6', '--resume') == 0
    a, b = read_log(d / 'full' / 'logs' / 'train.csv'), read_log(d / 'split' / 'logs' / 'train.csv')
    assert [r['loss'] for r in a] == [r['loss'] for r in b]


def _error(capsys, d, *args) -> str:
    assert _train(d, 'bad', '--overwrite', *args) == 2
    return capsys.readouterr().err


def test_bad_latent_input(caches, capsys):
    d, lat = caches, str(caches / 'lat.safetensors')
    t2i = ['--config', 'tiny_t2i', '--data', lat, '--text-features', str(d / 'text.safetensors')]
    err = _error(capsys, d, '--config', 'tiny_latent_c', '--data', lat, '--img-size', 'none', '--model-kw',
                 '{"in_chans": 4, "img_size": 16, "num_classes": 11, "null_class": true}')
    assert 'holds 4x8x8 latents but the model takes 4x16x16' in err and 'img_size=8' in err
    (d / 'garbage.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": not json}')
    err = _error(capsys, d, '--config', 'tiny_latent_c', '--data', str(d / 'garbage.safetensors'))
    assert f"cannot read the cache {d / 'garbage.safetensors'}" in err and 'adadiff-latents' in err
    err = _error(capsys, d, *t2i, '--empty-context', 'none')
    assert "pass --empty-context FILE" in err
    err = _error(capsys, d, *t2i, '--empty-context', str(d / 'empty.safetensors'), '--model-kw',
                 '{"in_chans": 4, "clip_dim": 32, "num_clip_token": 8}')
    assert 'hold (8, 16) contexts but the model takes (8, 32)' in err
    err = _error(capsys, d, *t2i, '--empty-context', str(d / 'text.safetensors'))
    assert 'the one prompt ""' in err
    err = _error(capsys, d, '--config', 'tiny_latent_c', '--data', lat, '--text-features', str(d / 'empty.safetensors'))
    assert 'the latent cache has 96 items but the text cache 1' in err
