"""Independent decoders of ModelOpt's INT4, NVFP4 and MX exports, written from
modelopt-export-format.md sections 3-4, plus builders of synthetic checkpoints for the recipe tests.

Nothing here imports lazyxform. Decoders compute in float64: every ModelOpt product below is exact
there (at most 4 + 3 + 24 significant bits), so they give the exact real value the export encodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import copy_fixture, edit_json, rewrite_tensors
from reference import FIXTURES, load_tensors

# E2M1 code -> value: bit 3 is the sign, bits 0-2 index {0, .5, 1, 1.5, 2, 3, 4, 6}.
E2M1_TABLE = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
SVD_A = "weight_quantizer._svdquant_lora_a"
SVD_B = "weight_quantizer._svdquant_lora_b"


def int4_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in], byte = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4 -> signed q [out, in]."""
    nibbles = torch.empty(packed.shape[0] * 2, packed.shape[1], dtype=torch.int64)
    nibbles[0::2] = (packed & 0x0F).long()
    nibbles[1::2] = (packed >> 4).long()
    return torch.where(nibbles >= 8, nibbles - 16, nibbles)


def fp4_values(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2], low nibble = even column -> E2M1 values [out, in] (float64)."""
    codes = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.int64)
    codes[:, 0::2] = (packed & 0x0F).long()
    codes[:, 1::2] = (packed >> 4).long()
    return E2M1_TABLE[codes]


def per_column(scale: torch.Tensor, block: int) -> torch.Tensor:
    """Block scales [out, in/block] -> one scale per element [out, in] (float64)."""
    return scale.double().repeat_interleave(block, dim=1)


def modelopt_weight(algo: str, t: dict[str, torch.Tensor], module: str, group: int | None = None) -> torch.Tensor:
    """W in float64 as ModelOpt's formulas define it (section 3 table, section 4)."""
    w, ws = t[f"{module}.weight"], t[f"{module}.weight_scale"]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        q = int4_values(w).double()
        return q * per_column(ws, q.shape[1] // ws.shape[1])
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "W4A8_NVFP4_FP8", "NVFP4_SVD"):
        v = fp4_values(w)
        residual = v * per_column(ws, v.shape[1] // ws.shape[1]) * t[f"{module}.weight_scale_2"].double()
        if algo != "NVFP4_SVD":
            return residual
        return residual + t[f"{module}.{SVD_B}"].double() @ t[f"{module}.{SVD_A}"].double()
    exponent = ws.double() - 127  # E8M0
    if algo == "MXFP8":
        return w.double() * torch.pow(2.0, exponent).repeat_interleave(32, dim=1)
    if algo == "MXFP4":
        return fp4_values(w) * torch.pow(2.0, exponent).repeat_interleave(32, dim=1)
    raise NotImplementedError(algo)


def hf_algo(ckpt: Path) -> str:
    return json.loads((Path(ckpt) / "hf_quant_config.json").read_text())["quantization"]["quant_algo"].upper()


def algo_of(algo: str) -> str:
    """The format a fixture's quant_algo stores (W4A8_MXFP4_FP8 weights are MXFP4)."""
    return {"W4A8_MXFP4_FP8": "MXFP4"}.get(algo, algo)


# --- synthetic checkpoints -----------------------------------------------------------------------

MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_LEAF = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def moe_name(name: str, layer_mlp: str, expert: int, naming: str) -> str:
    """model.layers.N.mlp.<proj>.<suffix> -> the expert's name in Qwen3-MoE or Mixtral naming."""
    rest = name[len(layer_mlp) + 1:]
    proj, suffix = rest.split(".", 1)
    if naming == "qwen3_moe":
        return f"{layer_mlp}.experts.{expert}.{proj}.{suffix}"
    layer = layer_mlp.removesuffix(".mlp")
    return f"{layer}.block_sparse_moe.experts.{expert}.{MIXTRAL_LEAF[proj]}.{suffix}"


def make_moe(fixture: str, tmp: Path, naming: str, experts: int = 2) -> Path:
    """A dense fixture whose every MLP becomes `experts` identical experts plus a bf16 router, in
    Qwen3-MoE (`mlp.experts.{e}.gate_proj`, router `mlp.gate`) or Mixtral naming
    (`block_sparse_moe.experts.{e}.w1|w2|w3`, router `block_sparse_moe.gate`)."""
    ckpt = copy_fixture(fixture, tmp / naming)
    router = "mlp.gate" if naming == "qwen3_moe" else "block_sparse_moe.gate"

    def to_moe(t: dict[str, torch.Tensor]) -> None:
        layers = sorted({k.split(".mlp.")[0] for k in t if ".mlp." in k})
        for layer in layers:
            layer_mlp = f"{layer}.mlp"
            for k in [k for k in t if k.startswith(layer_mlp + ".") and k.split(".")[4] in MLP]:
                value = t.pop(k)
                for e in range(experts):
                    t[moe_name(k, layer_mlp, e, naming)] = value.clone()
            hidden = t[f"{layer}.post_attention_layernorm.weight"].shape[0]
            t[f"{layer}.{router}.weight"] = torch.randn(experts, hidden, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    rewrite_tensors(ckpt, to_moe)
    routers = [f"model.layers.*.{router}"]
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(exclude_modules=c["quantization"]["exclude_modules"] + routers))

    def moe_config(c: dict) -> None:
        c["model_type"] = naming
        c["quantization_config"]["ignore"] = c["quantization_config"]["ignore"] + routers

    edit_json(ckpt / "config.json", moe_config)
    return ckpt


def make_mixed(tmp: Path, layout: dict[str, tuple[str, dict]]) -> Path:
    """MIXED_PRECISION checkpoint: `layout` maps a module-name prefix (model.layers.0.mlp, or one
    module) to (fixture, quantized_layers spec); every tensor under the prefix, and for a whole
    self_attn / mlp block the norm in front of it, comes from that fixture; later prefixes override
    earlier ones. Everything else comes from the first fixture."""
    first = next(iter(layout.values()))[0]
    ckpt = copy_fixture(first, tmp)
    sources = {fixture: load_tensors(FIXTURES / fixture) for fixture, _ in layout.values()}
    norm_of = {"self_attn": "input_layernorm", "mlp": "post_attention_layernorm"}
    layers: dict[str, dict] = {}

    def graft(t: dict[str, torch.Tensor]) -> None:
        for prefix, (fixture, spec) in layout.items():
            src = sources[fixture]
            layer, block = prefix.rsplit(".", 1)[0], prefix.rsplit(".", 1)[1]
            norm = f"{layer}.{norm_of[block]}.weight" if block in norm_of else None
            for k in [k for k in t if k.startswith(prefix + ".") or k == norm]:
                del t[k]
            for k, v in src.items():
                if k.startswith(prefix + ".") or k == norm:
                    t[k] = v
                    if k.endswith(".weight_scale"):
                        layers[k.removesuffix(".weight_scale")] = spec

    rewrite_tensors(ckpt, graft)
    body = {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "model.embed_tokens"]}
    edit_json(ckpt / "hf_quant_config.json", lambda c: c.update(quantization=body))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo="MIXED_PRECISION"))
    return ckpt


