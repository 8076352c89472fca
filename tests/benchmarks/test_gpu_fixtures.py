"""benchmarks/gpu_fixtures.py's CPU half: which runs a GPU lease serves, with which options, and which
run each is compared with bit for bit. Checked here because CI has no GPU and a wrong plan costs a
lease: an FP8 MoE model gets vLLM's Triton MoE backend whatever its config calls the expert count
(DeepSeek's n_routed_experts was missed once, and vLLM compiled FlashInfer's MoE for minutes); a run
paired with itself, or with the wrong path's run, would report "identical" for nothing; a missing twin
would leave a claim unchecked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_fixtures as harness  # noqa: E402

NAMES = ["deepseek_v3_nvfp4", "fp8", "fp8_kv_fp8", "int4_awq", "int8_sq", "nvfp4", "qwen3moe_fp8"]


def planned(probe_s: float = 0.0) -> dict[str, harness.Run]:
    return {r.name: r for r in harness.plan_runs(harness.FIXTURES, NAMES, 300.0, probe_s, [])}


def test_fp8_moe_runs_on_the_triton_backend_whatever_the_config_calls_its_experts() -> None:
    runs = {r.name: r.llm for r in harness.plan_runs(harness.FIXTURES, ["deepseek_v3_fp8", "qwen3moe_fp8"], 300.0, 100.0, [])}
    for name in ("deepseek_v3_fp8", "qwen3moe_fp8"):  # n_routed_experts, num_experts
        assert runs[f"{name}-all-triton-moe"] == harness.MOE_TRITON
        assert runs[f"{name}-off-triton-moe"] == harness.MOE_TRITON  # vLLM loads FP8 natively
        assert f"{name}-all-default-moe" in runs  # the default backend only as a probe
        assert runs[f"{name}-off-dense"] == harness.MOE_TRITON


def test_int4_moe_runs_vllms_default_and_its_emulation_and_a_dense_twin() -> None:
    runs = {r.name: r.llm for r in harness.plan_runs(harness.FIXTURES, ["qwen3moe_int4_awq"], 300.0, 100.0, [])}
    assert runs == {
        "qwen3moe_int4_awq-all": {},  # vLLM refuses the Triton backend for WNA16 MoE; no native path for INT4 AWQ
        "qwen3moe_int4_awq-all-emulation-moe": harness.EMULATED_MOE,
        "qwen3moe_int4_awq-off-dense": harness.MOE_TRITON,
    }


def test_dense_twin_is_served_from_a_plain_bf16_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start() serves a dense run from modelopt_reference.dense_twin's copy, not the ModelOpt checkpoint."""
    monkeypatch.setattr(harness.subprocess, "Popen", lambda *a, **k: None)
    run = next(r for r in harness.plan_runs(harness.FIXTURES, ["qwen3moe_int4_awq"], 300.0, 0.0, []) if r.tag == harness.DENSE)
    harness.start(run, harness.FIXTURES, tmp_path)
    request = json.loads((tmp_path / f"{run.name}.request.json").read_text())
    dense = tmp_path / harness.DENSE / run.fixture
    assert request["model"] == str(dense) and not request["serve"]
    assert not (dense / "hf_quant_config.json").exists() and (dense / "model.safetensors").exists()


def test_runs_of_each_kind_where_they_belong() -> None:
    runs = planned()
    # vLLM loads FP8 and NVFP4 itself: both routes; INT4 and INT8 only through lazyxform
    assert {"fp8-all", "fp8-off", "nvfp4-all", "nvfp4-off", "int4_awq-all", "int8_sq-all"} <= set(runs)
    assert "int4_awq-off" not in runs and "int8_sq-off" not in runs
    # bf16-exact k/v scales: the FP8-KV fixtures vLLM loads natively, on both routes
    kv = {n for n, r in runs.items() if r.tag == harness.KV_BF16}
    assert kv == {f"{f}-{route}-{harness.KV_BF16}" for f in ("fp8_kv_fp8", "qwen3moe_fp8") for route in ("all", "off")}
    # `vllm serve` as typed: no route set, the MoE backend of the fixture's main runs
    served = {n: r for n, r in runs.items() if r.tag == harness.SERVED}
    assert set(served) == {f"{f}-auto-{harness.SERVED}" for f in ("fp8", "int4_awq", "int8_sq", "nvfp4", "qwen3moe_fp8")}
    assert served[f"qwen3moe_fp8-auto-{harness.SERVED}"].llm == harness.MOE_TRITON
    # the multi-thread loader, the dense twins of MoE fixtures, no probes when their timeout is 0
    assert {n for n, r in runs.items() if r.tag == "multithread-load"} == {"int4_awq-all-multithread-load", "nvfp4-all-multithread-load"}
    assert {n for n, r in runs.items() if r.tag == harness.DENSE} == {"deepseek_v3_nvfp4-off-dense", "qwen3moe_fp8-off-dense"}
    assert not any(r.tag == "default-moe" for r in runs.values())
    assert {n for n, r in planned(100.0).items() if r.tag == "default-moe"} == {"qwen3moe_fp8-off-default-moe", "qwen3moe_fp8-all-default-moe"}


