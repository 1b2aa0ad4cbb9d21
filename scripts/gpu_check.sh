#!/usr/bin/env bash
# Everything that needs a GPU, as one command for a GPU session (H100/H200), most important first (issue 8's
# open point is the 512² training throughput): the 512² bf16 b8 training step (ours eager; ours with the
# subpixel or half_norm fast kernel switched on; diffusers; training.compile, also in channels_last and with
# LPIPS + discriminator compiled), the decode acceptance with the options table (incl. sub-pixel upsampling
# on/off), the GPU tests, the compiled training step at batch 16, then the full encode/decode table. Each step
# gets its own time limit, cut to what is left of BUDGET seconds (default 540), so the script ends inside
# BUDGET + ~15 s even if a step hangs. On the H200 of 2026-11-26 the first fresh-machine training step once
# took > 170 s (cuDNN/JIT warm-up, suspected), hence the train step's generous limit.
#   OUT=/tmp/gpu scripts/gpu_check.sh            # then read $OUT/summary.txt and $OUT/*.out
# On a machine without diffusers/lpips (the lent GPUs have neither), put their wheels in .whl/ first, here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 lpips==0.1.4 \
#     importlib_metadata==8.7.0
# and they are installed to /tmp/site there. All output goes under $OUT (set by the GPU runner; ./gpu_out
# otherwise), 7 files in all.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
BUDGET="${BUDGET:-540}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
summary="$OUT/summary.txt"
: > "$summary"
start=$SECONDS

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl \
    >> "$summary" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c "import torch, diffusers, lpips; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__,
torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: stdout and stderr -> $OUT/NAME.out, limit cut to the budget left
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name: skipped (budget spent)" | tee -a "$summary"; return; fi
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.out" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $limit s): $*" | tee -a "$summary"
}

# 1. The 512² bf16 b8 training step with the full loss, every variant in one interleaving
#    (benchmarks/bench.py train_section).
step train 300 python3 benchmarks/bench.py --device cuda --only train --compile
# 2. Decode 512² bf16 b8: ours NCHW / sub-pixel off / channels_last / compiled beside diffusers' eager
#    default; TF32, SDPA, AdamW.
step options 100 python3 benchmarks/bench.py --device cuda --only options --compile
# 3. The GPU tests (tests/test_cuda.py, the CUDA fp16 GradScaler path of test_train.py).
step pytest 90 python3 -m pytest tests/test_cuda.py tests/test_train.py -k "cuda or gpu" -v -s \
  -p no:cacheprovider
# 4. Batch 16 at 512²: the compiled runs only (an eager step would need > 80 GB).
step train16 150 python3 benchmarks/bench.py --device cuda --only train --compile --train-batch 16
# 5. Whatever is left: the encode/decode table (256²-1024² x fp32/bf16/fp16 x b1/b8).
step infer 200 python3 benchmarks/bench.py --device cuda --full --only infer
echo "total $((SECONDS - start)) s" | tee -a "$summary"
