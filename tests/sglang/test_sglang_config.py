"""The plugin on the installed SGLang, without an engine: it registers through the entry point and
HookRegistry, presents every ModelOpt fixture (Llama, Qwen3-MoE, Phi-3, Gemma 3, DeepSeek-V3) to
SGLang's own ModelConfig as compressed-tensors, routes as documented, and SGLang's compressed-tensors
config accepts lazyxform's config and gives each layer the scheme its GPU path would run (scheme
selection answered as on an SM 9.0 and an SM 10.0 GPU; for ModelOpt's FP8 recipe, SGLang's own
ModelOpt FP8 methods instead), a run-time pre_quant_scale where lazyxform left one, or a refusal
naming the layer; on a CPU, lazyxform's portable linear and fused-MoE schemes."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import sglang
import torch
from algos import ALIASES, FIXTURE_TABLE, SERVED, SGLANG_MOE_SCHEME, SGLANG_SCHEME
from reference import FIXTURES, load_tensors, quantized_modules
from safetensors.torch import save_file
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
from sglang.srt.layers.quantization.compressed_tensors import compressed_tensors
from sglang.srt.layers.quantization.compressed_tensors.schemes import (
    compressed_tensors_w4a4_nvfp4_moe as w4a4_nvfp4_moe,
)
from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from sglang.srt.models.gemma3_causal import Gemma3ForCausalLM
from sglang.srt.models.llama import LlamaForCausalLM, Phi3ForCausalLM
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang_support import ROUTE_ENV, answer_gpu, plugin_stream
from sglang_support import lazyxform_config as served_config

import lazyxform
from lazyxform.routing import serves
from lazyxform_sglang import compat, quant_config
from lazyxform_sglang.config import MARK
from lazyxform_sglang.routing import native_algos
from lazyxform_sglang.schemes import (
    PortableMoEScheme,
    PortableScheme,
    PreQuantScaleMoEScheme,
    PreQuantScaleScheme,
    StaticInt8InputScheme,
)

FIXTURE_NAMES = SERVED
# SGLang's layers of each architecture (its model files' names) checked in decoder layer 0, plus the
# head; DeepSeek-V3's layer 0 has a dense MLP, its experts are in layer 1.
LLAMA_LAYERS = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
MLA_LAYERS = ["self_attn.fused_qkv_a_proj_with_mqa", "self_attn.q_b_proj", "self_attn.kv_b_proj", "self_attn.o_proj"]
LAYERS = {
    "llama": LLAMA_LAYERS,
    "phi3": LLAMA_LAYERS,
    "gemma3_text": LLAMA_LAYERS,
    "qwen3_moe": ["self_attn.qkv_proj", "self_attn.o_proj"],
    "deepseek_v3": [*MLA_LAYERS, "mlp.gate_up_proj", "mlp.down_proj"],
}
EXPERTS = {"qwen3_moe": "model.layers.0.mlp.experts", "deepseek_v3": "model.layers.1.mlp.experts"}
SM = {"SM 9.0": (9, 0), "SM 10.0": (10, 0)}
# What SGLANG_SCHEME and SGLANG_MOE_SCHEME name for ModelOpt's FP8 and NVFP4 recipes: SGLang's own
# ModelOpt methods, which lazyxform hands a GPU instead of the compressed-tensors schemes.
MODELOPT_METHODS = ("ModelOptFp8LinearMethod", "ModelOptFp8MoEMethod", "ModelOptFp4LinearMethod")
# The packed_modules_mapping SGLang's loader passes to the quantization config: the model class's
# (llama.py declares none), DeepseekV2ForCausalLM's set in __init__ for a q_lora_rank model.
PACKED_MODULES_MAPPING = {
    "llama": getattr(LlamaForCausalLM, "packed_modules_mapping", {}),
    "phi3": getattr(Phi3ForCausalLM, "packed_modules_mapping", {}),
    "gemma3_text": Gemma3ForCausalLM.packed_modules_mapping,
    "qwen3_moe": Qwen3MoeForCausalLM.packed_modules_mapping,
    "deepseek_v3": {"fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]},
}
# The checkpoint modules behind SGLang's fused layers (its models' stacked_params_mapping).
PACKED = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
    "fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"],
}


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
    """What SGLang's get_quant_config builds for a served checkpoint, through the hook."""
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    return served_config(path, PACKED_MODULES_MAPPING[model_type])


