"""lazyxform's portable CPU kernels (lazyxform_vllm/portable.py) against references that share no
code with them: ModelOpt's formulas (tests/reference.py; bounds from tests/algos.py), compressed-
tensors' own decompressor, and hand-worked examples of each input quantizer. The whole path, in a
real engine, is test_vllm_fixtures.py."""

from __future__ import annotations

import pytest
import torch
from algos import FIXTURE_TABLE, ROW_FOLD_EXTRA, fixtures
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from helpers import assert_within, folded_row_factor
from reference import FIXTURES, ct_decompress, load_tensors, modelopt_weight, quantized_modules

import lazyxform
from lazyxform import emulate
from lazyxform_vllm import portable

# Fixtures with one compressed-tensors scheme for every quantized Linear (NVFP4_SVD is dense).
DECODED = fixtures(dense=False)


def scheme_of(quantization_config: dict, module: str) -> emulate.Scheme:
    groups = quantization_config["config_groups"].values()
    group = next(g for g in groups if "Linear" in g["targets"] or module in g["targets"])
    scheme = QuantizationScheme.model_validate(group)
    return emulate.Scheme(group.get("format") or quantization_config["format"], scheme.weights, scheme.input_activations)


@pytest.mark.parametrize("name", DECODED)
def test_decoded_weights_are_the_checkpoints(name: str) -> None:
    """Every module's decoded weight is ModelOpt's, up to the stream's documented scale rounding,
    and is what compressed-tensors' decompressor computes (which rounds its result to bf16)."""
    ck = lazyxform.open(FIXTURES / name, device="cpu")
    out = dict(ck)
    orig = load_tensors(FIXTURES / name)
    algo = FIXTURE_TABLE[name].algo
    for module in quantized_modules(orig):
        scheme = scheme_of(ck.quantization_config, module)
        want = modelopt_weight(algo, orig, module).double()
        rows, cols = want.shape
        names = emulate.layout(scheme, [rows], cols, torch.bfloat16)
        got = emulate.decode_weight(scheme, {n: out[f"{module}.{n}"] for n in names}, [rows])
        assert got.dtype == torch.float32
        rel = FIXTURE_TABLE[name].target.decode_bound  # decoded in fp32: W8A16's scale is the only rounding
        factor = folded_row_factor(module, orig, out)
        if factor is not None:
            want = want * factor.double()[:, None]
            rel += ROW_FOLD_EXTRA
        assert_within(got, want, rel, f"{name} {module}")
        decompressed = ct_decompress(ck.quantization_config, module, out)
        assert_within(decompressed, got.double(), 2**-8, f"{name} {module} vs compressed-tensors")


def args(**kw) -> QuantizationArgs:
    return QuantizationArgs(**kw)


def scheme(fmt: str, activations: QuantizationArgs | None) -> emulate.Scheme:
    return emulate.Scheme(fmt, args(num_bits=8, type="float", strategy="tensor"), activations)


def test_fp4_rounding_ties_to_even_and_saturates() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -2.6, 0.0])
    assert emulate.round_fp4(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -3.0, 0.0]


def test_nvfp4_input_block() -> None:
    """One 16-element block, global scale g = 2: block scale fp8(g * amax / 6) = fp8(4.0) = 4;
    each x * g / 4 rounds to E2M1, times 4 / g."""
    x = torch.tensor([[12.0, -6.0, 1.0, 0.9, 3.1, 0.0, 7.0, -12.0] + [0.5] * 8])
    a = args(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local")
    s = emulate.Scheme("nvfp4-pack-quantized", args(num_bits=4, type="float", strategy="tensor_group", group_size=16), a)
    got = emulate.quantize_input(s, x, {"input_global_scale": torch.tensor([2.0])})
    # 0.9 * 2 / 4 = 0.45 -> 0.5; 7 * 2 / 4 = 3.5 -> 4 and 0.5 * 2 / 4 = 0.25 -> 0: ties go to the even code.
    want = [12.0, -6.0, 1.0, 1.0, 3.0, 0.0, 8.0, -12.0] + [0.0] * 8
    assert got.tolist() == [want]


def test_mx_input_block_scale_is_compressed_tensors() -> None:
    """amax 5.0 (mantissa 1.25) rounds to 4 = 2^2, over E2M1's top exponent 2: scale 1; amax 7
    (mantissa 1.75) rounds up to 8: scale 2. MXFP8: amax 5 over 2^8: scale 2^-6."""
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1] = 5.0, 0.7
    x[1, 0], x[1, 1] = 7.0, 0.7
    a4 = args(num_bits=4, type="float", strategy="group", group_size=32, dynamic=True)
    got = emulate.quantize_input(emulate.Scheme("mxfp4-pack-quantized", a4, a4), x, {})
    assert got[0, :2].tolist() == [4.0, 0.5] and got[1, :2].tolist() == [8.0, 1.0]
    a8 = args(num_bits=8, type="float", strategy="group", group_size=32, dynamic=True)
    got8 = emulate.quantize_input(emulate.Scheme("mxfp8-quantized", a8, a8), x[:1], {})
    assert torch.equal(got8[0, :2], torch.tensor([5.0, 0.7]).div(2**-6).to(torch.float8_e4m3fn).float() * 2**-6)


