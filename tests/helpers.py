"""Building variants of the bundled fixtures in a temporary directory (shards, renames, MoE and
MIXED_PRECISION checkpoints); comparing tensors bit for bit; checking one streamed module against
the shared reference (reference.py) within its algo's bound (algos.py). No lazyxform import."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from algos import ROW_FOLD_EXTRA, algo_row
from reference import (
    FIXTURES,
    ct_decompress,
    fp32_reciprocal,
    int4_values,
    load_tensors,
    modelopt_weight,
    quantized_modules,
)
from safetensors.torch import save_file


def copy_fixture(name: str, dst: Path, source: Path = FIXTURES) -> Path:
    out = dst / name
    shutil.copytree(source / name, out)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def rewrite_tensors(ckpt: Path, edit) -> None:
    """Apply edit(dict) to the checkpoint's tensors and save them back."""
    tensors = load_tensors(ckpt)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"))


def servable_copies(root: Path, source: Path = FIXTURES) -> Callable[[str], Path]:
    """name -> a copy under `root` of a fixture in `source` (default: the bundled ones) plus the tiny
    tokenizer an engine loads, made once per name (files are copied: lazyxform refuses files that
    resolve outside the checkpoint directory, as a symlink would)."""
    from tiny_tokenizer import write_tokenizer  # tests/vllm, on sys.path in both engines' suites

    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            made[name] = copy_fixture(name, root, source)
            write_tokenizer(made[name])
        return made[name]

    return make


def poisoned(tmp_path: Path, fixture: str, name: str, edit) -> Path:
    """A copy of the fixture with tensor `name` replaced by edit(tensor)."""
    ckpt = copy_fixture(fixture, tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({name: edit(t[name])}))
    return ckpt


def set_at(index: tuple[int, int], value: float):
    """An edit for `poisoned`: one value of the tensor changed."""

    def edit(s: torch.Tensor) -> torch.Tensor:
        s = s.clone()
        s[index] = value
        return s

    return edit


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def exclude_in_bf16(ckpt: Path, algo: str, prefix: str) -> list[str]:
    """The checkpoint with every quantized module under `prefix` decoded to bf16 by ModelOpt's
    formula and `prefix*` excluded, as ModelOpt's hf_ptq exports a layer it left unquantized (an MTP
    layer). Returns those modules."""
    modules = [m for m in quantized_modules(load_tensors(ckpt)) if m.startswith(prefix)]

    def decode(t: dict[str, torch.Tensor]) -> None:
        for m in modules:
            weight = modelopt_weight(algo, t, m).to(torch.bfloat16)
            for k in [k for k in t if k.startswith(m + ".")]:
                del t[k]
            t[f"{m}.weight"] = weight

    rewrite_tensors(ckpt, decode)
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"]["exclude_modules"].append(f"{prefix}*"))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"]["ignore"].append(f"{prefix}*"))
    return modules


def tensors_of(name: str) -> dict[str, torch.Tensor]:
    return load_tensors(FIXTURES / name)


