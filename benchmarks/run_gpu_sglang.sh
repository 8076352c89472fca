#!/usr/bin/env bash
# The SGLang GPU run of issue 13 on the lent machine, once the kit is installed
# (benchmarks/gpu_sglang/device-setup.sh; docs/sglang.md, "GPU"), from the repository root:
#   [FIXTURES_DIR=tests/fixtures/modelopt] [JOBS=4] [RUN_TIMEOUT_S=200] bash benchmarks/run_gpu_sglang.sh [FIXTURE ...]     # default: gpu_sglang.py's fixtures
# Results: $OUT/sglang.tgz.part?? (split under the transfer's 16 MiB a file): cat them | tar xz; and
# $OUT/sglang-jit.tgz.part??, SGLang's JIT-built kernels (below).
# BUDGET_S bounds the harness so that its results come back inside one device call. RES_DIR (default
# /tmp/res-sglang) keeps two harnesses apart, e.g. one started with setsid in the background.
# TP_SIZE (default 1): SGLang's tensor parallelism, one GPU a rank.
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/integrations/sglang:/tmp/site PYTHONUNBUFFERED=1  # this tree before the kit's copy
res=${RES_DIR:-/tmp/res-sglang}
mkdir -p "$res"
{ date -u; nvidia-smi; nproc; free -g; df -h /tmp; } >"$res/machine.txt" 2>&1
only=()
[ $# -gt 0 ] && only=(--only "$@")
timeout "${BUDGET_S:-480}" python3 benchmarks/gpu_sglang.py serve --out "$res" --fixtures "${FIXTURES_DIR:-tests/fixtures/modelopt}" --timeout "${RUN_TIMEOUT_S:-200}" --jobs "${JOBS:-1}" --tp-size "${TP_SIZE:-1}" "${only[@]}" 2>&1 | tee "$res/harness.log"
echo "harness exited with $?"
# Stopped by the budget before compare: compare what finished.
[ -f "$res/table.md" ] || python3 benchmarks/gpu_sglang.py compare "$res" --fixtures "${FIXTURES_DIR:-tests/fixtures/modelopt}" 2>&1 | tail -n 20
tar czf - -C "$(dirname "$res")" --exclude="$(basename "$res")/fixtures" "$(basename "$res")" | split -b 15M - "$OUT/sglang.tgz.part"
# The kernels SGLang built with nvcc at first use (tvm-ffi's content-addressed cache, .so files): save
# $OUT/sglang-jit.tgz.part* as .kit-sglang-jit/ here, and the next kit skips those builds (docs/sglang.md).
jit=${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}
if [ -d "$jit" ] && [ -n "$(find "$jit" -name '*.so' | head -n 1)" ]; then
  (cd "$jit" && find . -name '*.so' | tar czf /tmp/sglang-jit.tgz -T -)
  # What comes back from a call is at most 64 MiB and 8 files: the results first.
  if [ "$(stat -c %s /tmp/sglang-jit.tgz)" -le $((45 << 20)) ]; then
    split -b 15M /tmp/sglang-jit.tgz "$OUT/sglang-jit.tgz.part"
  else
    echo "JIT kernels not returned: $(du -h /tmp/sglang-jit.tgz | cut -f1) compressed, over 45 MiB"
  fi
fi
