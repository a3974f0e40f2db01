#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the Triton kernel's tests compiled (not interpreted), then the attention benchmark.
#   bash benchmarks/gpu_check.sh [OUTDIR]
# Writes OUTDIR/gpu_tests.log, OUTDIR/attention.log and OUTDIR/attention.json (default OUTDIR: /tmp/cwm_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-/tmp/cwm_gpu_check}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# HIGHEST: XLA's float32 dense oracle must not use TF32 (the kernel keeps float32 dots in IEEE precision).
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 \
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py 2>&1 | tee "$OUTDIR/gpu_tests.log"
JAX_PLATFORMS=cuda timeout 330 python3 benchmarks/attention.py --json "$OUTDIR/attention.json" 2>&1 \
  | tee "$OUTDIR/attention.log"
