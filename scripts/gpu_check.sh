#!/usr/bin/env bash
# Everything that needs a GPU, as one command for a GPU session (H100/H200), most important first: the decode
# acceptance (ours eager / channels_last / compiled against diffusers' eager default) with the options table, the
# 512² training step (eager, training.compile, diffusers), issue 7's 4096² tiled decode, the GPU tests, then the
# full encode/decode table and the tiled 2048²/4096² rows (last: the H200 run of 2026-11-26 was cut there). Each step
# gets its own time limit, cut to what is left of BUDGET seconds (default 540), so the script ends inside BUDGET +
# ~15 s even if a step hangs. On an H200: options ~75 s, train ~55 s, tiling ~95 s, pytest ~75 s.
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
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$summary" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c "import torch, diffusers, lpips; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"; } \
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

# 1. Decode 512² bf16 b8: ours NCHW / channels_last / compiled beside diffusers' eager default; TF32, SDPA, AdamW.
step options 100 python3 bench.py --device cuda --only options --compile
# 2. The 512² bf16 b8 training step with the full loss: ours eager, ours with training.compile, diffusers eager.
step train 150 python3 bench.py --device cuda --only train --compile
# 3. Issue 7: 4096² bf16 decode, exact tiles vs untiled vs diffusers' tiles, time and peak memory.
step tiling 110 python3 bench_tiling.py --section gpu --gpu_size 4096
# 4. The GPU tests (tests/test_cuda.py, the CUDA fp16 GradScaler path of test_train.py).
step pytest 80 python3 -m pytest tests/test_cuda.py tests/test_train.py -k "cuda or gpu" -v -s -p no:cacheprovider
# 5. Whatever is left: the encode/decode table (256²-1024² x fp32/bf16/fp16 x b1/b8), tiled 2048²/4096² rows.
step infer 200 python3 bench.py --device cuda --full --only infer,tiled
echo "total $((SECONDS - start)) s" | tee -a "$summary"
