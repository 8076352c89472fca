"""Fuzzing the parsers of untrusted input: ModelOpt configs, safetensors headers and indexes, and
planning from headers. Any input either parses into something sound or raises a LazyxformError;
nothing else may escape. Deterministic (derandomized), with a fixed number of cases per target,
each run proving it ran them all. Exercises modelopt.py, shards.py, reader.py (ShardReader) and
planner.py (with every recipe)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from math import prod
from pathlib import Path

import pytest
import torch
from algos import SERVED
from helpers import safetensors_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import FIXTURES
from safetensors import safe_open
from safetensors.torch import save

from lazyxform.errors import LazyxformError
from lazyxform.modelopt import AlgoConfig, read_modelopt_config
from lazyxform.planner import build_plan
from lazyxform.reader import ShardReader
from lazyxform.recipes import RECIPES
from lazyxform.shards import DTYPES, index_checkpoint, read_header

CASES = {
    "config round trip": 1500,
    "config garbage": 2000,
    "header round trip": 600,
    "header byte mutations": 2000,
    "header entry mutations": 1500,
    "index weight_map": 800,
    "plan from mutated headers": 2000,
}


def run_cases(target: str, strategy: st.SearchStrategy, check: Callable) -> None:
    """Run `check` on CASES[target] derandomized examples and prove that many ran (hypothesis may
    stop early on a search space it thinks exhausted)."""
    ran = 0

    @settings(max_examples=CASES[target], deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(case):
        nonlocal ran
        ran += 1
        check(case)

    prop()
    assert ran >= CASES[target]


@pytest.fixture
def workdir():
    # One directory for all cases of a test: hypothesis runs them in one call of the test function.
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# --- ModelOpt configs ------------------------------------------------------------------------------

CANONICAL = sorted(RECIPES)
SPELLINGS = {a: [a, a.lower(), f" {a.title()} "] for a in CANONICAL}
FP8_TENSORS = index_checkpoint(FIXTURES / "fp8")
# Real module names (so that the garbage cases reach planning) and made-up ones.
modules = st.sampled_from(sorted(n.removesuffix(".weight_scale") for n in FP8_TENSORS if n.endswith(".weight_scale"))) | st.from_regex(
    r"model\.layers\.[0-9]\.(self_attn|mlp)\.[a-z_]{1,8}", fullmatch=True
)
algo_configs = st.builds(AlgoConfig, st.sampled_from(CANONICAL), st.none() | st.sampled_from([16, 32, 64, 128]), st.booleans())
intents = st.fixed_dictionaries(
    {
        "form": st.sampled_from(["nested", "flat", "both"]),
        "default": st.none() | algo_configs,
        "layers": st.dictionaries(modules, algo_configs, min_size=1, max_size=4),
        "exclude": st.lists(st.text(min_size=1, max_size=12), max_size=3),
        "kv": st.sampled_from([None, "FP8", "NVFP4"]),
        "spelling": st.integers(0, 3),
    }
)


# Configs that fit FP8_TENSORS, so that garbage in the other fields reaches planning.
fp8_intents = intents.map(lambda i: i | {"default": AlgoConfig("FP8"), "exclude": [], "kv": None})


def spell(algo: str, i: int) -> str:
    return SPELLINGS[algo][i % len(SPELLINGS[algo])]


def algo_fields(cfg: AlgoConfig, i: int) -> dict:
    fields = {"quant_algo": spell(cfg.algo, i), "has_zero_point": cfg.has_zero_point}
    return fields | ({"group_size": cfg.group_size} if cfg.group_size is not None else {})


def config_docs(intent: dict) -> dict[str, dict | None]:
    """The intent in ModelOpt's nested form (hf_quant_config.json), flat form (config.json) or both."""
    i = intent["spelling"]
    if intent["default"] is None:
        body = {"quant_algo": "MIXED_PRECISION", "quantized_layers": {m: algo_fields(c, i) for m, c in intent["layers"].items()}}
    else:
        body = algo_fields(intent["default"], i)
    nested = body | {"exclude_modules": intent["exclude"], "kv_cache_quant_algo": intent["kv"]}
    kv_scheme = {"FP8": {"dynamic": False, "num_bits": 8, "type": "float"}, "NVFP4": "NVFP4", None: None}[intent["kv"]]
    flat = body | {"quant_method": "modelopt", "ignore": intent["exclude"], "kv_cache_scheme": kv_scheme}
    return {
        "config.json": {"model_type": "llama"} | ({"quantization_config": flat} if intent["form"] != "nested" else {}),
        "hf_quant_config.json": None if intent["form"] == "flat" else {"producer": {"name": "modelopt"}, "quantization": nested},
    }


