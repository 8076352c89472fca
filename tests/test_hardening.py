"""Untrusted checkpoints: every bad input is refused with a typed error that names the file, the
tensor, what was expected and what was found; nothing outside the checkpoint is read. Exercises
shards.py (headers, indexes, paths), modelopt.py (configs), planner.py and recipes/* (header
checks), reader.py (files changing under a load), stream.py and checks.py (scale values)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from algos import SERVED
from helpers import copy_fixture, edit_json, rewrite_tensors, safetensors_bytes, shard_checkpoint
from reference import FIXTURES, load_tensors
from safetensors.torch import save_file

import lazyxform
from lazyxform.errors import (
    BadScaleError,
    ConfigError,
    CorruptSafetensorsError,
    InconsistentScalesError,
    MissingTensorError,
    TensorMismatchError,
    UnexpectedTensorError,
    UnsafePathError,
    UnsupportedAlgoError,
)
from lazyxform.reader import Reader
from lazyxform.shards import MAX_HEADER_BYTES, read_header

ALL_FIXTURES = SERVED


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


GOOD = {"a": entry()}
CORRUPT_FILES = {
    "empty file": (b"", "file is 0 bytes, too short"),
    "half a length field": (b"\x10\x00\x00", "file is 3 bytes, too short"),
    "header longer than the file": (safetensors_bytes(GOOD, b"\0" * 8, header_len=10_000), r"header claims 10000 bytes but the file has \d+"),
    "header over the size limit": (safetensors_bytes(GOOD, b"\0" * 8, header_len=MAX_HEADER_BYTES + 1), f"header claims {MAX_HEADER_BYTES + 1} bytes"),
    "2**64-1 header length": (safetensors_bytes(GOOD, header_len=2**64 - 1), f"header claims {2**64 - 1} bytes"),
    "not JSON": (safetensors_bytes(b"{not json"), "not valid JSON"),
    "not UTF-8": (safetensors_bytes(b'{"\xff": 1}'), "not valid JSON .*utf-8"),
    "UTF-16 JSON": (safetensors_bytes('{"a": 1}'.encode("utf-16")), "not valid JSON .*utf-8"),
    "a list, not an object": (safetensors_bytes([1, 2]), "expected a JSON object, got list"),
    "the same tensor twice": (safetensors_bytes(b'{"a": %s, "a": %s}' % (json.dumps(entry()).encode(), json.dumps(entry(offsets=(8, 16))).encode()), b"\0" * 16), "key 'a' appears twice"),
    "nesting 100000 deep": (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), "not valid JSON .*recursion"),
    "a 5000-digit integer": (safetensors_bytes(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}'), "not valid JSON"),
    "entry not an object": (safetensors_bytes({"a": [1, 2]}), "entry for 'a' is not an object"),
    "unknown dtype": (safetensors_bytes({"a": entry(dtype="F4")}, b"\0" * 8), "tensor 'a' has unknown dtype 'F4'"),
    "dtype a list": (safetensors_bytes({"a": entry(dtype=["F32"])}, b"\0" * 8), r"tensor 'a' has unknown dtype \['F32'\]"),
    "dtype missing": (safetensors_bytes({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a' has unknown dtype None"),
    "negative dim": (safetensors_bytes({"a": entry(shape=(-2,))}, b"\0" * 8), r"tensor 'a' has invalid shape \[-2\]"),
    "bool dim": (safetensors_bytes({"a": entry(shape=[True, 2])}, b"\0" * 8), r"invalid shape \[True, 2\]"),
    "float dim": (safetensors_bytes({"a": entry(shape=[2.0])}, b"\0" * 8), r"invalid shape \[2.0\]"),
    "shape a string": (safetensors_bytes({"a": entry(shape="2")}, b"\0" * 8), "invalid shape '2'"),
    "element count past int64": (safetensors_bytes({"a": entry(shape=(2**32, 2**32), offsets=(0, 0))}), "beyond int64 element counts"),
    "huge dims hidden by a zero": (safetensors_bytes({"a": entry(shape=(0, 2**70), offsets=(0, 0))}), r"shape \[0, 1180591620717411303424\], beyond int64"),
    "offsets reversed": (safetensors_bytes({"a": entry(offsets=(8, 0))}, b"\0" * 8), r"invalid data_offsets \[8, 0\]"),
    "offsets negative": (safetensors_bytes({"a": entry(offsets=(-8, 0))}, b"\0" * 8), r"invalid data_offsets \[-8, 0\]"),
    "three offsets": (safetensors_bytes({"a": entry(offsets=(0, 4, 8))}, b"\0" * 8), r"invalid data_offsets \[0, 4, 8\]"),
    "offsets bool": (safetensors_bytes({"a": entry(offsets=[False, 8])}, b"\0" * 8), r"invalid data_offsets \[False, 8\]"),
    "offsets missing": (safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "invalid data_offsets None"),
    "span vs dtype x shape": (safetensors_bytes({"a": entry(offsets=(0, 12))}, b"\0" * 12), r"tensor 'a' spans 12 bytes but float32 \[2\] needs 8"),
    "past the end (truncated)": (safetensors_bytes({"a": entry(offsets=(8, 16))}, b"\0" * 12), r"tensor 'a' ends at byte 16 of the data section, which has only 12 bytes \(truncated"),
    "overlapping tensors": (safetensors_bytes({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12), "tensors 'a' and 'b' overlap"),
}


@pytest.mark.parametrize("raw, message", CORRUPT_FILES.values(), ids=CORRUPT_FILES)
def test_corrupt_safetensors_file(tmp_path, raw, message):
    path = tmp_path / "model-00001-of-00001.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CorruptSafetensorsError, match=message) as err:
        read_header(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_valid_hand_written_file_is_accepted(tmp_path):
    """The builder above is right: the cases fail for the reason they name, not for a typo."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes({"a": entry(), "b": entry(offsets=(8, 16)), "__metadata__": {"format": "pt"}}, b"\0" * 16))
    infos = read_header(path)
    assert [(i.name, i.start, i.end) for i in infos.values()] == [("a", path.stat().st_size - 16, path.stat().st_size - 8), ("b", path.stat().st_size - 8, path.stat().st_size)]


