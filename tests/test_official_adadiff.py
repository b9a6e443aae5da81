"""`load_official_adadiff` against an independent functional reference of the official AdaDiff forward
(`libs/uvit.py` of the AdaDiff release, with its `thres` argument): a state dict laid out like an official
checkpoint (U-ViT backbone + `lte_classifer.{j}.lte`) is saved as a .pth, loaded strictly, and the project
model's outputs and exit layers are compared with a plain-tensor forward that applies the official exit rule
(certainty = sigmoid of a linear map of the detached patch tokens, mean over the whole batch > thres,
in-block exits only on a second hit, mid/out blocks on the first)."""
import math
import pytest
import torch
import torch.nn.functional as F

from adadiff_nb.models.checkpoint import CheckpointError, load_model, register_arch, save_model
from adadiff_nb.models.official_adadiff import (OfficialAdaDiffUViT, load_official_adadiff, official_state_dict,
                                         official_threshold)

TINY = dict(img=8, p=2, C=3, D=32, depth=4, heads=2, mlp=2)


def block_names(depth):
    "The official block prefixes in execution order."
    half = range(depth // 2)
    return [f'in_blocks.{i}' for i in half] + ['mid_block'] + [f'out_blocks.{i}' for i in half]


def official_shapes(img, p, C, D, depth, mlp, heads=None, num_classes=-1):
    "Key -> shape of an official AdaDiff U-ViT state dict (no time MLP, no qkv bias), written out by hand."
    N, H, pd = (img // p) ** 2, D * mlp, p * p * C
    s = {'pos_embed': (1, (2 if num_classes > 0 else 1) + N, D), 'patch_embed.proj.weight': (D, C, p, p),
         'patch_embed.proj.bias': (D,), 'norm.weight': (D,), 'norm.bias': (D,), 'decoder_pred.weight': (pd, D),
         'decoder_pred.bias': (pd,), 'final_layer.weight': (C, C, 3, 3), 'final_layer.bias': (C,)}
    if num_classes > 0:
        s['label_emb.weight'] = (num_classes, D)
    names = block_names(depth)
    for k, pre in enumerate(names):
        for n, shape in (('norm1.weight', (D,)), ('norm1.bias', (D,)), ('attn.qkv.weight', (3 * D, D)),
                         ('attn.proj.weight', (D, D)), ('attn.proj.bias', (D,)), ('norm2.weight', (D,)),
                         ('norm2.bias', (D,)), ('mlp.fc1.weight', (H, D)), ('mlp.fc1.bias', (H,)),
                         ('mlp.fc2.weight', (D, H)), ('mlp.fc2.bias', (D,))):
            s[f'{pre}.{n}'] = shape
        if pre.startswith('out'):
            s[f'{pre}.skip_linear.weight'], s[f'{pre}.skip_linear.bias'] = (D, 2 * D), (D,)
    for j in range(depth + 1):
        s[f'lte_classifer.{j}.lte.weight'], s[f'lte_classifer.{j}.lte.bias'] = (pd, D), (pd,)
    return s


def random_state(shapes, seed=0, lte_std=0.4):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in shapes.items():
        std = lte_std if k.startswith('lte_') else (0.05 if len(v) > 1 else 0.2)
        sd[k] = torch.randn(v, generator=g) * std + (1.0 if k.endswith(('norm1.weight', 'norm2.weight')) or
                                                      k == 'norm.weight' else 0.0)
    return sd


def reference_forward(sd, x, t, thres, p, heads, depth, y=None):
    """The official AdaDiff forward in plain tensor ops -> (output, blocks run, batch-mean certainty per block).
    The means are those of the blocks evaluated (all of them when nothing exits)."""
    B, C, S, _ = x.shape
    D = sd['pos_embed'].shape[-1]
    tok = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=p).flatten(2).transpose(1, 2)
    half = D // 2
    ang = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)[None]
    parts = [torch.cat([torch.cos(ang), torch.sin(ang)], -1)[:, None], tok]
    if y is not None:
        parts = [sd['label_emb.weight'][y][:, None]] + parts
    h = torch.cat(parts, 1) + sd['pos_embed']
    extras, g = len(parts) - 1, S // p

    def ln(z, pre):
        return F.layer_norm(z, (D,), sd[pre + '.weight'], sd[pre + '.bias'], eps=1e-5)

    def block(z, pre, skip=None):
        if skip is not None:
            z = torch.cat([z, skip], -1) @ sd[pre + '.skip_linear.weight'].T + sd[pre + '.skip_linear.bias']
        n = z.shape[1]
        qkv = ln(z, pre + '.norm1') @ sd[pre + '.attn.qkv.weight'].T
        q, k, v = qkv.reshape(B, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), -1) @ v
        z = z + a.transpose(1, 2).reshape(B, n, D) @ sd[pre + '.attn.proj.weight'].T + sd[pre + '.attn.proj.bias']
        m = F.gelu(ln(z, pre + '.norm2') @ sd[pre + '.mlp.fc1.weight'].T + sd[pre + '.mlp.fc1.bias'])
        return z + m @ sd[pre + '.mlp.fc2.weight'].T + sd[pre + '.mlp.fc2.bias']

    def to_image(z):                                               # (B, N, p*p*C) -> (B, C, S, S)
        return z.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, S, S)

    def head(z):
        z = (ln(z, 'norm') @ sd['decoder_pred.weight'].T + sd['decoder_pred.bias'])[:, extras:]
        return F.conv2d(to_image(z), sd['final_layer.weight'], sd['final_layer.bias'], padding=1)

    def certainty(z, j):                                           # mean over the whole batch
        c = torch.sigmoid(z[:, extras:].detach() @ sd[f'lte_classifer.{j}.lte.weight'].T
                          + sd[f'lte_classifer.{j}.lte.bias'])
        return float(c.mean())

    names = block_names(depth)
    skips, armed, means = [], False, []
    for j, pre in enumerate(names):
        is_in = pre.startswith('in_')
        h = block(h, pre, skips.pop() if pre.startswith('out') else None)
        if is_in:
            skips.append(h)
        means.append(certainty(h, j))
        if means[-1] > thres:
            if not is_in or armed:
                return head(h), j + 1, means
            armed = True
    return head(h), len(names), means


