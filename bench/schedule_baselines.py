"""Dynamic exits against static per-step schedules at equal measured time (issue 21, item 2), on the embedded model.

For each threshold: the dynamic exits, the per-step schedule compiled from them (`compile_exit_schedule`, 'AdaDiff as
a schedule') and the one calibrated on the same model to the dynamic run's layer ratio (`calibrate_step_schedule`),
both on calibration noise (seed + 1), and the plain backbone, all sampled from the same evaluation noise
(`adadiff_nb.experiments.schedule_baselines.schedule_baselines`): layer ratio, per-image MSE / PSNR to the full model's
images with paired bootstrap intervals of each schedule minus the dynamic exits, whole-run times in turns with the
plain backbone (measured and ideal speed-up), and a verdict per threshold. Writes one JSON (atomically) with the
command line, and prints a markdown table.

    OMP_NUM_THREADS=1 python bench/schedule_baselines.py --threads 1 --out results/schedule_baselines_cpu.json
"""
from __future__ import annotations
import argparse, inspect, sys, time
from pathlib import Path
import torch
from adadiff_nb.experiments.exit_bench import add_timing_args, write_bench_json
from adadiff_nb.experiments.schedule_baselines import schedule_baselines, schedule_baselines_table
from adadiff_nb.models.default_model import default_threshold, load_default
from adadiff_nb.sampling.samplers import get_sampler

THRESHOLD_FACTORS = (1., 1.5, 2.)      # default thresholds: the model's documented one times these


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=5)
    p.add_argument('--thresholds', nargs='+', type=float, default=None,
                   help=f"exit thresholds (default: the model's default_threshold x {list(THRESHOLD_FACTORS)})")
    p.add_argument('--sampler', default='ddim', help='a one-evaluation sampler (ddim, ddpm, euler_ode, ...)')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--n', type=int, default=64, help='evaluation images (fidelity and timing: one whole run)')
    p.add_argument('--batch', type=int, default=64, help='batch size of the sampling runs')
    p.add_argument('--calibration-n', type=int, default=None, help='calibration images (default: --n)')
    p.add_argument('--calibration-seed', type=int, default=None, help='calibration noise (default: --seed + 1)')
    p.add_argument('--weight', default='measured', choices=['measured', 'none'],
                   help="step weights of the calibrated schedule's error table")
    p.add_argument('--weight-n', type=int, default=16, help='images of the measured step weights')
    p.add_argument('--no-clip', action='store_true', help='sample without clip_denoised (default: clipped)')
    p.add_argument('--confidence', type=float, default=.95, help='bootstrap interval level')
    p.add_argument('--time-tol', type=float, default=.02, help='dynamic counts as not slower within this share')
    p.add_argument('--all-exit-points', action='store_true',
                   help='dynamic exits test every exit (default: only the exit points calibrated on the calibration '
                        'noise, calibrate_exit_points: the same exits at less cost)')
    p.add_argument('--out', default='results/schedule_baselines_cpu.json')
    p.set_defaults(warmup=0)
    return p


def check_args(a):
    "Clear errors before loading anything (schedule_baselines checks the rest before sampling)."
    for name in ('steps', 'n', 'batch', 'repeats', 'weight_n'):
        if getattr(a, name) < (2 if name == 'n' else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be >= {2 if name == 'n' else 1}, got {getattr(a, name)}")
    if a.warmup < 0: raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")
    if torch.device(a.device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA GPU; run on a GPU machine or use --device cpu")
    get_sampler(a.sampler)


def sampler_opts(sampler: str, clip: bool) -> dict | None:
    "clip_denoised=True where the sampler takes it (as the sampling bench samples), unless --no-clip."
    takes = 'clip_denoised' in inspect.signature(get_sampler(sampler)).parameters
    return {'clip_denoised': True} if clip and takes else None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a, t0 = build_parser().parse_args(argv), time.time()
    log = lambda s: print(s, flush=True)
    try:
        check_args(a)
        if a.threads: torch.set_num_threads(a.threads)
        m = load_default(a.device)
        ths = a.thresholds or [round(default_threshold(m) * f, 6) for f in THRESHOLD_FACTORS]
        res = schedule_baselines(m, ths, a.sampler, a.steps, a.n, a.batch, a.seed, a.repeats, a.warmup,
                                 a.calibration_seed, a.calibration_n, a.weight, a.weight_n, a.device,
                                 sampler_opts(a.sampler, not a.no_clip), a.confidence, a.time_tol,
                                 exit_points=not a.all_exit_points, log=log)
    except ValueError as e:
        print(f"schedule_baselines: error: {e}", file=sys.stderr)
        return 2
    print(schedule_baselines_table(res))
    name = torch.cuda.get_device_name(a.device) if torch.device(a.device).type == 'cuda' else 'CPU'
    out = write_bench_json(a.out, 'bench/schedule_baselines.py', argv, t0, model='default', device_name=name,
                           sampler_opts=sampler_opts(a.sampler, not a.no_clip), **res)
    print(f"wrote {out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
