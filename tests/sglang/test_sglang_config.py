"""The plugin on the installed SGLang, without an engine: it registers through the entry point and
HookRegistry, presents every ModelOpt fixture to SGLang's own ModelConfig as compressed-tensors,
routes as documented, and SGLang's compressed-tensors config accepts lazyxform's config and gives
each layer the scheme its GPU path would run (scheme selection answered as on an SM 9.0 and an SM
10.0 GPU), a run-time pre_quant_scale where lazyxform left one, or a refusal naming the layer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sglang
import torch
from algos import ALIASES, FIXTURE_TABLE, SERVED, SGLANG_SCHEME
from reference import FIXTURES, load_tensors, quantized_modules
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
from sglang.srt.models.llama import LlamaForCausalLM
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang_support import ROUTE_ENV

import lazyxform
from lazyxform.routing import serves
from lazyxform_sglang import compat, quant_config
from lazyxform_sglang.config import MARK
from lazyxform_sglang.routing import native_algos
from lazyxform_sglang.schemes import PortableScheme, PreQuantScaleScheme

# SGLang's Llama and Qwen3-MoE models: the layer names below are theirs. Phi-3, Gemma 3 and DeepSeek
# fixtures are not run on SGLang here (docs/sglang.md).
FIXTURE_NAMES = [f for f in SERVED if FIXTURE_TABLE[f].model_type in ("llama", "qwen3_moe")]
LLAMA_LAYERS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
QWEN3MOE_LAYERS = ["self_attn.qkv_proj", "self_attn.o_proj"]
SM = {"SM 9.0": (9, 0), "SM 10.0": (10, 0)}
LLAMA_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}  # llama.py's stacked_params_mapping


@pytest.fixture(scope="module", autouse=True)
def plugins() -> None:
    load_plugins()  # SGLang's own loader: entry points, then HookRegistry.apply_hooks


def test_registered_through_the_entry_point_and_hook_registry() -> None:
    for target, hook in (
        (compat.PARSE_QUANT_CONFIG, "parse_quant_hf_config"),
        (compat.GET_QUANT_CONFIG, "get_quant_config"),
        (compat.WEIGHTS_ITERATOR, "get_weights_iterator"),
    ):
        assert [h.__name__ for _, h, source in HookRegistry._hooks[target] if source.plugin_name == "lazyxform"] == [hook]


def model_config(path: Path, monkeypatch: pytest.MonkeyPatch, route: str = "auto", **kwargs) -> ModelConfig:
    monkeypatch.setenv(ROUTE_ENV, route)
    return ModelConfig(model_path=str(path), **kwargs)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_sglang_sees_compressed_tensors(name: str, checkpoint: Callable[[str], Path], monkeypatch) -> None:
    path = checkpoint(name)
    mc = model_config(path, monkeypatch)
    assert mc.quantization == "compressed-tensors"
    presented = mc.hf_config.quantization_config
    ck = lazyxform.open(path, device="cpu")
    assert {k: v for k, v in presented.items() if k != MARK} == ck.quantization_config
    assert presented[MARK] == {"checkpoint": str(path.resolve())}


def test_legacy_export_and_routes(checkpoint: Callable[[str], Path], tmp_path: Path, monkeypatch) -> None:
    """A legacy export (only hf_quant_config.json) is presented too; `off` leaves it to SGLang's
    ModelOpt parser; an explicit --quantization is respected; a non-ModelOpt checkpoint is untouched."""
    path = checkpoint("int4_awq")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in path.iterdir():
        legacy.joinpath(f.name).write_bytes(f.read_bytes())
    config = json.loads((legacy / "config.json").read_text())
    del config["quantization_config"]
    (legacy / "config.json").write_text(json.dumps(config))
    assert model_config(legacy, monkeypatch).quantization == "compressed-tensors"
    assert model_config(path, monkeypatch, route="off").quantization == "modelopt"
    assert model_config(checkpoint("fp8"), monkeypatch, quantization="modelopt_fp8").quantization == "modelopt_fp8"
    dense = tmp_path / "dense"
    unquantized = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k != "quantization_config"}
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps(unquantized))
    assert model_config(dense, monkeypatch).quantization is None


def test_routing() -> None:
    """auto leaves to SGLang exactly what it loads natively (0.5.17: FP8, NVFP4, NVFP4_AWQ; 0.5.23 adds
    W4A16_NVFP4 and MXFP8) and serves everything on a CPU; all/off override."""
    for algos, on_0_5_17, on_0_5_23 in (
        ({"FP8"}, False, False),
        ({"NVFP4", "NVFP4_AWQ"}, False, False),
        ({"W4A16_NVFP4"}, True, False),
        ({"MXFP8"}, True, False),
        ({"W4A16_AWQ"}, True, True),
        ({"FP8_PER_CHANNEL_PER_TOKEN"}, True, True),
        ({"FP8", "W4A8_AWQ"}, True, True),
    ):
        assert serves(algos, "auto", False, native_algos("0.5.17")) is on_0_5_17, algos
        assert serves(algos, "auto", False, native_algos("0.5.23")) is on_0_5_23, algos
        assert serves(algos, "auto", True, native_algos("0.5.23"))
        assert serves(algos, "all", False, native_algos("0.5.23"))
        assert not serves(algos, "off", True, native_algos("0.5.23"))


def test_version_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    compat.check_sglang()  # the installed SGLang
    assert sglang.__version__ == "0.5.23"
    for version in ("0.5.16", "0.5.24", "0.6.0"):
        with pytest.raises(compat.UnsupportedSglangError, match=f"supports SGLang >=0.5.17,<0.5.24, found {version}"):
            compat.check_sglang(version)
    # A hooked function whose parameters moved is named, not patched blindly.
    monkeypatch.setitem(compat.HOOKED_PARAMETERS, compat.WEIGHTS_ITERATOR, ("self", "model_config"))
    with pytest.raises(compat.UnsupportedSglangError, match=r"_get_weights_iterator\('self', 'model_config'\)"):
        compat.check_sglang()


def lazyxform_config(path: Path) -> quant_config.LazyxformConfig:
    """What SGLang's get_quant_config builds for a served Llama checkpoint, through the hook."""
    ck = lazyxform.open(path, device="cpu")
    packed = getattr(LlamaForCausalLM, "packed_modules_mapping", {})  # as SGLang's loader passes it
    config = {**ck.quantization_config, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": packed}
    return quant_config.LazyxformConfig.from_config(config)


def stand_in(cls: type) -> torch.nn.Module:
    """An SGLang layer object for get_quant_method, without the tensor-parallel groups a real one needs."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    return layer


def checkpoint_members(name: str, layer: str) -> list[str]:
    parent, leaf = f"model.layers.0.{layer}".rsplit(".", 1)
    return [f"{parent}.{m}" for m in LLAMA_FUSED.get(leaf, [leaf])]


@pytest.mark.parametrize("sm", SM)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_layer_gets_sglangs_gpu_scheme(name: str, sm: str, monkeypatch) -> None:
    monkeypatch.setattr(quant_config, "is_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: SM[sm])
    path = FIXTURES / name
    config = lazyxform_config(path)
    quantized = set(quantized_modules(load_tensors(path)))
    runtime = set(lazyxform.open(path, device="cpu").plan.runtime_pre_quant_scale)
    algo = FIXTURE_TABLE[name].algo
    expected = SGLANG_SCHEME[ALIASES.get(algo, algo)][list(SM).index(sm)]
    for layer_name in QWEN3MOE_LAYERS if FIXTURE_TABLE[name].moe else LLAMA_LAYERS:
        members = checkpoint_members(name, layer_name)
        prefix = f"model.layers.0.{layer_name}"
        layer = stand_in(LinearBase)
        if not set(members) & quantized or expected == "dense":
            assert type(config.get_quant_method(layer, prefix)).__name__ == "UnquantizedLinearMethod", prefix
            continue
        if expected is None:
            with pytest.raises(quant_config.UnsupportedSglangSchemeError, match=rf"^{prefix}: SGLang 0\.5\.23 cannot run linear layers of "):
                config.get_quant_method(layer, prefix)
            continue
        assert type(config.get_quant_method(layer, prefix)).__name__ == "CompressedTensorsLinearMethod"
        scheme = layer.scheme
        if set(members) <= runtime:
            assert isinstance(scheme, PreQuantScaleScheme), prefix
            scheme = scheme.inner
        assert type(scheme).__name__ == expected, prefix


def test_moe_experts(monkeypatch) -> None:
    """qwen3moe_fp8's experts: SGLang's W8A8Fp8 MoE scheme on a GPU; on a CPU a refusal naming the
    layer (no portable fused-MoE scheme for SGLang yet)."""
    config = lazyxform_config(FIXTURES / "qwen3moe_fp8")
    prefix = "model.layers.0.mlp.experts"
    with pytest.raises(quant_config.UnsupportedSglangSchemeError, match=rf"^{prefix}: SGLang 0\.5\.23 cannot run quantized fused-MoE experts on a CPU"):
        config.get_quant_method(stand_in(FusedMoE), prefix)
    assert type(config.get_moe_scheme(stand_in(FusedMoE), prefix)).__name__ == "CompressedTensorsW8A8Fp8MoE"


def test_cpu_layers_run_the_portable_scheme() -> None:
    """On a CPU every quantized linear layer gets lazyxform's portable scheme inside SGLang's
    compressed-tensors linear method (the end-to-end tests run them)."""
    config = lazyxform_config(FIXTURES / "int4_awq")
    layer = stand_in(LinearBase)
    assert type(config.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj")).__name__ == "CompressedTensorsLinearMethod"
    assert isinstance(layer.scheme, PortableScheme)
    layer = stand_in(LinearBase)
    config.get_quant_method(layer, "model.layers.0.self_attn.o_proj")
    assert isinstance(layer.scheme, PreQuantScaleScheme) and isinstance(layer.scheme.inner, PortableScheme)
    # MX input quantizers, which SGLang's scheme map drops for formats it has no GPU scheme for, are kept.
    for name, bits in (("mxfp4", 4), ("mxfp8", 8)):
        layer = stand_in(LinearBase)
        lazyxform_config(FIXTURES / name).get_quant_method(layer, "model.layers.0.mlp.down_proj")
        acts = layer.scheme.scheme.activations
        assert (acts.type, acts.num_bits, acts.group_size, acts.dynamic) == ("float", bits, 32, True), name
