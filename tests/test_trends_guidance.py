"""Exit trends on a class-conditional model with classifier-free guidance: the rows `run_trends` records against the
samplers called directly and against the exit rule applied by hand to every layer's uncertainty (also through
`exits_at`, which the per-sampler thresholds and the app's note read the rule with), the note on a guided run where
nothing exits, and the app's class, guidance and policy widgets (an unconditional model shows none) and its
per-sampler thresholds on the embedded class-conditional model."""
import numpy as np
import pytest
import torch
from adadiff_nb.exits.early_exit import create_early_exit
from adadiff_nb.sampling.samplers import sample_ddim
from adadiff_nb.sampling.run import schedule_for
from adadiff_nb.apps.trends import run_trends, ExitTrendsApp, exits_at, exit_note, SAMPLER_THRESHOLDS
from adadiff_nb.models.default_model import load_default

STEPS, B, LABELS, S = 3, 3, [2, 5, 9], 3.


@pytest.fixture(scope='module')
def tiny_c():
    "A tiny untrained class-conditional model whose UEM weights are scaled up so that its exits vary around u = 0.5."
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_early_exit('adadiff_tiny', num_classes=11, null_class=True).eval()
    with torch.no_grad():
        for p in model.uem.parameters(): p.mul_(30.)
    return model


def _x_T(model, seed=0):
    "The initial noise run_trends documents: randn (batch, C, H, W) from a CPU generator seeded `seed`."
    return torch.randn((B, 3, 8, 8), generator=torch.Generator('cpu').manual_seed(seed))


@pytest.mark.parametrize('policy', ['joint', 'independent'])
def test_rows_and_samples_equal_the_sampler_called_directly(tiny_c, policy):
    r = run_trends(tiny_c, threshold=0.5, steps=STEPS, batch=B, labels=LABELS, guidance_scale=S,
                   guidance_policy=policy)
    assert 0 < r.exit_layer.mean() < tiny_c.num_layers                              # exits vary: not a trivial case
    ex = []
    extra = dict(y=torch.tensor(LABELS), guidance_scale=S, guidance_policy=policy, threshold=0.5)
    with torch.no_grad():
        x0 = sample_ddim(tiny_c, _x_T(tiny_c), schedule_for(tiny_c), STEPS, extra_args=extra, clip_denoised=True,
                         callback=lambda d: ex.append(d['exit']['exit_layer'].clone()))
    np.testing.assert_array_equal(r.exit_layer, torch.stack(ex).numpy())          # (steps, 2B): cond rows, then uncond
    np.testing.assert_allclose(r.samples, x0.numpy(), atol=1e-6)
    assert r.row_names[:B] == [f'cond {i}' for i in range(B)] and r.guided


def _first_below(u, tau):
    "The exit rule by hand on every layer's uncertainty u (L, R): first i with u_i < tau, else L."
    below = u < tau
    return torch.where(below.any(0), below.float().argmax(0), torch.tensor(u.shape[0]))


def _split_threshold(u_c, u_u, margin=1e-5):
    "The first midpoint between sorted u values at which some sample's two rows exit apart under the own-row rule."
    v = torch.cat([u_c.flatten(), u_u.flatten()]).sort().values
    for lo, hi in zip(v[:-1].tolist(), v[1:].tolist()):
        if hi - lo > margin and (_first_below(u_c, (lo + hi) / 2) != _first_below(u_u, (lo + hi) / 2)).any():
            return (lo + hi) / 2
    raise AssertionError('the conditional and unconditional rows never exit apart')


def test_first_step_exits_follow_the_policy_rule(tiny_c):
    "At the first step both rows see x_T: independent = each row's own rule, joint = first layer where both are below."
    x, null = _x_T(tiny_c), tiny_c.null_class
    with torch.no_grad():
        mt = torch.full((B,), float(run_trends(tiny_c, 0., steps=STEPS, batch=B, labels=LABELS).model_time[0]))
        u_c = tiny_c.forward_train(x, mt, torch.tensor(LABELS))['u']                # (L, B): every layer
        u_u = tiny_c.forward_train(x, mt, torch.full((B,), null))['u']
    tau = _split_threshold(u_c, u_u)
    ind = run_trends(tiny_c, tau, steps=STEPS, batch=B, labels=LABELS, guidance_scale=S, guidance_policy='independent')
    joint = run_trends(tiny_c, tau, steps=STEPS, batch=B, labels=LABELS, guidance_scale=S, guidance_policy='joint')
    np.testing.assert_array_equal(ind.exit_layer[0], torch.cat([_first_below(u_c, tau), _first_below(u_u, tau)]))
    both = _first_below(torch.maximum(u_c, u_u), tau)
    np.testing.assert_array_equal(joint.exit_layer[0], torch.cat([both, both]))
    assert (ind.exit_layer[0, :B] != ind.exit_layer[0, B:]).any()                   # the policies differ here
    u = torch.cat([u_c, u_u], 1).numpy()[None]                                      # (1, L, 2B) as a run records it
    np.testing.assert_array_equal(exits_at(u, tau), ind.exit_layer[:1])
    np.testing.assert_array_equal(exits_at(u, tau, joint=True), joint.exit_layer[:1])


