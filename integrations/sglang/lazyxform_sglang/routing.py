"""SGLang's side of the routing policy (lazyxform/routing.py): its switch, and the ModelOpt quant_algo
values each SGLang release loads itself."""

from __future__ import annotations

from packaging.version import Version

ROUTE_ENV = "LAZYXFORM_SGLANG_ROUTE"

# The ModelOpt quant_algo values SGLang loads itself: ModelOptFp4Config.from_config and
# ModelConfig._parse_modelopt_quant_config (layers/quantization/modelopt_quant.py,
# configs/model_config.py). 0.5.17 takes FP8, NVFP4 and NVFP4_AWQ; 0.5.23 adds W4A16_NVFP4 and
# MXFP8 (its "mxfp8" method). Releases in between were not read: there lazyxform serves those two.
SGLANG_NATIVE_ALGOS = frozenset({"FP8", "NVFP4", "NVFP4_AWQ"})
SGLANG_0_5_23_NATIVE_ALGOS = SGLANG_NATIVE_ALGOS | {"W4A16_NVFP4", "MXFP8"}


def native_algos(sglang_version: str) -> frozenset[str]:
    return SGLANG_0_5_23_NATIVE_ALGOS if Version(sglang_version) >= Version("0.5.23") else SGLANG_NATIVE_ALGOS
