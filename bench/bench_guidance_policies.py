"""The two guidance-aware exit policies compared on a class-conditional early-exit model, at equal layer ratio.

Classifier-free guidance evaluates every sample twice per step (its class and the null class). With 'joint' both
rows of a sample leave at the first exit where both are below the threshold; with 'independent' each row leaves on
its own. For each policy and threshold this samples `--n` images (same noise, same labels: the classes cycled),
measures the layer ratio of all rows, proxy-FD / proxy-KID against the CIFAR-10 test slice, the proxy classifier's
accuracy for the requested classes and the PSNR to the full model's guided samples, then interpolates both
policies' quality at common layer ratios (`adadiff_nb.experiments.guidance`). A paired bootstrap over images gives 95%
intervals for the PSNR and accuracy differences at equal ratio. Written to `--out` (JSON) and printed.

    OMP_NUM_THREADS=1 python bench/bench_guidance_policies.py --clip-denoised --out results/cifar16_cond_guidance.json
"""
from __future__ import annotations
import argparse, shlex, sys, time
import numpy as np
import torch
from adadiff_nb.models.checkpoint import atomic_write_json, load_model
from adadiff_nb.models.default_model import EMBEDDED_MODELS, load_default
from adadiff_nb.experiments.guidance import (bootstrap_equal_ratio, compare_guidance_policies, equal_ratio_table,
                                      guidance_table, policy_curves_at_equal_ratio)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='cifar10_cond', help=f'embedded model {list(EMBEDDED_MODELS)} or a model dir')
    p.add_argument('--thresholds', default='0,0.05,0.075,0.1,0.125,0.15,0.2',
                   help='comma-separated thresholds in [0, 1]')
    p.add_argument('--guidance-scale', type=float, default=3.)
    p.add_argument('--n', type=int, default=512, help='images per policy and threshold')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--clip-denoised', action='store_true', help='clip the predicted x0 to [-1, 1] (DDPM / DDIM)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--out', default=None, help='write the results as JSON here')
    return p


def jsonable(obj):
    "Numpy arrays and scalars (nested in dicts / lists) as JSON-ready Python values; non-finite floats as None."
    if isinstance(obj, dict): return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)): return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.floating, float)): return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer): return int(obj)
    return obj


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    t0 = time.time()
    try:
        taus = [float(v) for v in a.thresholds.split(',') if v.strip()]
        model = load_default('cpu', name=a.model) if a.model in EMBEDDED_MODELS else load_model(a.model).eval()
        res = compare_guidance_policies(model, taus, a.guidance_scale, n=a.n, batch_size=a.batch, steps=a.steps,
                                        sampler=a.sampler, seed=a.seed, progress=True,
                                        sampler_opts=dict(clip_denoised=True) if a.clip_denoised else None)
        eq = policy_curves_at_equal_ratio(res)
        boot = {m: bootstrap_equal_ratio(res, m, n_boot=2000, seed=a.seed) for m in ('psnr_vs_full', 'accuracy')}
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_guidance_policies: error: {e}", file=sys.stderr)
        return 2
    print(guidance_table(res))
    print(equal_ratio_table(eq))
    for m, b in boot.items():
        cells = ', '.join(f"{r:.3f}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                          for r, d, lo, hi in zip(b['layer_ratio'], b['mean'], b['lo'], b['hi']))
        print(f"joint - independent, {m}, 95% paired bootstrap by layer ratio: {cells}")
    if a.out:
        cmd = ' '.join(['python bench/bench_guidance_policies.py', *map(shlex.quote, argv)])
        env = dict(torch=torch.__version__, threads=torch.get_num_threads())
        per_image = ('psnr_images', 'correct')                             # summarised by the bootstrap; large
        res = dict(res, by_policy={p: {k: v for k, v in d.items() if k not in per_image}
                                   for p, d in res['by_policy'].items()},
                   full={k: v for k, v in res['full'].items() if k not in per_image})
        atomic_write_json(a.out, jsonable(dict(command=cmd, created=time.strftime('%Y-%m-%d %H:%M:%S'), model=a.model,
                                               result=res, equal_ratio=eq, bootstrap=boot, environment=env,
                                               seconds=round(time.time() - t0, 1))))
        print(f"wrote {a.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