def shard_checkpoint(ckpt: Path, n_shards: int) -> None:
    """Re-save as HF-style shards with an index; tensors dealt round-robin, so a weight and its
    scales land in different shards."""
    tensors = load_tensors(ckpt)
    (ckpt / "model.safetensors").unlink()
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: v.contiguous() for j, (k, v) in enumerate(sorted(tensors.items())) if j % n_shards == i}
        save_file(part, str(ckpt / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rename_tensors(ckpt: Path, renames: list[tuple[str, str]]) -> None:
    """Apply (old substring, new substring) renames to every tensor name."""

    def edit(t):
        for k in list(t):
            new = k
            for old, repl in renames:
                new = new.replace(old, repl)
            t[new] = t.pop(k)

    rewrite_tensors(ckpt, edit)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (unlike torch.equal, NaN equals NaN and -0.0 differs from 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def safetensors_bytes(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file written by hand, so that it can be wrong in any way."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def set_quant_algo(ckpt: Path, algo: str) -> None:
    """Write another quant_algo into both config files (e.g. an alias of the exported one)."""
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(quant_algo=algo))
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].update(quant_algo=algo))


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


# The MIXED_PRECISION layout of the planner's and vLLM's mixed-checkpoint tests (make_mixed): five
# formats over two layers; the NVFP4_SVD module is dequantized and ignored.
MIXED_LAYOUT = {
    "model.layers.0.self_attn": ("nvfp4", {"quant_algo": "NVFP4", "group_size": 16}),
    "model.layers.0.mlp": ("int4_awq", {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True}),
    "model.layers.1.self_attn": ("mxfp8", {"quant_algo": "MXFP8", "group_size": 32}),
    "model.layers.1.self_attn.o_proj": ("nvfp4_svdquant", {"quant_algo": "NVFP4_SVD", "group_size": 16}),
    "model.layers.1.mlp": ("w4a8_nvfp4_fp8", {"quant_algo": "W4A8_NVFP4_FP8", "group_size": 32}),
}


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


def assert_within(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    """|got - want| <= rel * |want|, elementwise, computed in float64 (rel 0: equal values)."""
    excess = (got.double() - want.double()).abs() - rel * want.double().abs()
    worst = float(excess.max())
    assert worst <= 0, f"{what}: exceeds rel {rel} by {worst:.3g} (max abs diff {float((got.double() - want.double()).abs().max()):.3g})"


# Producer leaf -> the module reading its output rows. Phi-3's stored gate_up_proj and qkv_proj: the
# reader's input is their last rows (transformers' Phi3MLP: gate, up = chunk(2); Phi3Attention: q, k, v
# in that order).
ROW_CONSUMER = {"up_proj": "down_proj", "w3": "w2", "v_proj": "o_proj", "gate_up_proj": "down_proj", "qkv_proj": "o_proj"}


def folded_row_factor(module: str, orig: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The pre_quant_scale of the module reading this module's output rows, when the stream no
    longer carries it and that module is still quantized: folded into these rows. [out]: 1 for
    the rows it does not read."""
    parent, _, leaf = module.rpartition(".")  # lm_head has no parent
    consumer = ROW_CONSUMER.get(leaf)
    key = f"{parent}.{consumer}.pre_quant_scale"
    folded = consumer and key in orig and key not in out and f"{parent}.{consumer}.weight_scale" in out
    if not folded:
        return None
    rows = orig[f"{module}.weight_scale"].shape[0]
    return torch.cat([torch.ones(rows - orig[key].shape[0], dtype=orig[key].dtype), orig[key]])


def check_stored_bits(algo: str, orig: dict, out: dict, module: str, factor: torch.Tensor | None) -> None:
    """The module streams exactly its algo's tensors, weight_scale in its dtype, and (per the
    algo's `stored` layout) the compressed-tensors tensors hold exactly ModelOpt's values."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    row = algo_row(algo)
    own = {k[len(module) + 1:] for k in out if k.startswith(module + ".")} - {"pre_quant_scale", "bias"}
    assert own == row.outputs, (module, own)
    if row.scale_dtype is not None:
        assert str(out[f"{module}.weight_scale"].dtype) == f"torch.{row.scale_dtype}", module
    w = orig[f"{module}.weight"]
    if row.stored == "int4":
        q = int4_values(w)
        assert out[f"{module}.weight_shape"].tolist() == list(q.shape)
        assert torch.equal(unpack_from_int32(out[f"{module}.weight_packed"], 4, q.shape).long(), q), module
        ws = orig[f"{module}.weight_scale"]
        want = ws if factor is None else ws * factor.float()[:, None]
        assert torch.equal(out[f"{module}.weight_scale"], want.to(torch.bfloat16)), module
    elif row.stored == "dense":
        assert out[f"{module}.weight"].dtype == torch.bfloat16
    elif row.stored == "codes":
        key = "weight" if "weight" in row.outputs else "weight_packed"
        assert torch.equal(out[f"{module}.{key}"].view(torch.uint8), w.view(torch.uint8)), module
        ws = orig[f"{module}.weight_scale"]
        repeat = out[f"{module}.weight_scale"].shape[1] // ws.shape[1]
        assert torch.equal(out[f"{module}.weight_scale"].view(torch.uint8), ws.view(torch.uint8).repeat_interleave(repeat, dim=1)), module
    if "weight_global_scale" in row.outputs:
        assert torch.equal(out[f"{module}.weight_global_scale"], fp32_reciprocal(orig[f"{module}.weight_scale_2"])), module
    if "input_global_scale" in row.outputs:
        assert torch.equal(out[f"{module}.input_global_scale"], fp32_reciprocal(orig[f"{module}.input_scale"])), module


def check_module(algo: str, orig: dict, out: dict, qc: dict, module: str, factor: torch.Tensor | None = None) -> None:
    """Stored bits as check_stored_bits says, and the weight (compressed-tensors' decompressor, or
    the dense weight) within the algo's bound of ModelOpt's formula (rows times `factor` where a
    consumer's pre_quant_scale was folded into them)."""
    row = algo_row(algo)
    check_stored_bits(algo, orig, out, module, factor)
    want = modelopt_weight(algo, orig, module)
    rel = row.bound
    if factor is not None:
        want = want * factor.to(want.dtype)[:, None]
        rel += ROW_FOLD_EXTRA
    if row.format == "dense":
        pqs = orig.get(f"{module}.pre_quant_scale")
        if pqs is not None:
            want = want * pqs.double()[None, :]
        assert_within(out[f"{module}.weight"], want, rel, module)
        return
    got = ct_decompress(qc, module, out)
    assert got.shape == want.shape, module
    assert_within(got, want, rel, module)