def test_fp8_and_int8_inputs() -> None:
    x = torch.tensor([[1.0, -3.0, 0.1], [100.0, 2.0, -0.01]])
    static_fp8 = scheme("float-quantized", args(num_bits=8, type="float", strategy="tensor"))
    got = emulate.quantize_input(static_fp8, x, {"input_scale": torch.tensor([0.1])})
    assert torch.equal(got, (x / 0.1).clamp(-448, 448).to(torch.float8_e4m3fn).float() * torch.tensor(0.1))
    token = scheme("float-quantized", args(num_bits=8, type="float", strategy="token", dynamic=True))
    got = emulate.quantize_input(token, x, {})
    assert got[0, 1] == -3.0 and got[1, 0] == 100.0  # each row's amax maps to 448 exactly
    int8 = scheme("int-quantized", args(num_bits=8, type="int", strategy="tensor"))
    got = emulate.quantize_input(int8, x, {"input_scale": torch.tensor([0.5])})
    assert got.tolist() == [[1.0, -3.0, 0.0], [63.5, 2.0, -0.0]]  # 100 / 0.5 = 200 clamps to 127
    int8_token = scheme("int-quantized", args(num_bits=8, type="int", strategy="token", dynamic=True))
    got = emulate.quantize_input(int8_token, x, {})
    step = 3 / 127  # row 0's scale: amax 3 maps to 127; 1.0 -> 42.33 steps -> 42, 0.1 -> 4.23 -> 4
    assert got[0].tolist() == pytest.approx([42 * step, -3.0, 4 * step])
    assert got[1, 0] == 100.0 and got[1, 2] == 0.0  # row 1: scale 100/127; -0.01 rounds to 0
    group = scheme("float-quantized", args(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True))
    wide = torch.cat([torch.full((1, 128), 1.0), torch.full((1, 128), 300.0)], dim=1)
    assert torch.equal(emulate.quantize_input(group, wide, {}), wide)  # one scale per 128-column group


def test_auto_uses_portable_only_where_vllm_cpu_has_no_exact_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    int4 = emulate.Scheme("pack-quantized", args(num_bits=4, type="int", strategy="group", group_size=128), None)
    int8 = emulate.Scheme("int-quantized", args(num_bits=8, type="int", strategy="channel"), args(num_bits=8, type="int", strategy="tensor"))
    nvfp4 = emulate.Scheme("nvfp4-pack-quantized", args(num_bits=4, type="float", strategy="tensor_group", group_size=16), None)
    int4_native = portable.vllm_cpu_computes(int4)  # loads the vLLM library this CPU gets
    assert int4_native == hasattr(torch.ops._C, "cpu_gemm_wna16")
    assert portable.vllm_cpu_computes(int8) and not portable.vllm_cpu_computes(nvfp4)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # vLLM runs these another way there
    assert not portable.vllm_cpu_computes(int4) and not portable.vllm_cpu_computes(int8)
    monkeypatch.setenv(portable.MODE_ENV, "portable")
    assert portable.wants_portable(int8)
    monkeypatch.setenv(portable.MODE_ENV, "off")
    assert not portable.wants_portable(nvfp4)
    monkeypatch.setenv(portable.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="LAZYXFORM_VLLM_CPU_KERNELS"):
        portable.mode()