def stand_in(cls: type) -> torch.nn.Module:
    """An SGLang layer object for get_quant_method, without the tensor-parallel groups a real one needs."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    return layer


def checked_layers(name: str) -> list[tuple[str, type, list[str]]]:
    """(SGLang prefix, layer class, checkpoint modules behind it) of the layers checked in a fixture:
    the fused layers' members, or the layer itself where the checkpoint has it (Phi-3's pre-fused
    qkv_proj and gate_up_proj)."""
    tensors = load_tensors(FIXTURES / name)
    layers = []
    for layer in LAYERS[FIXTURE_TABLE[name].model_type]:
        prefix = f"model.layers.0.{layer}"
        parent, leaf = prefix.rsplit(".", 1)
        fused = f"{prefix}.weight" not in tensors and leaf in PACKED
        layers.append((prefix, LinearBase, [f"{parent}.{m}" for m in PACKED[leaf]] if fused else [prefix]))
    if "lm_head.weight" in tensors:
        layers.append(("lm_head", ParallelLMHead, ["lm_head"]))
    return layers


@pytest.mark.parametrize("sm", SM)
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_layer_gets_sglangs_gpu_scheme(name: str, sm: str, monkeypatch) -> None:
    answer_gpu(monkeypatch, SM[sm])
    path = FIXTURES / name
    config = lazyxform_config(path)
    quantized = set(quantized_modules(load_tensors(path)))
    runtime = set(FIXTURE_TABLE[name].runtime_pqs)
    algo = FIXTURE_TABLE[name].algo
    expected = SGLANG_SCHEME[ALIASES.get(algo, algo)][list(SM).index(sm)]
    for prefix, cls, members in checked_layers(name):
        layer = stand_in(cls)
        if not set(members) & quantized or expected == "dense":
            assert type(config.get_quant_method(layer, prefix)).__name__ == ("UnquantizedLinearMethod" if cls is LinearBase else "NoneType"), prefix
            continue
        if expected is None:
            with pytest.raises(quant_config.UnsupportedSglangSchemeError, match=rf"^{prefix}: SGLang 0\.5\.23 cannot run linear layers of "):
                config.get_quant_method(layer, prefix)
            continue
        if expected in MODELOPT_METHODS:  # SGLang's ModelOpt method; no compressed-tensors scheme asked for
            assert type(config.get_quant_method(layer, prefix)).__name__ == expected, prefix
            assert "scheme" not in vars(layer) and layer.scheme is None, prefix
            continue
        assert type(config.get_quant_method(layer, prefix)).__name__ == "CompressedTensorsLinearMethod", prefix
        scheme = layer.scheme
        if set(members) <= runtime:
            assert isinstance(scheme, PreQuantScaleScheme), prefix
            scheme = scheme.inner
        if expected == "CompressedTensorsW8A8Int8":  # static input scales, one per fused member
            assert isinstance(scheme, StaticInt8InputScheme), prefix
            scheme = scheme.inner
        assert type(scheme).__name__ == expected, prefix


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_cpu_layers_run_the_portable_schemes(name: str) -> None:
    """On a CPU every quantized linear layer (the head included) gets lazyxform's portable scheme
    inside SGLang's compressed-tensors linear method, wrapped where a pre_quant_scale runs at run
    time; quantized experts get the portable fused-MoE scheme inside SGLang's compressed-tensors
    fused-MoE method (tests/sglang/test_sglang_fixtures.py runs them)."""
    path = FIXTURES / name
    config = lazyxform_config(path)
    quantized = set(quantized_modules(load_tensors(path)))
    runtime = set(FIXTURE_TABLE[name].runtime_pqs)
    for prefix, cls, members in checked_layers(name):
        layer = stand_in(cls)
        method = type(config.get_quant_method(layer, prefix)).__name__
        if not set(members) & quantized or FIXTURE_TABLE[name].target.format == "dense":
            assert method == ("UnquantizedLinearMethod" if cls is LinearBase else "NoneType"), prefix
            continue
        assert method == "CompressedTensorsLinearMethod", prefix
        scheme = layer.scheme
        if set(members) <= runtime:
            assert isinstance(scheme, PreQuantScaleScheme), prefix
            scheme = scheme.inner
        assert isinstance(scheme, PortableScheme), prefix
    if FIXTURE_TABLE[name].moe:
        prefix = EXPERTS[FIXTURE_TABLE[name].model_type]
        layer = stand_in(FusedMoE)
        assert type(config.get_quant_method(layer, prefix)).__name__ == "CompressedTensorsFusedMoEMethod"
        assert isinstance(layer.scheme, PortableMoEScheme)
        assert layer.scheme.input_scaled == any(m.startswith(f"{prefix}.") for m in runtime), name


def test_input_quantizers_kept_on_a_cpu() -> None:
    """MX input quantizers, which SGLang's scheme map drops for formats it has no GPU scheme for, are
    kept for the portable scheme."""
    for name, bits in (("mxfp4", 4), ("mxfp8", 8)):
        layer = stand_in(LinearBase)
        lazyxform_config(FIXTURES / name).get_quant_method(layer, "model.layers.0.mlp.down_proj")
        acts = layer.scheme.scheme.activations
        assert (acts.type, acts.num_bits, acts.group_size, acts.dynamic) == ("float", bits, 32, True), name


def on_a_gpu(monkeypatch: pytest.MonkeyPatch, sm: str) -> None:
    """LazyxformConfig's and SGLang's scheme selection for experts answered as on the GPU `sm`."""
    answer_gpu(monkeypatch, SM[sm])
    # The W4A4 NVFP4 experts' constructor asks SGLang's platform whether it is a Blackwell (SM 10.x), and
    # the INT4 experts' choice whether it is an SM 10.0 (Triton there, Marlin elsewhere).
    monkeypatch.setattr(w4a4_nvfp4_moe, "get_platform", lambda: SimpleNamespace(is_blackwell=SM[sm] >= (10, 0)))
    monkeypatch.setattr(compressed_tensors, "get_platform", lambda: SimpleNamespace(is_sm100=SM[sm] == (10, 0)))


@pytest.mark.parametrize("sm", SM)
@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if FIXTURE_TABLE[n].moe])
def test_moe_experts_on_a_gpu(name: str, sm: str, monkeypatch) -> None:
    """Experts on a GPU: SGLang's own fused-MoE scheme. Experts whose gate/up pre_quant_scale differs
    between experts are streamed dense (deepseek_v3_int4_awq: SGLang's unquantized fused MoE, no
    scheme); experts that keep one scale per layer (qwen3moe_int4_awq) get SGLang's scheme with the
    scale mixed in, still of its class and named as it (test_sglang_schemes.py runs that on a CPU)."""
    on_a_gpu(monkeypatch, sm)
    prefix = EXPERTS[FIXTURE_TABLE[name].model_type]
    config = lazyxform_config(FIXTURES / name)
    if any(m.startswith(f"{prefix}.") for m in config.runtime_pre_quant_scale):
        layer = stand_in(FusedMoE)
        assert type(config.get_quant_method(layer, prefix)).__name__ == "CompressedTensorsFusedMoEMethod"
        assert isinstance(layer.scheme, PreQuantScaleMoEScheme)
        assert isinstance(layer.scheme, type(config.get_moe_scheme(stand_in(FusedMoE), prefix)))
        assert type(layer.scheme).__name__ == SGLANG_MOE_SCHEME[FIXTURE_TABLE[name].algo][list(SM).index(sm)]
        return
    if name == "deepseek_v3_int4_awq":
        assert any(m.startswith(f"{prefix}.") for m in FIXTURE_TABLE[name].runtime_pqs)  # on a CPU
        assert config.get_moe_scheme(stand_in(FusedMoE), prefix) is None  # ignored: UnquantizedFusedMoEMethod
        return
    expected = SGLANG_MOE_SCHEME[FIXTURE_TABLE[name].algo][list(SM).index(sm)]
    layer = stand_in(FusedMoE)
    method = config.get_quant_method(layer, prefix)
    if expected in MODELOPT_METHODS:  # SGLang's ModelOpt method; no compressed-tensors scheme asked for
        assert type(method).__name__ == expected
        assert "scheme" not in vars(layer) and layer.scheme is None
        assert type(config.get_moe_scheme(stand_in(FusedMoE), prefix)).__name__ == "CompressedTensorsW8A8Fp8MoE"  # what it replaces
        return
    assert type(method).__name__ == "CompressedTensorsFusedMoEMethod"
    assert type(config.get_moe_scheme(stand_in(FusedMoE), prefix)).__name__ == expected


@pytest.mark.parametrize("sm", SM)
def test_fp8_with_a_runtime_pre_quant_scale_keeps_the_compressed_tensors_scheme(sm: str, tmp_path: Path, monkeypatch) -> None:
    """SGLang's ModelOpt FP8 methods have no place for a run-time pre_quant_scale: FP8 modules get them
    on a GPU (and stream as exported) only where they carry none. No FP8 fixture does, so a copy of
    qwen3moe_fp8 gets one for o_proj and, one vector for the whole layer, for the experts' gate and up;
    FP8 per-tensor scales cannot absorb them, so lazyxform keeps both for run time. o_proj then keeps
    SGLang's compressed-tensors scheme inside PreQuantScaleScheme and its stream keeps the
    compressed-tensors layout, the experts get SGLang's compressed-tensors FP8 fused-MoE scheme with
    the scale mixed in, and qkv_proj, whose members carry none, still gets the ModelOpt method."""
    answer_gpu(monkeypatch, SM[sm])
    path = tmp_path / "qwen3moe_fp8_pqs"
    shutil.copytree(FIXTURES / "qwen3moe_fp8", path)
    tensors = load_tensors(path)
    o_proj, experts = "model.layers.0.self_attn.o_proj", EXPERTS["qwen3_moe"]
    tensors[f"{o_proj}.pre_quant_scale"] = torch.linspace(0.5, 2, 256, dtype=torch.bfloat16)
    for e, proj in itertools.product(range(4), ("gate_proj", "up_proj")):
        tensors[f"{experts}.{e}.{proj}.pre_quant_scale"] = torch.linspace(2, 0.5, 256, dtype=torch.bfloat16)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = lazyxform_config(path)
    assert set(config.runtime_pre_quant_scale) == {o_proj, *(f"{experts}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj"))}
    # Whole SGLang layers: the experts' down_proj, without a scale of its own, stays with its layer.
    assert "model.layers.0.self_attn.q_proj" in config.as_exported and o_proj not in config.as_exported
    assert not any(m.startswith(f"{experts}.") for m in config.as_exported)
    layer = stand_in(LinearBase)
    assert type(config.get_quant_method(layer, o_proj)).__name__ == "CompressedTensorsLinearMethod"
    assert isinstance(layer.scheme, PreQuantScaleScheme) and type(layer.scheme.inner).__name__ == "CompressedTensorsW8A8Fp8"
    assert type(config.get_quant_method(stand_in(LinearBase), "model.layers.0.self_attn.qkv_proj")).__name__ == "ModelOptFp8LinearMethod"
    layer = stand_in(FusedMoE)
    assert type(config.get_quant_method(layer, experts)).__name__ == "CompressedTensorsFusedMoEMethod"
    assert isinstance(layer.scheme, PreQuantScaleMoEScheme) and type(layer.scheme).__name__ == "CompressedTensorsW8A8Fp8MoE"
    streamed = dict(plugin_stream(path, tensors))
    assert streamed[f"{o_proj}.input_scale"].shape == (1,)  # compressed-tensors' layout
    assert streamed[f"{experts}.0.down_proj.input_scale"].shape == (1,)
    assert streamed["model.layers.0.self_attn.q_proj.input_scale"].shape == ()  # as exported


@pytest.mark.parametrize("gpu", [False, True])
def test_experts_whose_down_proj_keeps_a_scale_are_refused_by_name(gpu: bool, monkeypatch) -> None:
    """A run-time pre_quant_scale on the experts' down_proj (whose input lives inside the fused-MoE
    kernel; lazyxform folds it where the format allows) has no parameter in SGLang's expert mapping,
    which would skip it silently: refused, on a CPU and on a GPU."""
    if gpu:
        answer_gpu(monkeypatch)
    prefix = EXPERTS["qwen3_moe"]
    config = lazyxform_config(FIXTURES / "qwen3moe_int4_awq")
    config.runtime_pre_quant_scale |= {f"{prefix}.0.down_proj"}
    with pytest.raises(quant_config.UnsupportedSglangSchemeError, match=rf"^{prefix}: SGLang 0\.5\.23 cannot run experts whose down_proj keeps a pre_quant_scale"):
        config.get_quant_method(stand_in(FusedMoE), prefix)


def test_experts_whose_projections_differ_are_refused_by_name() -> None:
    """SGLang runs an expert's gate, up and down in one fused-MoE scheme: a config giving down_proj
    another one (here FP8 per channel, per token) is refused on a CPU, naming the layer and both."""
    path = FIXTURES / "qwen3moe_fp8"
    ck = lazyxform.open(path, device="cpu")
    group = ck.quantization_config["config_groups"]["group_0"]
    per_channel = {
        **group,
        "targets": ["re:.*down_proj"],
        "weights": {**group["weights"], "strategy": "channel"},
        "input_activations": {**group["input_activations"], "strategy": "token", "dynamic": True},
    }
    groups = {"down": per_channel, "group_0": group}
    config = {**ck.quantization_config, "config_groups": groups, MARK: {"checkpoint": str(path)}, "packed_modules_mapping": {}}
    prefix = "model.layers.0.mlp.experts"
    with pytest.raises(
        quant_config.UnsupportedSglangSchemeError,
        match=rf"^{prefix}: SGLang 0\.5\.23 cannot run experts whose projections differ in scheme \(gate_proj: float-quantized: W float8 tensor, .*down_proj: float-quantized: W float8 channel",
    ):
        quant_config.LazyxformConfig.from_config(config).get_quant_method(stand_in(FusedMoE), prefix)


@pytest.mark.parametrize(("fixture", "sm", "warned"), [("nvfp4_awq_lite", "SM 9.0", True), ("nvfp4_awq_lite", "SM 10.0", False), ("nvfp4", "SM 9.0", False)])
def test_nvfp4_awq_left_to_sglang_below_sm100_is_warned_about(fixture: str, sm: str, warned: bool, monkeypatch, caplog) -> None:
    """An NVFP4_AWQ checkpoint that route `auto` leaves to SGLang gets SGLang's ModelOptFp4Config (here
    built from the fixture's hf_quant_config.json as SGLang builds it); below SM 10.0 its FP4 Marlin
    path does not apply the pre_quant_scale, which the plugin's config hook says, naming the way out."""
    answer_gpu(monkeypatch, SM[sm])
    native = ModelOptFp4Config.from_config({**json.loads((FIXTURES / fixture / "hf_quant_config.json").read_text()), "packed_modules_mapping": {}})
    assert native.is_awq == (fixture == "nvfp4_awq_lite")
    with caplog.at_level("WARNING", logger=quant_config.logger.name):
        assert quant_config.get_quant_config(lambda model_config: native, SimpleNamespace(model_path=fixture)) is native
    messages = [r.getMessage() for r in caplog.records if r.name == quant_config.logger.name]
    if warned:
        assert len(messages) == 1 and f"serves {fixture} (ModelOpt NVFP4_AWQ) itself; on this GPU (SM 9.0)" in messages[0]
        assert "does not apply the checkpoint's pre_quant_scale" in messages[0] and "LAZYXFORM_SGLANG_ROUTE=all" in messages[0]
    else:
        assert messages == []


