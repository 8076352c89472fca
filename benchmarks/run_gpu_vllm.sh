#!/usr/bin/env bash
# The GPU runs of issue 14 on the lent machine, once the CUDA vLLM kit is installed
# (the workplace's gpu-vllm kit, outside this repository: benchmarks/README.md), from the repository root:
#   [TP2="int4_awq nvfp4"] [ONLY="fp8 nvfp4"] [TIMEOUT_S=200] [PROBE_S=100] bash benchmarks/run_gpu_vllm.sh fixtures FIXTURES_DIR   # every fixture (or ONLY those) through vLLM (gpu_fixtures.py serve); TP2: also at TP=2; PROBE_S=0: no default-MoE-backend probes
#   [LOAD_ARGS="--formats nvfp4 --repeats 2"] bash benchmarks/run_gpu_vllm.sh load   # 8B-shaped load times (gpu_load.py)
#   bash benchmarks/run_gpu_vllm.sh ct-copy FIXTURES_DIR NAME   # vLLM alone on a compressed-tensors copy of a fixture (lazyxform's
#       stream written once, gpu_load.write_compressed_tensors; run-time pre_quant_scale left out): does vLLM's own path load and run those weights?
#   bash benchmarks/run_gpu_vllm.sh marlin-moe   # vLLM's Marlin WNA16 MoE against plain torch on random INT4 experts (gpu_marlin_moe.py; < 2 min)
# The fixtures step's `vllm serve` runs need jmespath, which vLLM 0.26's API server imports and the kit lacks:
#   here `pip download --no-deps jmespath -d .kit/extra`, carried; there `python3 -m pip install --no-index --no-deps --target /tmp/site .kit/extra/*.whl`.
# Results: $OUT/<step>.tgz.part?? (split under the transfer's 16 MiB a file): cat them | tar xz.
# BUDGET_S bounds the step so that its results come back inside one device call.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/integrations/vllm:/tmp/site PYTHONUNBUFFERED=1  # this tree before the kit's copy
step=$1
res=/tmp/res-$step
mkdir -p "$res"
{ date -u; nvidia-smi; nproc; free -g; df -h /tmp; } >"$res/machine.txt" 2>&1
case $step in
  fixtures) timeout "${BUDGET_S:-420}" python3 benchmarks/gpu_fixtures.py serve --out "$res" --fixtures "$2" ${ONLY:+--only $ONLY} --tp2 ${TP2:-} --jobs 8 --timeout "${TIMEOUT_S:-200}" --probe-timeout "${PROBE_S:-100}" ;;
  load) timeout "${BUDGET_S:-540}" python3 benchmarks/gpu_load.py bench --data /tmp/lx-data --out "$res" --timeout 150 ${LOAD_ARGS:-} ;;
  ct-copy)
    python3 -c "import sys, shutil; from pathlib import Path; sys.path.insert(0, 'benchmarks'); from gpu_load import write_compressed_tensors
src, dst = Path('$2/$3'), Path('/tmp/ct-$3'); print('left out:', write_compressed_tensors(src, dst)); [shutil.copy(f, dst) for f in src.glob('tokenizer*')]" >"$res/write.log" 2>&1
    echo '{"model": "/tmp/ct-'"$3"'", "route": "off", "llm": {}, "env": {}, "traceback_s": '"$(( ${BUDGET_S:-300} - 20 ))"'}' >"$res/request.json"
    timeout "${BUDGET_S:-300}" python3 benchmarks/gpu_fixtures.py worker "$res/request.json" "$res/$3-ct.pt" >"$res/$3-ct.log" 2>&1 ;;
  marlin-moe) timeout "${BUDGET_S:-150}" python3 benchmarks/gpu_marlin_moe.py --out "$res" 2>&1 | tee "$res/marlin_moe.txt" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
echo "$step exited with $?"
tar czf - -C /tmp "res-$step" | split -b 15M - "$OUT/$step.tgz.part"
