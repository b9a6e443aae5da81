"""Whole sampling runs: the plain backbone vs dynamic exits, a per-step exit schedule and a static exit (CPU or CUDA).

For a user the whole sampling run counts, not one forward. Each cell (model, batch, threads, mode, precision) samples
`batch` images from the same noise with the plain backbone and with the early-exit model under each exit rule, timed
in turns (`adadiff_nb.experiments.sampling_bench.sampling_grid`): dynamic exits at the model's threshold ('dynamic'),
the same threshold tested only at the exit points `calibrate_exit_points(model, threshold)` finds on calibration noise
(seed + 1; 'points'), the per-step schedule `compile_exit_schedule(model, threshold)` compiles from a calibration run
(seed + 1; 'scheduled'), the static exit with the dynamic run's layer ratio ('static') and threshold 0 ('zero': no row
can leave). Rows: measured speed-up (median plain / median method), ideal (1 / layer ratio), share of ideal, host
syncs, max |threshold 0 - plain| (0: threshold 0 is exactly the full model) and, for 'points', the share of exits
that differ from the dynamic run's on the same noise.

Models: `default` and `cifar10_unet` (the embedded U-ViT and convolutional UNet at their documented thresholds; a
UNet's exits run their up path, so read its FLOP ideal, not 1 / layer ratio), `uvit-s2` and `dit-xl2` (random weights,
reduced widths unless --full-width, a threshold that skips about --skip of the layers of a random batch).

    OMP_NUM_THREADS=2 python bench/bench_sampling.py --out results/sampling_cpu_bench.json
    OMP_NUM_THREADS=2 python bench/bench_sampling.py --models cifar10_unet --threads 2 --methods dynamic points zero \
        --out results/sampling_unet_cpu_bench.json
    python bench/bench_sampling.py --device cuda --models default uvit-s2 dit-xl2 --full-width --batches 1 8 64 256
"""
from __future__ import annotations
import argparse, sys, time
import torch
from adadiff_nb.experiments.exit_bench import (add_timing_args, build_bench_model, spread_uem_weights,
                                               threshold_for_skip, write_bench_json)
from adadiff_nb.experiments.sampling_bench import METHODS, MODES, sampling_grid, sampling_table
from adadiff_nb.models.default_model import default_threshold, load_default

BENCH_MODELS = {'uvit-s2': 'U-ViT-S/2', 'dit-xl2': 'DiT-XL/2'}     # --models name -> build_bench_model arch
EMBEDDED = ('default', 'cifar10_unet')        # embedded models, at their documented thresholds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=3)
    p.add_argument('--models', nargs='+', default=['default'], choices=[*EMBEDDED, *BENCH_MODELS])
    p.add_argument('--batches', nargs='+', type=int, default=None, help='batch sizes (CPU: 1 8 64; GPU: 1 8 64 256)')
    p.add_argument('--threads', nargs='+', type=int, default=None,
                   help='torch threads, one cell each (CPU default: 1 2; CUDA: as set)')
    p.add_argument('--modes', nargs='+', default=['eager'], choices=list(MODES))
    p.add_argument('--precisions', nargs='+', default=['fp32'], help='fp32, bf16, fp16')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS),
                   help='exit rules compared with the plain backbone (static takes the dynamic run\'s layer ratio)')
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--skip', type=float, default=.4, help="share of layers the bench models' threshold skips")
    p.add_argument('--schedule-n', type=int, default=64,
                   help='images of the calibration runs of the schedule and the exit points (seed + 1)')
    p.add_argument('--min-seconds', type=float, default=3.,
                   help='time each method for about this long at least (more repeats where a run is short)')
    p.add_argument('--slack', type=float, default=.5,
                   help='exit points: keep an exit where a calibration row had u < threshold * (1 + slack)')
    p.add_argument('--full-width', action='store_true', help='uvit-s2 / dit-xl2 at full width (default: reduced)')
    p.add_argument('--buckets', default='fine', help="compiled mode's batch buckets: fine (default) or pow2")
    p.add_argument('--out', default=None,
                   help='JSON results (default: results/sampling_{cpu,gpu}_bench.json by device)')
    p.set_defaults(warmup=1)
    return p


