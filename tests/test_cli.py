from __future__ import annotations

import json
import subprocess
import sys

from reference import FIXTURES


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