def test_every_twin_is_another_planned_run_of_the_same_fixture() -> None:
    runs = planned()
    names = set(runs)
    for name, run in runs.items():
        quantization = "lazyxform" if run.fixture in ("int4_awq", "int8_sq") else "modelopt"
        twin = harness.twin_of({"name": name, "route": run.route, "tag": run.tag, "fixture": run.fixture, "quantization": quantization}, names)
        if not twin:  # lazyxform's own runs, and vLLM alone on a dense twin
            assert (run.route == "all" and run.tag in ("", "triton-moe", harness.KV_BF16)) or run.tag == harness.DENSE, name
            continue
        assert twin in names and twin != name, (name, twin)
        assert runs[twin].fixture == run.fixture, (name, twin)
        assert runs[twin].route == "all" or run.tag == harness.SERVED, (name, twin)
        if run.route == "off":  # vLLM's own path against lazyxform's on the same checkpoint and options
            assert (runs[twin].tag, runs[twin].llm) == (run.tag, run.llm), (name, twin)


def test_a_served_run_is_compared_with_the_path_the_plugin_took() -> None:
    names = set(planned())
    row = {"name": "fp8-auto-vllm-serve", "route": "auto", "tag": harness.SERVED, "fixture": "fp8"}
    assert harness.twin_of({**row, "quantization": "modelopt"}, names) == "fp8-off"
    assert harness.twin_of({**row, "quantization": "lazyxform"}, names) == "fp8-all"
    moe = {"name": "qwen3moe_fp8-auto-vllm-serve", "route": "auto", "tag": harness.SERVED, "fixture": "qwen3moe_fp8"}
    assert harness.twin_of({**moe, "quantization": "modelopt"}, names) == "qwen3moe_fp8-off-triton-moe"


def test_kv_scales_bf16_rounds_only_the_kv_scales(tmp_path: Path) -> None:
    src = harness.FIXTURES / "fp8_kv_fp8"
    dst = harness.kv_scales_bf16(src, tmp_path / "copy")
    assert {f.name for f in dst.iterdir()} == {f.name for f in src.iterdir()}
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(dst / "model.safetensors", "pt") as b:
        assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
        changed = 0
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if k.endswith((".k_scale", ".v_scale")):
                assert torch.equal(y, x.to(torch.bfloat16).to(x.dtype)), k
                changed += not torch.equal(x, y)
            else:
                assert torch.equal(x, y), k
    assert changed > 0  # the fixture's scales are not bf16 numbers: the copy is another checkpoint


def test_a_derived_checkpoint_is_made_once_and_whole(tmp_path: Path) -> None:
    kv = harness.Run("fp8_kv_fp8", "off", harness.KV_BF16)
    copy = tmp_path / harness.KV_BF16 / "fp8_kv_fp8"
    (copy.parent / "fp8_kv_fp8.partial").mkdir(parents=True)  # what a killed harness leaves
    assert harness.served_checkpoint(kv, harness.FIXTURES, tmp_path) == copy
    made = (copy / "model.safetensors").stat().st_mtime_ns
    # the other route's run, and compare's reference, take the same copy
    assert harness.reference_checkpoint(harness.Run("fp8_kv_fp8", "all", harness.KV_BF16), harness.FIXTURES, tmp_path) == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == made
    assert not (copy.parent / "fp8_kv_fp8.partial").exists()
    assert harness.served_checkpoint(harness.Run("fp8_kv_fp8", "off"), harness.FIXTURES, tmp_path) == harness.FIXTURES / "fp8_kv_fp8"
    # a dense twin serves another checkpoint but encodes its fixture's function
    dense = harness.Run("qwen3moe_fp8", "off", harness.DENSE)
    assert harness.reference_checkpoint(dense, harness.FIXTURES, tmp_path) == harness.FIXTURES / "qwen3moe_fp8"


def test_a_served_run_without_a_named_path_has_no_twin() -> None:
    row = {"name": "fp8-auto-vllm-serve", "route": "auto", "tag": harness.SERVED, "fixture": "fp8", "quantization": None}
    assert harness.twin_of(row, set(planned())) == ""


def test_llm_arguments_become_vllm_serve_flags() -> None:
    args = {"enforce_eager": True, "max_logprobs": -1, "moe_backend": "triton", **harness.MULTITHREAD}
    flags = harness.cli_flags(args)
    assert flags[:5] == ["--enforce-eager", "--max-logprobs", "-1", "--moe-backend", "triton"]
    assert flags[5] == "--model-loader-extra-config" and json.loads(flags[6]) == harness.MULTITHREAD["model_loader_extra_config"]
    for unwritten in ({"enforce_eager": False}, {"cudagraph_capture_sizes": [1, 32]}):
        with pytest.raises(ValueError, match="no `vllm serve` flag"):
            harness.cli_flags(unwritten)


def test_a_served_run_asks_its_worker_for_vllm_serve_with_no_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.subprocess, "Popen", lambda *a, **k: None)
    run = planned()[f"int4_awq-auto-{harness.SERVED}"]
    harness.start(run, harness.FIXTURES, tmp_path)
    request = json.loads((tmp_path / f"{run.name}.request.json").read_text())
    assert request["serve"] and request["route"] == "auto" and request["env"] == {}
    assert request["model"] == str(harness.FIXTURES / "int4_awq") and request["log"] == str(tmp_path / f"{run.name}.log")
