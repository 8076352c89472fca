"""vLLM's Marlin MoE for INT4/INT8 experts: the gate/up scales put back in the order its kernel reads.

vLLM (0.26, and 0.32 and 0.33 as read; vllm-project/vllm#50196, open) permutes the experts' w13
(gate/up) group scales for Marlin with `size_k = intermediate_size_per_partition`, though w13's K is
the hidden size.
`marlin_permute_scales` takes its channelwise ("single") column order when group_size >= size_k, while
the kernel reads grouped scales whenever there are several groups along K (hidden // group_size). So
where intermediate <= group_size < hidden, every gate/up column is scaled by another column's scale:
on an H200, qwen3moe_int4_awq (hidden 256, intermediate 128, group 128) deviated 4.6x the
reference's noise (mean) through Marlin, 1.0x through vLLM's emulation MoE, and 1.0x through Marlin
with this repair; benchmarks/gpu_marlin_moe.py measured gate/up alone at 78-180x the bf16 noise
without it and 1.00x with it. Real models meet it at high tensor parallelism (Qwen3-30B-A3B's 768 at
TP=8 is 96 per rank).

The repair reads the layout instead of trusting a version: after vLLM's own processing it undoes the
channelwise order and applies the grouped one only when undoing the channelwise order gives back the
scales as loaded and undoing the grouped order does not. Any other result (a fixed vLLM, the grouped
order already, scales changed by FP8/INT8 activation processing, a backend that keeps them raw)
leaves vLLM's tensor untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.quantization.utils.marlin_utils import get_scale_perms

logger = init_logger(f"vllm.{__name__}")


def reorder_gate_up_scales(processed: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Rewrite `processed` (vLLM's Marlin w13 scales, [experts, groups, 2 * padded intermediate]) in
    place into the grouped order when it holds `loaded` (the scales before processing) in the
    channelwise order; True when it did."""
    grouped, single = (torch.tensor(p, device=processed.device) for p in get_scale_perms())
    if processed.dim() != 3 or loaded.dim() != 3 or processed.numel() % len(grouped):
        return False
    as_single, as_grouped = _undo(processed, single), _undo(processed, grouped)
    # vLLM's methods hold the loaded scales K-first ([experts, groups, 2 * intermediate]: 0.26's
    # Marlin method) or N-first ([experts, 2 * intermediate, groups]: 0.32's WNA16 method).
    for k_first in (loaded, loaded.transpose(1, 2)):
        if _holds(as_single, k_first) and not _holds(as_grouped, k_first):
            processed.copy_(as_single.reshape(-1, len(grouped))[:, grouped].reshape(processed.shape))
            return True
    return False


def _undo(permuted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The tensor that `x.reshape(-1, len(perm))[:, perm]` (marlin_permute_scales) turned into `permuted`."""
    return permuted.reshape(-1, len(perm))[:, torch.argsort(perm)].reshape(permuted.shape)


def _holds(unpermuted: torch.Tensor, loaded: torch.Tensor) -> bool:
    """Whether `unpermuted` is `loaded` ([experts, groups, 2 * intermediate]) with each gate/up half
    zero-padded to its own width (vLLM pads the intermediate size to Marlin's tile before permuting)."""
    experts, groups, width = unpermuted.shape
    inter, padded = loaded.shape[2] // 2, width // 2
    if loaded.shape[:2] != (experts, groups) or loaded.shape[2] % 2 or width % 2 or inter > padded:
        return False
    halves = unpermuted.reshape(experts, groups, 2, padded)
    return bool(torch.equal(halves[..., :inter].reshape(loaded.shape), loaded) and not halves[..., inter:].any())


# A FusedMoEMethodBase, as experts.ExpertsInputScale and for the same reason.
class MarlinGateUpScaleOrder(FusedMoEMethodBase):
    """Mixed in front of vLLM's compressed-tensors MoE method for integer weight-only experts on a GPU
    (lazyxform.emulate.mix_in; see the module docstring)."""

    def process_weights_after_loading(self, layer: Any) -> None:
        scales = getattr(layer, "w13_weight_scale", None)
        loaded = scales.data.clone() if scales is not None and scales.dim() == 3 else None
        super().process_weights_after_loading(layer)
        if loaded is not None and reorder_gate_up_scales(layer.w13_weight_scale.data, loaded):
            # Once per process (vLLM's warning_once keys on the arguments too, so there are none).
            logger.warning_once(
                "lazyxform: vLLM put Marlin MoE gate/up scales in the one-group order where the intermediate size is "
                "not above the group size, while its kernel reads several groups along the hidden size "
                "(vllm-project/vllm#50196); lazyxform put them in the grouped order"
            )
