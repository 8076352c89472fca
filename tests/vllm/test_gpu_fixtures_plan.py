"""benchmarks/gpu_fixtures.py's plan of GPU runs (what engines a GPU session starts, and with which
options), checked here because CI has no GPU and a wrong plan costs a lease: an FP8 MoE model gets
vLLM's Triton MoE backend whatever its config calls the expert count (DeepSeek's n_routed_experts
was missed once, and vLLM compiled FlashInfer's MoE for minutes), INT4 MoE fixtures get the
emulation-backend run beside the default, every MoE fixture its dense twin, and native twins only
where vLLM loads the algo itself."""

from __future__ import annotations

import sys
from pathlib import Path

from reference import FIXTURES

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_fixtures  # noqa: E402


def planned(names: list[str]) -> dict[str, dict]:
    return {run.name: run.llm for run in gpu_fixtures.plan_runs(FIXTURES, names, timeout_s=300, probe_s=100, tp2=[])}


def test_fp8_moe_runs_on_the_triton_backend_whatever_the_config_calls_its_experts() -> None:
    runs = planned(["deepseek_v3_fp8", "qwen3moe_fp8"])  # n_routed_experts, num_experts
    for name in ("deepseek_v3_fp8", "qwen3moe_fp8"):
        assert runs[f"{name}-all-triton-moe"] == {"moe_backend": "triton"}
        assert runs[f"{name}-off-triton-moe"] == {"moe_backend": "triton"}  # vLLM loads FP8 natively
        assert f"{name}-all-default-moe" in runs  # the default backend only as a probe
        assert runs[f"{name}-off-dense"] == {"moe_backend": "triton"}


def test_int4_moe_runs_vllms_default_and_its_emulation_and_a_dense_twin() -> None:
    runs = planned(["qwen3moe_int4_awq", "int4_awq"])
    assert runs["qwen3moe_int4_awq-all"] == {}  # vLLM refuses the Triton backend for WNA16 MoE
    assert runs["qwen3moe_int4_awq-all-emulation-moe"] == {"moe_backend": "emulation"}
    assert "qwen3moe_int4_awq-off-dense" in runs
    assert "qwen3moe_int4_awq-off" not in runs  # no native path for INT4 AWQ
    assert set(runs) == {"qwen3moe_int4_awq-all", "qwen3moe_int4_awq-all-emulation-moe", "qwen3moe_int4_awq-off-dense", "int4_awq-all", "int4_awq-all-vllm-reader"}


def test_dense_twin_is_served_from_a_plain_bf16_copy(tmp_path: Path, monkeypatch) -> None:
    """start() serves a dense run from modelopt_reference.dense_twin's copy, not the ModelOpt checkpoint."""
    seen = {}
    monkeypatch.setattr(gpu_fixtures.subprocess, "Popen", lambda *a, **k: seen.setdefault("popen", (a, k)))
    run = next(r for r in gpu_fixtures.plan_runs(FIXTURES, ["qwen3moe_int4_awq"], 300, 100, []) if r.tag == gpu_fixtures.DENSE)
    gpu_fixtures.start(run, FIXTURES / run.fixture, tmp_path)
    request = (tmp_path / f"{run.name}.request.json").read_text()
    dense = tmp_path / gpu_fixtures.DENSE / run.fixture
    assert f'"model": "{dense}"' in request
    assert not (dense / "hf_quant_config.json").exists() and (dense / "model.safetensors").exists()
