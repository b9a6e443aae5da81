"""Token Merging (ToMe, the ASE paper's baseline) on the embedded default model's U-ViT backbone: whole sampling runs.

Each ToMe setting (schedule F / R / B, merge ratio, merging blocks) is applied by hooks to a copy of the trained
backbone (`adadiff_nb.exits.token_merging.apply_tome`); every setting and the plain backbone sample the same `--n`
images from the same noise, timed in turns (`time_interleaved`). Rows: the FLOP ratio vs the plain backbone
(`tome_flop_ratio`, the matching included), measured speed-up (median plain s / median ToMe s), the FLOP ideal
(1 / FLOP ratio), their ratio, and the per-image MSE / PSNR to the plain backbone's images. ToMe needs the `tome`
extra (tomesd).

    OMP_NUM_THREADS=2 python bench/bench_tome.py --threads 2 --out results/tome_cpu_bench.json
"""
from __future__ import annotations
import argparse, copy, itertools, sys
from pathlib import Path
import torch
from adadiff_nb.exits.token_merging import TOME_SCHEDULES, apply_tome, check_ratio, tome_flop_ratio
from adadiff_nb.experiments.exit_bench import add_timing_args, run_environment, time_interleaved, bench_main
from adadiff_nb.experiments.schedule_baselines import image_fidelity
from adadiff_nb.models.default_model import load_default
from adadiff_nb.sampling.run import sample_batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=3)
    p.add_argument('--schedules', nargs='+', default=list(TOME_SCHEDULES), help='ASE merging schedules: F R B')
    p.add_argument('--ratios', nargs='+', type=float, default=[.2, .4, .6], help='merge ratios in [0, 1)')
    p.add_argument('--blocks', type=int, default=5,
                   help='merging blocks k, placed by the schedule (default 5 of the 9; 0: all of them)')
    p.add_argument('--merge-mlp', action='store_true', help='merge around the MLP too (default: attention only)')
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--n', type=int, default=64, help='images of each whole run (one batch per --batch)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--out', default='results/tome_cpu_bench.json')
    p.set_defaults(warmup=1)
    return p


def check_args(a):
    "Clear errors before loading anything."
    if a.blocks < 0: raise ValueError(f"--blocks must be >= 0 (0: all), got {a.blocks}")
    for name in ('steps', 'n', 'batch', 'repeats'):
        if getattr(a, name) < 1: raise ValueError(f"--{name} must be >= 1, got {getattr(a, name)}")
    bad = [s for s in a.schedules if s not in TOME_SCHEDULES]
    if bad: raise ValueError(f"--schedules {bad} unknown; use {' '.join(TOME_SCHEDULES)}")
    for r in a.ratios: check_ratio(r)
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")


def settings(a) -> dict:
    "name -> apply_tome keywords of every setting asked for."
    k = a.blocks or None                                                 # 0: every block (the schedule then moot)
    scheds = a.schedules if k else a.schedules[:1]
    return {f'{s}{k or "all"} {r:g}': dict(ratio=r, schedule=s, blocks=k, merge_mlp=a.merge_mlp, seed=a.seed)
            for s, r in itertools.product(scheds, a.ratios)}


def run(a, log=print) -> dict:
    "The runs, timed in turns, and one row per ToMe setting."
    dev = torch.device(a.device)
    bb = load_default(dev).backbone
    nets = {'plain': bb, **{k: apply_tome(copy.deepcopy(bb), **kw) for k, kw in settings(a).items()}}
    kw = dict(n=a.n, batch_size=a.batch, seed=a.seed, device=dev, sampler_opts={'clip_denoised': True}, meter=False)
    fns = {k: (lambda net=net: sample_batches(net, a.sampler, a.steps, **kw)) for k, net in nets.items()}
    images = {k: f().images for k, f in fns.items()}                      # untimed: the images, and a warm-up
    tm = time_interleaved(fns, a.repeats, a.warmup, dev)
    plain_s, rows = tm['plain'].median, []
    for k, opts in settings(a).items():
        fid, ratio = image_fidelity(images[k], images['plain']), tome_flop_ratio(nets[k])
        measured = plain_s / tm[k].median
        rows.append(dict(setting=k, **{o: opts[o] for o in ('schedule', 'ratio', 'blocks', 'merge_mlp')},
                         flop_ratio=ratio, plain_s=plain_s, tome_s=tm[k].median, measured_speedup=measured,
                         flop_ideal_speedup=1 / ratio, share_of_flop_ideal=measured * ratio,
                         mse_vs_plain=float(fid['mse'].mean()), psnr_vs_plain=float(fid['psnr'].mean())))
        log(f"{k:9s} FLOP ratio {ratio:.3f}  measured {measured:.3f}x  FLOP ideal {1 / ratio:.3f}x  "
            f"PSNR vs plain {rows[-1]['psnr_vs_plain']:.2f} dB")
    return dict(rows=rows, environment=dict(run_environment(), device=str(dev), threads=torch.get_num_threads()),
                settings=dict(sampler=a.sampler, steps=a.steps, n=a.n, batch=a.batch, seed=a.seed, repeats=a.repeats,
                              warmup=a.warmup, blocks=a.blocks, merge_mlp=a.merge_mlp),
                model='default (its U-ViT backbone)')


def main(argv=None) -> int:
    return bench_main('bench/bench_tome.py', build_parser, check_args, run, argv, device_name='CPU')


if __name__ == '__main__':
    sys.exit(main())
