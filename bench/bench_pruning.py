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
import argparse, sys
from pathlib import Path
import torch
from adadiff_nb.experiments.peers import cached_pruned
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


def pruned_models(a, bb, log) -> dict:
    "{target: (pruned before fine-tuning, fine-tuned, report)}, from `--cache` where already built (`cached_pruned`)."
    return cached_pruned(bb, a.targets, a.cache, a.seed, log, taylor_batches=a.taylor_batches,
                         taylor_threshold=a.taylor_threshold, finetune_steps=a.finetune_steps,
                         finetune_batch=a.finetune_batch, finetune_lr=a.finetune_lr, finetune_warmup=a.finetune_warmup)


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
                 training="the embedded model's own exit heads, UEMs and backbone")]
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
                note=("the default model's recipe fine-tunes its backbone with the exit heads and UEMs (1500 x 64 "
                      "images, cpu16_adadiff); pruning starts from that backbone and fine-tunes the pruned backbone "
                      "for finetune_steps x finetune_batch images more"))


def main(argv=None) -> int:
    return bench_main('bench/bench_pruning.py', build_parser, check_args, run, argv, device_name='CPU')


if __name__ == '__main__':
    sys.exit(main())
