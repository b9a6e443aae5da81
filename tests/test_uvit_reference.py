"""U-ViT against an independent functional reference written from the official release's
parameter names and shapes (`libs/uvit.py` of U-ViT): a state dict laid out exactly like an
official checkpoint is saved as a .pth, loaded strictly through the project's loader, and the
forward output is compared with a plain-tensor implementation of the same network. The same holds for the
latent ImageNet-256 models (L/2, H/2: 4 latent channels, 1001 labels, H/2 without the final conv) and the
text-to-image model of `libs/uvit_t2i.py` (a linear `context_embed` of the CLIP context, its 77 tokens after the
time token); EarlyExitUViT wraps the text-to-image backbone (its context tokens are extras the exit heads drop)."""
import math
import torch
import torch.nn.functional as F
import pytest

from adadiff_nb.models.checkpoint import load_official_uvit, CheckpointError
from adadiff_nb.exits.early_exit import EarlyExitUViT, create_early_exit
from adadiff_nb.models.uvit import create_uvit, count_params


def official_shapes(img=32, p=2, C=3, D=512, depth=12, mlp=4, num_classes=-1, qkv_bias=False, conv=True,
                    clip_dim=None, n_ctx=77):
    "Key -> shape of an official U-ViT (`uvit.py`) or, with clip_dim, `uvit_t2i.py` state dict, written out by hand."
    L = (img // p) ** 2
    extras = 1 + (num_classes > 0) + (n_ctx if clip_dim else 0)
    H = int(D * mlp)
    s = {'pos_embed': (1, extras + L, D), 'patch_embed.proj.weight': (D, C, p, p), 'patch_embed.proj.bias': (D,)}
    if num_classes > 0:
        s['label_emb.weight'] = (num_classes, D)
    if clip_dim:
        s.update({'context_embed.weight': (D, clip_dim), 'context_embed.bias': (D,)})

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


def reference_forward(sd, x, t, p, heads, depth, y=None, context=None, conv=True):
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
    if context is not None:                                                                   # t2i: time, context
        parts = [temb, context @ sd['context_embed.weight'].T + sd['context_embed.bias'], tok]
    h = torch.cat(parts, 1) + sd['pos_embed']
    extras = h.shape[1] - tok.shape[1]

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
    return F.conv2d(img, sd['final_layer.weight'], sd['final_layer.bias'], padding=1) if conv else img


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



# the official configs: configs/imagenet256_uvit_large.py, imagenet256_uvit_huge.py, mscoco_uvit_small.py (+ depth 16)
LATENT = dict(img=32, p=2, C=4, mlp=4, num_classes=1001)
OFFICIAL = {'uvit_l2_imagenet256': dict(LATENT, D=1024, depth=20),
            'uvit_h2_imagenet256': dict(LATENT, D=1152, depth=28, conv=False),
            'uvit_s2_mscoco': dict(img=32, p=2, C=4, D=512, depth=12, mlp=4, clip_dim=768),
            'uvit_s2_deep_mscoco': dict(img=32, p=2, C=4, D=512, depth=16, mlp=4, clip_dim=768)}


@pytest.mark.parametrize('preset', sorted(OFFICIAL))
def test_latent_and_t2i_presets_have_the_official_layout(preset):
    with torch.device('meta'):
        sd = create_uvit(preset).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes(**OFFICIAL[preset])


def test_h2_imagenet256_layout_loads_strictly_and_matches_reference(tmp_path):
    "H/2's settings (4 channels, 1001 labels with the null class 1000, no final conv) at a reduced width and depth."
    small = dict(D=64, depth=4)
    sd = random_state(official_shapes(**{**OFFICIAL['uvit_h2_imagenet256'], **small}), seed=2)
    torch.save({'nnet': sd}, tmp_path / 'imagenet256_uvit_huge.pth')
    model = load_official_uvit(tmp_path / 'imagenet256_uvit_huge.pth', 'uvit_h2_imagenet256', embed_dim=64, depth=4,
                               num_heads=4)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([1.0, 640.0]), torch.tensor([7, 1000])
    with torch.no_grad():
        ref = reference_forward(sd, x, t, p=2, heads=4, depth=4, y=y, conv=False)
        assert (model(x, t, y) - ref).abs().max() < 1e-5
        assert torch.equal(model(x, t), model(x, t, y.new_full((2,), 1000)))    # y=None: the null class 1000


def t2i_model_and_state(tmp_path, seed=3):
    "A `uvit_s2_mscoco` at reduced width/depth (CLIP width 768, 77 tokens kept) loaded from an official layout."
    sd = random_state(official_shapes(**{**OFFICIAL['uvit_s2_mscoco'], 'D': 64, 'depth': 2}), seed=seed)
    torch.save(sd, tmp_path / 'mscoco_uvit_small.pth')
    model = load_official_uvit(tmp_path / 'mscoco_uvit_small.pth', 'uvit_s2_mscoco', embed_dim=64, depth=2,
                               num_heads=4)
    return model, sd


def test_t2i_layout_loads_strictly_and_matches_reference(tmp_path):
    model, sd = t2i_model_and_state(tmp_path)
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([0.0, 999.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        ref = reference_forward(sd, x, t, p=2, heads=4, depth=2, context=ctx)
        assert (model(x, t, ctx) - ref).abs().max() < 1e-5
        assert (model(x, t, ctx.half()) - ref).abs().max() < 1e-2                 # a float16 cached context is cast
    with pytest.raises(ValueError, match='needs a context y'):
        model(x, t)
    with pytest.raises(ValueError, match='class labels'):
        model(x, t, torch.tensor([1, 2]))


def test_t2i_early_exit_threshold_zero_is_the_backbone_and_exits_run(tmp_path):
    bb, _ = t2i_model_and_state(tmp_path)
    ee = EarlyExitUViT.from_backbone(bb).eval()
    assert ee.exit_heads[0].extras == 78 and ee.backbone.config == bb.config
    x, t, ctx = torch.randn(3, 4, 32, 32), torch.tensor([5.0, 500.0, 900.0]), torch.randn(3, 77, 768)
    with torch.no_grad():
        full = bb(x, t, ctx)
        out0 = ee(x, t, ctx, threshold=0.0)
        assert torch.equal(out0.sample, full) and out0.exit_layer.tolist() == [bb.num_layers] * 3
        out1 = ee(x, t, ctx, threshold=1.0)                      # every row leaves at exit 0, before any block
        assert out1.exit_layer.tolist() == [0, 0, 0] and (out1.layers_run, out0.layers_run) == (0, 9)
        h, _ = bb.embed(x, t, ctx)                                # exit 0's head starts as a copy of the backbone's
        assert torch.allclose(out1.sample, bb.decode(h), atol=1e-6)
        static = ee(x, t, ctx, exit_layers=torch.tensor([1, 2, 0]))
        assert static.exit_layer.tolist() == [1, 2, 0]
        train = ee.forward_train(x, t, ctx)
    assert train['exits'].shape == (bb.num_layers, 3, 4, 32, 32) and train['u'].shape == (bb.num_layers, 3)
    tiny = create_early_exit('adadiff_tiny', in_chans=4, clip_dim=16, num_clip_token=5).eval()   # a preset, t2i
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(tiny(x, t, ctx, threshold=0.0).sample, tiny.backbone(x, t, ctx))
    with pytest.raises(ValueError, match='needs a context y'):
        tiny(x, t)
