#!/usr/bin/env bash
# On the GPU machine, once every part of the kit is in /opt/k (docs/sglang.md, "GPU"): install SGLang
# 0.5.17 and its missing dependencies into /tmp/site, then this project (argument: its path there) so
# that its `sglang.srt.plugins` entry point is found. The image's torch, triton and other packages stay
# as they are; /tmp/site shadows the ones it carries (transformers, tokenizers) once PYTHONPATH=/tmp/site.
# KIT_ROOT and KIT_SITE move the kit and the site (to try this on a CPU machine). Kernels SGLang built
# with nvcc on an earlier machine (jit/, make-kit.sh) go into tvm-ffi's cache, where SGLang's load_jit
# finds them by content hash instead of building them again.
set -euo pipefail
kit=${KIT_ROOT:-/opt/k}
site=${KIT_SITE:-/tmp/site}
joined=$site.joined
mkdir -p "$site" "$joined"
# Files cut into chunks by pack_kit.py, spread over parts: joined in chunk order.
for first in $kit/p*/chunks/*.chunk000; do
  [ -e "$first" ] || continue
  name=$(basename "$first" .chunk000)
  ls $kit/p*/chunks/"$name".chunk* | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2 | xargs cat >"$joined/$name"
done
for z in $kit/p*/zips/*.zip "$joined"/*.zip; do
  if [ -e "$z" ]; then python3 -m zipfile -e "$z" "$site"; fi
done
wheels=$(ls $kit/p*/wheels/*.whl "$joined"/*.whl 2>/dev/null || true)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" $wheels
if [ -n "${1:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" "$1"
fi
jit_parts=$(ls $kit/p*/jit/sglang-jit.tgz.part* 2>/dev/null | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2 || true)
if [ -n "$jit_parts" ]; then
  jit=${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}
  mkdir -p "$jit"
  cat $jit_parts | tar xzf - -C "$jit"
  echo "JIT kernels from an earlier machine: $(find "$jit" -name '*.so' | wc -l) in $jit"
fi
PYTHONPATH=$site python3 -c "
import importlib.metadata as md, sglang, transformers
print('sglang', sglang.__version__, 'transformers', transformers.__version__,
      'plugins', [e.name for e in md.entry_points(group='sglang.srt.plugins')])"
