#!/usr/bin/env bash
# The GPU runs of issue 14 on the lent machine, once the CUDA vLLM kit is installed
# (the workplace's gpu-vllm kit, outside this repository: benchmarks/README.md), from the repository root:
#   [TP2="int4_awq nvfp4"] bash benchmarks/run_gpu_vllm.sh fixtures FIXTURES_DIR   # every fixture through vLLM (gpu_fixtures.py serve); TP2: also at TP=2
#   bash benchmarks/run_gpu_vllm.sh load                     # 8B-shaped load times (gpu_load.py)
# Results: $OUT/<step>.tgz.part?? (split under the transfer's 16 MiB a file): cat them | tar xz.
# BUDGET_S bounds the step so that its results come back inside one device call.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/integrations/vllm:/tmp/site PYTHONUNBUFFERED=1  # this tree before the kit's copy
step=$1
res=/tmp/res-$step
mkdir -p "$res"
{ date -u; nvidia-smi; nproc; free -g; df -h /tmp; } >"$res/machine.txt" 2>&1
case $step in
  fixtures) timeout "${BUDGET_S:-420}" python3 benchmarks/gpu_fixtures.py serve --out "$res" --fixtures "$2" --tp2 ${TP2:-} --jobs 8 --timeout 200 --probe-timeout 100 ;;
  load) timeout "${BUDGET_S:-540}" python3 benchmarks/gpu_load.py bench --data /tmp/lx-data --out "$res" --timeout 150 ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
echo "$step exited with $?"
tar czf - -C /tmp "res-$step" | split -b 15M - "$OUT/$step.tgz.part"
