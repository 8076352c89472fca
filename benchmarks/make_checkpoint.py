"""Synthetic ModelOpt checkpoints from random data, in the format ModelOpt 0.47's
`export_hf_checkpoint` + `save_pretrained` writes: config.json carrying the modelopt
quantization_config, hf_quant_config.json, generation_config.json and the weights as HF-style
shards (at most --shard-gb each, model.safetensors.index.json; a lone shard is model.safetensors).
At the bundled fixtures' tiny shape it reproduces tests/fixtures/modelopt/{int4_awq,nvfp4,fp8}:
the same configs, tensor names, dtypes, shapes and byte layout (tests/benchmarks/test_make_checkpoint.py).

    python benchmarks/make_checkpoint.py --format int4_awq --out benchmarks/data/int4_awq   # Llama-3-8B
    python benchmarks/make_checkpoint.py --format nvfp4 --out /tmp/small --layers 2 --vocab 1024

Values are random but valid: scales finite and > 0, scales ModelOpt unifies across fused
siblings (NVFP4 weight_scale_2 / input_scale, FP8 input_scale of q/k/v and gate/up) equal.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

FORMATS = ("int4_awq", "nvfp4", "fp8")
PRODUCER = {"name": "modelopt", "version": "0.47.0"}
IGNORE = ["lm_head", "model.embed_tokens"]
GB = 10**9  # save_pretrained's "5GB" is decimal


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    rms_norm_eps: float
    rope_theta: float
    bos: int
    eos: int


LLAMA3_8B = Dims(4096, 14336, 32, 32, 8, 128, 128256, 8192, 1e-5, 500000.0, 128000, 128001)
# The shape of the bundled fixtures (shared/tools/make_modelopt_fixtures.py).
FIXTURE = Dims(256, 512, 2, 4, 2, 64, 1024, 256, 1e-6, 10000.0, 1, 2)


def linears(d: Dims) -> list[tuple[str, int, int]]:
    """(module suffix, out, in) of one decoder layer, in the model's parameter order."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    return [
        ("self_attn.q_proj", q, d.hidden),
        ("self_attn.k_proj", kv, d.hidden),
        ("self_attn.v_proj", kv, d.hidden),
        ("self_attn.o_proj", d.hidden, q),
        ("mlp.gate_proj", d.intermediate, d.hidden),
        ("mlp.up_proj", d.intermediate, d.hidden),
        ("mlp.down_proj", d.hidden, d.intermediate),
    ]


def fused_set(module: str) -> str:
    """The first of the siblings the engine runs as one GEMM (ModelOpt unifies their per-tensor
    scales): model.layers.0.self_attn.k_proj -> model.layers.0.self_attn.q_proj."""
    parent, name = module.rsplit(".", 1)
    return f"{parent}.{ {'k_proj': 'q_proj', 'v_proj': 'q_proj', 'up_proj': 'gate_proj'}.get(name, name)}"


# name -> (dtype, shape, how to fill it); filled only when its shard is written.
Spec = tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


class Random:
    """Random tensors made on `device` (fast on a GPU) and returned on the CPU, reproducibly."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.gen = torch.Generator(device).manual_seed(seed)
        self._shared: dict[str, torch.Tensor] = {}

    def bytes(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=self.device, generator=self.gen).cpu()

    def uniform(self, shape: tuple[int, ...], low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
        x = torch.rand(shape, device=self.device, generator=self.gen) * (high - low) + low
        return x.to(dtype).cpu()

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype, clamp: float | None = None) -> torch.Tensor:
        x = torch.randn(shape, device=self.device, generator=self.gen) * std
        return (x.clamp(-clamp, clamp) if clamp else x).to(dtype).cpu()

    def shared(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The same value for every caller with `key` (scales of fused siblings)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key].clone()


def module_tensors(fmt: str, name: str, out: int, inp: int, rnd: Random) -> Iterator[tuple[str, Spec]]:
    fused = fused_set(name)

    def f32_scalar(low: float, high: float) -> Callable[[], torch.Tensor]:
        return lambda: rnd.uniform((), low, high, torch.float32)

    if fmt == "int4_awq":
        yield f"{name}.weight", (torch.uint8, (out // 2, inp), lambda: rnd.bytes((out // 2, inp)))
        yield f"{name}.weight_scale", (torch.float32, (out, inp // 128), lambda: rnd.uniform((out, inp // 128), 1e-3, 2e-2, torch.float32))
        # AWQ folds q/k/v's and gate/up's pre_quant_scale into the norms; o_proj (GQA) and
        # down_proj keep theirs.
        if name.endswith(("o_proj", "down_proj")):
            yield f"{name}.pre_quant_scale", (torch.bfloat16, (inp,), lambda: rnd.uniform((inp,), 0.5, 2.0, torch.bfloat16))
    elif fmt == "nvfp4":
        yield f"{name}.weight", (torch.uint8, (out, inp // 2), lambda: rnd.bytes((out, inp // 2)))
        yield f"{name}.weight_scale", (torch.float8_e4m3fn, (out, inp // 16), lambda: rnd.uniform((out, inp // 16), 1.0, 448.0, torch.float8_e4m3fn))
        yield f"{name}.weight_scale_2", (torch.float32, (), lambda: rnd.shared(f"{fused}.ws2", f32_scalar(1e-5, 1e-4)))
        yield f"{name}.input_scale", (torch.float32, (), lambda: rnd.shared(f"{fused}.is", f32_scalar(1e-3, 1e-2)))
    else:
        yield f"{name}.weight", (torch.float8_e4m3fn, (out, inp), lambda: rnd.normal((out, inp), 64.0, torch.float8_e4m3fn, clamp=448.0))
        yield f"{name}.weight_scale", (torch.float32, (), f32_scalar(1e-4, 3e-4))
        yield f"{name}.input_scale", (torch.float32, (), lambda: rnd.shared(f"{fused}.is", f32_scalar(1e-2, 3e-2)))


def state_dict_specs(fmt: str, d: Dims, rnd: Random) -> dict[str, Spec]:
    """Every tensor, in the order save_pretrained meets them (which decides the shards)."""
    specs: dict[str, Spec] = {}
    vocab = (d.vocab, d.hidden)
    specs["model.embed_tokens.weight"] = (torch.bfloat16, vocab, lambda: rnd.normal(vocab, 0.02, torch.bfloat16))
    for i in range(d.layers):
        for suffix, out, inp in linears(d):
            specs.update(module_tensors(fmt, f"model.layers.{i}.{suffix}", out, inp, rnd))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[f"model.layers.{i}.{norm}.weight"] = (torch.bfloat16, (d.hidden,), lambda: rnd.uniform((d.hidden,), 0.5, 1.5, torch.bfloat16))
    specs["model.norm.weight"] = (torch.bfloat16, (d.hidden,), lambda: rnd.uniform((d.hidden,), 0.5, 1.5, torch.bfloat16))
    specs["lm_head.weight"] = (torch.bfloat16, vocab, lambda: rnd.normal(vocab, 0.02, torch.bfloat16))
    return specs


def nbytes(spec: Spec) -> int:
    dtype, shape, _ = spec
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def split_shards(specs: dict[str, Spec], max_bytes: int) -> list[list[str]]:
    """huggingface_hub's split_torch_state_dict_into_shards: greedy in order, an oversized tensor alone."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, spec in specs.items():
        n = nbytes(spec)
        if n > max_bytes:
            shards.append([name])
            continue
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    return [*shards, current] if current else shards


