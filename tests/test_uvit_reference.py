"""U-ViT against an independent functional reference written from the official release's
parameter names and shapes (`libs/uvit.py` of U-ViT): a state dict laid out exactly like an
official checkpoint is saved as a .pth, loaded strictly through the project's loader, and the
forward output is compared with a plain-tensor implementation of the same network."""
import math
import torch
import torch.nn.functional as F
import pytest

from adadiff_nb.checkpoint import load_official_uvit, CheckpointError
from adadiff_nb.uvit import create_uvit, count_params


def official_shapes(img=32, p=2, C=3, D=512, depth=12, mlp=4, num_classes=-1, qkv_bias=False, conv=True):
    "Key -> shape of an official U-ViT state dict (mlp_time_embed=False), written out by hand."
    L = (img // p) ** 2
    extras = 2 if num_classes > 0 else 1
    H = int(D * mlp)
    s = {'pos_embed': (1, extras + L, D), 'patch_embed.proj.weight': (D, C, p, p), 'patch_embed.proj.bias': (D,)}
    if num_classes > 0:
        s['label_emb.weight'] = (num_classes, D)

    def block(pre, skip=False):
        b = {f'{pre}.norm1.weight': (D,), f'{pre}.norm1.bias': (D,), f'{pre}.attn.qkv.weight': (3 * D, D),
             f'{pre}.attn.proj.weight': (D, D), f'{pre}.attn.proj.bias': (D,), f'{pre}.norm2.weight': (D,),
             f'{pre}.norm2.bias': (D,), f'{pre}.mlp.fc1.weight': (H, D), f'{pre}.mlp.fc1.bias': (H,),
             f'{pre}.mlp.fc2.weight': (D, H), f'{pre}.mlp.fc2.bias': (D,)}
        if qkv_bias:
            b[f'{pre}.attn.qkv.bias'] = (3 * D,)
        if skip:
            b.update({f'{pre}.skip_linear.weight': (D, 2 * D), f'{pre}.skip_linear.bias': (D,)})
        return b

    for i in range(depth // 2):
        s.update(block(f'in_blocks.{i}'))
    s.update(block('mid_block'))
    for i in range(depth // 2):
        s.update(block(f'out_blocks.{i}', skip=True))
    s.update({'norm.weight': (D,), 'norm.bias': (D,), 'decoder_pred.weight': (p * p * C, D),
              'decoder_pred.bias': (p * p * C,)})
    if conv:
        s.update({'final_layer.weight': (C, C, 3, 3), 'final_layer.bias': (C,)})
    return s


def random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    is_norm_weight = lambda k: k.endswith('norm1.weight') or k.endswith('norm2.weight') or k == 'norm.weight'
    return {k: torch.randn(v, generator=g) * (0.05 if len(v) > 1 else 0.2) + (1.0 if is_norm_weight(k) else 0.0)
            for k, v in shapes.items()}


def reference_forward(sd, x, t, p, heads, depth, y=None):
    "The U-ViT forward, written with plain tensor ops from the paper's description."
    B, C, Hh, W = x.shape
    D = sd['pos_embed'].shape[-1]
    tok = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=p)  # (B, D, h, w)
    tok = tok.reshape(B, D, -1).permute(0, 2, 1)                                              # (B, L, D)
    half = D // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    ang = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(ang), torch.sin(ang)], -1)[:, None]                          # (B, 1, D)
    parts = [temb, tok]
    if y is not None:
        parts = [sd['label_emb.weight'][y][:, None], temb, tok]
    h = torch.cat(parts, 1) + sd['pos_embed']
    extras = len(parts) - 1

    def ln(z, pre):
        return F.layer_norm(z, (D,), sd[pre + '.weight'], sd[pre + '.bias'], eps=1e-5)

    def block(z, pre, skip=None):
        if skip is not None:
            z = torch.cat([z, skip], -1) @ sd[pre + '.skip_linear.weight'].T + sd[pre + '.skip_linear.bias']
        a = ln(z, pre + '.norm1') @ sd[pre + '.attn.qkv.weight'].T
        if pre + '.attn.qkv.bias' in sd:
            a = a + sd[pre + '.attn.qkv.bias']
        N = z.shape[1]
        q, k, v = a.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v            # (B, h, N, d)
        z = z + att.transpose(1, 2).reshape(B, N, D) @ sd[pre + '.attn.proj.weight'].T + sd[pre + '.attn.proj.bias']
        m = F.gelu(ln(z, pre + '.norm2') @ sd[pre + '.mlp.fc1.weight'].T + sd[pre + '.mlp.fc1.bias'])
        return z + m @ sd[pre + '.mlp.fc2.weight'].T + sd[pre + '.mlp.fc2.bias']

    skips = []
    for i in range(depth // 2):
        h = block(h, f'in_blocks.{i}')
        skips.append(h)
    h = block(h, 'mid_block')
    for i in range(depth // 2):
        h = block(h, f'out_blocks.{i}', skips.pop())
    h = ln(h, 'norm') @ sd['decoder_pred.weight'].T + sd['decoder_pred.bias']
    h = h[:, extras:]                                                                         # (B, L, p*p*C)
    g = Hh // p
    img = h.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hh, W)
    return F.conv2d(img, sd['final_layer.weight'], sd['final_layer.bias'], padding=1)


def test_uvit_s2_cifar10_param_count():
    with torch.device('meta'):
        n = count_params(create_uvit('uvit_s2_cifar10'))
    assert abs(n / 44.2e6 - 1) < 0.005
    assert n == sum(math.prod(s) for s in official_shapes().values())


def test_official_layout_loads_strictly_and_matches_reference(tmp_path):
    torch.manual_seed(0)
    sd = random_state(official_shapes())
    path = tmp_path / 'cifar10_uvit_small.pth'
    torch.save(sd, path)
    model = load_official_uvit(path, 'uvit_s2_cifar10')
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3.0, 811.5])
    with torch.no_grad():
        ours = model(x, t)
        ref = reference_forward(sd, x, t, p=2, heads=8, depth=12)
    assert (ours - ref).abs().max().item() < 1e-5


def test_class_conditional_small_layout_matches_reference(tmp_path):
    shapes = official_shapes(img=8, p=2, D=32, depth=4, mlp=2, num_classes=5, qkv_bias=True)
    sd = random_state(shapes, seed=1)
    torch.save({'state_dict': sd}, tmp_path / 'c.pth')
    model = load_official_uvit(tmp_path / 'c.pth', 'uvit_tiny', num_classes=5, qkv_bias=True)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert (model(x, t, y) - reference_forward(sd, x, t, p=2, heads=2, depth=4, y=y)).abs().max() < 1e-5


def test_mismatched_official_checkpoint_names_the_problem(tmp_path):
    sd = random_state(official_shapes(img=8, p=2, D=32, depth=4, mlp=2))
    sd.pop('mid_block.norm1.weight')
    sd['decoder_pred.weight'] = torch.zeros(5, 32)
    torch.save(sd, tmp_path / 'm.pth')
    with pytest.raises(CheckpointError) as e:
        load_official_uvit(tmp_path / 'm.pth', 'uvit_tiny')
    msg = str(e.value)
    assert 'mid_block.norm1.weight' in msg and 'decoder_pred.weight' in msg and 'shape' in msg
