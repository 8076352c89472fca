"""tests/vllm/modelopt_reference.py, checked on its own (no vLLM: tests/vllm/conftest.py imports
vLLM, so this file lives here and reaches the module through sys.path).

- every bundled fixture builds and gives finite log-probabilities;
- every quantized module's weight is ModelOpt's formula (the shared decoders of reference.py)
  to float32 rounding, and the module computes input quantizer(x * pre_quant_scale) @ W^T;
- each input quantizer reproduces hand-worked examples of ModelOpt's formulas and is (nearly)
  idempotent;
- the KV-cache quantizers act, and the bf16 reference differs from the fp32 one (the noise the
  vLLM tests scale their bound by)."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from algos import FIXTURE_TABLE, REFUSED, SERVED, fixtures
from helpers import assert_within, make_mixed
from reference import FIXTURES, SVD_A, SVD_B, load_tensors, modelopt_weight, quantized_modules
from tokenizers import Tokenizer
from torch.nn import functional as F

sys.path.append(str(Path(__file__).parent / "vllm"))
import modelopt_reference as mr  # noqa: E402
from tiny_tokenizer import write_tokenizer  # noqa: E402

NAMES = SERVED
# vllm_support.PROMPTS (not imported: that module imports vLLM).
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "lazyxform rewrites ModelOpt weights at load time!",
    "0123456789 abc XYZ",
    "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.",
]
FP32_ROUNDING = 2.0**-24  # one rounding of an exact float64 value to float32
KV_FIXTURES = [f for f in NAMES if FIXTURE_TABLE[f].kv]
PQS_FIXTURES = fixtures(pre_quant_scale=True)


@functools.cache
def prompt_ids() -> tuple[tuple[int, ...], ...]:
    """The prompts as the vLLM tests' byte-level tokenizer encodes them."""
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d))
        tokenizer = Tokenizer.from_file(str(Path(d) / "tokenizer.json"))
        return tuple(tuple(tokenizer.encode(p).ids) for p in PROMPTS)


@functools.cache
def reference(name: str, **options) -> mr.Reference:
    return mr.Reference(FIXTURES / name, **options)


@functools.cache
def logprobs(name: str, **options) -> torch.Tensor:
    """Rows as vllm_support.reference_logprobs: every prompt position but the last."""
    ref = reference(name, **options)
    return torch.cat([ref.logprobs(list(ids))[:-1] for ids in prompt_ids()])


def modelopt_formula(algo: str, t: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """The weight from the decoders the tests share, in float64."""
    return modelopt_weight(algo, t, module).double()


def check_weights(ref: mr.Reference, t: dict[str, torch.Tensor]) -> int:
    """Every quantized module's weight in the reference model is ModelOpt's formula to float32
    rounding. Returns the number of modules checked (an MTP layer's are no part of the main model)."""
    modules = [m for m in quantized_modules(t) if not m.startswith(ref.mtp)]
    for module in modules:
        name = mr.transformers_name(module)
        algo = ref.algos[name]
        if ".experts." in name:
            block, e, proj = name.rsplit(".", 3)[0], int(name.rsplit(".", 2)[1]), name.rsplit(".", 1)[1]
            got = ref.model.get_submodule(block).experts.experts[e][proj]
        elif algo == "NVFP4_SVD":
            low_rank = ref.model.get_submodule(name)
            assert isinstance(low_rank, mr.LowRank), name
            got = low_rank.linear.weight
            assert torch.equal(low_rank.a, t[f"{module}.{SVD_A}"].float()), name
            assert torch.equal(low_rank.b, t[f"{module}.{SVD_B}"].float()), name
            algo = "NVFP4"  # the residual; the low-rank term is checked above
        else:
            got = ref.model.get_submodule(name).weight
        assert got.dtype == torch.float32
        assert_within(got.detach(), modelopt_formula(algo, t, module), FP32_ROUNDING, name)
    return len(modules)


def check_module_inputs(ref: mr.Reference, t: dict[str, torch.Tensor]) -> None:
    """Each non-expert quantized module computes ModelOpt's input quantizer of its algo applied to
    x * pre_quant_scale, times W^T (plus, for NVFP4_SVD, the low-rank term on the unquantized input)."""
    torch.manual_seed(0)
    for module in quantized_modules(t):
        name = mr.transformers_name(module)
        if ".experts." in name or module.startswith(ref.mtp):
            continue
        algo = ref.algos[name]
        m = ref.model.get_submodule(name)
        linear = m.linear if isinstance(m, mr.LowRank) else m
        x = torch.randn(1, 5, linear.in_features) * 0.5
        xs = x * t[f"{module}.pre_quant_scale"].float() if f"{module}.pre_quant_scale" in t else x
        kind = mr.ALGO_ACTIVATION[algo]
        q = xs if kind is None else mr.ACTIVATIONS[kind](xs, t.get(f"{module}.input_scale"))
        want = F.linear(q, linear.weight)
        if isinstance(m, mr.LowRank):
            want = want + F.linear(F.linear(xs, m.a), m.b)
        with torch.no_grad():
            got = m(x)
        assert torch.equal(got, want), name


def test_every_fixture_is_covered() -> None:
    assert NAMES == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name not in REFUSED)
    assert KV_FIXTURES == ["fp8_kv_fp8", "nvfp4_kv_fp8", "nvfp4_kv_nvfp4", "qwen3moe_fp8"]
    assert PQS_FIXTURES == [
        "deepseek_v3_int4_awq", "gemma3_int4_awq", "gemma3_int8_sq", "int4_awq", "int8_sq", "lm_head_int4_awq",
        "nvfp4_awq_lite", "nvfp4_svdquant", "phi3_int4_awq", "qwen3moe_int4_awq", "w4a8_awq",
    ]  # fmt: skip
    for name in NAMES:
        _, kv = mr.read_algos(FIXTURES / name)
        modules = [mr.transformers_name(m) for m in quantized_modules(load_tensors(FIXTURES / name))]
        assert set(mr.module_algos(FIXTURES / name, modules).values()) <= set(mr.ALGO_ACTIVATION), name
        assert kv in (None, "FP8", "NVFP4"), (name, kv)


