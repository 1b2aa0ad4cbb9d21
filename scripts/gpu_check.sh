#!/usr/bin/env bash
# Everything that needs a GPU, as one command for a GPU session (H100/H200): bench.py's GPU tables, its tiled
# and torch.compile measurements, the GPU-only tests and the tiling benchmark (bench_tiling.py, issue 7).
# All output goes under $OUT (set by the GPU runner; ./gpu_out otherwise). Each step has its own time limit, 470 s
# in all, so the script ends within ~8 minutes on an H100 even if a step hangs; expected ~4-5 minutes.
#   OUT=/tmp/gpu scripts/gpu_check.sh        # then read $OUT/summary.txt and $OUT/bench.out
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: a time limit; stdout -> $OUT/NAME.out, stderr -> $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $limit s): $*" | tee -a "$summary"
}

{ nvidia-smi; python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1

# 1. The acceptance and options tables first (the GPU criteria need them), then training steps (256²/512² bf16)
#    and encode/decode (256²-1024² x fp32/bf16/fp16 x b1/b8). The JSON is rewritten after every section and
#    bench.log gets every row as it is measured, so a run cut off by its limit still reports.
step bench 200 python bench.py --device cuda --full --only accept,options,train,infer --json "$OUT/bench.json"
# 2. Tiled encode/decode at 2048² and 4096² bf16 (ours: exact tiles; diffusers: blended tiles).
step bench_tiled 60 python bench.py --device cuda --only tiled --json "$OUT/bench_tiled.json"
# 3. torch.compile of the decoder and of the training step (training.compile), beside eager and diffusers.
step bench_compile 110 python bench.py --device cuda --only options --compile --json "$OUT/bench_compile.json"
# 4. The GPU-only tests (fp16 GradScaler path, CUDA parity, ...); exit 5 means none were collected.
step pytest_cuda 50 python -m pytest tests -q -x -k "cuda or gpu" -p no:cacheprovider
# 5. Issue 7's GPU figure: 4096² bf16 decode, exact tiles vs untiled vs diffusers' tiles, time and peak memory.
if [ -f bench_tiling.py ]; then
  step bench_tiling 50 python bench_tiling.py --section gpu --gpu_size 4096
fi
echo "outputs in $OUT: bench*.out (tables), bench*.json, bench*.log, pytest_cuda.out, bench_tiling.out" | tee -a "$summary"
