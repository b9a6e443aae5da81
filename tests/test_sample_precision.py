"""bf16 autocast sampling on the CPU with the embedded default model at its documented threshold: the images stay
close to fp32's, and every exit decision that differs from fp32's belongs to an evaluation whose fp32 uncertainty
lies within a small margin of the threshold. Evaluations after a sample's first differing decision are left out:
from there on the two runs denoise different images. Prints how many decisions differ."""
import torch

from adadiff_nb.models.default_model import default_threshold
from adadiff_nb.apps.sample_cli import load_sampling_model
from adadiff_nb.sampling.run import sample_batches

MARGIN = 0.002    # |u - tau| below this (4 bf16 ulps at tau = 0.075: 8 significant bits) may flip the decision


def _run(model, tau, precision):
    "Images, exit layers (steps, B) and uncertainties (steps, B, L) of a 4-step DPM-Solver++(2M) run of 32 images."
    seen = []
    r = sample_batches(model, 'dpm_solver_pp_2m', 4, n=32, batch_size=32, threshold=tau, seed=0, precision=precision,
                       callback=lambda d: seen.append((d['exit']['exit_layer'], d['exit']['uncertainty'])))
    return r, torch.stack([e for e, _ in seen]), torch.stack([u for _, u in seen])


def test_bf16_exits_agree_with_fp32_away_from_the_threshold():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_sampling_model('default')
        tau, L = default_threshold(model), model.num_layers
        r32, e32, u32 = _run(model, tau, 'fp32')
        r16, e16, u16 = _run(model, tau, 'bf16')
    finally:
        torch.set_num_threads(threads)
    assert (r16.stats['precision'], r32.stats['precision'], r16.images.dtype) == ('bf16', 'fp32', torch.float32)
    differ = e32 != e16
    compared = differ.long().cumsum(0) - differ.long() == 0            # up to a sample's first differing decision
    first = torch.minimum(e32, e16).clamp(max=L - 1)                  # the exit where the two runs part
    gap = (u32.gather(2, first[..., None])[..., 0] - tau).abs()
    flipped, near = differ & compared, (gap < MARGIN) & compared
    print(f'bf16 vs fp32 at tau={tau}: {int(flipped.sum())} of {int(compared.sum())} exit decisions differ, '
          f'{int(near.sum())} within {MARGIN} of the threshold')
    print('gaps of the differing decisions:', [round(float(g), 5) for g in gap[flipped]])
    assert not (flipped & ~near).any(), gap[flipped & ~near]
    assert flipped.sum() <= near.sum()
    same = ~differ.any(0)                                             # samples whose exits all agree
    assert same.sum() >= 16
    a, b = r32.images[same].clamp(-1, 1), r16.images[same].clamp(-1, 1)
    assert (a - b).abs().mean() < 0.1, float((a - b).abs().mean())
    assert abs(r16.stats['layer_ratio'] - r32.stats['layer_ratio']) < 0.05