def _thresholds(means):
    "1.0 (never exit), the midpoints between the sorted per-block means, and one below all of them."
    m = sorted(means[:-1])                                         # the last block's estimator decides nothing
    assert min(b - a for a, b in zip(m, m[1:])) > 1e-4             # no decision within float noise
    return [1.0] + [(a + b) / 2 for a, b in zip(m, m[1:])] + [m[0] - 0.01]


def _save(tmp_path, sd, name='nnet_ema.pth'):
    torch.save(sd, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize('B', [1, 4])
def test_outputs_and_exits_match_official_rule(tmp_path, B):
    shapes = official_shapes(**TINY)
    seen = set()
    for seed in range(4):
        sd = random_state(shapes, seed=seed)
        model = load_official_adadiff(_save(tmp_path, sd), 'uvit_tiny')
        g = torch.Generator().manual_seed(100 + seed)
        x, t = torch.randn(B, 3, 8, 8, generator=g), torch.rand(B, generator=g) * 999
        _, _, means = reference_forward(sd, x, t, 1.0, p=2, heads=2, depth=4)
        for thres in _thresholds(means):
            ref, blocks, _ = reference_forward(sd, x, t, thres, p=2, heads=2, depth=4)
            with torch.no_grad():
                out = model(x, t, threshold=official_threshold(thres))
            assert out.exit_layer.tolist() == [blocks] * B, (seed, thres)
            assert (out.sample - ref).abs().max().item() < 1e-5
            assert out.layers_run == B * blocks
            seen.add(blocks)
    assert seen >= {2, 3, 4, 5}, seen                              # every reachable exit was taken somewhere


def test_sample_decision_is_the_official_rule_per_image(tmp_path):
    sd = random_state(official_shapes(**TINY), seed=7)
    model = load_official_adadiff(_save(tmp_path, sd), 'uvit_tiny', decision='sample')
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(6, 3, 8, 8, generator=g), torch.rand(6, generator=g) * 999
    means = [m for b in range(6)
             for m in reference_forward(sd, x[b:b + 1], t[b:b + 1], 1.0, p=2, heads=2, depth=4)[2][:-1]]
    exits = set()
    for thres in _thresholds(means)[::3]:
        with torch.no_grad():
            out = model(x, t, threshold=official_threshold(thres))
        for b in range(6):
            ref, blocks, _ = reference_forward(sd, x[b:b + 1], t[b:b + 1], thres, p=2, heads=2, depth=4)
            assert int(out.exit_layer[b]) == blocks
            assert (out.sample[b:b + 1] - ref).abs().max().item() < 1e-5
        exits.add(len(set(out.exit_layer.tolist())))
    assert max(exits) >= 2                                         # rows of one batch left at different exits


def test_class_conditional_layout(tmp_path):
    sd = random_state(official_shapes(**TINY, num_classes=5), seed=2)
    model = load_official_adadiff(_save(tmp_path, sd), 'uvit_tiny', num_classes=5)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1.0, 500.0, 990.0]), torch.tensor([0, 4, 2])
    _, _, means = reference_forward(sd, x, t, 1.0, p=2, heads=2, depth=4, y=y)
    for thres in _thresholds(means):
        ref, blocks, _ = reference_forward(sd, x, t, thres, p=2, heads=2, depth=4, y=y)
        with torch.no_grad():
            out = model(x, t, y, threshold=official_threshold(thres))
        assert out.exit_layer.tolist() == [blocks] * 3
        assert (out.sample - ref).abs().max().item() < 1e-5