# Iteration on the CPU, and the pipelined reader of GPU loads (run on the CPU here).
STREAMS = {"iteration": iter, "pipelined reader": lambda ck: ck.wrap(Reader(ck.read_order(), "cpu"))}


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS)
def test_a_shard_truncated_after_open_fails_on_read(tmp_path, stream):
    ckpt = copy_fixture("fp8", tmp_path)
    ck = lazyxform.open(ckpt, device="cpu")
    shard = ckpt / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CorruptSafetensorsError, match=r"model\.safetensors: .*\(file changed or truncated\)"):
        list(stream(ck))


@pytest.mark.parametrize("stream", STREAMS.values(), ids=STREAMS)
def test_a_shard_deleted_after_open_fails_on_read(tmp_path, stream):
    ckpt = copy_fixture("fp8", tmp_path)
    ck = lazyxform.open(ckpt, device="cpu")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CorruptSafetensorsError, match=r"model\.safetensors: cannot (read|open) .*\(No such file or directory\)"):
        list(stream(ck))


def test_short_reads_are_resumed(monkeypatch):
    """Linux moves at most ~2 GiB per read call: a tensor larger than that arrives in pieces."""
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: preadv(fd, [b[:1000] for b in buffers], offset))
    streamed = dict(lazyxform.open(FIXTURES / "fp8_pc_pt", device="cpu"))
    monkeypatch.undo()
    direct = dict(lazyxform.open(FIXTURES / "fp8_pc_pt", device="cpu"))
    assert all(torch.equal(streamed[k], direct[k]) for k in direct) and streamed.keys() == direct.keys()


@pytest.fixture
def sharded(tmp_path) -> Path:
    ckpt = copy_fixture("fp8", tmp_path)
    shard_checkpoint(ckpt, 2)
    return ckpt


def set_index(ckpt: Path, edit) -> None:
    edit_json(ckpt / "model.safetensors.index.json", edit)


FIRST_SHARD = "model-00001-of-00002.safetensors"


