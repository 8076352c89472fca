"""lazyxform_sglang's portable fused-MoE scheme inside a real SGLang FusedMoE layer on the CPU, built in
this process (one-rank gloo group), for DeepSeek-V3's routed experts: SGLang 0.5.23 cannot run
DeepSeek-V3 on a CPU end to end (docs/sglang.md), so this is where its experts are checked. The
checkpoint's expert tensors, rewritten by lazyxform's stream, go through SGLang's own expert weight
loader (its expert_params_mapping names); after SGLang's process_weights_after_loading

- each expert's decoded gate/up and down weights equal compressed-tensors' decompressor applied to the
  stream (tests/reference.py), in the decompressor's dtype;
- each expert's own gate/up pre_quant_scale (different per expert in the AWQ export) is the
  checkpoint's;
- for INT4 AWQ (weight-only: no input quantizer to model) the layer's output on random tokens matches
  ModelOpt's formula in float64 (tests/reference.py's weights, the gate/up and down pre_quant_scales
  applied as ModelOpt does), within the bf16 rounding of the output, and the bound catches one
  expert's pre_quant_scale left out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from algos import FIXTURE_TABLE
from reference import FIXTURES, ct_decompress, load_tensors, modelopt_weight

import lazyxform
from lazyxform_sglang.config import MARK
from lazyxform_sglang.quant_config import LazyxformConfig
from lazyxform_sglang.schemes import PortableMoEScheme

DEEPSEEK = sorted(n for n, f in FIXTURE_TABLE.items() if f.model_type == "deepseek_v3" and f.refused is None)
LAYER = "model.layers.1.mlp.experts"  # DeepSeek-V3 fixtures: layer 0 is dense, layer 1 has 4 routed experts
EXPERTS, TOP_K, TOKENS = 4, 2, 16
BF16_ULP = 2**-8


pytestmark = pytest.mark.usefixtures("one_rank_group")


def loaded_experts(name: str) -> torch.nn.Module:
    """Layer 1's FusedMoE of the fixture, loaded from lazyxform's stream through SGLang's loader."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    path = FIXTURES / name
    ck = lazyxform.open(path, device="cpu")
    config = LazyxformConfig.from_config({**ck.quantization_config, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": {}})
    hf = ck.hf_config
    layer = FusedMoE(
        num_experts=EXPERTS,
        top_k=TOP_K,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["moe_intermediate_size"],
        layer_id=1,
        quant_config=config,
        prefix=LAYER,
        params_dtype=torch.bfloat16,
    )
    assert isinstance(layer.scheme, PortableMoEScheme)
    params = dict(layer.named_parameters(prefix="experts"))
    mapping = FusedMoE.make_expert_params_mapping("gate_proj", "down_proj", "up_proj", EXPERTS)
    loaded = 0
    for tensor_name, tensor in ck.wrap(iter(load_tensors(path).items())):
        if not tensor_name.startswith(f"{LAYER}."):
            continue
        short = tensor_name.removeprefix("model.layers.1.mlp.")
        param_name, weight_name, expert, shard = next(m for m in mapping if m[1] in short)
        param = params[short.replace(weight_name, param_name)]
        param.weight_loader(param, tensor, short.replace(weight_name, param_name), shard_id=shard, expert_id=expert)
        loaded += 1
    assert loaded > 0
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("name", DEEPSEEK)
def test_decoded_experts_are_the_decompressed_stream(name: str) -> None:
    layer = loaded_experts(name)
    path = FIXTURES / name
    ck = lazyxform.open(path, device="cpu")
    stream = dict(ck.wrap(iter(load_tensors(path).items())))
    checkpoint = load_tensors(path)
    for e in range(EXPERTS):
        module = f"{LAYER}.{e}"
        gate_up = torch.cat([ct_decompress(ck.quantization_config, f"{module}.{p}", stream) for p in ("gate_proj", "up_proj")])
        down = ct_decompress(ck.quantization_config, f"{module}.down_proj", stream)
        assert torch.equal(layer.w13_weight[e].to(gate_up.dtype), gate_up), module
        assert torch.equal(layer.w2_weight[e].to(down.dtype), down), module
        if f"{module}.gate_proj.pre_quant_scale" in checkpoint:
            assert torch.equal(layer.w13_pre_quant_scale[e], checkpoint[f"{module}.gate_proj.pre_quant_scale"].to(torch.bfloat16)), module


def modelopt_experts(name: str, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, skip_scale_of: int | None = None) -> torch.Tensor:
    """ModelOpt's routed experts in float64: each expert's gate/up on x * its gate/up pre_quant_scale, its
    down on SiLU(gate) * up times its down pre_quant_scale; weighted by the router."""
    t = load_tensors(FIXTURES / name)
    algo = FIXTURE_TABLE[name].algo
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(TOP_K):
            e = int(topk_ids[token, slot])
            module = f"{LAYER}.{e}"
            w = {p: modelopt_weight(algo, t, f"{module}.{p}").double() for p in ("gate_proj", "up_proj", "down_proj")}
            pqs = {p: t[f"{module}.{p}.pre_quant_scale"].double() for p in w if f"{module}.{p}.pre_quant_scale" in t}
            xe = x[token].double() * (pqs["gate_proj"] if e != skip_scale_of else 1)
            h = F.silu(w["gate_proj"] @ xe) * (w["up_proj"] @ xe)
            out[token] += topk_weights[token, slot].double() * (w["down_proj"] @ (h * pqs.get("down_proj", 1)))
    return out


def test_int4_awq_experts_compute_modelopts_function() -> None:
    from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    name = "deepseek_v3_int4_awq"
    layer = loaded_experts(name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, layer.hidden_size, generator=generator).to(torch.bfloat16)
    topk_ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)]).int()
    topk_weights = torch.rand(TOKENS, TOP_K, generator=generator).softmax(-1)
    topk = StandardTopKOutput(topk_weights, topk_ids, torch.zeros(TOKENS, EXPERTS))
    got = layer.quant_method.apply(layer, StandardDispatchOutput(x, None, topk)).hidden_states
    assert got.dtype == torch.bfloat16
    want = modelopt_experts(name, x, topk_weights, topk_ids)
    # The stream's bf16 group scales (2^-8, WNA16 bound), folded down_proj scales and the one bf16
    # rounding of the output: a few bf16 steps of the output's scale.
    bound = 4 * BF16_ULP * want.abs().max()
    err = (got.double() - want).abs().max()
    blind = (got.double() - modelopt_experts(name, x, topk_weights, topk_ids, skip_scale_of=1)).abs().max()
    print(f"{name} experts: max |SGLang - ModelOpt| {err:.3g}, bound {bound:.3g}, without expert 1's pre_quant_scale {blind:.3g}")
    assert err <= bound, f"{name}: max |SGLang - ModelOpt| {err:.3g}, bound {bound:.3g}"
    assert blind > bound, f"{name} without expert 1's pre_quant_scale: {blind:.3g} within {bound:.3g}"
