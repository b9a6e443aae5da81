"""Dynamic early exiting for diffusion models (AdaDiff / DeeDiff) on U-ViT, built with nbdev

Modules:

- `adadiff_nb.checkpoint`: Safe, atomic weight files: safetensors + a JSON config for the project's own models, official U-ViT `.pth` files through `torch.load(weights_only=True)` only, and errors that name the problem.
- `adadiff_nb.data`: Image data sets in $[-1, 1]$: the offline CIFAR-10 subset, the slice embedded in the repo, and torchvision-backed CIFAR-10 / MNIST / CelebA 64 (U-ViT's crop) / image folders.
- `adadiff_nb.default_model`: A small U-ViT early-exit model trained by the project's own commands on the offline real CIFAR-10 subset (16x16, average-pooled), shipped in `data/default_model/` so every notebook and CLI works offline right after `pip install`.
- `adadiff_nb.diffusion`: Noise schedules (discrete DDPM, continuous VP-SDE as U-ViT uses it, cosine), `q_sample`, alpha / sigma / log-SNR at any t, prediction-type conversions and the DDPM posterior.
- `adadiff_nb.early_exit`: A U-ViT with an exit head and an uncertainty estimation module (UEM) at every exit. At inference each sample leaves the network at the first exit whose estimated uncertainty is below a threshold, and the deeper blocks run on the remaining rows only.
- `adadiff_nb.losses`: The joint training objective of AdaDiff/DeeDiff (Sections 3.2-3.4): the diffusion loss, the uncertainty-estimation loss, the uncertainty-aware layer-wise loss and, optionally, the reproduction blog's unweighted layer-wise loss.
- `adadiff_nb.metrics`: Sample quality and fidelity: FID with the standard pytorch-fid Inception-v3, KID, a clearly labelled offline `proxy_fd`, PSNR / MSE against the full model, and sample folders for the 50k-sample protocol.
- `adadiff_nb.sample`: `adadiff-sample`: sample a saved (early-exit) model with any sampler and threshold, write an image grid, the uint8 samples and a `stats.json` with layer ratio, exit layer per step, analytic GFLOPs and wall time; optionally against the full model from the same noise.
- `adadiff_nb.samplers`: DDPM, DDIM, Euler-Maruyama (reverse VP-SDE / probability-flow ODE, as U-ViT samples), singlestep DPM-Solver-1/2/3 and DPM-Solver++(2M), as small pure functions with one signature, plus the plumbing that hands early-exit models a threshold (or a static exit schedule) at every step.
- `adadiff_nb.train`: One training script for U-ViT backbones and AdaDiff early-exit models: presets and config files, four modes (scratch, backbone, finetune, frozen), AdamW with warm-up, EMA, bf16 on GPU, exact resume from safetensors checkpoints, NaN guards, and Accelerate for one CPU, one GPU or many.
- `adadiff_nb.trends`: Drag the threshold and watch the exits move: exit layer per denoising step, per-layer uncertainty over layers x steps, per-pixel uncertainty maps (the AdaDiff paper's Figure 6), cost read-outs, and the early-exit samples beside the full model's from the same noise.
- `adadiff_nb.uvit`: The U-ViT of Bao et al. (CVPR 2023): all inputs (time, optional class, image patches) are tokens; `depth//2` in-blocks, a mid-block and `depth//2` out-blocks joined by long skips."""

__version__ = "0.0.1"