@pytest.mark.parametrize(
    "shard, message",
    [
        ("../outside.safetensors", r"'\.\./outside\.safetensors' resolves to .*outside\.safetensors, outside the checkpoint directory"),
        ("/etc/passwd", "'/etc/passwd' resolves to /etc/passwd, outside the checkpoint directory"),
        ("sub/../../outside.safetensors", "outside the checkpoint directory"),
        ("nul\x00byte.safetensors", r"cannot resolve 'nul\\x00byte\.safetensors' \(embedded null byte\)"),
        ("x" * 5000, r"cannot resolve 'xxxx.*File name too long"),
    ],
)
def test_index_naming_a_shard_outside_the_checkpoint(sharded, shard, message):
    set_index(sharded, lambda i: i["weight_map"].update({"model.norm.weight": shard}))
    with pytest.raises(UnsafePathError, match=message):
        lazyxform.open(sharded, device="cpu")


def test_a_shard_symlink_escaping_the_checkpoint(sharded):
    outside = sharded.parent / "elsewhere.safetensors"
    (sharded / FIRST_SHARD).rename(outside)
    (sharded / FIRST_SHARD).symlink_to(outside)
    with pytest.raises(UnsafePathError, match=f"'{FIRST_SHARD}' resolves to {outside}, outside the checkpoint directory"):
        lazyxform.open(sharded, device="cpu")


@pytest.mark.parametrize("name", ["config.json", "hf_quant_config.json", "model.safetensors.index.json", "model.safetensors"])
def test_no_file_is_read_through_a_symlink_that_escapes(tmp_path, name):
    ckpt = copy_fixture("fp8", tmp_path)
    if name == "model.safetensors.index.json":
        shard_checkpoint(ckpt, 2)
    outside = tmp_path / "outside"
    (ckpt / name).rename(outside)
    (ckpt / name).symlink_to(outside)
    with pytest.raises(UnsafePathError, match=f"'{name}' resolves to {outside}, outside the checkpoint directory"):
        lazyxform.open(ckpt, device="cpu")


def test_a_symlink_loop(sharded):
    (sharded / FIRST_SHARD).unlink()
    (sharded / FIRST_SHARD).symlink_to(FIRST_SHARD)
    with pytest.raises(UnsafePathError, match=f"cannot resolve '{FIRST_SHARD}'"):
        lazyxform.open(sharded, device="cpu")


def test_symlinks_inside_the_checkpoint_are_followed(sharded):
    (sharded / FIRST_SHARD).rename(sharded / "real.bin")
    (sharded / FIRST_SHARD).symlink_to("real.bin")
    assert len(dict(lazyxform.open(sharded, device="cpu"))) == len(dict(lazyxform.open(FIXTURES / "fp8", device="cpu")))


def hub_cache_snapshot(tmp_path: Path, fixture: str) -> Path:
    """The Hugging Face hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha>."""
    repo = tmp_path / "models--nvidia--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((FIXTURES / fixture).iterdir())):
        shutil.copy(f, blobs / f"sha{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/sha{i}")
    return snapshot


def test_a_hub_cache_snapshot_loads_through_its_blob_symlinks(tmp_path):
    snapshot = hub_cache_snapshot(tmp_path, "int8_sq")
    cached = dict(lazyxform.open(snapshot, device="cpu"))
    direct = dict(lazyxform.open(FIXTURES / "int8_sq", device="cpu"))
    assert cached.keys() == direct.keys() and all(torch.equal(cached[k], direct[k]) for k in direct)


def test_a_hub_cache_snapshot_cannot_escape_its_repository(tmp_path):
    snapshot = hub_cache_snapshot(tmp_path, "fp8")
    (tmp_path / "secret").write_text("{}")
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to("../../../secret")
    with pytest.raises(UnsafePathError, match="'config.json' resolves to .*secret, outside the checkpoint directory"):
        lazyxform.open(snapshot, device="cpu")


def test_index_naming_a_missing_shard(sharded):
    set_index(sharded, lambda i: i["weight_map"].update({"model.norm.weight": "model-00003-of-00002.safetensors"}))
    with pytest.raises(MissingTensorError, match="shard 'model-00003-of-00002.safetensors' is missing or not a regular file"):
        lazyxform.open(sharded, device="cpu")


