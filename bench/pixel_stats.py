"""Pixel statistics of generated images against real ones: why a method can score a lower proxy-FD than the full model.

Samples `--n` images from the same noise with the full backbone and with DeepCache (every `--interval` steps a full
pass), DDIM with clipping as in the controlled comparison, and prints for each and for held-out real images the
pixel mean and standard deviation, the mean per-image channel standard deviation (contrast) and the share of pixels
at the ends of the range (|x| > 0.98), plus the MSE between the full model's and DeepCache's images.

    OMP_NUM_THREADS=2 python bench/pixel_stats.py --backbone runs/cpu16_backbone_long/ema_4500 [--n 256]
"""
from __future__ import annotations
import argparse
import torch
from adadiff_nb.experiments.bench import load_backbone
from adadiff_nb.exits.caching import CACHE_METHODS
from adadiff_nb.data import get_dataset
from adadiff_nb.sampling.run import sample_batches


def stats(x: torch.Tensor) -> dict:
    "Pixel statistics of images in [-1, 1] (clamped first, as the comparison scores them)."
    x = x.clamp(-1, 1)
    return dict(mean=float(x.mean()), std=float(x.std()), contrast=float(x.std(dim=(2, 3)).mean()),
                saturated=float((x.abs() > .98).float().mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbone', required=True, help='a U-ViT checkpoint directory (save_model format)')
    p.add_argument('--n', type=int, default=256)
    p.add_argument('--steps', type=int, default=25)
    p.add_argument('--interval', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    bb = load_backbone(a.backbone).float().eval()
    shape = (bb.in_chans, bb.img_size, bb.img_size)
    x = torch.randn(a.n, *shape, generator=torch.Generator().manual_seed(a.seed))
    run = lambda m: sample_batches(m, 'ddim', a.steps, x_T=x, batch_size=min(a.n, 64),
                                   sampler_opts=dict(clip_denoised=True), meter=False).images
    full, cached = run(bb), run(CACHE_METHODS['deepcache'](bb, dict(interval=a.interval)))
    ds = get_dataset('cifar10_partial', split='test', img_size=bb.img_size, flip=False)
    real = torch.stack([ds[i][0] for i in range(min(a.n, len(ds)))])
    for name, v in (('full', full), (f'deepcache (interval {a.interval})', cached), ('real (test)', real)):
        s = stats(v)
        print(f"{name:24s} mean {s['mean']:+.3f}  std {s['std']:.3f}  contrast {s['contrast']:.3f}  "
              f"|x|>0.98 {s['saturated']:.3f}")
    print(f"MSE full vs deepcache: {float((full.clamp(-1, 1) - cached.clamp(-1, 1)).pow(2).mean()):.4f}")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
