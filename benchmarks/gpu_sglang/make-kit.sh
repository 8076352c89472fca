#!/usr/bin/env bash
# Build a kit that puts CUDA SGLang 0.5.17 on the lent GPU machine (no package index; each device call
# carries at most 64 MiB). SGLang 0.5.17 is the newest SGLang pinning torch==2.11.0, the GPU image's torch
# (2.11.0+cu130); it needs sglang-kernel 0.4.5 (PyPI's wheel is the CUDA 13 build: it links
# libcudart.so.13) and flashinfer-python 0.6.15.post1. Left out of sglang-kernel (365 MiB compressed):
# FlashAttention 3 (flash_ops, 326 MiB: the harness runs the triton attention backend), the SM100
# common_ops (an H200 loads sm90/), InfLLM-V2. Usage, from the repository root:
#   bash benchmarks/gpu_sglang/make-kit.sh [.kit-sglang]
# Writes .kit-sglang/p0 .. pN (each <= KIT_PART_MIB, default 50; then any saved JIT kernels; the last
# part also holds device-setup.sh)
# and ignores the kit in .git/info/exclude. Downloads are cached in $KIT_CACHE. docs/sglang.md, "GPU".
set -euo pipefail
KIT=${1:-.kit-sglang}
here=$(cd "$(dirname "$0")" && pwd)
cache=${KIT_CACHE:-/tmp/gpu-sglang-kit-cache}
mkdir -p "$cache"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx "/$KIT/" "$exclude" 2>/dev/null || echo "/$KIT/" >>"$exclude"
# The GPU image's Python 3.12 on x86_64; sglang 0.5.17's own wheel is cp312 manylinux_2_34.
platform="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for tag in 2_34 2_31 2_28 2_27 2_26 2_24 2_17 2_5; do platform+=" --platform manylinux_${tag}_x86_64"; done
platform+=" --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
specs=("sglang==0.5.17" "sglang-kernel==0.4.5" "flashinfer-python==0.6.15.post1")
while read -r spec; do specs+=("$spec"); done < <(grep -v -e '^#' -e '^$' "$here/deps.txt")
chosen=$(mktemp -d)
for spec in "${specs[@]}"; do
  # pip prints one line per unreadable find-links location of this machine's configuration: dropped.
  python3 -m pip download -q $platform -d "$cache" "$spec" 2>&1 | grep -v -e "is ignored: it is neither" || true
  # The spec's own wheel (the cache may hold other versions: two versions of one package stop the install).
  name=$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')
  wheel=$(find "$cache" -maxdepth 1 -iname "${name}-${spec##*==}-*.whl" | head -n 1)
  [ -n "$wheel" ] || { echo "no wheel downloaded for $spec" >&2; exit 1; }
  ln -f "$wheel" "$chosen/"
done
KIT_PART_MIB_LIMIT=${KIT_PART_MIB:-50}
python3 "$here/pack_kit.py" "$chosen" "$KIT" --limit-mib "$KIT_PART_MIB_LIMIT" \
  --trim "sglang_kernel=sgl_kernel/flash_ops.abi3.so,sgl_kernel/sm100/,sgl_kernel/infllm_ops"
rm -r "$chosen"
# SGLang's JIT-built kernels saved from an earlier machine (run_gpu_sglang.sh writes them to $OUT;
# kept in $KIT_JIT, ignored by git): parts of their own, each file <= 15 MiB.
jit_saved=${KIT_JIT:-.kit-sglang-jit}
if ls "$jit_saved"/sglang-jit.tgz.part* >/dev/null 2>&1; then
  n=$(ls -d "$KIT"/p* | wc -l) used=$((KIT_PART_MIB_LIMIT + 1))
  for f in "$jit_saved"/sglang-jit.tgz.part*; do
    size=$(( $(stat -c %s "$f") / 1048576 + 1 ))
    if [ $((used + size)) -gt "$KIT_PART_MIB_LIMIT" ]; then mkdir -p "$KIT/p$n/jit"; part="$KIT/p$n"; n=$((n + 1)); used=0; fi
    cp "$f" "$part/jit/"; used=$((used + size))
  done
fi
last=$(ls -d "$KIT"/p* | sort -V | tail -n 1)
cp "$here/device-setup.sh" "$last/"
