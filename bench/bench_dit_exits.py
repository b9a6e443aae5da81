"""CPU (or CUDA) benchmark of an early-exit DiT forward with static exits: measured vs ideal speed-up.

An early-exit DiT preset with random weights (timing does not depend on training) runs a batch whose samples
leave at static exit layers spread so that `--skip` of the block evaluations are skipped; it is timed against
the plain backbone on the same batch, interleaved (`experiments.bench.bench_dit_exits`). Printed and written to
`--out` (JSON): measured speed-up, the ideal ones (1/layer ratio, analytic FLOPs, measured parts), their ratio
(efficiency; issue 10's target is >= 0.85 at ~40% skipped, batch 64), per-part costs and peak memory.
`--guidance` adds the guided batch (two rows per sample, labels [y; null]).

    OMP_NUM_THREADS=1 python bench/bench_dit_exits.py --threads 1 --guidance --out results/dit_s2_cpu_bench.json
"""
from __future__ import annotations
import argparse, sys, time
import torch
from adadiff_nb.experiments.bench import add_timing_args, bench_dit_exits, exit_bench_table, write_bench_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='DiT-S/2', help='DiT preset (adadiff_nb.models.dit.DIT_PRESETS)')
    p.add_argument('--input-size', type=int, default=16, help='latent size (16: 64 tokens with patch 2)')
    p.add_argument('--in-channels', type=int, default=4)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--batch', type=int, default=64, help='samples (rows; twice as many rows with --guidance)')
    p.add_argument('--skip', type=float, default=0.4, help='fraction of block evaluations skipped')
    p.add_argument('--guidance', action='store_true', help='also benchmark the guided batch (2 rows per sample)')
    return add_timing_args(p, repeats=9)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    kw = dict(preset=a.preset, input_size=a.input_size, in_channels=a.in_channels, num_classes=a.num_classes,
              batch=a.batch, skip_fraction=a.skip, repeats=a.repeats, warmup=a.warmup, seed=a.seed, device=a.device)
    t0 = time.time()
    try:
        runs = [bench_dit_exits(**kw, guidance=g) for g in ([False, True] if a.guidance else [False])]
    except ValueError as e:
        print(f"bench_dit_exits: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.preset} at {a.input_size}x{a.input_size}x{a.in_channels}, batch {a.batch}, {a.skip:.0%} skipped "
          f"requested; torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}")
    print(exit_bench_table(runs))
    if a.out:
        path = write_bench_json(a.out, 'bench/bench_dit_exits.py', argv, t0, runs=runs,
                                environment=runs[0]['environment'])
        print(f"wrote {path}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
