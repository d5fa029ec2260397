#!/usr/bin/env bash
# GPU check, for a CUDA machine that already has jax[cuda], flax, optax, orbax, torch, torchvision,
# scikit-image and pytest installed (no set-up here: such machines are often offline).
#   1. mbv3-parity for every model: JAX on the GPU in fp32 (TF32 off) against torchvision on the CPU;
#   2. the classifier and one-training-step parity tests with JAX on the GPU;
#   3. throughput, JAX vs torchvision on the same GPU (each framework's default precision):
#      eval at batch 1 and 256, and training steps at batch 256.
# Output goes to stdout and, per part, to $OUT (default /tmp/gpu_check). Each part has a time limit
# (PARITY_S, TESTS_S, BENCH_S, TRAIN_S seconds: 240 + 80 + 60 + 90) so the whole stays under 8 minutes.
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 - <<'EOF'
import flax, jax, torch, torchvision
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__)
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())
EOF
nvidia-smi -L

echo "== 1. parity, JAX on $(python3 -c 'import jax; print(jax.default_backend())') vs torchvision on the CPU"
NVIDIA_TF32_OVERRIDE=0 timeout "${PARITY_S:-240}" python3 -c \
    "import sys; from porting.cli import parity_main; sys.exit(parity_main(['--repeats', '0']))" \
    2>&1 | grep -v cuda_timer | tee "$OUT/parity.txt"

echo "== 2. parity tests on the GPU"
NVIDIA_TF32_OVERRIDE=0 timeout "${TESTS_S:-80}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_classifier_parity.py tests/test_train_parity.py 2>&1 | tee "$OUT/tests.txt" | tail -15

echo "== 3. throughput on the GPU"
timeout "${BENCH_S:-60}" python3 benchmarks/bench_classifiers.py --batches 1 256 --rounds 5 \
    --torch-device cuda --channels-last 2>&1 | tee "$OUT/bench_eval.txt"
timeout "${TRAIN_S:-90}" python3 -m train.benchmark --batch 256 --steps 5 --rounds 5 \
    --torch-device cuda --channels-last 2>&1 | tee "$OUT/bench_train.txt"
