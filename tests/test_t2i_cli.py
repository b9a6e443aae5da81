"adadiff-sample on a tiny text-to-image early-exit U-ViT: prompts, guidance with the empty prompt, decoding, errors."
import json

import numpy as np
import pytest
import torch

from adadiff_nb.models.autoencoder import TINY_VAE_CONFIG, LatentAutoencoder, load_latent_record, save_latent_record
from adadiff_nb.models.checkpoint import save_model
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.apps.sample_cli import main, sample_to_dir
from adadiff_nb.sampling.run import images_uint8, sample_batches
from adadiff_nb.models.text_encoder import TextEncoder, write_tiny_clip

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def t2i(tmp_path_factory):
    "Paths and objects of a tiny t2i checkpoint (CLIP width 16, 8 tokens) with its VAE and text encoder."
    root = tmp_path_factory.mktemp('t2i')
    torch.manual_seed(0)
    LatentAutoencoder.from_config(TINY_VAE_CONFIG).vae.save_pretrained(str(root / 'vae'))
    ae = LatentAutoencoder.from_pretrained(root / 'vae')
    write_tiny_clip(root / 'clip', width=16)
    te = TextEncoder.from_pretrained(root / 'clip', max_length=8)
    model = create_early_exit('adadiff_tiny', in_chans=4, clip_dim=16, num_clip_token=8).eval()
    save_model(model, root / 'ckpt')
    save_latent_record(root / 'ckpt', ae, te, vae_path=root / 'vae', text_encoder_path=root / 'clip')
    return dict(root=root, ckpt=root / 'ckpt', vae=root / 'vae', clip=root / 'clip', model=model, ae=ae, te=te)


def _args(d, out, *extra):
    return ['--checkpoint', str(d['ckpt']), '--vae', str(d['vae']), '--text-encoder', str(d['clip']), '--out',
            str(out), '--sampler', 'ddim', '--steps', '2', '--quiet', *extra]


def test_cli_runs_with_prompts(t2i, tmp_path, capsys):
    out = tmp_path / 'o'
    rc = main(_args(t2i, out, '--prompt', 'a cat', '--prompt', 'the cat', '--n', '3', '--batch', '2',
                    '--threshold', '0.3', '--guidance-scale', '2'))
    assert rc == 0, capsys.readouterr().err
    assert 'decoded in' in capsys.readouterr().out
    z, st = np.load(out / 'samples.npz'), json.loads((out / 'stats.json').read_text())
    assert z['images'].shape == (3, 16, 16, 3) and list(z['prompts']) == ['a cat', 'the cat', 'a cat']
    assert st['prompts'] == ['a cat', 'the cat'] and st['text_context'] == [8, 16] and st['guided']
    assert st['decode_seconds'] > 0 and st['guidance_policy'] == 'joint'
    te, ae = t2i['te'], t2i['ae']                                                    # the same run by hand
    run = sample_batches(t2i['model'], 'ddim', 2, n=3, batch_size=2, context=te.encode(['a cat', 'the cat', 'a cat']),
                         uncond_context=te.empty_context, guidance_scale=2., threshold=0.3)
    np.testing.assert_array_equal(z['images'], images_uint8(ae.decode(run.images)))


def test_prompts_file_and_threshold_zero(t2i, tmp_path):
    f = tmp_path / 'p.json'
    f.write_text(json.dumps(['a cat', ['the cat', 'another caption']]))
    st = sample_to_dir(t2i['ckpt'], tmp_path / 'o', sampler='ddim', steps=2, n=2, batch=2, threshold=0.,
                       guidance_scale=3., prompts_file=f, vae=t2i['vae'], text_encoder=t2i['clip'],
                       compare_full=True, progress=False)
    assert st['max_abs_diff_vs_full'] == 0. and st['prompts'] == ['a cat', 'the cat']


def test_bad_input(t2i, tmp_path, capsys):
    base = ['--checkpoint', str(t2i['ckpt']), '--out', str(tmp_path), '--n', '1', '--steps', '1', '--quiet']
    vae = ['--vae', str(t2i['vae'])]
    for extra, msg in ((['--prompt', 'a'], '--vae DIR'), (vae + ['--prompt', 'a'], '--text-encoder DIR'),
                       (['--vae', str(t2i['vae']), '--text-encoder', str(t2i['clip'])], '--prompt TEXT'),
                       (['--vae', str(t2i['vae']), '--text-encoder', str(t2i['clip']), '--class', '1'],
                        'holds a text-to-image model'),
                       (['--vae', str(t2i['vae']), '--text-encoder', str(tmp_path), '--prompt', 'a'], 'vocab.json')):
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra


def test_compile_sizes_buckets_for_guided_rows(t2i, tmp_path, monkeypatch):
    model = create_early_exit('adadiff_tiny', in_chans=4, clip_dim=16, num_clip_token=8).eval()
    model.latent_record = load_latent_record(t2i['ckpt'])
    seen = []
    monkeypatch.setattr(model, 'compile_exits', lambda **kw: seen.append(kw) or model, raising=False)
    sample_to_dir(model, tmp_path, sampler='ddim', steps=1, n=2, batch=2, guidance_scale=2., prompts='a cat',
                  vae=t2i['ae'], text_encoder=t2i['te'], compile=True, progress=False)
    assert seen == [dict(max_batch=4)]
