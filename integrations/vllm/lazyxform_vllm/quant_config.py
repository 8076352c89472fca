"""The "lazyxform" quantization method: vLLM's compressed-tensors config, built from lazyxform's
translation of a ModelOpt checkpoint's config, plus the run-time pre_quant_scale of the modules
whose scale the weight stream keeps."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.platforms import current_platform

import lazyxform
from lazyxform.emulate import Scheme, mix_in
from lazyxform.fallback import ExpertsInputScale

from .config_parser import MARK
from .experts import scale_experts_input
from .linear import PreQuantScaleLinearMethod
from .marlin_moe import MarlinGateUpScaleOrder

if TYPE_CHECKING:
    from vllm.model_executor.models.utils import WeightsMapper

logger: logging.Logger = init_logger(f"vllm.{__name__}")

NAME = "lazyxform"


def experts_input_scale() -> ExpertsInputScale:
    """What lazyxform.open should do with routed experts whose gate/up pre_quant_scale differs between
    experts: keep it ("runtime") where the experts run lazyxform's portable CPU fused-MoE kernel, which
    scales each expert's input; everywhere else ("dense": every GPU, vLLM's own CPU kernels under
    LAZYXFORM_VLLM_CPU_KERNELS=off) vLLM's fused-MoE kernel takes one input for all experts, so those
    layers' experts are streamed dense with the scales multiplied in (experts.py: what runs)."""
    if current_platform.is_cpu():
        from . import portable

        if portable.experts_run_portable():
            return "runtime"
    return "dense"


class LazyxformConfig(CompressedTensorsConfig):
    checkpoint_dir: str
    # Checkpoint (later: vLLM) names of the modules whose input is scaled at run time.
    runtime_pre_quant_scale: frozenset[str]

    def get_name(self) -> str:
        return NAME

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claims the ModelOpt checkpoints the config parser marked as served, and any marked one
        when the user asks for quantization="lazyxform"; another explicit choice is respected."""
        mark = hf_quant_cfg.get(MARK)
        if not isinstance(mark, dict):
            return None
        if user_quant == NAME or (user_quant is None and mark["served"]):
            return NAME
        return None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LazyxformConfig:
        mark = config.get(MARK)
        if not isinstance(mark, dict):
            raise lazyxform.NotAModelOptCheckpoint(
                f"quantization={NAME!r} needs a ModelOpt checkpoint seen by the lazyxform config parser; this "
                f"quantization config (quant_method {config.get('quant_method')!r}) has no {MARK!r} mark"
            )
        # Configs and headers only (plus, for dense experts, their [hidden] pre_quant_scale vectors,
        # read on the CPU): no device is touched in this process.
        ck = lazyxform.open(mark["checkpoint"], device="cpu", experts_input_scale=experts_input_scale())
        # compressed-tensors' from_config builds `cls`, so the schemes are vLLM's own.
        quant_config = super().from_config(copy.deepcopy(ck.quantization_config))
        quant_config.checkpoint_dir = mark["checkpoint"]
        quant_config.runtime_pre_quant_scale = frozenset(ck.runtime_pre_quant_scale)
        logger.info(
            "lazyxform: %s as compressed-tensors (format %s), %d quantized modules, %d with a run-time "
            "pre_quant_scale; `lazyxform inspect %s` prints the plan",
            mark["checkpoint"],
            ck.quantization_config.get("format"),
            len(ck.plan.modules),
            len(quant_config.runtime_pre_quant_scale),
            mark["checkpoint"],
        )
        for warning in ck.plan.warnings:
            logger.warning("lazyxform: %s", warning)
        if mark.get("kv_cache_dropped"):  # the config parser said why
            quant_config.kv_cache_scheme = None
        return quant_config

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        super().apply_vllm_mapper(hf_to_vllm_mapper)
        self.runtime_pre_quant_scale = frozenset(hf_to_vllm_mapper.apply_list(sorted(self.runtime_pre_quant_scale)))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # A quantized lm_head is a Linear to the compressed-tensors methods (vLLM's own config gives
        # its ParallelLMHead CompressedTensorsLinearMethod); ModelOpt never folds its AWQ scale into
        # the final norm, so it may keep one for run time too.
        if isinstance(layer, (LinearBase, ParallelLMHead)):
            method = self._cpu_portable_method(layer, prefix) or super().get_quant_method(layer, prefix)
            members = self._checkpoint_modules(prefix)
            scaled = [m for m in members if m in self.runtime_pre_quant_scale]
            if not scaled:
                return method
            if len(scaled) != len(members):
                raise lazyxform.InconsistentScalesError(
                    f"{prefix}: vLLM runs {', '.join(members)} as one GEMM over one input, but only "
                    f"{', '.join(scaled)} carry a pre_quant_scale"
                )
            return PreQuantScaleLinearMethod(method)
        if isinstance(layer, RoutedExperts):
            method = self._cpu_portable_method(layer, prefix) or self._gpu_experts_method(layer, prefix)
            scaled = sorted(n for n in self.runtime_pre_quant_scale if n.startswith(prefix + "."))
            return scale_experts_input(method, layer, scaled) if scaled else method
        return super().get_quant_method(layer, prefix)

    def _experts_scheme(self, layer: RoutedExperts, prefix: str) -> Scheme | None:
        """The experts' config group: their first gate projection's, found as vLLM's compressed-tensors
        MoE method finds it (CompressedTensorsMoEMethod.get_moe_method)."""
        self._add_fused_moe_to_target_scheme_map()
        return Scheme.of(self.get_scheme_dict(layer, f"{prefix}.0.{layer.ckpt_gate_proj_name}"))

    def _gpu_experts_method(self, layer: RoutedExperts, prefix: str) -> QuantizeMethodBase | None:
        """vLLM's own method for the experts; for integer weight-only experts with the Marlin gate/up
        scale order repaired where vLLM gets it wrong (marlin_moe.py)."""
        method = super().get_quant_method(layer, prefix)
        scheme = self._experts_scheme(layer, prefix)
        if isinstance(method, FusedMoEMethodBase) and scheme is not None and scheme.weights.type == "int" and scheme.activations is None:
            method.__class__ = mix_in(MarlinGateUpScaleOrder, type(method))
        return method

    def _cpu_portable_method(self, layer: LinearBase | ParallelLMHead | RoutedExperts, prefix: str) -> QuantizeMethodBase | None:
        """lazyxform's portable method for a quantized layer that vLLM cannot compute exactly on this
        CPU (portable.py), else None. Never on a GPU, where portable.py is not even imported."""
        if not current_platform.is_cpu():
            return None
        from . import portable

        if not isinstance(layer, RoutedExperts):
            scheme = Scheme.of(self.get_scheme_dict(layer, prefix))
            return portable.PortableLinearMethod(scheme) if portable.wants_portable(scheme) else None
        scheme = self._experts_scheme(layer, prefix)
        return portable.PortableMoEMethod(scheme, layer.moe_config) if portable.wants_portable(scheme, experts=True) else None

    def _checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint modules behind a vLLM layer: the members of a fused layer (qkv_proj ->
        q_proj, k_proj, v_proj, per the model's packed_modules_mapping), else the layer itself."""
        parent, dot, leaf = prefix.rpartition(".")
        members = self.packed_modules_mapping.get(leaf)
        return [f"{parent}{dot}{m}" for m in members] if members else [prefix]