def _check_args(a):
    "Clear errors before loading anything."
    if 'static' in a.methods and 'dynamic' not in a.methods:
        raise ValueError("--methods static takes the dynamic run's layer ratio; add dynamic (--methods dynamic static)")
    for name in ('batches', 'threads'):
        bad = [v for v in getattr(a, name) or [] if v < 1]
        if bad: raise ValueError(f"--{name} must be integers >= 1, got {bad}")
    if a.steps < 1: raise ValueError(f"--steps must be >= 1, got {a.steps}")
    if not 0 < a.skip < 1: raise ValueError(f"--skip must lie in (0, 1), got {a.skip}")
    if a.schedule_n < 1: raise ValueError(f"--schedule-n must be >= 1, got {a.schedule_n}")
    if not a.slack >= 0: raise ValueError(f"--slack must be >= 0, got {a.slack}")
    if not a.min_seconds >= 0: raise ValueError(f"--min-seconds must be >= 0, got {a.min_seconds}")
    if torch.device(a.device).type == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA GPU; run on a GPU machine or use --device cpu")


def _calibrations(a, m, thr) -> tuple:
    "(per-step schedule, exit points) of model `m` at threshold `thr`, each calibrated on seed + 1 when asked for."
    from adadiff_nb.exits.calibrate import calibrate_exit_points
    from adadiff_nb.exits.schedule import compile_exit_schedule
    sch = pts = None
    if 'scheduled' in a.methods:
        sch = compile_exit_schedule(m, thr, sampler=a.sampler, steps=a.steps, n=a.schedule_n, batch_size=a.schedule_n,
                                    seed=a.seed + 1)
    if 'points' in a.methods:
        pts = calibrate_exit_points(m, thr, sampler=a.sampler, steps=a.steps, n=a.schedule_n, seed=a.seed + 1,
                                    slack=a.slack)
    return sch, pts


def build_models(a, log=print) -> dict:
    "{name: dict(model, threshold, schedule, static_exits)} of `--models` on `--device`."
    dev = torch.device(a.device)
    out = {}
    for name in a.models:
        if name in EMBEDDED:
            m = load_default(dev, name=name)
            thr = default_threshold(m)
        else:
            m = spread_uem_weights(build_bench_model(BENCH_MODELS[name], not a.full_width, a.seed).to(dev), seed=a.seed)
            bb, g = m.backbone, torch.Generator().manual_seed(a.seed)
            x = torch.randn(16, bb.in_chans, bb.img_size, bb.img_size, generator=g).to(dev)
            thr = threshold_for_skip(m, x, (torch.rand(16, generator=g) * 999.).to(dev), skip=a.skip)[0]
        sch, pts = _calibrations(a, m, thr)
        tested = '' if pts is None else f", exit points tested {pts.tested_share:.0%}"
        log(f"{name}: {m.num_layers} layers, threshold {thr:.4g}{tested}")
        out[name] = dict(model=m, threshold=thr if 'dynamic' in a.methods else None, schedule=sch,
                         static_exits='auto' if 'static' in a.methods else None, points=pts)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    dev, t0 = torch.device(a.device), time.time()
    cuda = dev.type == 'cuda'
    batches, threads = a.batches or ([1, 8, 64, 256] if cuda else [1, 8, 64]), a.threads or \
        ([torch.get_num_threads()] if cuda else [1, 2])
    log = lambda s: print(s, flush=True)
    try:
        _check_args(a)
        models = build_models(a, log)
        res = sampling_grid(models, batches, threads, a.modes, a.precisions, a.sampler, a.steps, a.repeats, a.warmup,
                            a.seed, dev, True, a.buckets, a.min_seconds, log=log)
    except ValueError as e:
        print(f"bench_sampling: error: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(dev) if cuda else 'CPU'
    width = 'full-width' if a.full_width else 'reduced'
    print(f"whole sampling runs on {name} ({a.sampler}, {a.steps} steps; bench models {width}); torch "
          f"{torch.__version__}")
    print(sampling_table(res['rows']))
    out = a.out or f"results/sampling_{'gpu' if cuda else 'cpu'}_bench.json"
    payload = {k: v for k, v in res.items() if k != 'command'}          # write_bench_json records the command line
    print(f"wrote {write_bench_json(out, 'bench/bench_sampling.py', argv, t0, device_name=name, **payload)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
