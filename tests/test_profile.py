"""Load profiles: `lazyxform profile` and `maybe_profile` write a table, JSON, a Chrome trace and a
PNG; stages and bytes add up; profiling changes no output. (CPU here; timings are not tested.)"""

from __future__ import annotations

import json
import os

import pytest
from helpers import same_bits
from reference import FIXTURES, load_tensors

import lazyxform
from lazyxform import profile
from lazyxform.cli import main
from lazyxform.profile import Span, summarize


def test_cli_profile_writes_table_json_trace_and_png(tmp_path, capsys):
    assert main(["profile", str(FIXTURES / "int4_awq"), "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "transform: weight uint8 [out/2, in]" in out.out and "peak host RSS" in out.out
    assert out.err.rstrip().split("\r")[-1].startswith("lazyxform [" + "#" * 30 + "]")  # progress bar, at 100%
    report = json.loads((tmp_path / "profile.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    total = sum(f.stat().st_size for f in (FIXTURES / "int4_awq").glob("*.safetensors"))
    assert stages["read"]["nbytes"] == report["input_bytes"] and 0 < report["input_bytes"] < total
    assert {"consumer", "source: next input"} <= stages.keys() and any(n.startswith("transform: ") for n in stages)
    trace = json.loads((tmp_path / "profile.trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["name"] for e in trace["traceEvents"] if e["ph"] == "M"} == {"thread_name", "process_name"}
    assert any(e["ph"] == "C" for e in trace["traceEvents"])  # memory counters
    assert (tmp_path / "profile.txt").read_text().startswith("stage")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maybe_profile_is_a_no_op_without_the_variable(monkeypatch):
    monkeypatch.delenv(profile.ENV, raising=False)
    ck = lazyxform.open(FIXTURES / "fp8", device="cpu")
    pairs = iter([])
    assert profile.maybe_profile(pairs, ck.device, ck.nbytes, ck.path.name) is pairs


def test_maybe_profile_writes_a_profile_per_process_and_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(profile.ENV, str(tmp_path))
    ck = lazyxform.open(FIXTURES / "nvfp4", device="cpu")
    profiled = dict(profile.maybe_profile(ck.wrap(load_tensors(ck.path).items()), ck.device, ck.nbytes, ck.path.name))
    plain = dict(ck.wrap(load_tensors(ck.path).items()))
    assert profiled.keys() == plain.keys()
    assert all(same_bits(profiled[n], plain[n]) for n in plain)
    stem = f"lazyxform-profile-{os.getpid()}"
    assert {p.name for p in tmp_path.iterdir()} >= {f"{stem}.txt", f"{stem}.json", f"{stem}.trace.json"}
    stages = {s["name"] for s in json.loads((tmp_path / f"{stem}.json").read_text())["stages"]}
    assert "read" not in stages and "source: next input" in stages  # wrap: the engine reads


def test_stage_times_count_overlaps_once():
    spans = [Span("read", "a", 0.0, 2.0, 10), Span("read", "b", 1.0, 3.0, 10), Span("read", "a", 5.0, 6.0, 5), Span("consumer", "m", 0.0, 1.0, 0)]
    read = next(s for s in summarize(spans) if s.name == "read")
    assert (read.calls, read.nbytes, read.active_s, read.busy_s) == (3, 25, 4.0, 5.0)
    assert read.gbps == 25 / 4.0 / 1e9


def test_rule_stages_fold_layer_numbers():
    assert profile.rule_stage(["bias x model.layers.3.mlp.up_proj.weight", "b"]) == "transform: bias x model.layers.*.mlp.up_proj.weight + b"