def write_docs(d: Path, docs: dict[str, object]) -> None:
    for name, doc in docs.items():
        (d / name).unlink(missing_ok=True)
        if doc is not None:
            (d / name).write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


def test_config_round_trip(workdir):
    """Every config ModelOpt can write, in either form and any spelling, parses to what it says."""

    def check(intent):
        write_docs(workdir, config_docs(intent))
        cfg, _ = read_modelopt_config(workdir)
        assert cfg.default == intent["default"]
        assert cfg.per_layer == ({} if intent["default"] else intent["layers"])
        assert cfg.exclude == intent["exclude"] and cfg.kv_cache_algo == intent["kv"]
        module, layer_cfg = next(iter(intent["layers"].items()))
        assert cfg.algo_for(module) == (intent["default"] or layer_cfg)

    run_cases("config round trip", intents, check)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = [
    "quant_algo", "group_size", "has_zero_point", "exclude_modules", "ignore", "kv_cache_quant_algo",
    "kv_cache_scheme", "quantized_layers", "quant_method",
]  # fmt: skip
HF_KEYS = ["model_type", "dtype", "torch_dtype", "num_attention_heads", "num_key_value_heads", "quantization_config"]


def test_config_garbage(workdir):
    """Valid configs with fields replaced by arbitrary JSON, files replaced by arbitrary bytes; the
    survivors are then planned against real headers."""

    def check(data):
        docs = config_docs(data.draw(fp8_intents | intents))
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(sorted(docs)))
            doc = docs[name]
            how = data.draw(st.sampled_from(["field", "field", "layer field", "file", "bytes"]))
            if how == "bytes":
                docs[name] = data.draw(st.binary(max_size=40))
            elif how == "file" or not isinstance(doc, dict):
                docs[name] = data.draw(json_values)
            elif name == "config.json":
                flat = doc.get("quantization_config")
                target = flat if isinstance(flat, dict) and data.draw(st.booleans()) else doc
                target[data.draw(st.sampled_from(CONFIG_KEYS + HF_KEYS))] = data.draw(json_values)
            elif isinstance(doc.get("quantization"), dict):
                body = doc["quantization"]
                layers = body.get("quantized_layers")
                if how == "layer field" and isinstance(layers, dict) and layers:
                    body = layers[data.draw(st.sampled_from(sorted(layers)))]
                if isinstance(body, dict):
                    body[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(json_values)
        write_docs(workdir, docs)
        try:
            cfg, hf = read_modelopt_config(workdir)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_plan(cfg, FP8_TENSORS, hf)
        except LazyxformError:
            pass

    run_cases("config garbage", st.data(), check)


# --- safetensors headers and indexes ---------------------------------------------------------------

NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(lambda n: n != "__metadata__")
tensors = st.dictionaries(
    NAMES,
    st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 2**31)),
    max_size=5,
)


