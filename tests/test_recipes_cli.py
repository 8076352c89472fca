"""`lazyxform inspect` on every bundled fixture explains every module and every quantized tensor."""

from __future__ import annotations

import json
import warnings

import pytest
from reference import FIXTURES, load_tensors, quantized_modules

import lazyxform
from lazyxform.cli import main, module_pattern

ALL_FIXTURES = sorted(p.name for p in FIXTURES.iterdir())


def inspect(capsys, *args: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
        assert main(["inspect", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_inspect_explains_every_module_and_tensor(capsys, fixture):
    path = FIXTURES / fixture
    data = json.loads(inspect(capsys, "--json", str(path)))
    plan, orig = data["plan"], load_tensors(path)
    assert sorted(m["name"] for m in plan["modules"]) == quantized_modules(orig)
    for m in plan["modules"]:
        assert m["algo"] and m["scheme"] and m["target"] and m["outputs"], m
        assert set(m["inputs"]) == {k[len(m["name"]) + 1:] for k in orig if k.startswith(m["name"] + ".") and not k.endswith(("k_scale", "v_scale"))}
    # Whatever passes through untouched is a plain model-dtype tensor, never a quantized one.
    assert all(str(orig[n].dtype) == "torch.bfloat16" for n in plan["passthrough"]), fixture
    assert all(g["rules"] for g in plan["groups"])

    table = inspect(capsys, str(path))
    rows = [line.split()[0] for line in table.splitlines()[2:] if line.startswith("model.")]
    assert set(rows) == {module_pattern(m["name"]) for m in plan["modules"]}
    assert f"{len(plan['modules'])} quantized modules" in table