def test_a_shard_that_is_a_directory(sharded):
    (sharded / FIRST_SHARD).unlink()
    (sharded / FIRST_SHARD).mkdir()
    with pytest.raises(MissingTensorError, match=f"shard '{FIRST_SHARD}' is missing or not a regular file"):
        lazyxform.open(sharded, device="cpu")


def test_index_naming_a_tensor_its_shard_lacks(sharded):
    set_index(sharded, lambda i: i["weight_map"].update({"model.layers.9.mlp.up_proj.weight": FIRST_SHARD}))
    with pytest.raises(MissingTensorError, match=f"index.json: maps 'model.layers.9.mlp.up_proj.weight' to {FIRST_SHARD}, whose header has no such tensor"):
        lazyxform.open(sharded, device="cpu")


def test_the_same_tensor_in_two_shards(sharded):
    save_file({"model.norm.weight": load_tensors(sharded)["model.norm.weight"]}, str(sharded / "extra.safetensors"))
    set_index(sharded, lambda i: i["weight_map"].update({"model.norm.weight": "extra.safetensors"}))
    with pytest.raises(CorruptSafetensorsError, match=r"tensor 'model\.norm\.weight' appears in both model-0000\d-of-00002\.safetensors and extra\.safetensors"):
        lazyxform.open(sharded, device="cpu")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1]", "expected a JSON object, got list"),
        ("{}", "weight_map is NoneType, expected an object"),
        ('{"weight_map": []}', "weight_map is list, expected an object"),
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] is 3, expected a file name"),
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "key 'a' appears twice"),
        ("{", "not valid JSON"),
    ],
)
def test_malformed_index(sharded, text, message):
    (sharded / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptSafetensorsError, match=f"model.safetensors.index.json: .*{message}"):
        lazyxform.open(sharded, device="cpu")


