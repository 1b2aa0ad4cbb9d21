#!/usr/bin/env bash
# Everything that needs a GPU, as one command for a GPU session (H100/H200): bench.py's GPU tables, the
# torch.compile measurements, the GPU-only tests and, when present, the tiling benchmark. All output goes under
# $OUT (set by the GPU runner; ./gpu_out otherwise). Each step has its own time limit, 450 s in all, so the whole
# script ends within ~8 minutes on an H100 even if a step hangs; expected ~4-5 minutes.
#   OUT=/tmp/gpu scripts/gpu_check.sh        # then read $OUT/summary.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, stdout -> NAME.md/.txt, stderr -> NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s): $*" | tee -a "$summary"
}

{ nvidia-smi; python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1

# 1. The main tables: inference (fp32/bf16/fp16, b1/b8, 256²-1024², tiled 2048²/4096²), training steps, the
#    acceptance line (decode 512² bf16 b8 vs diffusers: see the options table) and every option except compile.
step bench 240 python bench.py --device cuda --full --only accept,infer,train,options --json "$OUT/bench.json"
# 2. torch.compile of the decoder and of the training step (training.compile), beside eager and diffusers.
step bench_compile 150 python bench.py --device cuda --only options --compile --reps 5 --json "$OUT/bench_compile.json"
# 3. GPU-only tests (the fp16 GradScaler path, CUDA parity, ...); exit 5 = none collected.
step pytest_cuda 60 python -m pytest tests -q -x -k "cuda or gpu" -p no:cacheprovider
# 4. The tiling benchmark (bench_tiling.py, issue 7) when it exists.
if [ -f bench_tiling.py ]; then
  step bench_tiling 60 python bench_tiling.py --device cuda
fi
echo "outputs in $OUT: bench.out (tables), bench.json, bench_compile.out, pytest_cuda.out, *.log" | tee -a "$summary"
