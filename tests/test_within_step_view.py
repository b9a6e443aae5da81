"""The exit-trends app's within-step view (`adadiff_nb.apps.trend_runs.within_step_stats`) and the exit schedules'
spread (`exits.schedule.within_step_spread`) and the discrimination's eta squared must tell the same story: check that
they agree, on random exits and on a real guided run."""
import math
import numpy as np
import pytest
import torch
from adadiff_nb.apps.trend_runs import TrendRun, run_trends, within_step_stats
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.exits.schedule import within_step_spread
from adadiff_nb.evaluation.discrimination import eta_squared


def _run(e: np.ndarray, L: int, seed: int = 0) -> TrendRun:
    "A TrendRun with exits `e` (S, R) and random u, NaN past each row's exit (as run_trends records it)."
    S, R = e.shape
    u = np.random.default_rng(seed).random((S, L, R))
    u[np.arange(L)[None, :, None] > e[:, None, :]] = np.nan
    x = np.zeros((R, 3, 2, 2))
    return TrendRun(0.5, 'ddim', S, L, np.arange(S, 0, -1.), e, u, {}, x, x.copy())


@pytest.mark.parametrize('seed', range(4))
def test_share_and_eta_squared_match_the_library(seed):
    rng = np.random.default_rng(seed)
    e = rng.integers(0, 5, (6, 5))
    e[0] = 2                                                   # one step where every row exits alike
    e[1, :2] = 4                                               # and one with a tie broken toward the smaller exit
    st = within_step_stats(_run(e, 4, seed))
    np.testing.assert_allclose(st['share'], within_step_spread(e))
    assert st['eta2_exit'] == pytest.approx(eta_squared(e), abs=1e-12)
    assert st['steps_agree'] == int((within_step_spread(e) == 1).sum())


def test_constant_exits_and_a_real_guided_run():
    e = np.full((3, 4), 4)
    st = within_step_stats(_run(e, 4))
    assert math.isnan(st['eta2_exit']) and math.isnan(eta_squared(e)) and (st['share'] == 1).all()
    torch.manual_seed(0)
    tiny_c = create_early_exit('adadiff_tiny', num_classes=11, null_class=True).eval()
    r = run_trends(tiny_c, threshold=0.5, steps=3, batch=2, labels=[0, 4], guidance_scale=3.,
                   guidance_policy='independent')
    st = within_step_stats(r)                                  # all rows: cond and uncond
    np.testing.assert_allclose(st['share'], within_step_spread(r.exit_layer))
    e2 = eta_squared(r.exit_layer)
    assert (math.isnan(st['eta2_exit']) and math.isnan(e2)) or st['eta2_exit'] == pytest.approx(e2, abs=1e-12)
