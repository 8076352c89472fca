"""SGLang's compressed-tensors config for a checkpoint lazyxform presented, plus what its
compressed-tensors path cannot express: run-time pre_quant_scale, CPU kernels, named refusals."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import sglang
import torch
from compressed_tensors.quantization import QuantizationArgs
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
from sglang.srt.layers.quantization.base_config import QuantizeMethodBase
from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsFusedMoEMethod,
    CompressedTensorsLinearMethod,
)
from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Int8
from sglang.srt.layers.quantization.compressed_tensors.utils import check_equal_or_regex_match
from sglang.srt.layers.quantization.modelopt_quant import (
    ModelOptFp4Config,
    ModelOptFp4LinearMethod,
    ModelOptFp8Config,
    ModelOptFp8LinearMethod,
    ModelOptFp8MoEMethod,
)
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from sglang.srt.utils import is_cpu

import lazyxform
from lazyxform.emulate import Scheme

from .config import MARK, NVFP4_GROUP, open_checkpoint
from .schemes import (
    PortableMoEScheme,
    PortableScheme,
    PreQuantScaleScheme,
    StaticInt8InputScheme,
    UnsupportedSglangSchemeError,
    scale_experts_input,
)

logger = logging.getLogger(__name__)


# The fusions of SGLang's stacked_params_mapping in its Llama-family models, many of which declare no
# packed_modules_mapping (llama.py does not).
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


class LazyxformConfig(CompressedTensorsConfig):
    checkpoint_dir: str
    algos: str  # the checkpoint's ModelOpt quant_algo values, for messages
    checkpoint_modules: frozenset[str]  # names of the checkpoint's quantized modules
    # Checkpoint names of the modules whose input is scaled at run time.
    runtime_pre_quant_scale: frozenset[str]
    # Modules streamed as exported for SGLang's ModelOpt methods (config.modelopt_method_modules) -> algo.
    as_exported: dict[str, str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LazyxformConfig:
        quant_config = super().from_config(config)  # builds `cls`: the schemes are SGLang's own
        directory = config[MARK]["checkpoint"]
        # Configs and headers only (plus dense experts' [hidden] pre_quant_scale vectors, on the CPU).
        ck = open_checkpoint(directory, "cpu")
        quant_config.checkpoint_dir = directory
        quant_config.algos = ", ".join(sorted(lazyxform.read_modelopt_algos(directory)))
        quant_config.checkpoint_modules = frozenset(m.name for m in ck.plan.modules)
        quant_config.runtime_pre_quant_scale = frozenset(ck.plan.runtime_pre_quant_scale)
        quant_config.as_exported = {m.name: m.algo for m in ck.plan.modules if m.name in ck.plan.as_exported}
        logger.info(
            "lazyxform: %s as compressed-tensors (format %s), %d quantized modules, %d with a run-time "
            "pre_quant_scale; `lazyxform inspect %s` prints the plan",
            directory,
            config.get("format"),
            len(ck.plan.modules),
            len(quant_config.runtime_pre_quant_scale),
            directory,
        )
        for warning in ck.plan.warnings:
            logger.warning("lazyxform: %s", warning)
        if is_cpu():
            quant_config.restore_input_activations(config)
        return quant_config

    def restore_input_activations(self, config: dict[str, Any]) -> None:
        """SGLang keeps a group's input_activations only for the formats its GPU schemes quantize
        activations in (is_activation_quantization_format: not mxfp4-pack-quantized or
        mxfp8-quantized, which it has no linear scheme for). The portable CPU scheme computes the
        checkpoint's whole scheme, so it gets them back."""
        for group in config["config_groups"].values():
            if group.get("input_activations"):
                for target in group["targets"]:
                    self.target_scheme_map[target]["input_activations"] = QuantizationArgs.model_validate(group["input_activations"])

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, (LinearBase, ParallelLMHead)):
            return self._linear_method(layer, prefix)
        if isinstance(layer, FusedMoE):
            return self._experts_method(layer, prefix)
        return super().get_quant_method(layer, prefix)

    def _experts_method(self, layer: FusedMoE, prefix: str) -> QuantizeMethodBase | None:
        scaled = [n for n in self.runtime_pre_quant_scale if n.startswith(prefix + ".")]
        if any(n.endswith(".down_proj") for n in scaled):
            # SGLang's expert weight mapping has no parameter for it and would skip it silently.
            raise self._refusal(prefix, "experts whose down_proj keeps a pre_quant_scale (its input lives inside the fused-MoE kernel)")
        input_scaled = bool(scaled)  # the experts' gate/up
        if not is_cpu():
            if self._modelopt_algo(prefix, [n for n in self.checkpoint_modules if n.startswith(prefix + ".")]) == "FP8":
                return ModelOptFp8MoEMethod(self.modelopt_fp8)  # why: modelopt_method
            method = super().get_quant_method(layer, prefix)
            if not input_scaled:
                return method
            # Experts lazyxform did not stream dense: one scale per layer (or a format it cannot
            # dequantize, whose differing scales stop loading in PreQuantScaleMoEScheme).
            if not isinstance(method, CompressedTensorsFusedMoEMethod):
                raise self._refusal(prefix, f"experts with a gate/up pre_quant_scale in {type(method).__name__}, which has no compressed-tensors scheme to scale their input")
            layer.scheme = scale_experts_input(layer.scheme)
            return method
        # SGLang's own choice (get_moe_scheme) asks for a GPU: the experts' scheme, read as it reads it.
        self._add_fused_moe_to_target_scheme_map()
        schemes = {proj: Scheme.of(self.get_scheme_dict(layer, f"{prefix}.0.{proj}")) for proj in ("gate_proj", "up_proj", "down_proj")}
        scheme = schemes["gate_proj"]
        if any(s != scheme for s in schemes.values()):
            raise self._refusal(prefix, f"experts whose projections differ in scheme ({', '.join(f'{p}: {s}' for p, s in schemes.items())})")
        if scheme is None:
            return super().get_quant_method(layer, prefix)  # unquantized experts
        layer.scheme = PortableMoEScheme(scheme, input_scaled)
        return CompressedTensorsFusedMoEMethod(self)

    def _linear_scheme(self, layer: LinearBase | ParallelLMHead, prefix: str) -> Scheme | None:
        """The layer's compressed-tensors scheme as SGLang reads it: a head is quantized only when a
        target names it (get_lm_head_scheme, which asks for a GPU)."""
        if not isinstance(layer, ParallelLMHead):
            return Scheme.of(self.get_scheme_dict(layer, prefix))
        target = next((t for t in self.target_scheme_map if check_equal_or_regex_match(layer_name=prefix, targets=[t])), None)
        return None if target is None else Scheme.of(self.get_scheme_dict(layer, prefix, matched_target=target))

    def _modelopt_algo(self, prefix: str, members: list[str]) -> str | None:
        """The ModelOpt algo of a layer's modules when they stream as exported for SGLang's ModelOpt
        methods (config.modelopt_method_modules chooses whole layers), else None."""
        algos = {self.as_exported.get(m) for m in members}
        if len(algos) > 1:
            raise AssertionError(f"{prefix}: lazyxform streams some of {sorted(members)} as exported, not all; SGLang runs them as one layer")
        return next(iter(algos), None)

    @functools.cached_property
    def modelopt_fp8(self) -> ModelOptFp8Config:
        """SGLang's own ModelOpt FP8 config, built for the first FP8 layer (its constructor logs SGLang's
        "Detected ModelOpt FP8 checkpoint" warning); see modelopt_method."""
        return ModelOptFp8Config(is_checkpoint_fp8_serialized=True)

    @functools.cached_property
    def modelopt_fp4(self) -> ModelOptFp4Config:
        """SGLang's own ModelOpt NVFP4 config (16-column blocks), built for the first NVFP4 layer; see
        modelopt_method."""
        return ModelOptFp4Config(is_checkpoint_nvfp4_serialized=True, group_size=NVFP4_GROUP)

    def modelopt_method(self, algo: str) -> QuantizeMethodBase:
        """SGLang's own ModelOpt method for a linear layer of ModelOpt's FP8 or NVFP4 recipe on a GPU,
        in place of the compressed-tensors scheme; FP8 experts likewise get ModelOptFp8MoEMethod.

        Why: SGLang's native ModelOpt path is the checkpoint's own function as SGLang computes it
        (LAZYXFORM_SGLANG_ROUTE=auto leaves such checkpoints to it), and route `all` must give its
        logprobs bit for bit. The compressed-tensors schemes compute the same function with other
        kernels, or not at all: for FP8, apply_fp8_linear(..., compressed_tensor_quant=True) with a
        per-tensor weight scale (torch._scaled_mm), where the ModelOpt method picks its own (on an H200
        with SGLang 0.5.17, the scale broadcast per channel for sgl-kernel's CUTLASS fp8_scaled_mm):
        0.055 nats apart there; its experts run another fused-MoE method. For NVFP4, SGLang's
        compressed-tensors W4A4 scheme needs SM 10.0 and it has no W4A16 one, while its ModelOpt method
        runs FP4 Marlin below SM 10.0.

        These modules stream as ModelOpt exported them (config.modelopt_method_modules; names, shapes
        and bytes: weight, weight_scale, weight_scale_2, input_scale, the per-tensor scales 0-d), so the
        methods load them exactly as they load the native checkpoint: NVFP4's per-tensor scales are not
        turned into compressed-tensors' reciprocal global scales, which would not always invert back to
        the same float32. Modules with a pre_quant_scale are not among them: where SGLang's ModelOpt FP4
        method runs FP4 Marlin (below SM 10.0) it drops the scale (0.5.17, 0.5.23)."""
        if algo == "FP8":
            return ModelOptFp8LinearMethod(self.modelopt_fp8)
        return ModelOptFp4LinearMethod(self.modelopt_fp4)

    def _linear_method(self, layer: LinearBase | ParallelLMHead, prefix: str) -> QuantizeMethodBase | None:
        members = self._checkpoint_modules(prefix)
        algo = self._modelopt_algo(prefix, members)
        if algo is not None:
            return self.modelopt_method(algo)
        scaled = [m for m in members if m in self.runtime_pre_quant_scale]
        scheme = self._linear_scheme(layer, prefix)
        if scheme is None:  # unquantized, or dequantized by lazyxform (listed in `ignore`)
            # A head's unquantized method is SGLang's embedding default (None).
            method = None if isinstance(layer, ParallelLMHead) else UnquantizedLinearMethod()
        elif is_cpu():
            layer.scheme = PortableScheme(scheme)
            method = CompressedTensorsLinearMethod(self)
        else:
            try:
                method = super().get_quant_method(layer, prefix)
            except NotImplementedError as e:
                raise self._refusal(prefix, f"linear layers of {scheme} ({e})") from e
            inner = getattr(layer, "scheme", None)
            if isinstance(inner, CompressedTensorsW8A8Int8) and inner.is_static_input_scheme:
                layer.scheme = StaticInt8InputScheme(inner)  # loads and applies its static input scale
        if not scaled:
            return method
        if len(scaled) != len(members) or not isinstance(method, CompressedTensorsLinearMethod):
            raise lazyxform.InconsistentScalesError(
                f"{prefix}: SGLang runs {', '.join(members)} as one quantized GEMM over one input, but only "
                f"{', '.join(scaled)} carry a pre_quant_scale"
            )
        layer.scheme = PreQuantScaleScheme(layer.scheme, prefix)
        return method

    def _refusal(self, prefix: str, what: str) -> UnsupportedSglangSchemeError:
        return UnsupportedSglangSchemeError(
            f"{prefix}: SGLang {sglang.__version__} cannot run {what}; checkpoint {self.checkpoint_dir} (ModelOpt "
            f"{self.algos}). Set LAZYXFORM_SGLANG_ROUTE=off to leave the checkpoint to SGLang's own ModelOpt support, "
            "or serve it with vLLM (lazyxform_vllm)"
        )

    def _checkpoint_modules(self, prefix: str) -> list[str]:
        """The checkpoint modules behind an SGLang layer: the layer itself where the checkpoint has it
        (e.g. Phi-3's pre-fused qkv_proj), else the members of a fused layer (qkv_proj -> q_proj,
        k_proj, v_proj, per the model's packed_modules_mapping, else SGLang's usual fusions)."""
        parent, dot, leaf = prefix.rpartition(".")
        members = None if prefix in self.checkpoint_modules else self.packed_modules_mapping.get(leaf) or FUSED.get(leaf)
        return [f"{parent}{dot}{m}" for m in members] if members else [prefix]


