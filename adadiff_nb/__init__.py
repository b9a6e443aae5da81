"""Dynamic early exiting for diffusion models (AdaDiff / DeeDiff) on U-ViT, built with nbdev

Modules:

- `adadiff_nb.checkpoint`: Safe, atomic weight files: safetensors + a JSON config for the project's own models, official U-ViT `.pth` files through `torch.load(weights_only=True)` only, and errors that name the problem.
- `adadiff_nb.data`: Image data sets in $[-1, 1]$: the offline CIFAR-10 subset, the slice embedded in the repo, and torchvision-backed CIFAR-10 / MNIST / CelebA 64 (U-ViT's crop) / image folders.
- `adadiff_nb.diffusion`: Noise schedules (discrete DDPM, continuous VP-SDE as U-ViT uses it, cosine), `q_sample`, alpha / sigma / log-SNR at any t, prediction-type conversions and the DDPM posterior.
- `adadiff_nb.uvit`: The U-ViT of Bao et al. (CVPR 2023): all inputs (time, optional class, image patches) are tokens; `depth//2` in-blocks, a mid-block and `depth//2` out-blocks joined by long skips."""

__version__ = "0.0.1"
