"Faithfulness checks of the baselines (ASE, BERxiT, CALM, small model) against their papers, independent of the code."
import math

import numpy as np
import pytest
import torch

from adadiff_nb.exits import baselines as B
from adadiff_nb.exits import calibrate as C
from adadiff_nb.evaluation.cost import full_eval_flops, uvit_flops
from adadiff_nb.training.losses import l_u, l_ual
from adadiff_nb.models.uvit import create_uvit, uvit_s2_cifar10

torch.set_num_threads(1)

# ASE (Moon et al. 2023), Table 2, typed from the paper: blocks used per interval of t, low to high noise
TABLE2_UVIT = {'D1': (16.26, [6, 5, 4, 3, 2]), 'D2': (22.27, [6, 5, 3, 2, 1]), 'D3': (24.77, [6, 4, 3, 2, 1]),
               'D4': (28.03, [5, 4, 2, 2, 1]), 'D5': (30.71, [5, 4, 2, 1, 1]), 'D6': (32.09, [5, 3, 2, 1, 1])}
TABLE2_DIT = {'D1': (16.63, [28, 26, 24, 22, 20]), 'D3': (23.43, [28, 25, 22, 19, 16]),
              'D4': (30.46, [28, 24, 20, 16, 12]),
              'D6': (38.32, [28, 28, 24, 22, 20, 18, 12, 10, 8, 6])}    # "28 | 24, 22 | 20, 18 | 12, 10 | 8, 6"


def test_ase_table2():
    for table, sched, accel, drop in ((TABLE2_UVIT, B.ASE_UVIT_SCHEDULES, B.ASE_UVIT_ACCEL, 'decoder'),
                                      (TABLE2_DIT, B.ASE_DIT_SCHEDULES, B.ASE_DIT_ACCEL, 'end')):
        assert sorted(sched) == sorted(table)
        for name, (acc, blocks) in table.items():
            assert list(sched[name]) == blocks and accel[name] == acc
            assert list(B.ase_schedule(name, drop=drop)) == blocks
            assert blocks == sorted(blocks, reverse=True)                # noise-easy: never more blocks with noise


def test_ase_vlb_weight_is_eq8():
    betas = np.linspace(1e-4, 0.02, 1000)                               # the DDPM linear schedule
    abar = np.cumprod(1 - betas)
    n = np.array([0, 10, 250, 500, 999])
    sigma2 = betas[n]                                                   # DDPM's fixed variance
    want = betas[n] ** 2 / (2 * sigma2 * (1 - betas[n]) * (1 - abar[n]))
    got = B.ase_vlb_weight(torch.tensor((n + 1) / 1000.)).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ase_loss_reweighting_cycle():
    torch.manual_seed(0)
    m = B.StaticDropUViT.from_backbone(create_uvit('uvit_tiny'), schedule='D6').eval()
    x, eps, t = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0.05, 0.5, 0.95])
    mt = t * 1000
    with torch.no_grad():
        per = ((m(x, mt).sample - eps) ** 2).mean((1, 2, 3))
        lf = B.ase_train_loss(reweight_steps=3)
        lam = B.ase_vlb_weight(t)
        assert torch.allclose(lf(m, x, mt, eps, t, 2)['loss'], (lam * per).mean(), atol=1e-6)
        assert torch.allclose(lf(m, x, mt, eps, t, 3)['loss'], per.mean(), atol=1e-6)   # lambda <- 1 after C


def test_berxit_lte_shared_and_timestep_free():
    m = B.BERxiTUViT.from_backbone(create_uvit('uvit_tiny'))
    assert isinstance(m.uem, B.LTEPredictor) and m.uem.groups == 1 and m.uem.hidden == 0
    h = torch.randn(2, 17, 32)
    u1 = m.uem.uncertainty(1, m.backbone, h, m.uem.context(torch.tensor([10., 10.])))[0]
    u2 = m.uem.uncertainty(3, m.backbone, h, m.uem.context(torch.tensor([900., 500.])))[0]
    assert torch.equal(u1, u2)                                           # same layer weights, no timestep input