def set_quantization(ckpt: Path, **fields) -> None:
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(fields))


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"quant_algo": 8}, ConfigError, "quant_algo must be a string, got 8"),
        ({"quant_algo": "FP3_MAGIC"}, UnsupportedAlgoError, "'FP3_MAGIC' is not supported"),
        ({"group_size": "128"}, ConfigError, "group_size must be a positive integer, got '128'"),
        ({"group_size": 0}, ConfigError, "group_size must be a positive integer, got 0"),
        ({"group_size": True}, ConfigError, "group_size must be a positive integer, got True"),
        ({"has_zero_point": "no"}, ConfigError, "has_zero_point must be true or false, got 'no'"),
        ({"exclude_modules": "lm_head"}, ConfigError, "exclude_modules must be a list of module patterns, got 'lm_head'"),
        ({"exclude_modules": [1]}, ConfigError, r"exclude_modules must be a list of module patterns, got \[1\]"),
        ({"kv_cache_quant_algo": 8}, ConfigError, "kv_cache_quant_algo must be a string, got 8"),
        ({"kv_cache_quant_algo": "INT2"}, UnsupportedAlgoError, "kv_cache_quant_algo 'INT2' is not supported"),
        ({"quant_algo": "MIXED_PRECISION"}, ConfigError, "MIXED_PRECISION needs a non-empty quantized_layers map"),
        ({"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a": "FP8"}}, ConfigError, r"quantized_layers\['a'\] must be an object with a quant_algo string"),
        ({"quant_algo": "MIXED_PRECISION", "quantized_layers": {"a": {"quant_algo": None}}}, ConfigError, r"quantized_layers\['a'\] must be an object"),
        ({"exclude_modules": ["model.layers.0.*"]}, ConfigError, "model.layers.0.mlp.down_proj carries quantization scales but matches exclude_modules"),
    ],
)
def test_malformed_hf_quant_config(tmp_path, fields, error, message):
    ckpt = copy_fixture("fp8", tmp_path)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the nested form alone
    set_quantization(ckpt, **fields)
    with pytest.raises(error, match=message):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type=["llama"]), r"config\.json: model_type must be a str, got \['llama'\]"),
        (lambda c: c.update(num_attention_heads="4"), r"config\.json: num_attention_heads must be a positive int, got '4'"),
        (lambda c: c.update(num_key_value_heads=0), r"config\.json: num_key_value_heads must be a positive int, got 0"),
        (lambda c: c.update(dtype=16), r"config\.json: dtype must be a str, got 16"),
        (lambda c: c["quantization_config"].update(quant_algo="NVFP4"), "config.json says quant_algo NVFP4 but hf_quant_config.json says FP8"),
        (lambda c: c["quantization_config"].update(kv_cache_scheme={"type": "int", "num_bits": 4}), "unrecognised kv_cache_scheme"),
    ],
)
def test_malformed_config_json(tmp_path, edit, message):
    ckpt = copy_fixture("fp8", tmp_path)
    edit_json(ckpt / "config.json", edit)
    if "kv_cache_scheme" in message:
        (ckpt / "hf_quant_config.json").unlink()  # only the flat form reads kv_cache_scheme
    with pytest.raises(ConfigError, match=message):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", "expected a JSON object, got list"),
        ('{"quantization": {"quant_algo": "FP8", "quant_algo": "NVFP4"}}', "key 'quant_algo' appears twice"),
        ('{"quantization": 1}', "missing the 'quantization' object"),
        ("\ufeff{}", "not valid JSON"),
    ],
)
def test_malformed_json_files(tmp_path, text, message):
    ckpt = copy_fixture("fp8", tmp_path)
    (ckpt / "hf_quant_config.json").write_text(text)
    with pytest.raises(ConfigError, match=f"hf_quant_config.json: .*{message}"):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize(
    "fixture, group_size, error, message",
    [
        ("int4_awq", 64, TensorMismatchError, r"down_proj\.weight_scale \(float32 \[256, 4\]\) in model\.safetensors: expected float32 \[256, 8\]"),
        ("int4_awq", 100, TensorMismatchError, r"down_proj\.weight \(uint8 \[128, 512\]\) .*: 512 input columns are not a whole number of 100-column blocks"),
        ("nvfp4", 32, TensorMismatchError, r"down_proj\.weight_scale \(float8_e4m3fn \[256, 32\]\) in model\.safetensors: expected float8_e4m3fn \[256, 16\]"),
        ("nvfp4", 8, UnsupportedAlgoError, "NVFP4 with group_size 8; only multiples of 16"),
        ("mxfp8", 16, UnsupportedAlgoError, "MXFP8 with group_size 16; MX blocks are 32 columns"),
    ],
)
def test_group_size_that_contradicts_the_scales(tmp_path, fixture, group_size, error, message):
    ckpt = copy_fixture(fixture, tmp_path)
    set_quantization(ckpt, group_size=group_size)
    with pytest.raises(error, match=message):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize(
    "fixture, name, value, message",
    [
        ("fp8", "model.layers.0.mlp.up_proj.weight", torch.zeros(512, 256, dtype=torch.int8), r"up_proj\.weight \(int8 \[512, 256\]\) in model\.safetensors: expected float8_e4m3fn \[512, 256\]"),
        ("fp8", "model.layers.0.mlp.up_proj.input_scale", torch.ones(1), r"up_proj\.input_scale \(float32 \[1\]\) .*: expected float32 \[\]"),
        ("fp8", "model.layers.0.mlp.up_proj.weight", torch.zeros(2, 512, 256, dtype=torch.float8_e4m3fn), r"up_proj\.weight \(float8_e4m3fn \[2, 512, 256\]\) .*: expected a 2-D weight"),
        # Block scales come 4-D (FP8_PB_WO) or 2-D (fp8_pb_real, weight_scale_inv), each with its block counts.
        ("fp8_2d_blockwise_wo", "model.layers.0.mlp.up_proj.weight_scale", torch.ones(4, 1, 3, 1), r"weight_scale \(float32 \[4, 1, 3, 1\]\) .*: expected float32 \[4, 1, 2, 1\]"),
        ("fp8_2d_blockwise_wo", "model.layers.0.mlp.up_proj.weight_scale", torch.ones(4, 3), r"weight_scale \(float32 \[4, 3\]\) .*: expected float32 \[4, 2\]"),
        ("int4_awq", "model.layers.0.mlp.up_proj.weight", torch.zeros(512, 256, dtype=torch.uint8), r"up_proj\.weight_scale \(float32 \[512, 2\]\) .*: expected float32 \[1024, 2\]"),
        ("nvfp4", "model.layers.0.mlp.up_proj.weight_scale", torch.ones(512, 16), r"up_proj\.weight_scale \(float32 \[512, 16\]\) .*: expected float8_e4m3fn \[512, 16\]"),
        ("nvfp4", "model.layers.0.mlp.up_proj.weight_scale_2", torch.ones(512), r"weight_scale_2 \(float32 \[512\]\) .*: expected float32 \[\]"),
        ("mxfp4", "model.layers.0.mlp.up_proj.weight_scale", torch.ones(512, 8), r"weight_scale \(float32 \[512, 8\]\) .*: expected uint8 \[512, 8\]"),
        ("int8_sq", "model.layers.0.mlp.down_proj.pre_quant_scale", torch.ones(256, dtype=torch.bfloat16), r"down_proj\.pre_quant_scale \(bfloat16 \[256\]\) .*: expected a float \[512\] vector"),
    ],
)
def test_weight_or_scale_the_recipe_does_not_accept(tmp_path, fixture, name, value, message):
    ckpt = copy_fixture(fixture, tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({name: value}))
    with pytest.raises(TensorMismatchError, match=message):
        lazyxform.open(ckpt, device="cpu")