def materialise(spec: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, (dtype, shape, seed) in spec.items():
        n = prod(shape) * DTYPES[dtype].itemsize
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        out[name] = raw.view(DTYPES[dtype]).reshape(shape)
    return out


def assert_sound(path: Path) -> None:
    """Whatever read_header accepts lies inside the data section, without overlaps, with byte counts
    that match dtype x shape, and reads back at exactly that size."""
    size = path.stat().st_size
    try:
        infos = read_header(path)
    except LazyxformError:
        return
    data_start = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    spans = sorted((i.start, i.end) for i in infos.values() if i.nbytes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    reader = ShardReader()
    for info in infos.values():
        assert data_start <= info.start <= info.end <= size
        assert info.nbytes == prod(info.shape) * info.dtype.itemsize
        t = reader.read(info)
        assert t.dtype == info.dtype and tuple(t.shape) == info.shape
    reader.close()


def test_header_round_trip(workdir):
    """Files written by the safetensors library read back identically, agreeing with its reader."""
    path = workdir / "model.safetensors"

    def check(spec):
        original = materialise(spec)
        path.write_bytes(save(original, metadata={"format": "pt"}))
        infos = read_header(path)
        assert set(infos) == set(original)
        reader = ShardReader()
        with safe_open(str(path), framework="pt") as ref:
            for name, info in infos.items():
                got = reader.read(info)
                assert got.dtype == original[name].dtype and got.shape == original[name].shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), ref.get_tensor(name).reshape(-1).view(torch.uint8))
        reader.close()

    run_cases("header round trip", tensors, check)


def test_header_byte_mutations(workdir):
    """Valid files with bytes overwritten (mostly in the length field and header), cut or extended."""
    path = workdir / "model.safetensors"

    def check(data):
        raw = bytearray(save(materialise(data.draw(tensors))))
        header_end = 8 + int.from_bytes(raw[:8], "little")
        for _ in range(data.draw(st.integers(1, 4))):
            kind = data.draw(st.sampled_from(["overwrite", "overwrite", "truncate", "extend", "length"]))
            if kind == "overwrite":
                raw[data.draw(st.integers(0, min(len(raw), header_end + 8) - 1))] = data.draw(st.integers(0, 255))
            elif kind == "truncate":
                del raw[data.draw(st.integers(0, len(raw))):]
            elif kind == "extend":
                raw += data.draw(st.binary(min_size=1, max_size=16))
            else:
                raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
            if not raw:
                break
        path.write_bytes(bytes(raw))
        assert_sound(path)

    run_cases("header byte mutations", st.data(), check)


def test_header_entry_mutations(workdir):
    """Headers whose entries have fields replaced by arbitrary JSON or nearby integers."""
    path = workdir / "model.safetensors"
    numbers = st.integers(-3, 70) | st.integers(-(2**70), 2**70) | json_values

    def check(data):
        raw = save(materialise(data.draw(tensors.filter(bool))))
        header_end = 8 + int.from_bytes(raw[:8], "little")
        header, data_bytes = json.loads(raw[8:header_end]), raw[header_end:]
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(sorted(header)))
            entry = header[name]
            key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]))
            if key == "entry" or not isinstance(entry, dict):
                header[name] = data.draw(json_values)
            elif key == "dtype":
                entry[key] = data.draw(st.sampled_from(sorted(DTYPES)) | json_values)
            elif isinstance(entry.get(key), list) and entry[key] and data.draw(st.booleans()):
                entry[key][data.draw(st.integers(0, len(entry[key]) - 1))] = data.draw(numbers)
            else:
                entry[key] = data.draw(st.lists(numbers, max_size=3) | json_values)
        path.write_bytes(safetensors_bytes(json.dumps(header).encode(), data_bytes[: data.draw(st.integers(0, len(data_bytes)))]))
        assert_sound(path)

    run_cases("header entry mutations", st.data(), check)


SHARD_POOL = [
    "a.safetensors", "b.safetensors", "inside_link.safetensors", "outside_link.safetensors", "loop.safetensors",
    "dir.safetensors", "missing.safetensors", "sub/c.safetensors", "sub/../a.safetensors", "../a.safetensors",
    "/etc/passwd", "", ".", "a.safetensors\x00", "./b.safetensors",
]  # fmt: skip


@pytest.fixture
def shard_dir(workdir) -> Path:
    """Shards a (x, y), b (z), sub/c (w); links inside, outside and to themselves; a directory."""
    ckpt = workdir / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "dir.safetensors").mkdir()
    (ckpt / "a.safetensors").write_bytes(save({"x": torch.ones(2), "y": torch.ones(2)}))
    (ckpt / "b.safetensors").write_bytes(save({"z": torch.ones(2)}))
    (ckpt / "sub" / "c.safetensors").write_bytes(save({"w": torch.ones(2)}))
    (workdir / "outside.safetensors").write_bytes(save({"v": torch.ones(2)}))
    os.symlink("a.safetensors", ckpt / "inside_link.safetensors")
    os.symlink("../outside.safetensors", ckpt / "outside_link.safetensors")
    os.symlink("loop.safetensors", ckpt / "loop.safetensors")
    return ckpt


