"""A new backbone family added in this one file, through the backbone registry only (`adadiff_nb.models.registry`):
a toy per-token MLP network with its own state object and exit head is registered with one `BackboneSpec`, then
sampled with early exits, trained for steps by `adadiff-train`'s loop, reloaded from its checkpoint and benchmarked,
without any change to another module. Tiny shapes (8x8 images, width 16), CPU."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from adadiff_nb.models.registry import BackboneSpec, register_backbone, unregister_backbone, family_of
from adadiff_nb.models.uvit import unpatchify
from adadiff_nb.models.checkpoint import load_model
from adadiff_nb.exits.early_exit import EarlyExitModel, create_early_exit
from adadiff_nb.evaluation.cost import layer_costs
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.training.config import load_train_config
from adadiff_nb.training.loop import train
from adadiff_nb.experiments.exit_bench import build_bench_model, bench_exit_group

pytestmark = pytest.mark.usefixtures('one_thread')               # tests/conftest.py


class ToyState:
    "The toy family's per-row state: its time conditioning, restricted to the running rows by `select`."
    def __init__(self, cond): self.cond = cond
    def select(self, idx): return ToyState(self.cond[idx])
    def copy(self): return ToyState(self.cond)


class ToyNet(nn.Module):
    "Patch tokens, `depth` residual MLP blocks conditioned on t, a linear head: the backbone protocol, nothing else."
    arch = 'toy'
    null_class, num_labels, extras = None, 0, 0

    def __init__(self, img_size=8, patch_size=2, in_chans=3, toy_width=16, depth=4):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, toy_width=toy_width,
                           depth=depth)
        self.img_size, self.patch_size, self.in_chans, self.embed_dim = img_size, patch_size, in_chans, toy_width
        self.patch_dim = patch_size ** 2 * in_chans
        self.patch = nn.Linear(self.patch_dim, toy_width)
        self.time = nn.Linear(1, toy_width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(toy_width), nn.Linear(toy_width, toy_width), nn.GELU())
                                    for _ in range(depth))
        self.head = nn.Linear(toy_width, self.patch_dim)

    @property
    def num_layers(self): return len(self.blocks)

    def check_input(self, x, timesteps, y=None):
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"x must be (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}")

    def embed(self, x, timesteps, y=None):
        self.check_input(x, timesteps, y)
        p = self.patch_size
        tok = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        t = torch.as_tensor(timesteps, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        return self.patch(tok), ToyState(self.time(t / 1000.))

    def run_block(self, i, h, state):
        return h + self.blocks[i](h + state.cond[:, None])

    def decode(self, h, state=None):
        return unpatchify(self.head(h), self.in_chans)

    def patch_tokens(self, h): return h                       # every token is an image patch (what the UEM reads)

    def forward(self, x, timesteps, y=None):
        h, state = self.embed(x, timesteps, y)
        for i in range(self.num_layers): h = self.run_block(i, h, state)
        return self.decode(h, state)


class ToyHead(nn.Module):
    "The toy family's exit head: its final linear head at an earlier block."
    needs_state = False
    def __init__(self, width, patch_dim, in_chans):
        super().__init__()
        self.in_chans, self.proj = in_chans, nn.Linear(width, patch_dim)
    @classmethod
    def for_backbone(cls, bb): return cls(bb.embed_dim, bb.patch_dim, bb.in_chans)
    def copy_from(self, bb): self.proj.load_state_dict(bb.head.state_dict())
    def reset_parameters(self): self.proj.reset_parameters()
    def forward(self, h, state=None): return unpatchify(self.proj(h), self.in_chans)


def toy_flops(config: dict) -> dict:
    "Per-image FLOPs of the toy net, with the keys of `uvit_flops`."
    P, D, pd = (config['img_size'] // config['patch_size']) ** 2, config['toy_width'], \
        config['patch_size'] ** 2 * config['in_chans']
    block = 2 * P * D * D
    return dict(embed=2 * P * pd * D + 2 * D, blocks=[block] * config['depth'], head=2 * P * D * pd,
                skip=[0] * config['depth'], block_parts=[dict(mlp=block)] * config['depth'], exit_head=2 * P * D * pd)


def create_toy(name: str, **kw) -> ToyNet:
    return ToyNet(**{**TOY_PRESETS[name], **kw})


TOY_PRESETS = {'toy_tiny': dict(depth=4), 'toy_deep': dict(depth=6)}


@pytest.fixture(scope='module', autouse=True)
def toy_family():
    spec = register_backbone(BackboneSpec(
        'toy', 'Toy', backbone=ToyNet, create=create_toy, presets=TOY_PRESETS, width_key='toy_width',
        config_keys=('toy_width',), exit_head=ToyHead, flops=toy_flops,
        bench={'Toy': dict(preset='adadiff_toy_tiny', reduced=dict(toy_width=8))}))
    yield spec
    unregister_backbone('toy')


def test_the_registry_knows_the_family():
    assert family_of('toy_tiny') == 'toy' and family_of(dict(toy_width=16, depth=2)) == 'toy'
    m = create_early_exit('adadiff_toy_tiny')
    assert isinstance(m.backbone, ToyNet) and m.num_layers == 4 and isinstance(m.exit_heads[0], ToyHead)
    assert layer_costs(m)['blocks'] == toy_flops(m.backbone.config)['blocks']


def test_samples_with_exits_that_skip_layers():
    torch.manual_seed(0)
    m = EarlyExitModel.from_backbone(ToyNet(), uem_init_bias=0.).eval()
    full = sample_batches(m, 'ddim', 4, n=4, batch_size=4, threshold=0., seed=1)
    plain = sample_batches(m.backbone, 'ddim', 4, n=4, batch_size=4, seed=1)
    assert torch.equal(full.images, plain.images)                       # threshold 0: exactly the full model
    some = sample_batches(m, 'ddim', 4, n=4, batch_size=4, threshold=1., seed=1)
    assert some.stats['layer_ratio'] < 1 and torch.isfinite(some.images).all()


def test_trains_resumes_from_its_checkpoint_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / 'data.npz'
    np.savez(npz, train_x=rng.integers(0, 256, (32, 3, 32, 32), dtype=np.uint8), train_y=np.arange(32) % 10,
             test_x=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8), test_y=np.arange(8) % 10)
    cfg = load_train_config('tiny_cifar8', model=dict(img_size=8, patch_size=2, in_chans=3, toy_width=16, depth=4),
                            model_kw={}, data=str(npz), batch_size=8, steps=2, out=str(tmp_path / 'run'),
                            progress=False, ckpt_every=0, device='cpu', mode='scratch', p_uncond=0.)
    res = train(cfg)
    assert math.isfinite(res['loss'] if isinstance(res, dict) and 'loss' in res else 0.)
    saved = sorted((tmp_path / 'run').rglob('model.safetensors'))
    assert saved, 'the run saved no model'
    m = load_model(saved[-1].parent)
    assert isinstance(m, EarlyExitModel) and isinstance(m.backbone, ToyNet) and m.config['backbone_arch'] == 'toy'


def test_benchmarks_through_the_registry():
    m = build_bench_model('Toy', reduced=True)
    assert isinstance(m.backbone, ToyNet) and m.backbone.embed_dim == 8
    rows = bench_exit_group(m, batch=2, skips=(0., .5), repeats=1, warmup=0)
    assert rows and all(r['measured_speedup'] > 0 and r['ideal_speedup'] >= 1 for r in rows)
