"""lazyxform/routing.py: the policy both engine plugins route by (their own suites check that they
call it: tests/vllm/test_vllm_config.py, tests/sglang/test_sglang_config.py)."""

from __future__ import annotations

import json
import logging

import pytest
from helpers import copy_fixture
from reference import FIXTURES

import lazyxform
from lazyxform.routing import route, served_algos, serves

ENGINE_LOG = logging.getLogger("engine")


def test_route_reads_its_switch(monkeypatch) -> None:
    monkeypatch.delenv("SWITCH", raising=False)
    assert route("SWITCH") == "auto"
    monkeypatch.setenv("SWITCH", " ALL ")
    assert route("SWITCH") == "all"
    monkeypatch.setenv("SWITCH", "sometimes")
    with pytest.raises(ValueError, match=r"SWITCH='sometimes': expected one of auto, all, off"):
        route("SWITCH")


def test_serves() -> None:
    native = frozenset({"FP8"})
    assert not serves({"FP8"}, "auto", False, native)
    assert serves({"FP8", "W4A16_AWQ"}, "auto", False, native)  # a mixed checkpoint with one foreign algo
    assert serves({"FP8"}, "auto", True, native)  # on a CPU, everything
    assert serves({"FP8"}, "all", False, native)
    assert not serves({"W4A16_AWQ"}, "off", True, native)


def test_served_algos_logs_on_the_engines_logger(caplog) -> None:
    int4 = FIXTURES / "int4_awq"
    with caplog.at_level(logging.INFO, logger="engine"):
        assert served_algos(int4, "auto", False, frozenset({"FP8"}), ENGINE_LOG, "Engine") == {"W4A16_AWQ"}
        assert served_algos(int4, "auto", False, frozenset({"W4A16_AWQ"}), ENGINE_LOG, "Engine") is None
    assert [r.name for r in caplog.records] == ["engine"]
    assert f"lazyxform serves {int4} (ModelOpt W4A16_AWQ) through compressed-tensors" in caplog.text


def test_an_unreadable_config_is_left_to_the_engine_unless_routing_is_all(tmp_path, caplog) -> None:
    ckpt = copy_fixture("int4_awq", tmp_path)
    nested = json.loads((ckpt / "hf_quant_config.json").read_text())
    del nested["quantization"]
    (ckpt / "hf_quant_config.json").write_text(json.dumps(nested))
    with caplog.at_level(logging.WARNING, logger="engine"):
        assert served_algos(ckpt, "auto", True, frozenset(), ENGINE_LOG, "Engine") is None
    assert f"lazyxform cannot read the ModelOpt config of {ckpt}, leaving it to Engine: " in caplog.text
    assert "missing the 'quantization' object" in caplog.text
    with pytest.raises(lazyxform.ConfigError, match=r"hf_quant_config\.json: missing the 'quantization' object"):
        served_algos(ckpt, "all", True, frozenset(), ENGINE_LOG, "Engine")