def configs(fmt: str, d: Dims) -> tuple[dict, dict, dict]:
    """config.json, hf_quant_config.json, generation_config.json."""
    algo = {"int4_awq": "W4A16_AWQ", "nvfp4": "NVFP4", "fp8": "FP8"}[fmt]
    extra = {
        "int4_awq": {"group_size": 128, "has_zero_point": False, "pre_quant_scale": True},
        "nvfp4": {"group_size": 16},
        "fp8": {},
    }[fmt]
    hf_quant = {"producer": PRODUCER, "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, **extra, "exclude_modules": IGNORE}}
    quant: dict = {}
    if fmt != "int4_awq":  # ModelOpt writes config_groups for FP8 and NVFP4, not for W4A16_AWQ
        bits = {"dynamic": False, "num_bits": 4 if fmt == "nvfp4" else 8, "type": "float"} | ({"group_size": 16} if fmt == "nvfp4" else {})
        quant["config_groups"] = {"group_0": {"input_activations": dict(bits), "weights": dict(bits), "targets": ["Linear"]}}
    quant |= {"ignore": IGNORE, "quant_algo": algo, "producer": PRODUCER, "quant_method": "modelopt"}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": d.bos,
        "dtype": "bfloat16",
        "eos_token_id": d.eos,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "initializer_range": 0.02,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": d.max_positions,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": d.rms_norm_eps,
        "rope_parameters": {"rope_theta": d.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": False,
        "transformers_version": "5.14.1",
        "use_cache": True,
        "vocab_size": d.vocab,
        "quantization_config": quant,
    }
    generation = {
        "_from_model_config": True,
        "bos_token_id": d.bos,
        "eos_token_id": d.eos,
        "output_attentions": False,
        "output_hidden_states": False,
        "transformers_version": "5.14.1",
        "use_cache": True,
    }
    return config, hf_quant, generation


def write_checkpoint(fmt: str, out: Path, dims: Dims = LLAMA3_8B, shard_bytes: int = 5 * GB, seed: int = 0, device: str | None = None) -> int:
    """Write the checkpoint; returns its tensor bytes."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rnd = Random(dev, seed)
    out.mkdir(parents=True, exist_ok=True)
    config, hf_quant, generation = configs(fmt, dims)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=4))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    specs = state_dict_specs(fmt, dims, rnd)
    shards = split_shards(specs, shard_bytes)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: specs[n][2]() for n in names}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(nbytes(s) for s in specs.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, help=f"decoder layers (default {LLAMA3_8B.layers})")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size (default {LLAMA3_8B.vocab})")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="where random data is made (default: cuda when available)")
    args = parser.parse_args()
    dims = replace(LLAMA3_8B, layers=args.layers or LLAMA3_8B.layers, vocab=args.vocab or LLAMA3_8B.vocab)
    total = write_checkpoint(args.format, args.out, dims, int(args.shard_gb * GB), args.seed, args.device)
    print(f"{args.out}: {args.format}, {total / 1e9:.2f} GB of tensors")


if __name__ == "__main__":
    main()