# --- per-module checks ---------------------------------------------------------------------------

# Elementwise bound on compressed-tensors' decompressed weight, relative to ModelOpt's exact value.
BOUND = {
    # WNA16 holds the fp32 group scale in bf16 (2^-8) and dequantizes in bf16 (2^-8).
    "W4A16_AWQ": 2**-7,
    "W4A8_AWQ": 2**-7,
    # The decompressor returns bf16 (2^-8); weight_scale / (1 / weight_scale_2) is two fp32 roundings.
    "NVFP4": 2**-8 + 2**-22,
    "NVFP4_AWQ": 2**-8 + 2**-22,
    "W4A16_NVFP4": 2**-8 + 2**-22,
    "W4A8_NVFP4_FP8": 2**-8 + 2**-22,
    # Power-of-two scales times FP8 / E2M1 values: exact in bf16.
    "MXFP8": 0.0,
    "MXFP4": 0.0,
    # Dequantized: formed exactly in float64, rounded to bf16 through fp32 (torch's conversion).
    "NVFP4_SVD": 2**-8 + 2**-24,
}
ROW_FOLD_EXTRA = 2**-22  # ws * pqs is formed in fp32 before the one rounding to bf16
CT_OUTPUTS = {
    "W4A16_AWQ": {"weight_packed", "weight_scale", "weight_shape"},
    "W4A8_AWQ": {"weight_packed", "weight_scale", "weight_shape"},
    "NVFP4": {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"},
    "NVFP4_AWQ": {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"},
    "W4A16_NVFP4": {"weight_packed", "weight_scale", "weight_global_scale"},
    "W4A8_NVFP4_FP8": {"weight_packed", "weight_scale", "weight_global_scale"},
    "MXFP8": {"weight", "weight_scale"},
    "MXFP4": {"weight_packed", "weight_scale"},
    "NVFP4_SVD": {"weight"},
}


def assert_within(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """|got - want| <= rel * |want|, elementwise (rel 0: equal values)."""
    excess = (got.double() - want).abs() - rel * want.abs()
    worst = float(excess.max())
    assert worst <= 0, f"{what}: exceeds rel {rel} by {worst:.3g} (max abs diff {float((got.double() - want).abs().max()):.3g})"


def fp32_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x rounded once to fp32 (via float64: the quotient of two fp32 values cannot sit on an
    fp32 rounding boundary unless it is exact)."""
    return (1.0 / x.double()).float().reshape(1)


def check_stored_bits(algo: str, orig: dict, out: dict, module: str, factor: torch.Tensor | None) -> None:
    """The compressed-tensors tensors hold exactly ModelOpt's values, re-laid out."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    own = {k[len(module) + 1:] for k in out if k.startswith(module + ".")} - {"pre_quant_scale", "bias"}
    assert own == CT_OUTPUTS[algo], (module, own)
    w = orig[f"{module}.weight"]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        q = int4_values(w)
        assert out[f"{module}.weight_shape"].tolist() == list(q.shape)
        assert torch.equal(unpack_from_int32(out[f"{module}.weight_packed"], 4, q.shape).long(), q), module
        ws = orig[f"{module}.weight_scale"]
        want = ws if factor is None else ws * factor.float()[:, None]
        assert torch.equal(out[f"{module}.weight_scale"], want.to(torch.bfloat16)), module
    elif algo == "NVFP4_SVD":
        assert out[f"{module}.weight"].dtype == torch.bfloat16
    else:
        key = "weight" if algo == "MXFP8" else "weight_packed"
        assert torch.equal(out[f"{module}.{key}"].view(torch.uint8), w.view(torch.uint8)), module
        ws = orig[f"{module}.weight_scale"]
        repeat = out[f"{module}.weight_scale"].shape[1] // ws.shape[1]
        assert torch.equal(out[f"{module}.weight_scale"].view(torch.uint8), ws.view(torch.uint8).repeat_interleave(repeat, dim=1)), module
    if "weight_global_scale" in CT_OUTPUTS[algo]:
        assert torch.equal(out[f"{module}.weight_global_scale"], fp32_reciprocal(orig[f"{module}.weight_scale_2"])), module
    if "input_global_scale" in CT_OUTPUTS[algo]:
        assert torch.equal(out[f"{module}.input_global_scale"], fp32_reciprocal(orig[f"{module}.input_scale"])), module


def check_module(algo: str, orig: dict, out: dict, qc: dict, module: str, factor: torch.Tensor | None = None) -> None:
    """Stored bits exact, and the decompressed weight within BOUND of ModelOpt's formula (rows
    times `factor` where a consumer's pre_quant_scale was folded into them)."""
    from reference import ct_decompress

    check_stored_bits(algo, orig, out, module, factor)
    want = modelopt_weight(algo, orig, module)
    rel = BOUND[algo]
    if factor is not None:
        want = want * factor.double()[:, None]
        rel += ROW_FOLD_EXTRA
    if algo == "NVFP4_SVD":
        pqs = orig.get(f"{module}.pre_quant_scale")
        if pqs is not None:
            want = want * pqs.double()[None, :]
        assert_within(out[f"{module}.weight"], want, rel, module)
        return
    got = ct_decompress(qc, module, out)
    assert got.shape == want.shape, module
    assert_within(got, want, rel, module)


def row_factor_of(module: str, orig: dict, out: dict) -> torch.Tensor | None:
    """The pre_quant_scale of the module reading this module's output rows, when the stream no
    longer carries it: folded into these rows."""
    parent, leaf = module.rsplit(".", 1)
    consumer = {"up_proj": "down_proj", "w3": "w2", "v_proj": "o_proj"}.get(leaf)
    key = f"{parent}.{consumer}.pre_quant_scale"
    folded = consumer and key in orig and key not in out and f"{parent}.{consumer}.weight_packed" in out
    return orig[key] if folded else None