@pytest.mark.parametrize("name", NAMES)
def test_builds_with_finite_logprobs(name: str) -> None:
    ids = list(prompt_ids()[0])
    got = reference(name).logprobs(ids)
    assert got.shape == (len(ids), 1024)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.logsumexp(dim=-1), torch.zeros(len(ids)), atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_modelopt_formulas_and_inputs_modelopt_quantizers(name: str) -> None:
    ref, t = reference(name), load_tensors(FIXTURES / name)
    assert check_weights(ref, t) == FIXTURE_TABLE[name].modules - FIXTURE_TABLE[name].mtp_modules
    check_module_inputs(ref, t)


def test_mixed_precision_reads_each_modules_algo(tmp_path: Path) -> None:
    layout = {
        "model.layers.0.self_attn": ("nvfp4", {"quant_algo": "NVFP4", "group_size": 16}),
        "model.layers.0.mlp": ("int4_awq", {"quant_algo": "W4A16_AWQ", "group_size": 128}),
        "model.layers.1.self_attn": ("mxfp8", {"quant_algo": "MXFP8", "group_size": 32}),
        "model.layers.1.self_attn.o_proj": ("nvfp4_svdquant", {"quant_algo": "NVFP4_SVD", "group_size": 16}),
        "model.layers.1.mlp": ("w4a8_mxfp4_fp8", {"quant_algo": "W4A8_MXFP4_FP8", "group_size": 32}),
    }
    ckpt = make_mixed(tmp_path, layout)
    ref, t = mr.Reference(ckpt), load_tensors(ckpt)
    assert set(ref.algos.values()) == {"NVFP4", "W4A16_AWQ", "MXFP8", "NVFP4_SVD", "W4A8_MXFP4_FP8"}
    assert ref.algos["model.layers.1.self_attn.o_proj"] == "NVFP4_SVD"
    assert check_weights(ref, t) == 14
    check_module_inputs(ref, t)
    assert torch.isfinite(ref.logprobs(list(prompt_ids()[0]))).all()


# --- the quantizers on hand-worked examples ------------------------------------------------------


def test_e2m1_rounds_to_nearest_even_and_saturates() -> None:
    # Midpoints go to the value with an even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 2.9, 5.01, 7.0, 100.0])
    assert mr.e2m1(x).tolist() == [0, 1, 1, 2, 2, 4, 4, 0.5, 3, 6, 6, 6]


