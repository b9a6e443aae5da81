"""The latent autoencoder stage against diffusers' own AutoencoderKL calls, on a tiny random VAE saved to a folder
and loaded back by path: the scale factor as U-ViT/DiT apply it, the latent cache (moments of each image and of
its mirror, labels, atomic writes, corrupt files) and the `adadiff-latents` command."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

diffusers = pytest.importorskip('diffusers')

from adadiff_nb.models.autoencoder import (TINY_VAE_CONFIG, CacheError, LatentAutoencoder, LatentCache,
                                           check_compatible, precompute_latents)
from adadiff_nb.models.uvit import uvit_tiny


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('vae')
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(d)
    return d


@pytest.fixture(scope='module')
def images():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_loads_by_path_and_scales_as_uvit_and_dit(vae_dir, images):
    ae = LatentAutoencoder.from_pretrained(vae_dir)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()           # the reference: diffusers directly
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        z = ae.encode(images, sample=False)
        assert torch.allclose(z, dist.mean * 0.18215, atol=1e-5)
        assert torch.allclose(ae.decode(z), vae.decode(dist.mean).sample, atol=1e-5)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        drawn = ae.encode(images, generator=g1)
        ref = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g2)) * 0.18215
        assert torch.allclose(drawn, ref, atol=1e-5)
    coco = LatentAutoencoder.from_pretrained(vae_dir, scale_factor=0.23010)   # U-ViT's MS-COCO scale
    assert torch.allclose(coco.encode(images, sample=False), dist.mean * 0.23010, atol=1e-5)
    assert (ae.latent_channels, ae.downsample, ae.latent_shape(16)) == (4, 2, (4, 8, 8))


def test_bad_input_and_missing_weights(vae_dir, tmp_path):
    ae = LatentAutoencoder.from_pretrained(vae_dir)
    with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
        LatentAutoencoder.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r'\[-1, 1\]'):
        ae.encode(torch.full((1, 3, 16, 16), 3.0))
    with pytest.raises(ValueError, match='latent_channels=4'):
        ae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match='takes 3-channel inputs'):
        check_compatible(ae, uvit_tiny())
    with pytest.raises(ValueError, match='scale_factor=0.2301'):
        check_compatible(ae, uvit_tiny(in_chans=4), {'scale_factor': 0.2301})
    assert check_compatible(ae, uvit_tiny(in_chans=4), ae.record()) == 16


def test_cache_holds_moments_of_images_and_mirrors(vae_dir, images, tmp_path):
    ae = LatentAutoencoder.from_pretrained(vae_dir)
    path = precompute_latents(images, ae, tmp_path / 'c.safetensors', labels=torch.tensor([4, 3, 2, 1, 0]),
                              batch_size=2)
    st = load_file(path)
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        for v, x in enumerate((images, images.flip(-1))):
            d = vae.encode(x).latent_dist
            assert torch.allclose(st['moments'][:, v], torch.cat([d.mean, d.logvar], 1), atol=1e-5)
    assert st['labels'].tolist() == [4, 3, 2, 1, 0]
    cache = LatentCache(path, sample=False, flip=False)
    z, y = cache.get_batch([1, 3])
    assert torch.allclose(z, ae.encode(images[[1, 3]], sample=False), atol=1e-5) and y.tolist() == [3, 1]
    assert cache[0][1] == 4 and cache[0][0].shape == (4, 8, 8)
    seen = {round(float(LatentCache(path, sample=False, generator=torch.Generator().manual_seed(s))[2][0][0, 0, 0]),
                  5) for s in range(12)}
    assert len(seen) == 2                                                    # the flip variant is drawn per item


def test_cache_write_is_atomic_and_bad_files_are_named(vae_dir, images, tmp_path):
    ae = LatentAutoencoder.from_pretrained(vae_dir)
    path = precompute_latents(images, ae, tmp_path / 'c.safetensors', flip=False)
    before = path.read_bytes()

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 3:
                raise RuntimeError('disk error')
            return images[i], 0

    with pytest.raises(RuntimeError, match='disk error'):
        precompute_latents(Broken(), ae, path, batch_size=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ['c.safetensors']
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(before[: len(before) // 2])
    with pytest.raises(CacheError, match='truncated or corrupt'):
        LatentCache(bad)
    with pytest.raises(ValueError, match='in_chans=4, img_size=8'):
        LatentCache(path).check_model(uvit_tiny())


def test_cli_writes_a_cache_of_an_image_folder(vae_dir, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ('a', 'b'):
        (tmp_path / 'imgs' / cls).mkdir(parents=True)
        for k in range(2):
            img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
            img.save(tmp_path / 'imgs' / cls / f'{k}.png')
    cmd = [sys.executable, '-m', 'adadiff_nb.models.autoencoder', str(tmp_path / 'imgs'), '--vae', str(vae_dir),
           '--out', str(tmp_path / 'lat.safetensors'), '--img-size', '16', '--device', 'cpu']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (info['n'], info['latent_shape'], info['flip'], info['labels']) == (4, [4, 8, 8], True, True)
    assert LatentCache(tmp_path / 'lat.safetensors', flip=False).get_batch([0, 3])[1].tolist() == [0, 1]
    r = subprocess.run(cmd[:5] + [str(tmp_path / 'no_vae')] + cmd[6:], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and 'put config.json' in r.stderr
