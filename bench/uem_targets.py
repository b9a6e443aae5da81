"""Does L_u's target decide whether the exit adapts per sample? (issue 21, item 3, first step)

The embedded default model's uncertainty estimators (UEMs) are re-initialised and trained again, with the backbone and
the exit heads frozen, for the same number of training images under each target of `adadiff_loss(u_target=...)`:
'noise' (the paper's Eq. 8, tanh|g_i - eps|) and 'final' (tanh|g_i - g_L|: what exiting at i changes in the model's
own output). Each is then measured by `exit_discrimination` (within-step Spearman / AUROC of u against the real exit
error, eta squared of u and of the exit layer) at the threshold `calibrate_threshold` finds, on other noise, for the
shipped model's layer ratio there.
Writes one JSON (atomically) and prints a table. Usage:
    python bench/uem_targets.py [--steps 400] [--batch-size 64] [--n 64] [--out results/uem_targets_cpu.json]
"""
import argparse, copy, json, sys, time
from pathlib import Path

import numpy as np
import torch

from adadiff_nb.models.checkpoint import atomic_write_json
from adadiff_nb.models.default_model import load_default, default_threshold
from adadiff_nb.training.common import finetune
from adadiff_nb.training.losses import adadiff_loss, U_TARGETS
from adadiff_nb.evaluation.discrimination import exit_discrimination
from adadiff_nb.sampling.run import sample_batches
from adadiff_nb.exits.calibrate import calibrate_threshold


def uem_loss(u_target: str):
    "L_u alone (the backbone and heads are frozen, L_UAL would only push u), with the given target."
    def f(model, x_t, model_t, eps, t, step):
        out = model.forward_train(x_t, model_t)
        return adadiff_loss({k: v.float() for k, v in out.items()}, eps, beta=0., u_target=u_target)
    return f


def train_uem(base, u_target: str, steps: int, batch_size: int, seed: int, data: str):
    "A copy of `base` whose UEMs are re-initialised and trained for `steps` steps on `u_target` (nothing else moves)."
    torch.manual_seed(seed)
    m = copy.deepcopy(base).train()
    m.uem.init_weights(m.uem_init_bias)
    for p in m.parameters(): p.requires_grad_(False)
    for p in m.uem.parameters(): p.requires_grad_(True)
    t0 = time.time()
    res = finetune(m, uem_loss(u_target), steps, data=data, batch_size=batch_size, lr=1e-3, weight_decay=0.,
                   ema_decay=0., seed=seed, params=list(m.uem.parameters()), log_every=max(steps // 10, 1))
    out = res['raw'].eval()
    return out, dict(seconds=round(time.time() - t0, 1), log=res.get('log'))


def summary(res: dict) -> dict:
    """The headline numbers of one `exit_discrimination` result: within-step medians over steps and exits, eta
    squared (median over exits for u and d), the pooled scores, and the per-exit medians."""
    med = lambda v: None if v is None else float(np.nanmedian(np.array(v, dtype=float)))
    return dict(threshold=res['threshold'], layer_ratio=res['layer_ratio'], spearman=res['median_spearman_all'],
                auroc=res['median_auroc_all'], eta2_u=med(res['eta2_u']), eta2_d=med(res['eta2_d']),
                eta2_exit=res['eta2_exit'], pooled=res['pooled'], spearman_by_exit=res['median_spearman'],
                auroc_by_exit=res['median_auroc'])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=400, help='UEM training steps per target (equal images)')
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--n', type=int, default=64, help='samples of the discrimination run (and of the calibration)')
    p.add_argument('--sample-steps', type=int, default=20, help='DDIM steps of the discrimination run')
    p.add_argument('--data', default='cifar10_partial')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='results/uem_targets_cpu.json')
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.n < 2:
        print('uem_targets: --steps and --batch-size must be >= 1 and --n >= 2', file=sys.stderr)
        return 2
    out = Path(a.out)
    if not out.parent.is_dir():
        print(f'uem_targets: {out.parent} does not exist; create it or pass another --out', file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    base = load_default('cpu')
    bb = base.backbone
    x_cal = torch.randn(a.n, bb.in_chans, bb.img_size, bb.img_size, generator=torch.Generator().manual_seed(a.seed + 1))
    ratio = sample_batches(base, 'ddim', a.sample_steps, x_T=x_cal, batch_size=a.n,
                           threshold=default_threshold(base)).stats['layer_ratio']     # the shipped model's, to match
    rows = {'shipped': dict(training=None, **summary(exit_discrimination(
        base, a.n, 'ddim', a.sample_steps, a.seed, threshold=default_threshold(base), keep_samples=False)))}
    for target in U_TARGETS:
        m, info = train_uem(base, target, a.steps, a.batch_size, a.seed, a.data)
        cal = calibrate_threshold(m, x_cal, 'ddim', steps=a.sample_steps, target_reduction=1 - ratio)
        tau = float(cal['threshold'])
        res = exit_discrimination(m, a.n, 'ddim', a.sample_steps, a.seed, threshold=tau, keep_samples=False)
        rows[target] = dict(training=dict(steps=a.steps, batch_size=a.batch_size, images=a.steps * a.batch_size,
                                          **info), **summary(res))
        print(f'{target}: trained {info["seconds"]} s, tau {tau:.4g}', flush=True)
    doc = dict(command='python bench/uem_targets.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
               created=time.strftime('%Y-%m-%d %H:%M:%S'), target_layer_ratio=ratio, settings=vars(a), rows=rows)
    plain = json.dumps(doc, default=lambda o: o.tolist() if hasattr(o, 'tolist') else str(o))
    atomic_write_json(out, json.loads(plain))
    print(f"{'model':9s} {'ratio':>6s} {'Spearman':>9s} {'AUROC':>6s} {'eta2 u':>7s} {'eta2 exit':>9s}"
          "  (within a step)")
    for k, r in rows.items():
        f = lambda v: '-' if v is None else f'{v:.2f}'
        print(f"{k:9s} {f(r.get('layer_ratio')):>6s} {f(r.get('spearman')):>9s} {f(r.get('auroc')):>6s} "
              f"{f(r.get('eta2_u')):>7s} {f(r.get('eta2_exit')):>9s}")
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