def get_quant_config(original: Callable[..., Any], model_config: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of weight_utils.get_quant_config: SGLang builds its compressed-tensors config from the
    presented one as usual; for a checkpoint lazyxform serves it becomes a LazyxformConfig. A
    checkpoint left to SGLang's ModelOpt support is only looked at (warn_awq_scale_dropped)."""
    quant_config = original(model_config, *args, **kwargs)
    if type(quant_config) is CompressedTensorsConfig and MARK in (quant_config.config or {}):
        return LazyxformConfig.from_config(quant_config.config)
    warn_awq_scale_dropped(quant_config, getattr(model_config, "model_path", "the checkpoint"))
    return quant_config


def warn_awq_scale_dropped(quant_config: Any, checkpoint: str) -> None:
    """SGLang's ModelOpt FP4 method runs FP4 Marlin on GPUs below SM 10.0 (its other FP4 GEMMs need
    SM 10.0), and there its `apply` returns before the `x * pre_quant_scale` it applies otherwise
    (0.5.17 and 0.5.23, read in the sources): an NVFP4_AWQ checkpoint it serves itself runs without
    its AWQ scales. LAZYXFORM_SGLANG_ROUTE=auto leaves NVFP4_AWQ to it, so this says so."""
    if not isinstance(quant_config, ModelOptFp4Config) or not getattr(quant_config, "is_awq", False) or is_cpu():
        return
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (10, 0):
        return
    logger.warning(
        "lazyxform: SGLang %s serves %s (ModelOpt NVFP4_AWQ) itself; on this GPU (SM %d.%d) its ModelOpt FP4 method "
        "runs FP4 Marlin, which does not apply the checkpoint's pre_quant_scale, so the model computed is not the "
        "checkpoint's. LAZYXFORM_SGLANG_ROUTE=all serves it through lazyxform instead (SGLang 0.5.23: compressed-tensors "
        "W4A16 FP4 with the scale applied; SGLang 0.5.17 has no such scheme and refuses it by name)",
        sglang.__version__,
        checkpoint,
        major,
        minor,
    )
