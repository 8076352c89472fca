"""README's first command, `bash scripts/demo.sh`, after its set-up (scripts/setup.sh, which made this
interpreter's environment): its three steps on the bundled INT4 AWQ fixture, each a process started as
the script starts it, so that the command a newcomer runs first keeps working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "tests" / "fixtures" / "modelopt" / "int4_awq"  # the script's default


def step(*command: str) -> str:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_demo_inspects_streams_checks_and_serves() -> None:
    plan = step(str(Path(sys.executable).parent / "lazyxform"), "inspect", str(CKPT))
    assert "14 quantized modules" in plan and "pack-quantized: W int4 group g128" in plan
    streamed = step(sys.executable, "scripts/demo_stream.py", str(CKPT))
    diff = re.search(r"max relative diff (\S+) ", streamed)
    assert diff, streamed
    assert float(diff.group(1)) <= 2**-7  # compressed-tensors' decompressor = ModelOpt's formula, up to bf16 scales
    served = step(sys.executable, "scripts/demo_vllm.py", str(CKPT))
    assert "with quantization='lazyxform'" in served and "generated text" in served, served
