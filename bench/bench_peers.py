"""Early exit against its peers on one embedded model: per-step schedule, static exit, DeepCache, S-Pruning and (on
the U-ViT) ToMe F / R / B, all built on the model's own weights and sampled from the same noise.

Every method samples the same `--n` images (`adadiff_nb.experiments.peers.peer_comparison`): FLOP ratio, PSNR to the
full model's images with bootstrap intervals, proxy-FD and KID against `--real-n` CIFAR-10 test images, whole runs of
`--time-n` images timed in turns with the plain backbone, and each peer paired with the early-exit threshold of the
nearest measured speed-up (paired PSNR and proxy-FD differences). S-Pruning fine-tunes the pruned backbone for
`--finetune-steps x --finetune-batch` images (kept under `--cache`, so a rerun reuses it). Needs the `prune` and `tome`
extras.

    OMP_NUM_THREADS=2 python bench/bench_peers.py --model default --threads 2 --cache runs/peers \\
        --out results/peers_uvit_cpu.json
    OMP_NUM_THREADS=2 python bench/bench_peers.py --model cifar10_unet --threads 2 --cache runs/peers \\
        --out results/peers_unet_cpu.json
"""
from __future__ import annotations
import argparse, sys
from pathlib import Path
import torch
from adadiff_nb.data import get_dataset
from adadiff_nb.evaluation.metrics import load_proxy_classifier
from adadiff_nb.experiments.exit_bench import add_timing_args, bench_main
from adadiff_nb.experiments.peers import PEER_METHODS, is_unet, peer_comparison, peer_context, peer_points, peers_table
from adadiff_nb.models.default_model import EMBEDDED_MODELS, load_default

# per backbone: the options of each method (thresholds dense enough that every peer has an early-exit point near its
# measured speed-up; schedules and static exits at the layer ratios of the default thresholds and beyond)
DEFAULTS = {
    'uvit': dict(adadiff=dict(thresholds=[0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3]),
                 schedule=dict(thresholds=[0.075, 0.15]), static=dict(exits=[6, 4]),
                 deepcache=dict(intervals=[2, 3, 5], branch=1), spruning=dict(targets=[0.7]),
                 tome=dict(ratios=[0.4, 0.6], schedules=['F', 'R', 'B'], blocks=5)),
    'unet': dict(adadiff=dict(thresholds=[0.03, 0.05, 0.07, 0.1, 0.15, 0.25, 0.5]),
                 schedule=dict(thresholds=[0.07, 0.15]), static=dict(exits=[2, 1]),
                 deepcache=dict(intervals=[2, 3, 5], branch=0), spruning=dict(targets=[0.7])),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], conflict_handler='resolve')
    add_timing_args(p, repeats=3)
    p.add_argument('--model', default='default', help=f'embedded model: one of {list(EMBEDDED_MODELS)}')
    p.add_argument('--methods', nargs='+', default=None,
                   help=f'peer methods to run (default: all that apply); from {list(PEER_METHODS)}')
    p.add_argument('--thresholds', nargs='+', type=float, default=None, help='early-exit thresholds')
    p.add_argument('--finetune-steps', type=int, default=1500, help="S-Pruning's fine-tuning steps")
    p.add_argument('--finetune-batch', type=int, default=64)
    p.add_argument('--sampler', default='ddim')
    p.add_argument('--steps', type=int, default=50)
    p.add_argument('--n', type=int, default=512, help='images each method samples (quality)')
    p.add_argument('--time-n', type=int, default=64, help='images of each timed whole run')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--cal-n', type=int, default=64, help='calibration images (exit points, schedules), other noise')
    p.add_argument('--real-n', type=int, default=1017, help='CIFAR-10 test images for proxy-FD / KID (0: none)')
    p.add_argument('--n-boot', type=int, default=200)
    p.add_argument('--cache', default=None, help='directory for the pruned, fine-tuned backbones (reused)')
    p.add_argument('--out', default='results/peers_cpu.json')
    p.set_defaults(warmup=1)
    return p


def check_args(a):
    "Clear errors before loading anything."
    if a.model not in EMBEDDED_MODELS:
        raise ValueError(f"--model {a.model!r} is not an embedded model; choose one of {list(EMBEDDED_MODELS)}")
    bad = [m for m in a.methods or [] if m not in PEER_METHODS]
    if bad: raise ValueError(f"--methods {bad} unknown; choose from {list(PEER_METHODS)}")
    if a.methods is not None and 'adadiff' not in a.methods:
        raise ValueError("--methods must include adadiff: every peer is paired with an early-exit point")
    for name in ('steps', 'n', 'time_n', 'batch', 'cal_n', 'repeats', 'n_boot', 'finetune_batch'):
        if getattr(a, name) < 1: raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.n < 2: raise ValueError(f"--n must be >= 2 (bootstrap intervals), got {a.n}")
    if a.real_n < 0 or a.finetune_steps < 0: raise ValueError("--real-n and --finetune-steps must be >= 0")
    if a.threads is not None and a.threads < 1: raise ValueError(f"--threads must be >= 1, got {a.threads}")
    if not Path(a.out).parent.is_dir():
        raise ValueError(f"{Path(a.out).parent} does not exist; create it or pass another --out")


def method_spec(a, model) -> dict:
    "{method: options} of this run: the backbone's defaults, narrowed by --methods, --thresholds and fine-tuning."
    spec = {m: dict(o) for m, o in DEFAULTS['unet' if is_unet(model) else 'uvit'].items()}
    if a.methods is not None:
        if is_unet(model) and 'tome' in a.methods:
            raise ValueError("--methods tome: ToMe merges transformer tokens and this model is a UNet; drop it")
        spec = {m: spec.get(m, {}) for m in a.methods}
    if a.thresholds: spec['adadiff']['thresholds'] = a.thresholds
    if 'spruning' in spec: spec['spruning'].update(finetune_steps=a.finetune_steps, finetune_batch=a.finetune_batch)
    return spec


def real_images(n: int, img_size: int):
    "The first `n` CIFAR-10 test images of the offline subset at `img_size`, in [-1, 1] (None for n = 0)."
    if not n: return None
    ds = get_dataset('cifar10_partial', split='test', img_size=img_size, flip=False)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def run(a, log=print) -> dict:
    dev = torch.device(a.device)
    model = load_default(dev, name=a.model).eval()
    spec = method_spec(a, model)
    ctx = peer_context(model, a.sampler, a.steps, a.seed, cal_n=a.cal_n, device=dev,
                       sampler_opts={'clip_denoised': True}, cache=a.cache, log=log)
    points = peer_points(model, spec, ctx)
    log(f"{len(points)} points: {', '.join(p.key for p in points)}")
    real = real_images(a.real_n, model.backbone.img_size)
    res = peer_comparison(model, points, a.n, a.time_n, a.batch, a.sampler, a.steps, a.seed, a.repeats, a.warmup,
                          dev, {'clip_denoised': True}, real, load_proxy_classifier() if real is not None else None,
                          a.n_boot, log=log)
    log(peers_table(res))
    return dict(res, model=a.model, methods=spec,
                note=(f"every method starts from the embedded model {a.model!r}'s weights (its backbone at full depth "
                      "is 'full'); S-Pruning fine-tunes its pruned backbone for extra_train_images more images"))


def main(argv=None) -> int:
    return bench_main('bench/bench_peers.py', build_parser, check_args, run, argv, device_name='CPU')


if __name__ == '__main__':
    sys.exit(main())
