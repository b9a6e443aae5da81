"""DiT against an independent functional reference written from the official release's parameter names and
shapes (`models.py` of facebookresearch/DiT): a state dict laid out like an official checkpoint is saved as a .pt,
loaded strictly through `load_official_dit`, and the forward output is compared with a plain-tensor
implementation of the same network (adaLN-Zero blocks, final adaLN layer, unpatchify)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adadiff_nb.models.checkpoint import CheckpointError
from adadiff_nb.models.dit import DIT_PRESETS, create_dit, load_official_dit
from adadiff_nb.models.uvit import count_params

FREQ = 256  # sinusoid width of the official TimestepEmbedder


def official_shapes(img=32, p=2, C=4, D=1152, depth=28, mlp=4, num_classes=1000, dropout=0.1, learn_sigma=True):
    "Key -> shape of an official DiT state dict, written out by hand."
    L, H, out = (img // p) ** 2, int(D * mlp), (2 * C if learn_sigma else C)
    s = {'pos_embed': (1, L, D), 'x_embedder.proj.weight': (D, C, p, p), 'x_embedder.proj.bias': (D,),
         't_embedder.mlp.0.weight': (D, FREQ), 't_embedder.mlp.0.bias': (D,),
         't_embedder.mlp.2.weight': (D, D), 't_embedder.mlp.2.bias': (D,),
         'y_embedder.embedding_table.weight': (num_classes + (dropout > 0), D)}
    for i in range(depth):
        b = f'blocks.{i}'
        s.update({f'{b}.attn.qkv.weight': (3 * D, D), f'{b}.attn.qkv.bias': (3 * D,),
                  f'{b}.attn.proj.weight': (D, D), f'{b}.attn.proj.bias': (D,),
                  f'{b}.mlp.fc1.weight': (H, D), f'{b}.mlp.fc1.bias': (H,),
                  f'{b}.mlp.fc2.weight': (D, H), f'{b}.mlp.fc2.bias': (D,),
                  f'{b}.adaLN_modulation.1.weight': (6 * D, D), f'{b}.adaLN_modulation.1.bias': (6 * D,)})
    s.update({'final_layer.linear.weight': (p * p * out, D), 'final_layer.linear.bias': (p * p * out,),
              'final_layer.adaLN_modulation.1.weight': (2 * D, D), 'final_layer.adaLN_modulation.1.bias': (2 * D,)})
    return s


def sincos_reference(D, g):
    "MAE/DiT 2-D sin-cos table in numpy: first half encodes the column, second half the row."
    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        a = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)
    cols, rows = np.meshgrid(np.arange(g), np.arange(g))   # cols[i, j] = j, rows[i, j] = i
    return torch.from_numpy(np.concatenate([one(D // 2, cols), one(D // 2, rows)], axis=1)).float()


def random_state(shapes, seed=0):
    "Random weights for every key (the adaLN modulations nonzero, so shift/scale/gate all matter)."
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v, generator=g) * (0.1 if len(v) > 1 else 0.2) for k, v in shapes.items()}
    L, D = shapes['pos_embed'][1:]
    sd['pos_embed'] = sincos_reference(D, int(round(L ** 0.5)))[None]
    return sd


def reference_forward(sd, x, t, y, p, heads):
    "The DiT forward with plain tensor ops, following the paper's adaLN-Zero description."
    B, C, S, _ = x.shape
    D = sd['pos_embed'].shape[-1]
    depth = sum(1 for k in sd if k.endswith('.attn.qkv.weight'))
    lin = lambda z, pre: z @ sd[pre + '.weight'].T + sd[pre + '.bias']
    h = F.conv2d(x, sd['x_embedder.proj.weight'], sd['x_embedder.proj.bias'], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd['pos_embed']                                     # (B, L, D)
    half = FREQ // 2
    ang = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]
    tf = torch.cat([ang.cos(), ang.sin()], -1)
    c = lin(F.silu(lin(tf, 't_embedder.mlp.0')), 't_embedder.mlp.2') + sd['y_embedder.embedding_table.weight'][y]
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    mod = lambda z, shift, scale: z * (1 + scale[:, None]) + shift[:, None]
    N, hd = h.shape[1], D // heads
    for i in range(depth):
        b = f'blocks.{i}'
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + '.adaLN_modulation.1').chunk(6, dim=1)
        q, k, v = lin(mod(ln(h), sh1, sc1), b + '.attn.qkv').reshape(B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v                # (B, heads, N, hd)
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, N, D), b + '.attn.proj')
        m = F.gelu(lin(mod(ln(h), sh2, sc2), b + '.mlp.fc1'), approximate='tanh')
        h = h + g2[:, None] * lin(m, b + '.mlp.fc2')
    shift, scale = lin(F.silu(c), 'final_layer.adaLN_modulation.1').chunk(2, dim=1)
    h = lin(mod(ln(h), shift, scale), 'final_layer.linear')                                # (B, L, p*p*out)
    out, g = h.shape[-1] // (p * p), S // p
    return h.reshape(B, g, g, p, p, out).permute(0, 5, 1, 3, 2, 4).reshape(B, out, S, S)


def test_dit_xl2_param_count():
    with torch.device('meta'):
        n = count_params(create_dit('DiT-XL/2', input_size=32))
    assert n == sum(math.prod(s) for s in official_shapes().values()) == 675_129_632
    assert abs(n / 675e6 - 1) < 0.001                                     # the paper's "675M"


@pytest.mark.parametrize('name', ['DiT-L/4', 'DiT-B/8', 'DiT-S/2'])
def test_presets_have_the_official_layout(name):
    size, p = name[4:].split('/')
    D, depth = {'L': (1024, 24), 'B': (768, 12), 'S': (384, 12)}[size]
    with torch.device('meta'):
        sd = DIT_PRESETS[name](input_size=32).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(p=int(p), D=D, depth=depth)


def test_pos_embed_is_the_fixed_sincos_table():
    m = create_dit('DiT-S/4', input_size=16, depth=1, in_channels=3)
    assert not m.pos_embed.requires_grad
    assert (m.pos_embed[0] - sincos_reference(384, 4)).abs().max() < 1e-6


@pytest.mark.parametrize('learn_sigma', [True, False])
def test_official_layout_loads_strictly_and_matches_reference(tmp_path, learn_sigma):
    cfg = dict(img=16, p=2, C=4, D=64, depth=3, mlp=4, num_classes=7, learn_sigma=learn_sigma)
    sd = random_state(official_shapes(**cfg), seed=int(learn_sigma))
    torch.save(sd, tmp_path / 'DiT-tiny.pt')
    model = load_official_dit(tmp_path / 'DiT-tiny.pt', 'DiT-S/2', input_size=16, hidden_size=64, depth=3,
                              num_heads=4, num_classes=7, learn_sigma=learn_sigma)
    assert not model.training
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([0.0, 250.5, 999.0]), torch.tensor([0, 6, 7])  # 7: null class
    with torch.no_grad():
        ours, ref = model(x, t, y), reference_forward(sd, x, t, y, p=2, heads=4)
    assert ours.shape == (3, 8 if learn_sigma else 4, 16, 16)
    assert ref.abs().max() > 0.1                                          # the modulation is not trivial
    assert (ours - ref).abs().max().item() < 1e-5


def test_training_checkpoint_loads_its_ema_weights(tmp_path):
    shapes = official_shapes(img=8, p=4, C=3, D=32, depth=2, mlp=2, num_classes=5, dropout=0.0, learn_sigma=False)
    model_sd, ema_sd = random_state(shapes, seed=2), random_state(shapes, seed=3)
    torch.save({'model': model_sd, 'ema': ema_sd, 'opt': {}}, tmp_path / '0001000.pt')
    kw = dict(input_size=8, in_channels=3, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=5,
              class_dropout_prob=0.0, learn_sigma=False)
    model = load_official_dit(tmp_path / '0001000.pt', 'DiT-B/4', **kw)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([4, 1])
    with torch.no_grad():
        assert (model(x, t, y) - reference_forward(ema_sd, x, t, y, p=4, heads=2)).abs().max() < 1e-5


def test_checkpoint_of_another_preset_names_it(tmp_path):
    sd = random_state(official_shapes(img=8, p=2, C=4, D=32, depth=2, mlp=4, num_classes=5))
    sd.pop('blocks.1.attn.proj.bias')
    torch.save(sd, tmp_path / 'm.pt')
    with pytest.raises(CheckpointError) as e:
        load_official_dit(tmp_path / 'm.pt', 'DiT-S/4', input_size=8, hidden_size=32, depth=2, num_heads=2,
                          num_classes=5)
    msg = str(e.value)
    assert "preset 'DiT-S/4'" in msg and 'blocks.1.attn.proj.bias' in msg
    assert 'x_embedder.proj.weight: checkpoint (32, 4, 2, 2) vs model (32, 4, 4, 4)' in msg
