#!/usr/bin/env bash
# One-call GPU suite for a machine with one NVIDIA GPU, its own torch, and no network.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# Steps (each under its own timeout; a failed step is recorded and the suite goes on):
#   1. build the extension in place for this GPU's architecture
#      (pip install -e . --no-build-isolation --no-deps --no-index)
#   2. ceilings: device-to-device copy bandwidth, bf16/tf32/fp32 matmul TFLOP/s; kernel
#      time of the fused ops per GPU backend (python -m skipfast.bench.kernels); these take
#      under a minute and come before the tests, which the budget may cut
#   3. the GPU-marked tests (pytest -m gpu)
#   4. python -m skipfast.bench on CUDA: the residual tail and add+ReLU in float32 (eager,
#      eager-cl, torch.compile, skipfast; then skipfast with the Triton kernels forced),
#      ResNet-18/50 inference in bfloat16 channels_last at batch 256 and 1 (eager, eager-cl,
#      torch.compile, skipfast), float32 training steps of blocks and models
#   5. OUTDIR/summary.md + summary.json (python -m skipfast.bench.gpu_summary): card,
#      driver, torch, triton, per-step status, tests, ceilings, results, and achieved
#      bandwidth / FLOP rate against the measured ceilings.
# The whole suite stops starting steps after SUITE_BUDGET_S seconds (default 480) and
# cuts the running one at that point, so it ends in under 9 minutes.
# Environment: PYTHON (default python), SUITE_BUDGET_S.
set -euo pipefail

usage() { echo "usage: benchmarks/gpu_suite.sh OUTDIR   (OUTDIR: folder for logs, JSON and summary.md)" >&2; }
if [[ $# -ne 1 ]]; then usage; exit 2; fi
case "$1" in
  -h|--help) usage; exit 0 ;;
  "" | -*) usage; exit 2 ;;
esac
if [[ -e "$1" && ! -d "$1" ]]; then echo "gpu_suite.sh: OUTDIR '$1' exists and is not a folder" >&2; exit 2; fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
BUDGET=${SUITE_BUDGET_S:-480}
START=$SECONDS
: > "$OUT/steps.tsv"

summary() {
  timeout 30 "$PY" -m skipfast.bench.gpu_summary "$OUT" > "$OUT/summary.log" 2>&1 \
    || echo "gpu_suite.sh: the summary writer failed, see $OUT/summary.log" >&2
  [[ -f "$OUT/summary.md" ]] && echo "[suite] summary: $OUT/summary.md"
  return 0
}
trap summary EXIT

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, time left),
# logs to OUT/NAME.log, records "name<TAB>exit<TAB>seconds<TAB>log" in steps.tsv.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  local t=$(( cap < left ? cap : left ))
  if (( t < 15 )); then
    printf '%s\tskipped\t0\t\n' "$name" >> "$OUT/steps.tsv"
    echo "[suite] $name: skipped, no time left"
    return 0
  fi
  echo "[suite] $name (timeout ${t}s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$name.log" >> "$OUT/steps.tsv"
  echo "[suite] $name: exit $rc after $(( SECONDS - t0 ))s"
  return 0
}

# 0. the card
if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1; then
  printf 'gpu-check\t1\t0\t\n' >> "$OUT/steps.tsv"
  echo "gpu_suite.sh: torch sees no CUDA device; nothing to measure (summary written to $OUT)" >&2
  exit 1
fi
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null \
  || timeout 20 "$PY" -c "import torch; print(torch.cuda.get_device_name(0) + ', unknown, unknown')" > "$OUT/gpu.txt"
CAP=$(timeout 30 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
echo "[suite] $(head -1 "$OUT/gpu.txt") (sm_${CAP/./}) -> $OUT"

# 1. build for this card only
step build 240 env TORCH_CUDA_ARCH_LIST="$CAP" SKIPFAST_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
  "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .

step versions 60 "$PY" - "$OUT/versions.json" <<'PYEOF'
import datetime, json, subprocess, sys
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
import skipfast
from skipfast import _backend
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
doc = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": tv, "skipfast": skipfast.__version__,
       "extension": _backend.has_extension(), "cuda_kernels": _backend.has_cuda_kernels(), "git_commit": commit,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
open(sys.argv[1], "w").write(json.dumps(doc, indent=1))
print(doc)
PYEOF

# 2. ceilings
step ceilings 60 "$PY" -m skipfast.bench.ceilings --out "$OUT/ceilings.json"
# kernel time alone (torch.profiler), each GPU backend forced, against eager
step kernels 70 "$PY" -m skipfast.bench.kernels --out "$OUT/kernels.json"

# 3. GPU tests (pytest-xdist workers compile the Triton kernels in parallel, and
#    pytest-timeout stops a hung test, where those plugins are installed)
PLUGINS=()
if "$PY" -c "import xdist" > /dev/null 2>&1; then PLUGINS+=(-n 8); fi
if "$PY" -c "import pytest_timeout" > /dev/null 2>&1; then PLUGINS+=(--timeout 150); fi
# (SIGINT at the cap, so pytest still prints the failures it has seen)
step gpu-tests 200 timeout -s INT 190 "$PY" -m pytest -m gpu -q -rfE --tb=short --durations=15 -p no:cacheprovider \
  ${PLUGINS[@]+"${PLUGINS[@]}"} --junitxml="$OUT/pytest.xml" tests

# 4. benchmarks (each writes its JSON after every case, so a cut run keeps what it measured)
BENCH=("$PY" -m skipfast.bench --device cuda --no-progress)
# the residual tail, float32, against eager, eager channels_last and torch.compile; then
# the same with the Triton kernels forced, for the CUDA priority list
step bench-ops 90 "${BENCH[@]}" --cases bn_add_relu,add_relu --providers eager,eager-cl,compile,skipfast \
  --out "$OUT/bench-ops"
step bench-ops-triton 50 env SKIPFAST_BACKEND=triton "${BENCH[@]}" --cases bn_add_relu,add_relu \
  --providers eager,skipfast --out "$OUT/bench-ops-triton"
# inference, bf16 channels_last, batch 256 and 1
step bench-infer-b256 130 "${BENCH[@]}" --dtype bfloat16 --channels-last --batch 256 --modes infer \
  --cases resnet18,resnet50 --providers eager,eager-cl,compile,skipfast --out "$OUT/bench-infer-b256"
step bench-infer-b1 70 "${BENCH[@]}" --dtype bfloat16 --channels-last --batch 1 --modes infer \
  --cases resnet18,resnet50 --providers eager,eager-cl,compile,skipfast --out "$OUT/bench-infer-b1"
# training steps, float32
step bench-train 100 "${BENCH[@]}" --modes fwd+bwd --cases ResidualBlock,BottleneckBlock,DenseBlock,resnet50,densenet121 \
  --providers eager,eager-cl,skipfast --out "$OUT/bench-train"

echo "[suite] done in $(( SECONDS - START ))s"
