"""Building variants of the bundled fixtures in a temporary directory; comparing tensors bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from reference import FIXTURES, load_tensors
from safetensors.torch import save_file


def copy_fixture(name: str, dst: Path) -> Path:
    out = dst / name
    shutil.copytree(FIXTURES / name, out)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def rewrite_tensors(ckpt: Path, edit) -> None:
    """Apply edit(dict) to the checkpoint's tensors and save them back."""
    tensors = load_tensors(ckpt)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


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
