"""A diffusers `DiTPipeline` with and without early exits (`adadiff_nb.integrations.diffusers`): measured vs ideal
speed-up.

A pipeline of random components (timing does not depend on training) samples a batch of class labels with
classifier-free guidance (2 rows per image) at batch 1, 8 and 32; the plain pipeline is timed against the same
pipeline with static exits at a few layer ratios (every row leaves at layer round(ratio * L)), interleaved
(`adadiff_nb.experiments.bench.time_interleaved`), and each run prints the measured speed-up beside the ideal ones
(1 / layer ratio and the analytic GFLOPs of `exit_stats`). `--thresholds` adds threshold exits (untrained heads:
their layer ratio is whatever the random UEMs give). On CPU the DiT is small (`--size small`); with a GPU the
default is DiT-XL/2 size in bf16 (`--size xl`).

    OMP_NUM_THREADS=1 python bench/bench_pipelines.py --threads 1 --out results/pipelines_cpu_bench.json
    python bench/bench_pipelines.py --device cuda --size xl --batches 1,8,32 --out results/pipelines_cuda_bench.json
"""
from __future__ import annotations
import argparse, sys, time
import torch
from adadiff_nb.experiments.bench import add_timing_args, time_interleaved, write_bench_json
from adadiff_nb.evaluation.cost import speedup
from adadiff_nb.integrations.diffusers import (disable_early_exit, early_exit_model, enable_early_exit, exit_stats,
                                  set_exit_threshold, tiny_dit_pipeline)

SIZES = dict(tiny=dict(num_layers=4, sample_size=8, heads=2, head_dim=8),
             small=dict(num_layers=12, sample_size=16, heads=6, head_dim=32),
             xl=dict(num_layers=28, sample_size=32, heads=16, head_dim=72))      # DiT-XL/2 on 256x256 latents


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', choices=list(SIZES), default=None, help='DiT size (default: small on CPU, xl on CUDA)')
    p.add_argument('--batches', default='1,8,32', help='images per pipeline call, comma-separated')
    p.add_argument('--ratios', default='0.75,0.5,0.25', help='static exits at these layer ratios')
    p.add_argument('--thresholds', default='', help='threshold exits too, e.g. 0.5,0.55')
    p.add_argument('--steps', type=int, default=10, help='sampling steps per call')
    p.add_argument('--guidance-scale', type=float, default=4.0, help='> 1: guidance batch (2 rows per image)')
    add_timing_args(p, device='auto')                          # 'auto': cuda when available, else cpu
    p.set_defaults(warmup=1)
    return p


def build_pipeline(size: str, device: str, seed: int = 0):
    "The random DiT pipeline of `size` on `device` (bf16 on CUDA), early exit enabled (heads: output-layer copies)."
    pipe = tiny_dit_pipeline(seed=seed, **SIZES[size])
    pipe = pipe.to(device, torch.bfloat16) if device == 'cuda' else pipe.to(device)
    return enable_early_exit(pipe, threshold=0.)


def _modes(L: int, ratios: list, thresholds: list) -> dict:
    "{name: exit rule} with 'plain' (the original forward) first."
    modes = {'plain': None}
    modes.update({f'exit@{round(r * L)}/{L}': dict(exit_layer=round(r * L)) for r in ratios})
    modes.update({f'tau={t:g}': dict(threshold=t) for t in thresholds})
    return modes


def bench_batch(pipe, ee, batch: int, modes: dict, a) -> list[dict]:
    "Rows of one batch size: seconds per call of every mode (interleaved), layer ratio, speed-ups."
    labels = [i % 1000 for i in range(batch)]
    stats = {}

    def call(name, rule):
        def fn():
            if rule is None: disable_early_exit(pipe)
            else:
                enable_early_exit(pipe, heads=ee)
                set_exit_threshold(pipe, **rule)
            pipe(class_labels=labels, num_inference_steps=a.steps, guidance_scale=a.guidance_scale,
                 generator=torch.Generator().manual_seed(a.seed), output_type='np')
            if rule is not None: stats[name] = exit_stats(pipe)
        return fn

    times = time_interleaved({k: call(k, r) for k, r in modes.items()}, a.repeats, a.warmup, a.device)
    enable_early_exit(pipe, heads=ee)
    full = times['plain'].median
    rows = [dict(batch=batch, mode='plain', seconds=full, layer_ratio=1.0, measured_speedup=1.0, ideal_speedup=1.0)]
    for name in list(modes)[1:]:
        st = stats[name]
        sp = speedup(st['layer_ratio'], full, times[name].median, st['gflops_full'], st['gflops'])
        rows.append(dict(batch=batch, mode=name, seconds=times[name].median, rows=st['rows'],
                         gflops=st['gflops'], **sp))
    return rows


def table(rows: list) -> str:
    head = f"{'batch':>5} {'mode':>12} {'s/call':>9} {'layers':>7} {'measured':>9} {'ideal':>7} {'ideal GFLOPs':>12}"
    lines = [head]
    for r in rows:
        g = r.get('gflops_speedup')
        lines.append(f"{r['batch']:>5} {r['mode']:>12} {r['seconds']:>9.4f} {r['layer_ratio']:>7.3f} "
                     f"{r['measured_speedup']:>8.2f}x {r['ideal_speedup']:>6.2f}x "
                     + (f"{g:>11.2f}x" if g else f"{'':>12}"))
    return '\n'.join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    if a.device == 'auto': a.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if a.device == 'cuda' and not torch.cuda.is_available():
        print("bench_pipelines: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    size = a.size or ('xl' if a.device == 'cuda' else 'small')
    t0 = time.time()
    pipe = build_pipeline(size, a.device, a.seed)
    ee = early_exit_model(pipe)
    L = ee.num_layers
    modes = _modes(L, [float(v) for v in a.ratios.split(',') if v],
                   [float(v) for v in a.thresholds.split(',') if v])
    rows = [r for b in (int(v) for v in a.batches.split(',')) for r in bench_batch(pipe, ee, b, modes, a)]
    print(f"random DiTPipeline '{size}' ({L} blocks, {SIZES[size]}), {a.steps} steps, guidance {a.guidance_scale}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}")
    print(table(rows))
    if a.out:
        path = write_bench_json(a.out, 'bench/bench_pipelines.py', argv, t0, size=size, config=SIZES[size],
                                device=a.device, torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
        print(f"wrote {path}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