def test_nvfp4_in_other_blocks_than_16_keeps_the_compressed_tensors_path(tmp_path: Path, monkeypatch) -> None:
    """SGLang's FP4 kernels take 16-column blocks only: an NVFP4 export in 32-column blocks (a copy of
    nvfp4 with every other block scale and group_size 32) is not handed to SGLang's ModelOpt method;
    lazyxform converts it (each block scale repeated for two 16-column blocks) as for any engine."""
    answer_gpu(monkeypatch, SM["SM 10.0"])
    path = tmp_path / "nvfp4_g32"
    shutil.copytree(FIXTURES / "nvfp4", path)
    tensors = load_tensors(path)
    for name in [n for n in tensors if n.endswith(".weight_scale") and tensors[n].dim() == 2]:
        tensors[name] = tensors[name][:, ::2].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    for file, edit in (("hf_quant_config.json", lambda c: c["quantization"]), ("config.json", lambda c: c["quantization_config"])):
        config = json.loads((path / file).read_text())
        edit(config)["group_size"] = 32
        for group in edit(config).get("config_groups", {}).values():
            group["weights"]["group_size"] = 32
            if group.get("input_activations"):
                group["input_activations"]["group_size"] = 32
        (path / file).write_text(json.dumps(config))
    assert lazyxform_config(FIXTURES / "nvfp4").as_exported  # 16-column blocks: handed over
    config = lazyxform_config(path)
    assert config.as_exported == {}
    layer = stand_in(LinearBase)
    assert type(config.get_quant_method(layer, "model.layers.0.self_attn.qkv_proj")).__name__ == "CompressedTensorsLinearMethod"
    assert type(layer.scheme).__name__ == "CompressedTensorsW4A4Fp4"
