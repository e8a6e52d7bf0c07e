#!/usr/bin/env bash
# The whole benchmark (and the test suite) on a GPU machine with no network, results under
# bench/results/<device>/ (and, when $OUT is set, in $OUT/results.tar,
# rewritten after every part so that a call cut short still brings back what finished).
#
#   bench/gpu.sh                 every part below, one after the other
#   bench/gpu.sh PART [PART...]  some of them; PART is one of
#       tests           the test suite on the GPU (`pytest -q tests`, slow tests included)
#       attention-fp16  self/decode/cross attention, fp16, fwd, bwd, fwd+bwd, every competitor
#       attention-bf16  the same in bf16
#       se              SE layers of SE-ResNet50, EfficientNet-B0, MobileNetV3 (batch 64/256, both layouts)
#       cbam            CBAM layers of CBAM-ResNet50
#       models          whole-model training steps in bf16 autocast, converted vs original (eager, compiled)
#       pytest-bench    the pytest-benchmark files (`pytest bench/ --benchmark-only`)
#       quick           the headline figures in one call of under 8 minutes (each step time-boxed):
#                       the GPU test suite without the slow compile matrix (180 s), attention bf16
#                       fwd and bwd at E=64/128, L=1k/4k/16k, causal and not, against every torch
#                       SDPA backend and FlexAttention (200 s), one SE and one CBAM shape (45 s each)
#
# Each part is meant to fit one 10-minute call of a lent machine; extra arguments after `--` go to
# `python -m bench` (say `-- --rep-ms 50`). Uses the python that imports torch and triton (tools/ensure_env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
./tools/ensure_env.sh >/dev/null
PY=$(cat .attn_fast_env)
export PYTHONUNBUFFERED=1

parts=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  parts+=("$1"); shift
done
[ ${#parts[@]} -eq 0 ] && parts=(tests attention-fp16 attention-bf16 se cbam models pytest-bench)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA device'" || exit 2
device=$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9._-]+', '_', torch.cuda.get_device_name()).strip('_'))")
results=bench/results/$device
mkdir -p "$results"
status=0

run_part() {
  local part=$1 stamp
  stamp=$(date -u +%Y%m%d-%H%M%S)
  echo "== bench/gpu.sh: $part ($device, $(date -u))"
  case $part in
    tests)          "$PY" -m pytest -q --runslow tests 2>&1 | tee "$results/$stamp-tests.log" ;;
    attention-fp16) "$PY" -m bench --ops attention --dtypes fp16 --tag attention-fp16 "${extra[@]}" ;;
    attention-bf16) "$PY" -m bench --ops attention --dtypes bf16 --tag attention-bf16 --profile none "${extra[@]}" ;;
    se)             "$PY" -m bench --ops se --tag se --profile none "${extra[@]}" ;;
    cbam)           "$PY" -m bench --ops cbam --tag cbam --profile none "${extra[@]}" ;;
    models)         "$PY" -m bench --ops model --dtypes bf16 --tag models --profile none "${extra[@]}" ;;
    pytest-bench)   "$PY" -m pytest -q bench/ --benchmark-only --benchmark-json="$results/$stamp-pytest-bench.json" \
                      2>&1 | tee "$results/$stamp-pytest-bench.log" ;;
    quick)
      timeout 180 "$PY" -m pytest -q tests 2>&1 | tee "$results/$stamp-quick-tests.log"
      timeout 200 "$PY" -m bench --quick --families attention --dtypes bf16 --directions fwd bwd \
        --profile none --no-plots --tag quick-attention "${extra[@]}"
      timeout 45 "$PY" -m bench --quick --families se --match "seresnet50 N64 C256 56x56 Cr16 nchw" \
        --dtypes bf16 --profile none --no-plots --tag quick-se "${extra[@]}"
      timeout 45 "$PY" -m bench --quick --families cbam --match "cbam_resnet50 N64 C256 56x56 Cr16 nchw" \
        --dtypes bf16 --profile none --no-plots --tag quick-cbam "${extra[@]}" ;;
    *) echo "unknown part $part" >&2; return 2 ;;
  esac
}

for part in "${parts[@]}"; do
  run_part "$part" || status=1
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    tar -cf "$OUT/results.tar" -C bench/results "$device" 2>/dev/null || true
  fi
done
echo "== results in $results"
exit $status