def test_index_weight_map(shard_dir):
    """The right index, then entries re-pointed at good, bad and hostile shard names, dropped or
    added, or the whole document replaced."""
    right = {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors", "w": "sub/c.safetensors"}
    shards = st.sampled_from(SHARD_POOL) | st.text(max_size=8) | json_values
    edits = st.lists(st.tuples(st.sampled_from([*right, "v", "u"]) | st.text(max_size=4), st.none() | shards), max_size=3)
    root = shard_dir.resolve()

    def check(data):
        weight_map = dict(right)
        for name, shard in data.draw(edits):
            if shard is None:
                weight_map.pop(name, None)
            else:
                weight_map[name] = shard
        doc = data.draw(st.sampled_from([{"weight_map": weight_map}] * 4 + [weight_map]) | json_values)
        (shard_dir / "model.safetensors.index.json").write_text(json.dumps(doc))
        try:
            infos = index_checkpoint(shard_dir)
        except LazyxformError:
            return
        assert all(i.file.resolve().is_relative_to(root) for i in infos.values())
        assert set(doc["weight_map"]) <= set(infos)

    run_cases("index weight_map", st.data(), check)


# --- planning from headers ---------------------------------------------------------------------------

PLAN_FIXTURES = SERVED
LEAVES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "x", ""]
SUFFIXES = ["weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale", "v_scale", "bias", "weight_packed"]
BASES = {f: (read_modelopt_config(FIXTURES / f), index_checkpoint(FIXTURES / f)) for f in PLAN_FIXTURES}


def test_plan_from_mutated_headers():
    """Real fixtures' headers with tensors dropped, renamed, re-typed, re-shaped or added, under
    other configs: planning succeeds or says why, and never plans two tensors under one name."""

    def check(data):
        (cfg, hf), infos = BASES[data.draw(st.sampled_from(PLAN_FIXTURES))]
        infos = dict(infos)
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from(sorted(infos)))
            info = infos.pop(name)
            op = data.draw(st.sampled_from(["drop", "dtype", "shape", "rename", "add", "config"]))
            if op == "dtype":
                infos[name] = dataclasses.replace(info, dtype=DTYPES[data.draw(st.sampled_from(sorted(DTYPES)))])
            elif op == "shape":
                shape = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 16, 128, 255, 256, 512, 2**40]), max_size=4))
                infos[name] = dataclasses.replace(info, shape=tuple(shape))
            elif op == "rename":
                parts = name.split(".")
                parts[data.draw(st.integers(0, len(parts) - 1))] = data.draw(st.sampled_from(LEAVES))
                infos[".".join(parts)] = dataclasses.replace(info, name=".".join(parts))  # an index names each tensor by its key
            elif op == "add":
                infos[name] = info
                added = f"{name.rpartition('.')[0]}.{data.draw(st.sampled_from(SUFFIXES))}"
                infos[added] = dataclasses.replace(info, name=added)
            elif op == "config":
                infos[name] = info
                algo = AlgoConfig(data.draw(st.sampled_from([*CANONICAL, "FP3"])), data.draw(st.sampled_from([None, 16, 32, 100, 128])))
                per_layer = {} if data.draw(st.booleans()) else {name.rpartition(".")[0]: algo}
                cfg = dataclasses.replace(cfg, default=None if per_layer else algo, per_layer=per_layer, kv_cache_algo=data.draw(st.sampled_from([None, "FP8", "NVFP4"])))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan, _ = build_plan(cfg, infos, hf)
        except LazyxformError:
            return
        names = [o for g in plan.groups for o in g.outputs] + plan.passthrough
        assert len(names) == len(set(names))

    run_cases("plan from mutated headers", st.data(), check)
