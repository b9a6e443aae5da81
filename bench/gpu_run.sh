#!/usr/bin/env bash
# The GPU benchmarks in one go, on one CUDA GPU, in under 10 minutes (H100 / H200 class):
#  1. whole sampling runs (bench/bench_sampling.py): the embedded default model, U-ViT-S/2 and DiT-XL/2 at full
#     width, batch 1 8 64 256, fp32 and bf16, eager and compiled -> results/sampling_gpu_bench.json
#  2. the early-exit forward grid (bench/bench_exits.py) on the same GPU -> results/exits_gpu_bench.json
# Run from anywhere: bash bench/gpu_run.sh. Settings: STEPS (sampler steps, default 10), REPEATS (timed runs of
# each method, default 2), PYTHON (default python). Fewer steps keep DiT-XL/2 fp32 at batch 256 inside the budget;
# the speed-ups are ratios of whole runs of the same length, so they compare across step counts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-2}
SAMPLING_OUT=results/sampling_gpu_bench.json
EXITS_OUT=results/exits_gpu_bench.json

if ! "$PY" -c "import torch, adadiff_nb" 2>/dev/null; then
    echo "gpu_run.sh: error: $PY cannot import torch and adadiff_nb; install the package (pip install -e .) or" \
         "point PYTHON at its environment (PYTHON=.venv/bin/python bash bench/gpu_run.sh)." >&2
    exit 1
fi
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_run.sh: error: torch sees no CUDA GPU. Run this on a machine with one CUDA GPU and a CUDA build of" \
         "torch (python -c 'import torch; print(torch.cuda.is_available())' must print True)." >&2
    exit 1
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
mkdir -p results
t0=$SECONDS

echo "== 1/2 whole sampling runs ($STEPS steps, $REPEATS repeats) =="
"$PY" bench/bench_sampling.py --device cuda --models default uvit-s2 dit-xl2 --full-width \
    --batches 1 8 64 256 --precisions fp32 bf16 --modes eager compiled \
    --steps "$STEPS" --repeats "$REPEATS" --min-seconds 0 --warmup 0 --out "$SAMPLING_OUT"
echo "sampling runs: $((SECONDS - t0))s"

echo "== 2/2 early-exit forward grid =="
"$PY" bench/bench_exits.py --device cuda --batches 1 16 64 256 --precisions fp32 bf16 --modes eager compiled \
    --rules static threshold --repeats 5 --warmup 2 --out "$EXITS_OUT"

echo "done in $((SECONDS - t0))s; results:"
echo "  $(pwd)/$SAMPLING_OUT"
echo "  $(pwd)/$EXITS_OUT"
