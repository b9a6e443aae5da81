"""Samplers against diffusers' schedulers (configurations the notebook does not cover) and the
`adadiff-sample` console script run in a subprocess."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_nb.sampling.diffusion import get_schedule
from adadiff_nb.sampling.samplers import sample_ddim, sample_ddpm, sample_dpm_solver_pp_2m

diffusers = pytest.importorskip('diffusers')
LIN = get_schedule('linear')
AB = LIN.alphas_cumprod.numpy()
CFG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')


def dummy(x, mt):
    "Deterministic eps(x, model_time): exact for N(0, 0.5^2) data under the linear schedule, plus a non-linear term."
    mt = torch.as_tensor(mt, dtype=torch.float64)
    ab = torch.as_tensor(np.interp(mt.numpy(), np.arange(1000), AB)).view(-1, *[1] * (x.ndim - 1))
    out = (1 - ab).sqrt() * x.double() / (ab * 0.25 + 1 - ab) + 0.05 * torch.sin(3 * x.double() + mt.view_as(ab) / 100)
    return out.to(x.dtype)


def run_diffusers(sched, x, steps, generator=None, **kw):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(dummy(x, torch.full((x.shape[0],), float(t))), t, x, generator=generator, **kw).prev_sample
    return x


@pytest.fixture(scope='module')
def xT():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize('eta', [0.5, 1.0])
def test_ddim_eta_matches_diffusers(xT, eta):
    # diffusers draws one noise tensor per step when eta > 0 (the last one is multiplied by 0): same sequence
    ref = run_diffusers(diffusers.DDIMScheduler(**CFG, clip_sample=False, set_alpha_to_one=True), xT, 20,
                        generator=torch.Generator().manual_seed(3), eta=eta)
    ours = sample_ddim(dummy, xT, LIN, 20, eta=eta, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize('spacing', ['trailing', 'linspace'])
def test_ddpm_spacing_matches_diffusers(xT, spacing):
    ref = run_diffusers(diffusers.DDPMScheduler(**CFG, clip_sample=False, timestep_spacing=spacing), xT, 30,
                        generator=torch.Generator().manual_seed(4))
    ours = sample_ddpm(dummy, xT, LIN, 30, spacing=spacing, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_dpm_solver_pp_2m_many_steps_matches_diffusers(xT):
    # 111 steps: no lower-order final step (>= 15 steps); 999 / 111 is an integer, so the grids coincide
    ref = run_diffusers(diffusers.DPMSolverMultistepScheduler(**CFG, algorithm_type='dpmsolver++', solver_order=2,
                                                              final_sigmas_type='sigma_min'), xT, 111)
    torch.testing.assert_close(
        sample_dpm_solver_pp_2m(dummy, xT, LIN, 111, skip_type='time_uniform'), ref, atol=1e-4, rtol=0
    )


def _cli():
    exe = Path(sys.executable).parent / 'adadiff-sample'
    if exe.exists(): return [str(exe)]
    # the console script appears after `pip install -e .`; until then run the same entry point
    return [sys.executable, '-c', 'import sys; from adadiff_nb.apps.sample_cli import main; sys.exit(main())']


def test_console_script(tmp_path):
    from adadiff_nb.models.checkpoint import save_model
    from adadiff_nb.models.uvit import create_uvit
    try: from adadiff_nb.exits.early_exit import EarlyExitUViT
    except ImportError: EarlyExitUViT = None
    torch.manual_seed(0)
    if EarlyExitUViT is not None:
        model, extra = EarlyExitUViT.from_backbone(create_uvit('uvit_tiny')).eval(), ['--threshold', '0']
    else:
        model, extra = create_uvit('uvit_tiny').eval(), []
    save_model(model, tmp_path / 'ckpt', schedule={'name': 'linear'})
    env = dict(os.environ, OMP_NUM_THREADS='1')
    args = ['--checkpoint', str(tmp_path / 'ckpt'), '--sampler', 'dpm_solver_pp_2m', '--steps', '3', '--n', '4',
            '--batch', '4', '--seed', '0', '--out', str(tmp_path / 'out'), '--compare-full', *extra]
    r = subprocess.run(_cli() + args, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / 'out' / 'stats.json').read_text())
    assert stats['n'] == 4 and stats['steps'] == 3 and len(stats['exit_layer_mean_by_step']) == 3
    assert stats['mse_vs_full'] == 0 and stats['layer_ratio'] == 1
    assert (tmp_path / 'out' / 'samples.png').stat().st_size > 0
    assert np.load(tmp_path / 'out' / 'samples.npz')['images'].shape == (4, 8, 8, 3)
    # bad input: exit code 2, one line on stderr, no traceback
    r = subprocess.run(_cli() + args + ['--steps', '0'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.startswith('adadiff-sample: error: steps must be >= 1')
