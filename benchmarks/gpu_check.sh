#!/usr/bin/env bash
# GPU checks in one go (a few minutes): the gpu-marked tests, then a short decode benchmark on the
# embedded model (transformers eager vs adaroute dense vs adaroute routed at 0.5 and 0.35).
# Needs only PyTorch with CUDA and Triton on top of the project's own dependencies.
#   benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" - <<'PYEOF'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}")
PYEOF
echo "== gpu tests"
timeout 300 "$PY" -m pytest -q -m gpu tests/kernels/test_gpu.py
echo "== gpu decode benchmark"
timeout 240 "$PY" benchmarks/decode_bench.py --device cuda --new-tokens 64 --repeats 2 \
    --json "${OUT:-.}/gpu_decode.json" 2>&1 | grep -v '^round '