def test_state_dict_round_trip_and_save_load(tmp_path):
    sd = random_state(official_shapes(**TINY), seed=4)
    model = load_official_adadiff(_save(tmp_path, sd), 'uvit_tiny')
    back = official_state_dict(model)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    register_arch('adadiff_official', OfficialAdaDiffUViT)       # the class of the arch table's entry
    save_model(model, tmp_path / 'm')
    m2 = load_model(tmp_path / 'm')
    assert type(m2) is OfficialAdaDiffUViT and m2.config == model.config
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 700.0])
    with torch.no_grad():
        a, b = model(x, t, threshold=0.45), m2(x, t, threshold=0.45)
    assert torch.equal(a.exit_layer, b.exit_layer) and torch.allclose(a.sample, b.sample, atol=1e-6)


def test_strict_load_names_preset_and_keys(tmp_path):
    sd = random_state(official_shapes(**TINY))
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load_official_adadiff(path, 'uvit_cpu16')
    msg = str(e.value)
    assert "preset 'uvit_cpu16'" in msg and 'backbone.pos_embed: checkpoint (1, 17, 32) vs model (1, 65, 128)' in msg
    plain = {k: v for k, v in sd.items() if not k.startswith('lte_')}
    with pytest.raises(CheckpointError) as e:
        load_official_adadiff(_save(tmp_path, plain, 'plain.pth'), 'uvit_tiny')
    assert 'missing keys (10)' in str(e.value) and 'load_official_uvit' in str(e.value)
    extra = dict(sd, **{'lte_classifer.9.lte.bias': torch.zeros(12)})
    with pytest.raises(CheckpointError, match='unexpected keys'):
        load_official_adadiff(_save(tmp_path, extra, 'extra.pth'), 'uvit_tiny')


def test_threshold_conversion_is_exact_for_official_range():
    g = torch.Generator().manual_seed(0)
    diffs = 0
    drawn = (torch.rand(300, generator=g, dtype=torch.float64) / 2 + .5).tolist()
    for thres in [0.5, 0.87, 0.9, 0.92, 0.95, 1.0] + drawn:
        t32 = torch.tensor(thres, dtype=torch.float32)
        m = torch.cat([torch.rand(5000, generator=g), t32[None], t32.nextafter(torch.tensor(0.))[None],
                       t32.nextafter(torch.tensor(2.))[None]])
        tau = torch.tensor(official_threshold(thres), dtype=torch.float32)
        diffs += int(((m > thres) != ((1 - m) < tau)).sum())
    assert diffs == 0
    with pytest.raises(ValueError, match='must be a number in'):
        official_threshold(0.0)
