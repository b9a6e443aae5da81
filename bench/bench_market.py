"""The market beside early exit: one diffusers pipeline, every accelerator on the same noise and clock.

Plain, `enable_early_exit` at `--thresholds`, cache-dit's DBCache at its defaults and at `--cache-dit-thresholds`
(first block computed, 2 warm-up steps: `TINY_CACHE_DIT`), diffusers' own caches where the transformer has
`CacheMixin` (Flux, Wan; DiT, PixArt, SD3 and Sana get a row with the reason), and early exit on top of a cache
(`adadiff_nb.experiments.market`). Whole pipeline calls are timed in turns (every method once per round, medians);
each method's images are compared with the plain pipeline's on the same noise (PSNR / MSE per image, bootstrap
intervals), with its own statistics (early exit: layer ratio and GFLOPs; cache-dit: cached steps), the linear-layer
FLOPs its blocks really ran, and whether disabling it gave the plain output back. Random weights by default
(`weights: 'random'`: only speed and fidelity to plain mean anything; the exit heads are untrained copies of the
output layer); `--pipeline DIR` (+ `--heads DIR`) runs a saved pipeline with trained heads instead. Needs the
`market` extra (cache-dit) unless `--no-cache-dit`.

`--family sd` (or `sdxl`) builds a tiny random Stable Diffusion pipeline (`market_sd_pipeline`: a UNet2DConditionModel
of `--sd-channels` widths with cross-attention at every level, `--sample-size` latents, default 32) and adds the UNet
rows: static exits at `--exit-layers` (default every exit below the full UNet), DeepCache at `--deepcache-intervals`
(branch `--deepcache-branch`; the `deepcache` extra), tomesd at `--tome-ratios` (the `tome` extra), and early exit on
top of DeepCache (refused: a patched forward). cache-dit and diffusers' caches get rows with their reasons.

    OMP_NUM_THREADS=4 python bench/bench_market.py --threads 4 --out results/market_dit_cpu.json
    OMP_NUM_THREADS=4 python bench/bench_market.py --threads 4 --family flux --out results/market_flux_cpu.json
    OMP_NUM_THREADS=4 python bench/bench_market.py --threads 4 --family sd --out results/market_sd_cpu.json

`--quality-n N` (a class-conditional DiTPipeline, e.g. the trained test bed: `--pipeline DIR --heads DIR/exit_heads`)
then samples N images with every method that ran, untimed, on balanced class labels and the same noise
(`adadiff_nb.experiments.market_quality.market_quality`): PSNR / MSE to plain per image, proxy-FD, KID and class
accuracy against the offline CIFAR-10 test images at the pipeline's output size (the proxy classifier), pairs with
early exit at the nearest speed-up, and early exit's speed-up at each accelerator's PSNR (`quality` in the JSON).
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path
import torch
from adadiff_nb.experiments.exit_bench import add_timing_args, bench_main
from adadiff_nb.experiments.market import (DIFFUSERS_CACHES, market_methods, market_sd_call_kwargs, market_sd_pipeline,
                                           market_table)
from adadiff_nb.experiments.market_quality import (equal_fidelity_table, market_quality, quality_table, real_images,
                                                   run_market)

FAMILIES = ('dit', 'pixart', 'flux', 'sd3', 'sana', 'wan', 'sd', 'sdxl')
UNET_FAMILIES = ('sd', 'sdxl')
PROMPTS = ['a photo of a cat', 'a painting of a red bird', 'a small dog on the green', 'the blue cat with a dog']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=5)
    p.add_argument('--family', choices=FAMILIES, default='dit', help='tiny random pipeline to build')
    p.add_argument('--pipeline', default=None, help='a saved diffusers pipeline directory instead (DiT or PixArt)')
    p.add_argument('--heads', default=None, help='trained exit heads (adapter directory) for --pipeline')
    p.add_argument('--layers', type=int, default=12, help='transformer blocks (Flux: double-stream blocks)')
    p.add_argument('--single-layers', type=int, default=8, help='Flux single-stream blocks')
    p.add_argument('--heads-n', type=int, default=4, help='attention heads (DiT, PixArt)')
    p.add_argument('--head-dim', type=int, default=64, help='attention head width (DiT, PixArt)')
    p.add_argument('--sample-size', type=int, default=None, help='latent side (DiT, PixArt: 16; SD, SDXL: 32)')
    p.add_argument('--sd-channels', type=int, nargs='+', default=[64, 128], help='SD / SDXL UNet block widths')
    p.add_argument('--batch', type=int, default=4, help='images per call')
    p.add_argument('--steps', type=int, default=20, help='sampling steps per call')
    p.add_argument('--guidance-scale', type=float, default=4.0,
                   help='DiT / PixArt / SD guidance (> 1: 2 rows per image)')
    p.add_argument('--thresholds', type=float, nargs='*', default=[.2, .4, .6, .8], help='early-exit thresholds')
    p.add_argument('--cache-dit-thresholds', type=float, nargs='*', default=[.05, .1, .2, .4],
                   help="cache-dit residual_diff_threshold sweep (with Fn=1, Bn=0, 2 warm-up steps)")
    p.add_argument('--no-cache-dit', action='store_true', help='leave cache-dit out (no market extra needed)')
    p.add_argument('--diffusers-caches', nargs='*', default=list(DIFFUSERS_CACHES), help='diffusers caches to try')
    p.add_argument('--no-compose', action='store_true', help='no early exit + cache rows')
    p.add_argument('--exit-layers', type=int, nargs='*', default=None,
                   help='static exits (SD / SDXL default: every exit below the full UNet; others: none)')
    p.add_argument('--deepcache-intervals', type=int, nargs='*', default=None,
                   help='DeepCache cache_interval sweep (SD / SDXL default: 2 3; others: none)')
    p.add_argument('--deepcache-branch', type=int, default=0, help='DeepCache cache_branch_id')
    p.add_argument('--tome-ratios', type=float, nargs='*', default=None,
                   help='tomesd merge ratios (SD / SDXL default: 0.3 0.5; others: none)')
    p.add_argument('--quality-n', type=int, default=0,
                   help='images per method for the quality run (0: none; a multiple of the classes; DiTPipeline)')
    p.add_argument('--quality-batch', type=int, default=50, help='images per call in the quality run')
    p.add_argument('--classes', type=int, nargs='*', default=None,
                   help="quality-run classes (default: the pipeline's id2label classes)")
    p.add_argument('--no-real', action='store_true', help='quality run without proxy-FD / KID / accuracy')
    p.add_argument('--n-boot', type=int, default=200, help='bootstrap draws of proxy-FD and KID')
    p.add_argument('--out', default='results/market_cpu.json')
    p.set_defaults(warmup=1)
    return p


def resolve_defaults(a):
    "The defaults that depend on --family (SD / SDXL: 32x32 latents, static exits, DeepCache and tomesd sweeps)."
    unet = a.family in UNET_FAMILIES and not a.pipeline
    if a.sample_size is None: a.sample_size = 32 if unet else 16
    if a.exit_layers is None: a.exit_layers = list(range(len(a.sd_channels))) if unet else []
    if a.deepcache_intervals is None: a.deepcache_intervals = [2, 3] if unet else []
    if a.tome_ratios is None: a.tome_ratios = [.3, .5] if unet else []
    return a


def check_unet_args(a):
    "The SD / SDXL options."
    n = len(a.sd_channels)
    if n < 2 or any(c < 8 or c % 8 for c in a.sd_channels):
        raise ValueError(f"--sd-channels must give >= 2 widths, multiples of 8, got {a.sd_channels}")
    if a.family in UNET_FAMILIES and (a.sample_size % 8 or a.sample_size % 2 ** (n - 1)):
        raise ValueError(f"--sample-size must be a multiple of 8 and of 2^{n - 1} for SD, got {a.sample_size}")
    top = n if a.family in UNET_FAMILIES else float('inf')
    bad = [d for d in a.exit_layers if not 0 <= d <= top]
    if bad: raise ValueError(f"--exit-layers must lie in [0, {top}] (0 = the first exit), got {bad}")
    bad = [i for i in a.deepcache_intervals if i < 1]
    if bad: raise ValueError(f"--deepcache-intervals must be >= 1, got {bad}")
    if a.deepcache_branch < 0: raise ValueError(f"--deepcache-branch must be >= 0, got {a.deepcache_branch}")
    bad = [r for r in a.tome_ratios if not 0 < r <= .75]
    if bad: raise ValueError(f"--tome-ratios must lie in (0, 0.75], got {bad}")
    if a.family in UNET_FAMILIES and a.deepcache_intervals:
        from adadiff_nb.experiments.market import require_deepcache
        require_deepcache()                                              # the missing extra, named before any work
    if a.family in UNET_FAMILIES and a.tome_ratios:
        from adadiff_nb.extras import require
        require('tomesd', 'tomesd in the accelerator market', 'tome')


def check_quality_args(a):
    "The quality-run options."
    if a.quality_n < 0 or a.quality_batch < 1 or a.n_boot < 2:
        raise ValueError(f"--quality-n must be >= 0, --quality-batch >= 1, --n-boot >= 2, got {a.quality_n}, "
                         f"{a.quality_batch}, {a.n_boot}")
    if a.quality_n and not a.pipeline and a.family != 'dit':
        raise ValueError(f"--quality-n needs a class-conditional DiT pipeline (--pipeline DIR or --family dit), "
                         f"got --family {a.family}")
    k = len(a.classes) if a.classes else 10
    if a.quality_n % k:
        raise ValueError(f"--quality-n must be a multiple of the {k} classes (balanced labels), got {a.quality_n}")


def check_args(a):
    "Clear errors before building anything."
    resolve_defaults(a)
    for name in ('layers', 'single_layers', 'heads_n', 'head_dim', 'sample_size', 'batch', 'steps', 'repeats'):
        if getattr(a, name) < 1: raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.warmup < 0: raise ValueError(f"--warmup must be >= 0, got {a.warmup}")
    if a.sample_size % 2: raise ValueError(f"--sample-size must be even (patch size 2), got {a.sample_size}")
    bad = [t for t in a.thresholds if not 0 <= t <= 1]
    if bad: raise ValueError(f"--thresholds must lie in [0, 1], got {bad}")
    bad = [t for t in a.cache_dit_thresholds if t < 0]
    if bad: raise ValueError(f"--cache-dit-thresholds must be >= 0, got {bad}")
    bad = [c for c in a.diffusers_caches if c not in DIFFUSERS_CACHES]
    if bad: raise ValueError(f"--diffusers-caches {bad} unknown; use some of {' '.join(DIFFUSERS_CACHES)}")
    check_unet_args(a)
    check_quality_args(a)
    if a.heads and not a.pipeline: raise ValueError("--heads needs --pipeline (trained heads belong to a saved model)")
    if a.pipeline and not Path(a.pipeline).is_dir(): raise ValueError(f"--pipeline {a.pipeline} is not a directory")
    if a.heads and not Path(a.heads).is_dir(): raise ValueError(f"--heads {a.heads} is not a directory")
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")
    if not a.no_cache_dit:
        from adadiff_nb.experiments.market import require_cache_dit
        require_cache_dit()                                              # the missing extra, named before any work


def build_pipeline(a):
    "(pipeline, weights) of the arguments: a saved one, or a tiny random one of --family."
    if a.pipeline:
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(a.pipeline)
        pipe.set_progress_bar_config(disable=True)
        return pipe, f'trained: {a.pipeline}'
    if a.family in ('dit', 'pixart'):
        from adadiff_nb.integrations.adapters import tiny_dit_pipeline, tiny_pixart_pipeline
        build = tiny_dit_pipeline if a.family == 'dit' else tiny_pixart_pipeline
        return build(seed=a.seed, num_layers=a.layers, sample_size=a.sample_size, heads=a.heads_n,
                     head_dim=a.head_dim), 'random'
    if a.family in UNET_FAMILIES:
        return market_sd_pipeline(a.seed, tuple(a.sd_channels), a.sample_size, xl=a.family == 'sdxl'), 'random'
    from adadiff_nb.integrations import transformer_adapters as ta
    if a.family == 'flux': return ta.tiny_flux_pipeline(a.seed, a.layers, a.single_layers), 'random'
    return getattr(ta, f'tiny_{a.family}_pipeline')(a.seed, a.layers), 'random'


def call_kwargs(pipe, a) -> dict:
    "The keyword arguments of every call: labels or prompts (or tiny embeddings), steps, decoded images."
    kw = dict(num_inference_steps=a.steps, output_type='np')
    name = type(pipe).__name__
    if name == 'DiTPipeline':
        n, ids = int(pipe.transformer.config.num_embeds_ada_norm), sorted(set(getattr(pipe, 'labels', {}).values()))
        ys = [ids[i % len(ids)] for i in range(a.batch)] if ids else [(97 * i + 1) % n for i in range(a.batch)]
        return dict(kw, class_labels=ys, guidance_scale=a.guidance_scale)          # a test bed: its trained classes
    if name.startswith('PixArt'):
        kw.update(prompt=[PROMPTS[i % len(PROMPTS)] for i in range(a.batch)], guidance_scale=a.guidance_scale,
                  clean_caption=False)
        if a.pipeline: return kw
        side = int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor      # tiny: no resolution bins
        return dict(kw, height=side, width=side, use_resolution_binning=False, max_sequence_length=8)
    if name in ('StableDiffusionPipeline', 'StableDiffusionXLPipeline'):
        return market_sd_call_kwargs(pipe, a.batch, a.steps, a.guidance_scale, a.seed)
    from adadiff_nb.integrations.transformer_adapters import tiny_call_kwargs
    return dict(tiny_call_kwargs(pipe, batch=a.batch, seed=a.seed), **kw)


def run(a, log=print) -> dict:
    "Build the pipeline and the market, run it, print the table."
    pipe, weights = build_pipeline(a)
    dev = torch.device(a.device)
    pipe = pipe.to(dev)
    kw = call_kwargs(pipe, a)
    ms = market_methods(pipe, kw, thresholds=a.thresholds, heads=a.heads, cache_dit_default=not a.no_cache_dit,
                        cache_dit_thresholds=[] if a.no_cache_dit else a.cache_dit_thresholds,
                        diffusers_caches=a.diffusers_caches, compose=not a.no_compose, seed=a.seed,
                        exit_layers=a.exit_layers, deepcache_intervals=a.deepcache_intervals,
                        deepcache_branch=a.deepcache_branch, tome_ratios=a.tome_ratios)
    res = run_market(pipe, kw, ms, repeats=a.repeats, warmup=a.warmup, seed=a.seed, weights=weights, device=dev,
                     log=log)
    log(market_table(res))
    if a.quality_n:
        res['quality'] = run_quality(a, pipe, kw, ms, res, log)
    return dict(res, family=None if a.pipeline else a.family)


def run_quality(a, pipe, kw, ms, res, log) -> dict:
    "The quality run on --quality-n images per method, its tables printed."
    real = clf = None
    if not a.no_real:
        from adadiff_nb.evaluation.metrics import load_proxy_classifier
        clf = load_proxy_classifier()
        size = int(pipe.transformer.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        real = real_images(size)
    classes = a.classes if a.classes else None if getattr(pipe, 'labels', None) else list(range(10))
    q = market_quality(pipe, kw, ms, res, a.quality_n, a.quality_batch, classes, real, clf, a.n_boot, a.seed, log)
    log(quality_table(q, res))
    log(equal_fidelity_table(q))
    return q


def main(argv=None) -> int:
    return bench_main('bench/bench_market.py', build_parser, check_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())
