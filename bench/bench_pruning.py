"""S-Pruning (Diff-Pruning) against early exit on the embedded default model's U-ViT backbone: whole sampling runs.

The backbone is pruned to each `--targets` FLOP ratio (timestep-aware Taylor importance on `--taylor-batches` CIFAR-10
batches, heads and MLP channels removed by torch-pruning; `adadiff_nb.exits.pruning`), then fine-tuned for
`--finetune-steps` steps of `--finetune-batch` images with the training loop's noise loss (the same data, steps, batch,
lr and warm-up as the default model's exit stage, `cpu16_adadiff`, which also fine-tunes the backbone). The plain
backbone, every pruned model (before and after fine-tuning) and the default model's
dynamic exits (its calibrated threshold and exit points) sample the same `--n` images from the same noise, timed in
turns (`time_interleaved`). Rows: FLOP ratio (pruning: counted; early exit: the run's analytic GFLOPs), measured
speed-up, the FLOP ideal and their ratio, the per-image PSNR to the plain backbone's images with a paired bootstrap
interval of each method's PSNR minus early exit's (same images, same noise). Needs the `prune` extra (torch-pruning).

    OMP_NUM_THREADS=2 python bench/bench_pruning.py --threads 2 --cache runs/pruning \
        --out results/pruning_cpu_bench.json

`--cache DIR` keeps each fine-tuned pruned model (`save_pruned`: safetensors + JSON widths) under a name made of its
settings, so a rerun (e.g. on an idle machine, for the timing) loads it instead of pruning and training again.
"""
from __future__ import annotations
import argparse, copy, json, sys
from pathlib import Path
import torch
from adadiff_nb.data import get_dataset
from adadiff_nb.exits.pruning import finetune_pruned, load_pruned, prune_backbone, save_pruned, taylor_importance
from adadiff_nb.experiments.exit_bench import add_timing_args, run_environment, time_interleaved, bench_main
from adadiff_nb.experiments.schedule_baselines import image_fidelity, paired_bootstrap
from adadiff_nb.apps.sample_io import resolve_exit_points
from adadiff_nb.models.default_model import default_threshold, load_default
from adadiff_nb.sampling.run import sample_batches


SETTINGS = ('sampler', 'steps', 'n', 'batch', 'seed', 'repeats', 'warmup', 'targets', 'finetune_steps',
            'finetune_batch', 'finetune_lr', 'finetune_warmup', 'taylor_batches', 'taylor_threshold')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=3)
    p.add_argument('--targets', nargs='+', type=float, default=[.7], help='FLOP ratios to prune to, in (0, 1)')
    p.add_argument('--finetune-steps', type=int, default=1500,
                   help="fine-tuning steps of each pruned model (0: none); default: the default model's exit stage")
    p.add_argument('--finetune-batch', type=int, default=64)
    p.add_argument('--finetune-lr', type=float, default=2e-4)
    p.add_argument('--finetune-warmup', type=int, default=200)
    p.add_argument('--taylor-batches', type=int, default=2, help='CIFAR-10 batches of 64 for the Taylor importance')
    p.add_argument('--taylor-threshold', type=float, default=0.05, help="Diff-Pruning's loss threshold (its default)")
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--n', type=int, default=64, help='images of each whole run (one batch per --batch)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--cache', default=None, help='directory for the fine-tuned pruned models (reused when present)')
    p.add_argument('--out', default='results/pruning_cpu_bench.json')
    p.set_defaults(warmup=1)
    return p


def check_args(a):
    "Clear errors before loading anything."
    for t in a.targets:
        if not 0 < t < 1: raise ValueError(f"--targets must lie in (0, 1) (FLOP ratios), got {t}")
    for name in ('steps', 'n', 'batch', 'repeats', 'finetune_batch', 'taylor_batches'):
        if getattr(a, name) < 1: raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.finetune_steps < 0: raise ValueError(f"--finetune-steps must be >= 0, got {a.finetune_steps}")
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")


def taylor_batches(a, img_size: int) -> list:
    "The first `--taylor-batches` batches of 64 training images (no labels: the default model is unconditional)."
    ds = get_dataset('cifar10_partial', split='train', img_size=img_size, flip=False)
    g = torch.Generator().manual_seed(a.seed)
    idx = torch.randperm(len(ds), generator=g)[:64 * a.taylor_batches]
    xs = torch.stack([ds[int(i)][0] for i in idx])
    return [(xs[k:k + 64], None) for k in range(0, len(xs), 64)]


