#!/usr/bin/env bash
# Every GPU check and benchmark of the paper-scale model in one prepared run
# (about 8 minutes on an H200), for a GPU lent for a short while:
#
#   1. the DP step with the book-keeping engine in bf16 (fused SDPA), heads of 8,
#      with the engines compared on the paper model (--check), physical batches
#      up to 48 examples x K = 32;
#   2. the same with heads of 64 (model.attention_head_dim=64);
#   3. pre-training and DP fine-tuning under torchrun with NCCL (one worker);
#   4. the book-keeping engine in float32 (what bf16 adds) and the vmap engine in
#      float32 (the reference, measured in the same run);
#   5. a profile of one bf16 DP micro-batch (its top kernels), and channels-last
#      weights and activations against NCHW, back to back;
#   0. first, where pytest is installed: the book-keeping tests on CUDA (the
#      sensitivity under TF32 and bf16: what removing one record moves).
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [STEP...]   (JSON per run and log.txt there)
#        STEP: privacy bookkeeping-bf16 heads64 profile channels-last torchrun fp32 (default: all, ~8 min)
#        GPU_CHECK_CPU=1 benchmarks/gpu_check.sh OUT_DIR   (tiny sizes on the CPU: checks the script)
# Needs: a CUDA build of PyTorch, and diffusers, kornia, opacus, scikit-learn,
# PyYAML and safetensors importable. docs/scale.md holds the numbers of the last run.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
status=0
run() {  # run LIMIT_S NAME ARGS...: one step, its output in the log, its failure noted
  local limit=$1 name=$2; shift 2
  echo "=== $name: $*" | tee -a "$out/log.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/log.txt"
  [ "$rc" = 0 ] || status=1
}
python=${PYTHON:-python3}
smoke="$python $here/gpu_smoke.py"
cpu=()
if [ "${GPU_CHECK_CPU:-}" = 1 ]; then
  smoke="$smoke --cpu --quick"; cpu=(--cpu --set pretrain.steps=10 --set finetune.steps=2)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/log.txt"
fi
step_bookkeeping_bf16() {
  run 130 bookkeeping-bf16 $smoke --limit-s 120 --engine bookkeeping --precision bf16 --check \
      --physical 8 16 32 48 --json "$out/bk_bf16.json"
}
step_heads64() {
  run 100 bookkeeping-bf16-heads64 $smoke --limit-s 90 --engine bookkeeping --precision bf16 \
      --no-sampling --set model.attention_head_dim=64 --physical 16 32 48 64 \
      --json "$out/bk_bf16_h64.json"
}
step_profile() {
  run 100 bookkeeping-bf16-profile $smoke --limit-s 90 --engine bookkeeping --precision bf16 \
      --no-sampling --check --physical 32 --profile 25 --json "$out/bk_bf16_profile.json"
}
step_channels_last() {  # back to back: the run-to-run spread is larger than the effect
  run 80 bookkeeping-bf16-nchw $smoke --limit-s 70 --engine bookkeeping --precision bf16 \
      --no-sampling --physical 16 32 --json "$out/bk_bf16_nchw.json"
  run 80 bookkeeping-bf16-channels-last $smoke --limit-s 70 --engine bookkeeping \
      --precision bf16 --no-sampling --channels-last --check --physical 16 32 \
      --json "$out/bk_bf16_cl.json"
}
step_torchrun() {
  run 230 torchrun-nccl $python "$here/gpu_torchrun.py" "${cpu[@]}"
}
step_fp32() {
  run 60 bookkeeping-fp32 $smoke --limit-s 55 --engine bookkeeping --precision fp32 --no-sampling \
      --physical 8 16 --json "$out/bk_fp32.json"
  run 60 vmap-fp32 $smoke --limit-s 55 --engine vmap --precision fp32 --no-sampling --physical 8 \
      --json "$out/vmap_fp32.json"
}
step_privacy() {  # the bookkeeping engine's sensitivity on CUDA (TF32, bf16): tests, if pytest is there
  if $python -c "import pytest" 2>/dev/null; then
    run 120 privacy-cuda $python -m pytest -q -p no:cacheprovider "$here/../tests/privacy/test_bookkeeping.py" \
        -k "large_batch or bf16 or equals_vmap_on_the_smoke"
  else
    echo "=== privacy-cuda: skipped (no pytest)" | tee -a "$out/log.txt"
  fi
}
for step in "${@:2}"; do  # none named: all of them
  declare -F "step_${step//-/_}" >/dev/null || { echo "gpu_check: no step $step"; exit 2; }
done
if [ $# -gt 1 ]; then steps=("${@:2}"); else
  steps=(privacy bookkeeping-bf16 heads64 profile channels-last torchrun fp32); fi
for step in "${steps[@]}"; do "step_${step//-/_}"; done
echo "gpu_check: $([ $status = 0 ] && echo ok || echo 'FAILED (see above)')" | tee -a "$out/log.txt"
exit $status