def test_note_on_a_guided_run_where_nothing_exits(tiny_c):
    r0 = run_trends(tiny_c, 0., steps=STEPS, batch=B, labels=LABELS, guidance_scale=S)
    r = run_trends(tiny_c, float(np.nanmin(r0.u)) / 2, steps=STEPS, batch=B, labels=LABELS, guidance_scale=S)
    assert r.stats['layer_ratio'] == 1 and (r.exit_layer == tiny_c.num_layers).all()
    note = exit_note(r)
    assert 'nothing exits early' in note and 'try threshold' in note, note
    tau = float(note.split('try threshold ')[1].split(' ')[0])
    ex = run_trends(tiny_c, tau, steps=STEPS, batch=B, labels=LABELS, guidance_scale=S)
    assert ex.stats['layer_ratio'] < 1                                              # the suggestion does exit


def test_joint_rows_leave_together_with_a_multi_evaluation_sampler(tiny_c):
    r = run_trends(tiny_c, 0.5, sampler='dpm_solver', steps=4, batch=B, labels=LABELS, guidance_scale=2.)
    assert 0 < r.exit_layer.mean() < tiny_c.num_layers
    np.testing.assert_array_equal(r.exit_layer[:, :B], r.exit_layer[:, B:])


def test_app_class_guidance_and_policy_widgets(tiny_c):
    app = ExitTrendsApp(tiny_c, threshold=0.3, steps=2, batch=4, label=5, guidance_scale=2.5,
                        guidance_policy='independent')
    assert app.key() == (0.3, 'ddim', 2, 0, 4, 5, 2.5, 'independent')
    assert app.w_class.label == '5: dog' and app.w_class.options[0] == ('all classes (cycled)', -1)
    assert (app.w_scale.min, app.w_scale.max, app.w_scale.step, app.w_policy.options) == \
        (0., 8., 0.5, ('joint', 'independent'))
    ref = run_trends(tiny_c, 0.3, steps=2, batch=4, labels=5, guidance_scale=2.5, guidance_policy='independent')
    np.testing.assert_array_equal(app.run.exit_layer, ref.exit_layer)
    np.testing.assert_array_equal(app.run.samples_full, ref.samples_full)
    app.w_class.value = -1                                                          # all classes, cycled
    assert app.run.labels.tolist() == [0, 1, 2, 3]
    assert [a.text.split('<br>')[0] for a in app.f_samples.layout.annotations[:4]] == \
        ['airplane', 'automobile', 'bird', 'cat']
    app.w_scale.value = 0.                                                          # unconditional: one row a sample
    assert app.run.exit_layer.shape == (2, 4) and 'guidance 0' in app.f_exit.layout.title.text


def test_unconditional_app_has_no_class_widgets():
    torch.manual_seed(0)
    app = ExitTrendsApp(create_early_exit('adadiff_tiny').eval(), threshold=0.5, steps=2, batch=2)
    assert app.key() == (0.5, 'ddim', 2, 0, 2) and app.class_widgets == []
    assert app.run.labels is None and app.run.guidance_scale is None
    assert 'guidance' not in app.f_exit.layout.title.text and len(app.ui.children) == 9
    assert app.thresholds == {} and app.w_tau.value == 0.5 and app.w_hint.value == ''


def test_embedded_conditional_app_follows_the_sampler_thresholds():
    torch.set_num_threads(1)
    app = ExitTrendsApp(load_default(device='cpu', name='cifar10_cond'), steps=2, batch=2, guidance_scale=2.)
    t = SAMPLER_THRESHOLDS['cifar10_cond']
    assert app.key()[:2] == (t['ddim'], 'ddim') and app.w_class is not None and app.w_scale.value == 2.
    app.w_sampler.value = 'dpm_solver_pp_2m'
    assert app.key()[:2] == (t['dpm_solver_pp_2m'], 'dpm_solver_pp_2m') and len(app.cache) == 2
    assert f"calibrated for dpm_solver_pp_2m: <b>{t['dpm_solver_pp_2m']:g}</b>" in app.w_hint.value
