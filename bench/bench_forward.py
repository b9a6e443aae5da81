"""CPU benchmark of the early-exit forward of `EarlyExitUViT` with real row skipping.

A batch of 64 images with random timesteps goes through a mid-size early-exit U-ViT. The threshold is
calibrated on the same batch (bisection on the uncertainties that `forward_train` reports, then checked
with the real forward) so that about `--skip` (default 40%) of the block evaluations are skipped. The
UEMs are untrained (the decisions are arbitrary but real, and vary across samples through the data and the
random timesteps); what is measured is whether skipping block evaluations turns into wall-clock savings.

Printed: layer_ratio (block evaluations run / B*L), the ideal speed-up 1/layer_ratio, the measured
speed-up (median full-backbone time / median early-exit time, interleaved repeats after warm-up) and
efficiency = measured / ideal.

    python bench/bench_forward.py [--threads 1] [--batch 64] [--skip 0.4] [--repeats 9]
"""
from __future__ import annotations
import argparse
import torch
from adadiff_nb.experiments.bench import time_interleaved
from adadiff_nb.exits.early_exit import create_early_exit, layer_ratio


def calibrate(model, x, t, target_ratio: float, iters: int = 60) -> float:
    "Threshold whose layer ratio on (x, t) is closest to `target_ratio`: bisection on forward_train's uncertainties."
    with torch.inference_mode(): u = model.forward_train(x, t)['u'].t().float()         # (B, L)
    B, L = u.shape
    def ratio(tau):
        below = torch.cat([u < tau, torch.ones(B, 1, dtype=torch.bool)], 1)
        return below.float().argmax(1).sum().item() / (B * L)                    # exit = first exit with u < tau
    lo, hi = 0.0, 1.0  # ratio(0) = 1 >= target >= ratio(1) = 0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ratio(mid) > target_ratio:lo = mid
        else: hi = mid
    return hi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='adadiff_cpu32', 
                   help='early-exit preset (adadiff_nb.exits.early_exit.EE_PRESETS)')
    p.add_argument('--embed-dim', type=int, default=128)
    p.add_argument('--depth', type=int, default=6, help='U-ViT depth (depth+1 blocks)')
    p.add_argument('--num-heads', type=int, default=2)
    p.add_argument('--uem', default='linear', choices=['linear', 'attention'])
    p.add_argument('--uem-params', default='per_layer')
    p.add_argument('--exit-head', default='per_layer', choices=['per_layer', 'shared'])
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--skip', type=float, default=0.4, help='target fraction of block evaluations skipped')
    p.add_argument(
        '--threads', type=int, default=1, help='torch.set_num_threads (1: stable timings on a shared machine)'
    )
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = create_early_exit(a.preset, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads, uem=a.uem,
                              uem_params=a.uem_params, exit_head=a.exit_head).eval()
    bb, L = model.backbone, model.num_layers
    x = torch.randn(a.batch, bb.in_chans, bb.img_size, bb.img_size)
    t = torch.rand(a.batch) * 999.

    tau = calibrate(model, x, t, 1. - a.skip)
    with torch.inference_mode():
        out = model(x, t, threshold=tau)
        full = bb(x, t)
        test = model(x, t, threshold=0.)
    assert (test.sample - full).abs().max() < 1e-5
    lr = layer_ratio(out)
    hist = torch.bincount(out.exit_layer, minlength=L + 1).tolist()

    def run_full():
        with torch.inference_mode(): bb(x, t)
    def run_ee():
        with torch.inference_mode(): model(x, t, threshold=tau)
    def run_ee0():
        with torch.inference_mode(): model(x, t, threshold=0.)

    tm = time_interleaved(dict(full=run_full, ee=run_ee, ee0=run_ee0), a.repeats, a.warmup)  # drift hits all alike
    t_full, t_ee = tm['full'].times, tm['ee'].times
    mf, me, me0 = tm['full'].median, tm['ee'].median, tm['ee0'].median
    ideal, measured = 1. / lr, mf / me

    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {a.preset} embed_dim={a.embed_dim} depth={a.depth} ({L} blocks), uem={a.uem}/{a.uem_params}, "
        f"exit_head={a.exit_head}, {n_params / 1e6:.2f}M params; "
        f"batch {a.batch} of {bb.in_chans}x{bb.img_size}x{bb.img_size}, "
        f"random timesteps; torch {torch.__version__}, {a.threads} threads"
    )
    print(f"threshold {tau:.6f} (calibrated for {a.skip:.0%} skipped); exits per layer 0..{L}: {hist}")
    print(f"layer_ratio            {lr:.4f}  ({out.layers_run}/{out.layers_total} block evaluations, "
          f"{1 - lr:.1%} skipped)")
    print(f"full backbone          {mf * 1e3:8.1f} ms  (median of {a.repeats}; min {min(t_full) * 1e3:.1f})")
    print(f"early exit, tau=0      {me0 * 1e3:8.1f} ms  (all UEMs, no exits: overhead {me0 / mf - 1:+.1%})")
    print(f"early exit, tau={tau:.4f} {me * 1e3:8.1f} ms  (median of {a.repeats}; min {min(t_ee) * 1e3:.1f})")
    print(f"ideal speed-up         {ideal:.3f}x  (1/layer_ratio)")
    print(f"measured speed-up      {measured:.3f}x")
    print(f"efficiency             {measured / ideal:.3f}  (measured/ideal; target >= 0.85)")
    return dict(layer_ratio=lr, ideal=ideal, measured=measured, efficiency=measured / ideal)


if __name__ == '__main__':
    main()
