#!/usr/bin/env bash
# The one command a device call runs, from the repository root, with `.whl` carried (the packages
# lazyxform needs that the device image lacks: compressed-tensors and pydantic). Everything lands
# in $OUT/results.tgz; unpack it into benchmarks/results/<date>-<device>/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
res=$OUT/results
mkdir -p "$res"
{ date -u; nvidia-smi; nproc; free -g; df -h .; python3 -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'; } >"$res/env.txt" 2>&1
python3 benchmarks/bench_load.py --data benchmarks/data --out "$res" 2>&1 | tee "$res/bench_log.txt"
python3 -m lazyxform.cli profile benchmarks/data/nvfp4 --device cuda --out "$res/profile_cli" >"$res/profile_cli.txt" 2>&1
[ -f benchmarks/gpu_cpu_bits.py ] && python3 benchmarks/gpu_cpu_bits.py >"$res/gpu_cpu_bits.txt" 2>&1
tail -n 4 "$res/profile_cli.txt" "$res/gpu_cpu_bits.txt"
tar czf "$OUT/results.tgz" -C "$OUT" results
