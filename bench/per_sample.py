"""Does any exit criterion adapt per sample? (issue 21, items 1-3), on the embedded default model.

Each criterion (`adadiff_nb.experiments.per_sample.UEM_VARIANTS`: the model's own UEM; linear UEMs retrained alone on
the paper's target (Eq. 8) and on the change of the model's own output, the latter also with 4x the images; a UEM that
also reads what the last block changed; an attention probe over pooled tokens) is put at the shipped model's layer
ratio and measured against one per-step schedule calibrated to that ratio: within-step discrimination, the allocation
test (the share of the schedule's one-step error a per-sample exit could remove, and what the criterion gets, beside
random scores), and sampled images with thresholds per step matched to the schedule and with one threshold, paired
intervals against the schedule and whole runs timed in turns with the plain backbone. Writes one JSON (atomically)
and prints a markdown table.

    OMP_NUM_THREADS=2 python bench/per_sample.py --threads 2 --out results/per_sample_cpu.json
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path
from adadiff_nb.experiments.exit_bench import bench_main
from adadiff_nb.experiments.per_sample import UEM_VARIANTS, per_sample_study, per_sample_table
from adadiff_nb.models.default_model import load_default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--variants', nargs='+', default=list(UEM_VARIANTS), choices=list(UEM_VARIANTS),
                   help='criteria to compare (default: all)')
    p.add_argument('--train-steps', type=int, default=1200, help='UEM training steps per variant (equal images)')
    p.add_argument('--train-batch', type=int, default=64)
    p.add_argument('--steps', type=int, default=20, help='DDIM steps of every sampling run')
    p.add_argument('--n', type=int, default=64, help='evaluation images (and calibration images, other noise)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--repeats', type=int, default=3, help='timed whole runs per method (0: no timing)')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--out', default='results/per_sample_cpu.json')
    return p


def check_args(a):
    "Clear errors before loading anything."
    for name, lo in (('train_steps', 1), ('train_batch', 1), ('steps', 1), ('n', 2), ('repeats', 0)):
        if getattr(a, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(a, name)}")
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")


def run(a, log) -> dict:
    "The study on the embedded default model, sampled with clip_denoised (as bench/schedule_baselines.py)."
    res = per_sample_study(load_default('cpu'), {k: UEM_VARIANTS[k] for k in a.variants}, steps=a.steps, n=a.n,
                           batch=a.n, seed=a.seed, train_steps=a.train_steps, train_batch=a.train_batch,
                           repeats=a.repeats, warmup=1 if a.repeats else 0,
                           sampler_opts=dict(clip_denoised=True), log=log)
    print(per_sample_table(res))
    res['study_seconds'] = res.pop('seconds')
    return dict(model='default', **res)


if __name__ == '__main__':
    sys.exit(bench_main('bench/per_sample.py', build_parser, check_args, run))
