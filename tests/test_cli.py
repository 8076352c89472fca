"""lazyxform/cli.py: `lazyxform inspect` (table and JSON, on every bundled fixture: every module
and every quantized tensor explained), `--help` / `--version` start-up, exit codes, the lazy
package surface, Plan's repr. `lazyxform profile`: test_profile.py."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import warnings

import pytest
from algos import FIXTURE_TABLE, SERVED
from reference import FIXTURES, load_tensors, quantized_modules

import lazyxform
from lazyxform.cli import main, module_pattern


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazyxform.cli", *args], capture_output=True, text=True, timeout=120)


def test_inspect_prints_one_row_per_module_pattern():
    res = run("inspect", str(FIXTURES / "int8_sq"))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["module", "algo", "target", "scheme"]
    rows = [line for line in lines if line.startswith("model.layers.*")]
    assert len(rows) == 7 and all("W8A8_SQ_PER_CHANNEL" in r and "(x2)" in r for r in rows)
    assert "pre_quant_scale folded into model.layers.*.input_layernorm.weight" in res.stdout
    assert "pre_quant_scale applied at run time for: model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj" in res.stdout


def test_inspect_json_carries_plan_and_config():
    res = run("inspect", "--json", str(FIXTURES / "fp8_kv_fp8"))
    data = json.loads(res.stdout)
    assert data["quantization_config"]["kv_cache_scheme"]["strategy"] == "tensor"
    assert len(data["plan"]["modules"]) == 14


def test_inspect_reports_a_typed_error_and_exit_code(tmp_path):
    res = run("inspect", str(tmp_path))
    assert res.returncode == 2
    assert "NotAModelOptCheckpoint" in res.stderr


# Start-up: `--help` and `--version` must not load the heavy dependencies. Checked through
# sys.modules in a fresh interpreter, not by timing.
HEAVY = ("torch", "compressed_tensors", "transformers", "triton", "matplotlib", "numpy", "safetensors")
LOADED_AFTER = """
import sys
from lazyxform.cli import main
try:
    main([{arg!r}])
except SystemExit as e:
    assert e.code == 0, e.code
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r})))
"""


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version_load_neither_torch_nor_compressed_tensors(arg):
    res = subprocess.run([sys.executable, "-c", LOADED_AFTER.format(arg=arg, heavy=HEAVY)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "[]", res.stdout


def test_help_exits_0_and_names_the_commands():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: lazyxform")
    assert "inspect" in res.stdout and "profile" in res.stdout and "--version" in res.stdout


def test_version_prints_the_package_version():
    res = run("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"lazyxform {importlib.metadata.version('lazyxform')}"
    assert lazyxform.__version__ == importlib.metadata.version("lazyxform")


def test_inspect_of_a_missing_path_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    res = run("inspect", str(missing))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == [f"lazyxform: CheckpointNotFoundError: {missing}: path does not exist"]


def test_open_of_a_missing_path_raises_the_typed_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(lazyxform.CheckpointNotFoundError, match="does not exist") as info:
        lazyxform.open(missing)
    assert str(missing) in str(info.value)
    # Still what a missing path was reported as before it had its own class.
    assert isinstance(info.value, lazyxform.NotAModelOptCheckpoint) and isinstance(info.value, lazyxform.LazyxformError)


def test_public_api_resolves_through_the_lazy_package():
    code = (
        "import lazyxform\n"
        "assert 'torch' not in __import__('sys').modules\n"
        "names = [lazyxform.open, lazyxform.Checkpoint, lazyxform.is_modelopt_checkpoint, lazyxform.read_modelopt_config,"
        " lazyxform.read_modelopt_algos, lazyxform.CheckpointNotFoundError, lazyxform.profile.maybe_profile]\n"
        "from lazyxform import *\n"
        "assert set(lazyxform.__all__) <= set(dir(lazyxform))\n"
        "assert not hasattr(lazyxform, 'no_such_name')\n"
        f"print(sorted(lazyxform.read_modelopt_algos({str(FIXTURES / 'int8_sq')!r})))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "['W8A8_SQ_PER_CHANNEL']"


@pytest.mark.parametrize("fixture", SERVED)
def test_plan_repr_is_a_short_summary(fixture):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
        plan = lazyxform.open(FIXTURES / fixture, device="cpu").plan
    text = repr(plan)
    lines = text.splitlines()
    assert len(lines) <= 40 and max(map(len, lines)) <= 400, text
    assert f"{len(plan.modules)} quantized module" in lines[0]
    assert f"{len(plan.groups)} tensor group" in lines[0]
    assert plan.modules[0].name in text
    if len(plan.modules) > 5:
        assert f"... and {len(plan.modules) - 5} more modules" in text
    assert all(len(repr(g)) < 2000 and "function" not in repr(g) for g in plan.groups)


def test_inspect_table_does_not_load_compressed_tensors():
    code = (
        "import io, sys, contextlib\n"
        "from lazyxform.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['inspect', {str(FIXTURES / 'qwen3moe_fp8')!r}]) == 0\n"
        "print('compressed_tensors' in sys.modules, 'transformers' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "False False"


def inspect(capsys, *args: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
        assert main(["inspect", *args]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("fixture", SERVED)
def test_inspect_explains_every_module_and_tensor(capsys, fixture):
    path = FIXTURES / fixture
    data = json.loads(inspect(capsys, "--json", str(path)))
    plan, orig = data["plan"], load_tensors(path)
    assert sorted(m["name"] for m in plan["modules"]) == quantized_modules(orig)
    for m in plan["modules"]:
        assert m["algo"] == FIXTURE_TABLE[fixture].algo and m["scheme"] and m["target"] and m["outputs"], m
        assert set(m["inputs"]) == {k[len(m["name"]) + 1:] for k in orig if k.startswith(m["name"] + ".") and not k.endswith(("k_scale", "v_scale"))}
    # Whatever passes through untouched is a plain model-dtype tensor, never a quantized one.
    assert all(str(orig[n].dtype) == "torch.bfloat16" for n in plan["passthrough"]), fixture
    assert all(g["rules"] for g in plan["groups"])

    table = inspect(capsys, str(path))
    rows = [line.split()[0] for line in table.split("\n\n")[0].splitlines()[2:]]  # the table ends at a blank line
    assert set(rows) == {module_pattern(m["name"]) for m in plan["modules"]}
    assert f"{len(plan['modules'])} quantized modules" in table