def test_nvfp4_on_a_16_element_block() -> None:
    # Global scale 1/16 and block amax 6: block scale fp8(6 / (6 / 16)) / 16 = 16 / 16 = 1, so the
    # values are E2M1-rounded as they are.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.3, 0.7, -6.0, 2.9, 0.0, -1.1, 4.4, 3.0])
    want = [0, 1, 1, 2, 2, 4, 4, 6, -0.5, 0.5, -6, 3, 0, -1, 4, 3]
    assert mr.nvfp4_block(x, torch.tensor(1 / 16)).tolist() == want
    # Block amax 0.3: 0.3 / (6 / 16) = 0.8 -> E4M3 0.8125 (steps of 1/16 there), scale 0.8125 / 16;
    # 0.3 / scale = 5.9 -> 6, -0.1 / scale = -1.97 -> -2, 0.05 / scale = 0.98 -> 1.
    y = torch.tensor([0.3, -0.1, 0.05] + [0.0] * 13)
    scale = 0.8125 / 16
    assert mr.nvfp4_block(y, torch.tensor(1 / 16)).tolist() == [6 * scale, -2 * scale, scale] + [0.0] * 13
    # A block whose scale falls below 1e-5 (here: E4M3 underflows to 0) is quantized with scale 1.
    assert mr.nvfp4_block(torch.full((16,), 1e-4), torch.tensor(1 / 16)).tolist() == [0.0] * 16
    # The input quantizer uses the exported input_scale (amax / (6 * 448)) as the global scale.
    assert torch.equal(mr.nvfp4_input(x, torch.tensor(1 / 16)), mr.nvfp4_block(x, torch.tensor(1 / 16)))


def test_mx_scales_are_the_ceiling_power_of_two() -> None:
    pad = [0.0] * 30
    # MXFP8: amax 1 -> 2^ceil(log2(1/448)) = 2^-8; 0.3 * 256 = 76.8 -> E4M3 80 -> 0.3125.
    assert mr.mxfp8(torch.tensor([1.0, 0.3] + pad))[:2].tolist() == [1.0, 0.3125]
    # amax 56 = 448 / 8: an exact power of two is its own ceiling (2^-3, not 2^-2); 2.4 -> 2.5.
    assert mr.mxfp8(torch.tensor([56.0, 0.3] + pad))[:2].tolist() == [56.0, 0.3125]
    # MXFP4: amax 7 -> 2^ceil(log2(7/6)) = 2; 3.5 is a midpoint -> 4 (even code) -> 8; 1/2 -> 0.5 -> 1.
    assert mr.mxfp4(torch.tensor([7.0, 1.0] + pad))[:2].tolist() == [8.0, 1.0]
    # amax 6 -> scale 1; 1.25 -> 1. An all-zero block stays zero.
    assert mr.mxfp4(torch.tensor([6.0, 1.25] + pad))[:2].tolist() == [6.0, 1.0]
    assert mr.mxfp8(torch.zeros(32)).tolist() == [0.0] * 32


def test_fp8_and_int8() -> None:
    # Per token: amax 448 -> scale 1; 17 is a midpoint of E4M3 16 and 18 -> 16 (even); a zero row stays zero.
    got = mr.fp8_per_token(torch.tensor([[448.0, 17.0, -0.5], [0.0, 0.0, 0.0]]))
    assert got.tolist() == [[448.0, 16.0, -0.5], [0.0, 0.0, 0.0]]
    # Per token-group of 128 (not ModelOpt's; an engine's FP8_PB_WO): group amax 448 -> scale 1,
    # group amax 3.5 -> scale 128: 17 / 128 -> 16 / 128.
    x = torch.zeros(1, 256)
    x[0, 0], x[0, 1], x[0, 128], x[0, 129] = 448.0, 17.0, 3.5, 17 / 128
    got = mr.fp8_group128(x)
    assert got[0, [0, 1, 128, 129]].tolist() == [448.0, 16.0, 3.5, 16 / 128]
    # Per tensor, dynamic: one amax for the whole tensor.
    assert mr.fp8_per_tensor_dynamic(torch.tensor([[448.0], [17.0]])).tolist() == [[448.0], [16.0]]
    # Static: x / 2 rounded to E4M3, saturating at 448.
    assert mr.fp8_round(torch.tensor([34.0, 1000.0, -1000.0]), torch.tensor(2.0)).tolist() == [32.0, 896.0, -896.0]
    # INT8: x / 0.5 rounded half to even (0.5 -> 0, 1.5 -> 2), clamped to [-128, 127].
    got = mr.int8_round(torch.tensor([0.25, 0.75, 100.0, -100.0]), torch.tensor(0.5))
    assert got.tolist() == [0.0, 1.0, 63.5, -64.0]
    assert mr.int8_round(torch.ones(3), torch.tensor(0.0)).tolist() == [0.0] * 3


