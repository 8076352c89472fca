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
  expert's pre_quant_scale left out.

And Qwen3-MoE INT4 AWQ's experts, whose gate/up share one pre_quant_scale per layer, as SGLang runs them
on a GPU: a one-input scheme with PreQuantScaleMoEScheme mixed in (the portable scheme standing in for
SGLang's kernel), equal to the per-expert path, ModelOpt's function when routed from the unscaled
tokens, and refusing differing or missing scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from algos import FIXTURE_TABLE
from reference import FIXTURES, ct_decompress, load_tensors, modelopt_weight
from sglang.srt.layers.moe.token_dispatcher import StandardDispatchOutput
from sglang.srt.layers.moe.topk import StandardTopKOutput
from sglang_support import fused_moe, load_experts

import lazyxform
from lazyxform_sglang import quant_config
from lazyxform_sglang.config import MARK
from lazyxform_sglang.quant_config import LazyxformConfig
from lazyxform_sglang.schemes import (
    PortableMoEScheme,
    PreQuantScaleMoEScheme,
    UnsupportedSglangSchemeError,
    scale_experts_input,
)

DEEPSEEK = sorted(n for n, f in FIXTURE_TABLE.items() if f.model_type == "deepseek_v3" and f.refused is None)
LAYER = "model.layers.1.mlp.experts"  # DeepSeek-V3 fixtures: layer 0 is dense, layer 1 has 4 routed experts
EXPERTS, TOP_K, TOKENS = 4, 2, 16
BF16_ULP = 2**-8


pytestmark = pytest.mark.usefixtures("one_rank_group")


def loaded_experts(name: str, prefix: str = LAYER) -> torch.nn.Module:
    """The fixture's FusedMoE `prefix`, loaded from lazyxform's stream through SGLang's loader and
    processed after loading."""
    return processed(experts_layer(name, prefix))


def processed(layer: torch.nn.Module) -> torch.nn.Module:
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def experts_layer(name: str, prefix: str = LAYER) -> torch.nn.Module:
    """The fixture's FusedMoE `prefix`, its tensors from lazyxform's stream put in place by SGLang's
    expert weight loader (its expert_params_mapping names), not yet processed."""
    path = FIXTURES / name
    ck = lazyxform.open(path, device="cpu")
    config = LazyxformConfig.from_config({**ck.quantization_config, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": {}})
    layer = fused_moe(ck.hf_config, config, prefix, EXPERTS, TOP_K)
    assert isinstance(layer.scheme, PortableMoEScheme)
    assert load_experts(layer, ck.wrap(iter(load_tensors(path).items()))) > 0
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


def modelopt_experts(
    name: str, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, skip_scale_of: int | None = None, prefix: str = LAYER
) -> torch.Tensor:
    """ModelOpt's routed experts `prefix` in float64: each expert's gate/up on x * its gate/up
    pre_quant_scale, its down on SiLU(gate) * up times its down pre_quant_scale; weighted by the router."""
    t = load_tensors(FIXTURES / name)
    algo = FIXTURE_TABLE[name].algo
    out = torch.zeros(x.shape, dtype=torch.float64)
    for token in range(x.shape[0]):
        for slot in range(TOP_K):
            e = int(topk_ids[token, slot])
            module = f"{prefix}.{e}"
            w = {p: modelopt_weight(algo, t, f"{module}.{p}").double() for p in ("gate_proj", "up_proj", "down_proj")}
            pqs = {p: t[f"{module}.{p}.pre_quant_scale"].double() for p in w if f"{module}.{p}.pre_quant_scale" in t}
            xe = x[token].double() * (pqs["gate_proj"] if e != skip_scale_of else 1)
            h = F.silu(w["gate_proj"] @ xe) * (w["up_proj"] @ xe)
            out[token] += topk_weights[token, slot].double() * (w["down_proj"] @ (h * pqs.get("down_proj", 1)))
    return out


def dispatched(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> StandardDispatchOutput:
    """What SGLang's standard dispatcher hands the fused-MoE method: the tokens and their routing."""
    return StandardDispatchOutput(x, None, StandardTopKOutput(topk_weights, topk_ids, torch.zeros(x.shape[0], EXPERTS)))


def random_routing(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_weights, topk_ids: TOP_K distinct experts per token."""
    topk_ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)]).int()
    return torch.rand(TOKENS, TOP_K, generator=generator).softmax(-1), topk_ids


def test_int4_awq_experts_compute_modelopts_function() -> None:
    name = "deepseek_v3_int4_awq"
    layer = loaded_experts(name)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, layer.hidden_size, generator=generator).to(torch.bfloat16)
    topk_weights, topk_ids = random_routing(generator)
    got = layer.quant_method.apply(layer, dispatched(x, topk_weights, topk_ids)).hidden_states
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


# Qwen3-MoE INT4 AWQ: every expert of a layer carries the same gate/up pre_quant_scale (ModelOpt
# averages them), which cannot fold into the norm in front (the router reads it too). On a GPU,
# SGLang's own WNA16 scheme runs these experts with the scale mixed in (scale_experts_input); here the
# portable scheme, told that the experts keep no scale, stands in for SGLang's kernel, which needs a GPU.
SHARED = "qwen3moe_int4_awq"
SHARED_LAYER = "model.layers.0.mlp.experts"  # 4 routed experts, top 2, router weights not renormalized


def shared_scale_experts() -> torch.nn.Module:
    """SHARED_LAYER as LazyxformConfig builds it on a GPU: a one-input kernel with the scale mixed in,
    loaded, not yet processed."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(quant_config, "PortableMoEScheme", lambda scheme, input_scaled: scale_experts_input(PortableMoEScheme(scheme, input_scaled=False)))
        return experts_layer(SHARED, SHARED_LAYER)


def qwen3_routing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE's routing of x by the fixture's router: softmax, top k, weights not renormalized."""
    router = load_tensors(FIXTURES / SHARED)[SHARED_LAYER.replace(".experts", ".gate.weight")]
    topk_weights, topk_ids = (x.float() @ router.float().T).softmax(-1).topk(TOP_K)
    return topk_weights, topk_ids.int()


def test_one_expert_scale_outside_the_kernel_equals_the_per_expert_scale() -> None:
    """The experts' one scale mixed into a one-input scheme computes exactly what the portable scheme
    computes scaling each expert's tokens (SGLang's CPU path), on tokens whose product with the scale is
    exact in bf16 (signed powers of two), so that the two differ only in where they multiply; the
    inner scheme alone (the scale dropped) does not."""
    per_expert = loaded_experts(SHARED, SHARED_LAYER)
    layer = processed(shared_scale_experts())
    assert type(layer.scheme).__name__ == "PortableMoEScheme"  # SGLang's expert loader dispatches on the name
    assert isinstance(layer.scheme, PreQuantScaleMoEScheme) and not layer.scheme.input_scaled
    scale = load_tensors(FIXTURES / SHARED)[f"{SHARED_LAYER}.0.gate_proj.pre_quant_scale"].to(torch.bfloat16)
    assert not hasattr(layer, "w13_pre_quant_scale") and torch.equal(layer.experts_input_scale, scale)
    generator = torch.Generator().manual_seed(0)
    exponent = torch.randint(-4, 3, (TOKENS, layer.hidden_size), generator=generator)
    sign = torch.randint(0, 2, (TOKENS, layer.hidden_size), generator=generator) * 2 - 1
    routed = dispatched((sign * 2.0**exponent).to(torch.bfloat16), *random_routing(generator))
    got = layer.quant_method.apply(layer, routed).hidden_states
    assert torch.equal(got, per_expert.quant_method.apply(per_expert, routed).hidden_states)
    unscaled = PortableMoEScheme.apply_weights(layer.scheme, layer, routed).hidden_states
    assert (got - unscaled).abs().max() > 4 * BF16_ULP * got.abs().max()


def test_one_expert_scale_after_routing_computes_modelopts_function() -> None:
    """Routed by the fixture's router from the unscaled tokens (as SGLang routes before the experts
    run), the layer matches ModelOpt's experts in float64 within a few bf16 steps of the output; the
    same experts routed from the scaled tokens (the scale applied before routing) do not."""
    layer = processed(shared_scale_experts())
    x = torch.randn(TOKENS, layer.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    topk_weights, topk_ids = qwen3_routing(x)
    got = layer.quant_method.apply(layer, dispatched(x, topk_weights, topk_ids)).hidden_states.double()
    want = modelopt_experts(SHARED, x, topk_weights, topk_ids, prefix=SHARED_LAYER)
    bound = 4 * BF16_ULP * want.abs().max()  # as for DeepSeek-V3's experts above
    err = (got - want).abs().max()
    misrouted = (got - modelopt_experts(SHARED, x, *qwen3_routing(x * layer.experts_input_scale), prefix=SHARED_LAYER)).abs().max()
    print(f"{SHARED} experts: max |SGLang - ModelOpt| {err:.3g}, bound {bound:.3g}, routed from the scaled tokens {misrouted:.3g}")
    assert err <= bound, f"{SHARED}: max |SGLang - ModelOpt| {err:.3g}, bound {bound:.3g}"
    assert misrouted > bound, f"{SHARED} routed from the scaled tokens: {misrouted:.3g} within {bound:.3g}"


def test_differing_or_missing_expert_scales_stop_loading() -> None:
    """A one-input kernel cannot run experts whose scales differ: loading stops naming the layer. An
    expert whose scale never arrived (its row still NaN) stops it too."""
    layer = shared_scale_experts()
    layer.w13_pre_quant_scale.data[2] *= 2
    with pytest.raises(
        UnsupportedSglangSchemeError,
        match=rf"^{SHARED_LAYER}: the experts' gate/up pre_quant_scale differs between experts \(local expert 0 vs \[2\]\); SGLang's PortableMoEScheme runs every expert on one input",
    ):
        processed(layer)
    layer = shared_scale_experts()
    layer.w13_pre_quant_scale.data[3] = torch.nan
    with pytest.raises(lazyxform.MissingTensorError, match=rf"^{SHARED_LAYER}: no gate/up pre_quant_scale was loaded for local experts \[3\]"):
        processed(layer)


def test_an_input_quantized_before_the_experts_is_refused() -> None:
    """Where SGLang's dispatcher already quantized the tokens (its FP4 all-gather), multiplying them
    by the scale would be wrong: the layer stops, naming itself."""
    layer = processed(shared_scale_experts())
    x = torch.ones(TOKENS, layer.hidden_size, dtype=torch.bfloat16)
    routed = dispatched(x, *random_routing(torch.Generator().manual_seed(0)))._replace(hidden_states_scale=torch.ones(TOKENS))
    with pytest.raises(UnsupportedSglangSchemeError, match=rf"^{SHARED_LAYER}: SGLang quantized the experts' input"):
        layer.quant_method.apply(layer, routed)