def pruned_models(a, bb, log) -> dict:
    "{target: (pruned before fine-tuning, fine-tuned, report)}, from `--cache` where already built."
    scores, out = None, {}
    for t in a.targets:
        name = (f'prune{t:g}_taylor{a.taylor_batches}x{a.taylor_threshold:g}_ft{a.finetune_steps}x{a.finetune_batch}'
                f'_lr{a.finetune_lr:g}w{a.finetune_warmup}_s{a.seed}')
        cached = Path(a.cache) / name if a.cache else None
        if cached is not None and (cached / 'report.json').is_file():
            raw, ft = load_pruned(cached / 'raw'), load_pruned(cached / 'finetuned')
            out[t] = (raw.eval(), ft.eval(), json.loads((cached / 'report.json').read_text()))
            log(f"target {t:g}: loaded {cached}")
            continue
        if scores is None:
            scores = taylor_importance(bb, taylor_batches(a, bb.img_size), threshold=a.taylor_threshold, seed=a.seed)
            log(f"Taylor importance over {len(scores.losses)} timesteps (stopped at t = {scores.times[-1]:g})")
        raw = prune_backbone(bb, t, importance=scores, seed=a.seed).eval()
        res = finetune_pruned(copy.deepcopy(raw), a.finetune_steps, batch_size=a.finetune_batch, seed=a.seed,
                              lr=a.finetune_lr, warmup_steps=a.finetune_warmup) \
            if a.finetune_steps else dict(model=copy.deepcopy(raw), seconds=0., final_loss=None)
        rep = dict(pruning={k: v for k, v in raw.pruning.items()}, taylor_steps=len(scores.losses),
                   finetune_seconds=res['seconds'], finetune_final_loss=res['final_loss'])
        ft = res['model'].eval()
        ft.pruning = raw.pruning
        if cached is not None:
            save_pruned(raw, cached / 'raw')
            save_pruned(ft, cached / 'finetuned')
            (cached / 'report.json').write_text(json.dumps(rep, indent=1))
        out[t] = (raw, ft, rep)
        log(f"target {t:g}: FLOP ratio {raw.pruning['ratio']:.3f}, fine-tuned {a.finetune_steps} steps in "
            f"{res['seconds']:.0f} s")
    return out


def _row(name, method, images, ref, ee_psnr, plain_s, seconds, flop_ratio, **extra) -> dict:
    fid = image_fidelity(images, ref)
    d = paired_bootstrap(fid['psnr'], ee_psnr) if ee_psnr is not None else None
    measured = plain_s / seconds
    return dict(setting=name, method=method, flop_ratio=flop_ratio, seconds=seconds, measured_speedup=measured,
                flop_ideal_speedup=1 / flop_ratio, share_of_flop_ideal=measured * flop_ratio,
                psnr_vs_plain=float(fid['psnr'].mean()), mse_vs_plain=float(fid['mse'].mean()),
                psnr_minus_early_exit=d, **extra)


def run(a, log=print) -> dict:
    "Build (or load) the pruned models, then the runs timed in turns, and one row per method."
    dev = torch.device(a.device)
    ee = load_default(dev).eval()
    bb, tau = ee.backbone, default_threshold()
    pts = resolve_exit_points('auto', 'default', tau)
    models = pruned_models(a, bb, log)
    kw = dict(n=a.n, batch_size=a.batch, seed=a.seed, device=dev, sampler_opts={'clip_denoised': True})
    fns = {'plain': lambda: sample_batches(bb, a.sampler, a.steps, meter=False, **kw),
           'early exit': lambda: sample_batches(ee, a.sampler, a.steps, threshold=tau, exit_points=pts, **kw)}
    for t, (raw, ft, _) in models.items():
        fns[f'pruned {t:g}'] = lambda m=raw: sample_batches(m, a.sampler, a.steps, meter=False, **kw)
        fns[f'pruned {t:g} + ft'] = lambda m=ft: sample_batches(m, a.sampler, a.steps, meter=False, **kw)
    runs = {k: f() for k, f in fns.items()}                               # untimed: the images, and a warm-up
    tm = time_interleaved(fns, a.repeats, a.warmup, dev)
    plain_s, ref = tm['plain'].median, runs['plain'].images
    st = runs['early exit'].stats
    ee_ratio = st['gflops_per_image'] / st['gflops_full_per_image']
    ee_psnr = image_fidelity(runs['early exit'].images, ref)['psnr']
    rows = [_row('early exit', 'AdaDiff (default model)', runs['early exit'].images, ref, None, plain_s,
                 tm['early exit'].median, ee_ratio, threshold=tau, layer_ratio=st['layer_ratio'],
                 training='exit heads + UEMs of the embedded model (frozen backbone)')]
    for t, (_, _, rep) in models.items():
        for k, ft in ((f'pruned {t:g}', False), (f'pruned {t:g} + ft', True)):
            rows.append(_row(k, 'S-Pruning', runs[k].images, ref, ee_psnr, plain_s, tm[k].median,
                             rep['pruning']['ratio'], target=t, finetuned=ft,
                             finetune_steps=a.finetune_steps if ft else 0, widths=rep['pruning']['widths']))
    for r in rows:
        log(f"{r['setting']:18s} FLOP ratio {r['flop_ratio']:.3f}  measured {r['measured_speedup']:.3f}x  "
            f"FLOP ideal {r['flop_ideal_speedup']:.3f}x  PSNR vs plain {r['psnr_vs_plain']:.2f} dB")
    return dict(rows=rows, environment=dict(run_environment(), device=str(dev), threads=torch.get_num_threads()),
                settings={k: getattr(a, k) for k in SETTINGS},
                model='default (its U-ViT backbone)',
                note=('early exit trains only its heads and UEMs on the frozen backbone; pruning fine-tunes the '
                      'pruned backbone for finetune_steps x finetune_batch images'))


def main(argv=None) -> int:
    return bench_main('bench/bench_pruning.py', build_parser, check_args, run, argv, device_name='CPU')


if __name__ == '__main__':
    sys.exit(main())
