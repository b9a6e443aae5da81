"""Measured vs ideal speed-up of early exits across batch sizes, eager and compiled, fp32 and bf16 (CPU or CUDA).

U-ViT-S/2 at 32x32 (the paper's CIFAR-10 model) and DiT-XL/2 on 32x32x4 latents, random weights (timing does not
depend on training). In each group (model, batch, mode, precision) the plain backbone and the early-exit model at
every skip level run on the same batch and noise, timed in turns (`adadiff_nb.experiments.bench.bench_exit_group`): CUDA
events on a GPU, `time.perf_counter` on a CPU. Static exits are drawn per sample to skip the requested share of
block evaluations; `--rules threshold` adds the dynamic path (UEM, exit decisions on the device, host syncs) at a
threshold searched to skip about as much, under each `--sync-policies` policy. `--reduced` shrinks the widths so a
2-core CPU runs the grid in minutes. Printed and written to `--out` (JSON), every ratio from one run.

    OMP_NUM_THREADS=2 python bench/bench_exits.py --reduced --out results/exits_cpu_bench.json
    python bench/bench_exits.py --device cuda --batches 1 16 64 256 --out results/exits_h200_bench.json
"""
from __future__ import annotations
import argparse, sys, time
import torch
from adadiff_nb.experiments.bench import (BENCH_ARCHS, add_timing_args, bench_exit_grid, exit_grid_table,
                                          write_bench_json)


def _policy(v: str):
    return int(v) if v.isdigit() else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', nargs='+', default=list(BENCH_ARCHS), help=f'models: {list(BENCH_ARCHS)}')
    p.add_argument('--batches', nargs='+', type=int, default=None, help='batch sizes (CPU: 1 16 64; GPU: 1 16 64 256)')
    p.add_argument('--skips', nargs='+', type=float, default=[0., .25, .45, .6],
                   help='shares of block evaluations skipped (0: nothing exits)')
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'], help='fp32, bf16, fp16')
    p.add_argument('--modes', nargs='+', default=['eager', 'compiled'], help='eager, compiled (torch.compile)')
    p.add_argument('--rules', nargs='+', default=['static'], help='static (drawn exit layers), threshold (UEM)')
    p.add_argument('--sync-policies', nargs='+', type=_policy, default=['auto'],
                   help="host-sync policies of the threshold rows: auto, every, or an int k")
    p.add_argument('--reduced', action='store_true', help='narrower models (same depths) for a small CPU')
    p.add_argument('--buckets', default='fine', help="compiled mode's batch buckets: fine (default) or pow2")
    return add_timing_args(p)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    batches = a.batches or ([1, 16, 64] if dev.type == 'cpu' else [1, 16, 64, 256])
    t0 = time.time()
    try:
        res = bench_exit_grid(a.archs, batches, a.skips, a.precisions, a.modes, a.rules, a.sync_policies, a.reduced,
                              a.repeats, a.warmup, a.seed, dev, log=lambda s: print(s, flush=True),
                              buckets=a.buckets)
    except ValueError as e:
        print(f"bench_exits: error: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'
    print(f"{'reduced ' if a.reduced else ''}models on {name}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads")
    print(exit_grid_table(res['runs']))
    if a.out:
        print(f"wrote {write_bench_json(a.out, 'bench/bench_exits.py', argv, t0, device_name=name, **res)}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