@pytest.mark.parametrize("kind", sorted(mr.ACTIVATIONS))
def test_quantizers_are_idempotent_and_keep_dtype(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    scale = x.abs().max() / {"fp8_tensor": 448, "int8_tensor": 127, "nvfp4": 6 * 448}.get(kind, 1)
    quantize = mr.ACTIVATIONS[kind]
    once = quantize(x, scale)
    assert not torch.equal(once, x)
    # fp8_token: 448 / amax and its reciprocal are two float32 roundings.
    torch.testing.assert_close(quantize(once, scale), once, rtol=2e-7, atol=0)
    assert quantize(x.bfloat16(), scale).dtype == torch.bfloat16


def test_kv_quantizers() -> None:
    x = torch.randn(1, 2, 3, 64)
    # FP8: per tensor with the exported k/v scale.
    assert torch.equal(mr.kv_quantizer("FP8", torch.tensor(0.01))(x), mr.fp8_round(x, torch.tensor(0.01)))
    # NVFP4: k_scale = amax / 448 = 0.375 -> amax 168 -> global scale 168 / (6 * 448) = 1/16, blocks
    # of 16 along head_dim.
    quantize = mr.kv_quantizer("NVFP4", torch.tensor(0.375))
    assert torch.equal(quantize(x), mr.nvfp4_block(x, torch.tensor(1 / 16)))
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, -0.3, 0.7, -6.0, 2.9, 0.0, -1.1, 4.4, 3.0])
    assert quantize(row.repeat(4).reshape(1, 1, 1, 64))[0, 0, 0, :16].tolist() == mr.nvfp4_block(row, torch.tensor(1 / 16)).tolist()


# --- effects on the model ------------------------------------------------------------------------


@pytest.mark.parametrize("name", KV_FIXTURES)
def test_kv_cache_quantization_acts(name: str) -> None:
    assert reference(name).model.config._attn_implementation == "modelopt_kv_reference"
    assert not torch.equal(logprobs(name), logprobs(name, quantize_kv_cache=False))


@pytest.mark.parametrize("name", KV_FIXTURES)
def test_kv_cache_quantized_reference_is_causal(name: str) -> None:
    """A prompt's prefix gets the same logprobs alone as in front of more tokens: the KV-quantized
    attention keeps the causal mask (without one it attended to the whole prompt)."""
    ref, ids = reference(name), list(prompt_ids()[0])
    assert torch.allclose(ref.logprobs(ids[:10]), ref.logprobs(ids)[:10], atol=1e-5)


@pytest.mark.parametrize("name", PQS_FIXTURES)
def test_pre_quant_scale_acts(name: str) -> None:
    assert not torch.equal(logprobs(name), logprobs(name, pre_quant_scale=False))


def test_activation_override() -> None:
    ref = reference("w4a8_awq", activation="fp8_token")
    x = torch.randn(1, 3, 256)
    want = F.linear(mr.fp8_per_token(x), ref.model.get_submodule("model.layers.0.self_attn.q_proj").weight)
    with torch.no_grad():
        assert torch.equal(ref.model.get_submodule("model.layers.0.self_attn.q_proj")(x), want)
    with pytest.raises(ValueError, match="activation must be one of"):
        mr.Reference(FIXTURES / "fp8", activation="fp9")
    with pytest.raises(ValueError, match="needs an exported input_scale"):
        mr.Reference(FIXTURES / "fp8_pc_pt", activation="fp8_tensor")


@pytest.mark.parametrize("name", NAMES)
def test_bf16_reference_differs_from_fp32(name: str) -> None:
    noise = (logprobs(name, dtype=torch.bfloat16) - logprobs(name)).abs()
    print(f"{name}: bf16 noise max {noise.max():.4f} mean {noise.mean():.5f}")
    assert 0 < noise.max() < 1


def test_shares_no_code_with_lazyxform_and_needs_no_vllm() -> None:
    tests = Path(__file__).parent
    code = "import sys, modelopt_reference; assert not {'lazyxform', 'vllm'} & set(sys.modules), sorted(sys.modules)"
    env_path = f"{tests}:{tests / 'vllm'}"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": env_path, "PATH": ""}, cwd=tests)
