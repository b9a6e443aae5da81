"""The UNet backbone (models.unet) and its per-sample early exit (exits.unet_exits): exactness at threshold 0, what
threshold 1 runs, rows leaving at different depths, training outputs, FLOP model vs FlopCounterMode, bad input."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adadiff_nb.models.unet import UNet, ResBlock, create_unet, unet_flops
from adadiff_nb.models.registry import BACKBONES, BackboneSpec, register_backbone, family_of
from adadiff_nb.exits.unet_exits import (EarlyExitUNet, UNetExitHead, create_unet_early_exit, train_unet_exits,
                                         unet_exit_costs, unet_forward_flops)
from adadiff_nb.evaluation.cost import CostMeter, backbone_flops, count_flops, exit_flops_table, layer_costs
from adadiff_nb.sampling.diffusion import linear_schedule
from adadiff_nb.sampling.denoisers import EarlyExitDenoiser
from adadiff_nb.sampling.samplers import sample_ddim
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.training.losses import adadiff_loss


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return create_unet_early_exit('unet_test8', **kw).eval()


def _inputs(B=4, seed=1, S=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=g), torch.linspace(5., 995., B)


def _count_calls(model):
    "Forward hooks counting calls of every ResBlock of the backbone, by name, and of every exit adapter."
    calls, hooks = {}, []
    for name, mod in [*model.backbone.named_modules(), *(('adapter%d' % i, h.adapter)
                                                        for i, h in enumerate(model.exit_heads))]:
        if isinstance(mod, ResBlock):
            calls[name] = 0
            hooks.append(mod.register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1)))
    return calls, hooks


def test_threshold0_is_the_plain_unet_exactly():
    m = _model()
    x, t = _inputs()
    with torch.no_grad():
        ref = m.backbone(x, t)
        out = m(x, t, threshold=0.)
        full = m(x, t)
    assert torch.equal(out.sample, ref) and torch.equal(full.sample, ref)
    assert out.exit_layer.tolist() == [m.num_layers] * 4


def test_threshold1_runs_only_the_outermost_level():
    m = _model()
    x, t = _inputs()
    calls, hooks = _count_calls(m)
    try:
        with torch.no_grad(): out = m(x, t, threshold=1.)
    finally:
        for h in hooks: h.remove()
    assert out.exit_layer.tolist() == [0] * 4
    ran = {k for k, v in calls.items() if v}
    assert ran == {'down.0.res.0', 'adapter0', 'up.0.res.0', 'up.0.res.1'}, ran
    assert all(v == 1 for k, v in calls.items() if v)                 # one batched call each
    with torch.no_grad():                                              # and it is exit 0's head on the level-0 features
        h, s = m.backbone.embed(x, t)
        assert torch.allclose(out.sample, m.exit_heads[0](h, s), atol=1e-6)


def test_deeper_levels_run_only_for_deeper_exits():
    m = _model()
    x, t = _inputs(B=1)
    for e, expect in [(1, {'down.1.res.0', 'up.1.res.0', 'adapter1'}), (2, {'down.2.res.0', 'adapter2'})]:
        calls, hooks = _count_calls(m)
        try:
            with torch.no_grad(): m(x, t, exit_layers=torch.tensor([e]))
        finally:
            for h in hooks: h.remove()
        ran = {k for k, v in calls.items() if v}
        assert expect <= ran and not any(k.startswith('mid') for k in ran), (e, ran)
        assert not any(k.startswith('adapter') and k != f'adapter{e}' for k in ran)


def test_mixed_batch_rows_equal_each_row_alone():
    m = _model()
    x, t = _inputs(B=5)
    ex = torch.tensor([2, 0, 3, 1, 0])
    with torch.no_grad():
        out = m(x, t, exit_layers=ex)
        assert out.exit_layer.tolist() == ex.tolist()
        for b in range(5):
            alone = m(x[b:b + 1], t[b:b + 1], exit_layers=ex[b:b + 1]).sample
            assert torch.allclose(out.sample[b], alone[0], atol=1e-5), b
        outs = {e: m(x, t, exit_layers=e).sample for e in range(4)}    # the whole batch at each exit
    assert all(not torch.allclose(outs[e], outs[3], atol=1e-3) for e in range(3))   # the exits really differ


def test_dynamic_mixed_exits_match_static_and_deferred_reads():
    m = _model()
    x, t = _inputs(B=6)
    with torch.no_grad():
        u = m.forward_train(x, t)['u']                                 # (L, B): u of every row at every exit
        tau = torch.stack([u[0, 0] + 1e-4, u[0, 1] - 1e-4, u[1, 2] + 1e-4, u[0, 3] + 1e-4, u[0, 4] - 1e-4,
                           u[0, 5] - 1e-4]).clamp(0, 1)
        tau[4] = 0.                                                    # never leaves: the full model
        out = m(x, t, threshold=tau)
        e = out.exit_layer
        assert len(set(e.tolist())) >= 2, e                            # rows leave at different depths
        static = m(x, t, exit_layers=e).sample
        assert torch.allclose(out.sample, static, atol=1e-5)
        m.set_exit_sync(3)                                             # exits deferred: heads run later, deeper skips
        deferred = m(x, t, threshold=tau)
        m.set_exit_sync('auto')
    assert torch.equal(deferred.exit_layer, e) and torch.allclose(deferred.sample, out.sample, atol=1e-5)


def test_forward_train_every_exit_and_u():
    m = _model(uem_params='per_layer_timestep', uem_time_buckets=4)
    x, t = _inputs()
    out = m.forward_train(x, t)
    L = m.num_layers
    assert out['exits'].shape == (L, 4, 3, 8, 8) and out['u_map'].shape == (L, 4, 3, 8, 8)
    assert out['u'].shape == (L, 4) and out['eps'].shape == (4, 3, 8, 8)
    assert torch.allclose(out['u'], out['u_map'].mean((2, 3, 4)), atol=1e-6)
    with torch.no_grad():
        for i in range(L): assert torch.allclose(out['exits'][i], m(x, t, exit_layers=i).sample, atol=1e-5)
        assert torch.allclose(out['eps'], m.backbone(x, t), atol=1e-6)
    loss = adadiff_loss(out, torch.randn_like(x))['loss']
    loss.backward()
    assert all(h.adapter.conv1.weight.grad is not None for h in m.exit_heads)
    assert all(u.weight.grad is not None for u in m.uem.levels)


def test_heads_share_the_backbone_up_path():
    m = _model()
    sd = m.state_dict()
    assert not any(k.startswith('exit_heads.') and '.adapter.' not in k for k in sd)
    assert all(h.backbone is m.backbone for h in m.exit_heads)
    n_heads = sum(p.numel() for n, p in m.named_parameters() if n.startswith('exit_heads.'))
    assert n_heads == sum(p.numel() for h in m.exit_heads for p in h.adapter.parameters())


def test_config_rebuilds_the_model():
    m = _model(uem_reduce='max')
    m2 = EarlyExitUNet(**m.config).eval()                              # the config is complete: same parts, same keys
    m2.load_state_dict(m.state_dict())
    x, t = _inputs(B=2)
    with torch.no_grad():
        a, b = m(x, t, threshold=torch.tensor([0.6, 0.])), m2(x, t, threshold=torch.tensor([0.6, 0.]))
    assert torch.equal(a.sample, b.sample) and torch.equal(a.exit_layer, b.exit_layer)
    assert m2.config == m.config and m2.uem.reduce == 'max'


def _counted(fn):
    with FlopCounterMode(display=False) as fc: fn()
    return fc.get_total_flops()


def test_flop_model_plain_unet():
    for name in ('unet_test8', 'unet_tiny16', 'ddpm_cifar10'):
        with torch.device('meta'):                                     # counts shapes only: no compute
            u = create_unet(name)
            S = u.img_size
            x, t = torch.randn(2, 3, S, S), torch.full((2,), 10.)
            got = _counted(lambda: u(x, t))
        f = unet_flops(u.config)
        assert got == 2 * (f['embed'] + sum(f['blocks']) + f['head']), name


def test_flop_model_exits():
    m = _model()
    x, t = _inputs(B=3)
    costs = unet_exit_costs(m)
    with torch.no_grad():
        for kw in (dict(exit_layers=torch.tensor([0, 1, 3])), dict(exit_layers=2), dict(threshold=1.),
                   dict(threshold=torch.tensor([0., 0.5, 1.])), dict(threshold=0.)):
            r = count_flops(lambda: m(x, t, **kw))
            assert r['total'] == unet_forward_flops(m, r['result'])['total'], kw
        e = torch.tensor([0, 1, 3])
        r = count_flops(lambda: m(x, t, exit_layers=e))
    assert r['total'] == float(exit_flops_table(costs)[e].sum())
    f = exit_flops_table(costs)
    assert all(f[i] < f[i + 1] for i in range(m.num_layers))
    for d in range(m.num_layers):                                      # saving = inner part - adapter
        inner = sum(costs['blocks'][d:]) + costs['head'] - costs['up_from'][d]
        assert float(f[-1] - f[d]) == inner - costs['adapter'][d]


def test_cost_meter_reads_the_exit_costs_while_sampling():
    m = _model()
    meter = CostMeter(m)
    assert torch.equal(meter.table, exit_flops_table(unet_exit_costs(m)))
    assert layer_costs(m)['exit_head'] == unet_exit_costs(m)['exit_head']
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = sample_ddim(EarlyExitDenoiser(m, threshold=1.), x, linear_schedule(), 3, callback=meter, disable=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    s = meter.summary(2)
    assert s['exit_histogram'][0] == 6 and s['layer_ratio'] == 0.
    c = unet_exit_costs(m)                         # the meter charges exit 0's own UEM (costs['uem_exits'])
    assert abs(s['gflops_per_eval'] * 1e9 - (float(meter.table[0]) + c['uem_exits'][0])) < 1e-6 * float(meter.table[0])
    assert c['uem_exits'][0] != c['uem']


def test_sampling_runs_exact_at_threshold0_and_cheaper_at_threshold1(unet_registered):
    m = _model()
    full = sample_batches(m, 'ddim', 3, n=4, batch_size=4, threshold=0., seed=1)
    plain = sample_batches(m.backbone, 'ddim', 3, n=4, batch_size=4, seed=1)
    assert torch.equal(full.images, plain.images)
    some = sample_batches(m, 'ddim', 3, n=4, batch_size=4, threshold=1., seed=1)
    f = exit_flops_table(unet_exit_costs(m))
    assert some.stats['gflops_per_eval'] < full.stats['gflops_per_eval'] * float(f[1] / f[-1])
    assert torch.isfinite(some.images).all() and not torch.allclose(some.images, full.images)


UNET_SPEC = BackboneSpec('unet', 'UNet', backbone='adadiff_nb.models.unet:UNet',
                        create='adadiff_nb.models.unet:create_unet', presets='adadiff_nb.models.unet:UNET_PRESETS',
                        width_key='ch', config_keys=('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions'),
                        exit_head='adadiff_nb.exits.unet_exits:UNetExitHead',
                        flops='adadiff_nb.models.unet:unet_flops',
                        uem_builder='adadiff_nb.exits.unet_exits:build_unet_uem',
                        exit_costs='adadiff_nb.exits.unet_exits:unet_exit_costs')      # the entry of the notes


@pytest.fixture
def unet_registered():
    "The 'unet' family as the registry ships it."
    return BACKBONES['unet']


def test_registry_entry_through_register_backbone(unet_registered):
    for f in ('family', 'backbone', 'create', 'presets', 'width_key', 'config_keys', 'exit_head', 'flops',
              'uem_builder', 'exit_costs'):
        assert getattr(unet_registered, f) == getattr(UNET_SPEC, f), f
    register_backbone(UNET_SPEC, replace=True)                        # re-registering it changes nothing
    register_backbone(unet_registered, replace=True)
    u = create_unet('unet_test8')
    assert family_of('ddpm_cifar10') == 'unet' and family_of(dict(u.config)) == 'unet' and family_of(u) == 'unet'
    assert backbone_flops(u) == unet_flops(u.config)
    assert layer_costs(u)['head'] == unet_flops(u.config)['head']


def test_train_exits_on_frozen_unet():
    m = _model()
    m.train()
    frozen = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    uem0 = m.uem.levels[0].weight.detach().clone()
    imgs = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = train_unet_exits(m, imgs, adadiff_loss, steps=3, batch_size=4, lr=1e-2)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, m.backbone.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(uem0, m.uem.levels[0].weight)


@pytest.mark.parametrize('bad, msg', [
    (lambda u, x, t: u(x[:, :2], t), 'in_chans=3'),
    (lambda u, x, t: u(torch.randn(2, 3, 16, 16), t), 'img_size=8'),
    (lambda u, x, t: u(x[0], t), 'expected images of shape'),
    (lambda u, x, t: u(x, t[:1]), 'timesteps must have shape'),
    (lambda u, x, t: u(x, torch.tensor([1., float('inf')])), 'infinite'),
    (lambda u, x, t: u(x, t, torch.tensor([0, 1])), 'unconditional'),
])
def test_bad_input_named_with_fix(bad, msg):
    m = _model()
    x, t = _inputs(B=2)
    for model in (m.backbone, m):
        with pytest.raises(ValueError, match=None) as ei: bad(model, x, t)
        assert msg in str(ei.value), str(ei.value)


def test_bad_configs_named_with_fix():
    with pytest.raises(ValueError, match='divisible by 2'): UNet(img_size=10, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match='norm_groups'): UNet(img_size=8, ch=12, norm_groups=8, attn_resolutions=())
    with pytest.raises(ValueError, match='per_layer_timestep'):
        create_unet_early_exit('unet_test8', uem_params='shared')
    with pytest.raises(ValueError, match="exit_head='per_layer'"): EarlyExitUNet(dict(img_size=8, ch=8, ch_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(), norm_groups=4), exit_head='shared')
    with pytest.raises(TypeError, match='needs a UNet'): EarlyExitUNet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='exits are 0..2'): UNetExitHead(create_unet('unet_test8'), 5)
    with pytest.raises(ValueError, match='exit_layers must lie'): _model()(*_inputs(B=2), exit_layers=4)