def test_berxit_alt_objectives():
    torch.manual_seed(0)
    m = B.BERxiTUViT.from_backbone(create_uvit('uvit_tiny'))
    x, eps, mt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([100., 800.])
    with torch.no_grad():
        o = m.forward_train(x, mt)
        err = lambda a: float(((a - eps) ** 2).mean())
        j = float(((o['u'] - torch.tanh((o['exits'] - eps).abs()).mean((2, 3, 4))) ** 2).mean())
        even, odd = (float(B.berxit_train_loss()(m, x, mt, eps, None, s)['loss']) for s in (0, 1))
    assert math.isclose(even, err(o['eps']) + j, rel_tol=1e-5)
    assert math.isclose(odd, sum(err(o['exits'][i]) for i in range(1, 5)) + err(o['eps']) + j, rel_tol=1e-5)


def test_calm_classifier_targets_the_full_model():
    torch.manual_seed(0)
    m = B.CALMUViT.from_backbone(create_uvit('uvit_tiny'), criterion='classifier')
    x, mt = torch.randn(2, 3, 8, 8), torch.tensor([100., 800.])
    lf = B.calm_train_loss()
    with torch.no_grad():
        a, b = (lf(m, x, mt, torch.randn(2, 3, 8, 8), None, 0)['l_classifier'] for _ in range(2))
    assert torch.equal(a, b)                                             # the true noise does not enter its target


def test_hb_p_value_controls_the_risk():
    "Learn-then-Test's guarantee, simulated: with true risk above epsilon, rejection happens at most delta of the time."
    rng = np.random.default_rng(0)
    eps, delta, n = 0.1, 0.1, 200
    rejected = [C.hb_p_value(rng.binomial(1, 0.11, n).mean(), n, eps) <= delta for _ in range(2000)]
    assert np.mean(rejected) <= delta
    assert C.hb_p_value(0.02, n, eps) < 1e-3                             # and clear wins are rejected


def test_ltt_fixed_sequence_stops_at_first_failure():
    losses = [np.zeros(300), np.full(300, 0.3), np.zeros(300)]
    assert C.ltt_fixed_sequence(losses, 0.05, 0.1) == (0, C.ltt_fixed_sequence(losses, 0.05, 0.1)[1])
    assert len(C.ltt_fixed_sequence(losses, 0.05, 0.1)[1]) == 2


@pytest.mark.parametrize('ratio', [0.3, 0.523, 0.8])
def test_small_model_matches_gflops(ratio):
    with torch.device('meta'):
        cfg = uvit_s2_cifar10().config
    gf = lambda c: full_eval_flops(uvit_flops(c)) / 1e9
    target = ratio * gf(cfg)
    best = min(range(0, cfg['depth'] + 1, 2), key=lambda d: abs(gf(dict(cfg, depth=d)) - target))   # brute force
    sm = B.small_model_config(cfg, layer_ratio=ratio)
    assert sm['depth'] == best
    half_step = (gf(cfg) - gf(dict(cfg, depth=cfg['depth'] - 2))) / 2
    assert abs(gf(sm) - target) <= half_step + 1e-9                     # the stated tolerance
    assert abs(gf(B.small_model_config(cfg, layer_ratio=ratio, rel_tol=half_step / target)) - target) <= half_step


@pytest.mark.parametrize('detach', [False, True])
def test_ual_pulls_u_above_target(detach):
    "Minimising L_u + L_UAL over u: u* = u_hat + err^2 / 2 with u inside L_UAL, u* = u_hat with it detached."
    err2, u_hat = torch.tensor([[0.3, 0.8]]), torch.tensor([[0.2, 0.5]])
    g = torch.zeros(1, 2, 1, 1, 1) + err2.sqrt().view(1, 2, 1, 1, 1)   # exits whose squared error is err2 (eps = 0)
    u = torch.full((1, 2), 0.5, requires_grad=True)
    opt = torch.optim.SGD([u], lr=0.5)
    for _ in range(200):
        loss = l_u(u, u_hat) + l_ual(g, torch.zeros(2, 1, 1, 1), u, detach_u=detach)
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = u_hat if detach else u_hat + err2 / 2
    assert torch.allclose(u.detach(), want, atol=1e-4)