@pytest.mark.parametrize(
    "fixture, drop, message",
    [
        ("fp8", "model.layers.0.self_attn.v_proj.", r"fused set \[.*q_proj', .*k_proj', .*v_proj'\]: \['model\.layers\.0\.self_attn\.v_proj'\] missing"),
        ("int8_default", "model.layers.1.mlp.gate_proj.", r"fused set \[.*gate_proj', .*up_proj'\]: \['model\.layers\.1\.mlp\.gate_proj'\] missing"),
        ("nvfp4", "model.layers.0.self_attn.k_proj.", r"\['model\.layers\.0\.self_attn\.k_proj'\] missing"),
        ("qwen3moe_fp8", "model.layers.1.mlp.experts.3.up_proj.", r"fused set \[.*experts\.3\.gate_proj', .*experts\.3\.up_proj'\]: \[.*experts\.3\.up_proj'\] missing"),
    ],
)
def test_fused_set_with_a_member_missing(tmp_path, fixture, drop, message):
    ckpt = copy_fixture(fixture, tmp_path)
    rewrite_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith(drop)])
    with pytest.raises(MissingTensorError, match=message):
        lazyxform.open(ckpt, device="cpu")


def test_fused_set_mixing_formats(tmp_path):
    ckpt = copy_fixture("nvfp4", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.pop("quantization_config"))
    layers = {k.removesuffix(".weight_scale"): {"quant_algo": "NVFP4", "group_size": 16} for k in load_tensors(ckpt) if k.endswith(".weight_scale")}
    layers["model.layers.0.self_attn.k_proj"] = {"quant_algo": "NVFP4_AWQ", "group_size": 16}
    edit_json(ckpt / "hf_quant_config.json", lambda c: c.update(quantization={"quant_algo": "MIXED_PRECISION", "quantized_layers": layers}))
    with pytest.raises(ConfigError, match=r"fused set \[.*q_proj', .*k_proj', .*v_proj'\] mixes formats \['NVFP4', 'NVFP4_AWQ'\]"):
        lazyxform.open(ckpt, device="cpu")


def test_a_quantized_weight_without_its_scale(tmp_path):
    """Passed through, fp8 codes would be cast to bf16 by the engine as if they were values."""
    ckpt = copy_fixture("fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.0.mlp.down_proj.") and not k.endswith(".weight")])
    with pytest.raises(MissingTensorError, match=r"down_proj\.weight \(float8_e4m3fn \[256, 512\]\) in model\.safetensors: quantized codes with no model\.layers\.0\.mlp\.down_proj\.weight_scale"):
        lazyxform.open(ckpt, device="cpu")


