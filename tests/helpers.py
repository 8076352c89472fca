"""Building variants of the bundled fixtures in a temporary directory."""

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