def test_a_tensor_the_recipe_does_not_know(tmp_path):
    ckpt = copy_fixture("fp8_pc_pt", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_zero_point": torch.zeros(512)}))
    with pytest.raises(UnexpectedTensorError, match=r"model\.safetensors: FP8_PER_CHANNEL_PER_TOKEN module model\.layers\.0\.mlp\.up_proj has tensors \['weight_zero_point'\]"):
        lazyxform.open(ckpt, device="cpu")


def test_two_tensors_claiming_one_kv_scale(tmp_path):
    ckpt = copy_fixture("fp8_kv_fp8", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_scale": t["model.layers.0.self_attn.k_proj.k_scale"].clone()}))
    with pytest.raises(UnexpectedTensorError, match=r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.k_scale and model\.layers\.0\.self_attn\.k_scale are both the k_scale of model\.layers\.0\.self_attn"):
        lazyxform.open(ckpt, device="cpu")


def test_kv_scales_without_a_kv_config(tmp_path):
    ckpt = copy_fixture("fp8_kv_fp8", tmp_path)
    set_quantization(ckpt, kv_cache_quant_algo=None)
    edit_json(ckpt / "config.json", lambda c: c["quantization_config"].pop("kv_cache_scheme"))
    with pytest.raises(ConfigError, match=r"k_scale are KV-cache scales but the config has no kv_cache_quant_algo"):
        lazyxform.open(ckpt, device="cpu")


def poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    bad = t.clone().reshape(-1)
    bad[bad.numel() // 2] = value
    return bad.reshape(t.shape)


def forbidden_values(dtype: torch.dtype) -> list[float]:
    if dtype == torch.uint8:
        return [255]  # E8M0 NaN
    if dtype == torch.float8_e4m3fn:
        return [float("nan"), 0.0, -1.0]  # no Inf in E4M3FN
    return [float("nan"), float("inf"), 0.0, -1.0]


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_every_scale_with_a_forbidden_value_is_refused(fixture):
    """Each scale tensor of every fixture, poisoned in one element, stops its group with an error
    naming it: no scale reaches the engine unchecked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)  # NVFP4_SVD dequantizes
        ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    tensors = load_tensors(FIXTURES / fixture)
    group_of = ck.plan.group_of()
    scales = [n for n in tensors if n.endswith(("_scale", "_scale_2", "_scale_inv"))]
    assert scales
    for name in scales:
        for value in forbidden_values(tensors[name].dtype):
            pairs = [(n, poisoned(tensors[n], value) if n == name else tensors[n]) for n in group_of[name].inputs]
            with pytest.raises(BadScaleError, match=rf"^{name}: 1 of {tensors[name].numel()} .*values"):
                list(ck.wrap(pairs))


def test_e8m0_scale_zero_is_allowed(tmp_path):
    """E8M0 code 0 is 2^-127, a valid scale: only 255 (NaN) is forbidden."""
    ck = lazyxform.open(FIXTURES / "mxfp8", device="cpu")
    name = "model.layers.0.mlp.up_proj.weight_scale"
    scale = poisoned(load_tensors(FIXTURES / "mxfp8")[name], 0)
    ((_, out),) = ck.wrap([(name, scale)])
    assert torch.equal(out, scale)


def test_fused_global_scales_that_differ(tmp_path):
    ckpt = copy_fixture("nvfp4", tmp_path)
    name = "model.layers.0.self_attn.v_proj.weight_scale_2"
    rewrite_tensors(ckpt, lambda t: t.update({name: t[name] * 2}))
    with pytest.raises(InconsistentScalesError, match=r"weight_scale_2 of siblings fused into one GEMM: .*q_proj\.weight_scale_2 and .*v_proj\.weight_scale_2 differ"):
        list(lazyxform.open(ckpt, device="cpu"))


def test_a_tensor_received_twice_in_one_load():
    ck = lazyxform.open(FIXTURES / "fp8", device="cpu")
    name = "model.layers.0.self_attn.q_proj.input_scale"
    scale = load_tensors(FIXTURES / "fp8")[name]
    with pytest.raises(CorruptSafetensorsError, match=rf"{name}: received twice in one load"):
        list(ck.wrap([(name, scale), (name, scale)]))
