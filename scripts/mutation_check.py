"""Plant realistic one-line bugs in the recipes and the planning around them, and report which test
catches each: a bug no test catches is a test to write. Not run in CI (one suite run per bug).

    .venv/bin/python scripts/mutation_check.py            # every bug; the core suite (no vLLM)
    .venv/bin/python scripts/mutation_check.py --only int4 --tests tests/recipes

Each bug is applied to a copy of the repository in a temporary directory, which is then tested with
`pytest -x` (stop at the first failure: the catching test). The working tree is never modified.
Exit status 1 when a bug survives.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("lazyxform", "tests", "integrations", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Bug:
    name: str
    file: str
    old: str
    new: str


BUGS = (
    # recipes/base.py: what every recipe shares
    Bug("base: fused input scales merged with min, not max", "lazyxform/recipes/base.py", "merged = values.amax().reshape(1)", "merged = values.amin().reshape(1)"),
    Bug("base: a zero scale is accepted", "lazyxform/checks.py", "return (lo > 0) & (hi < torch.inf)", "return (lo >= 0) & (hi < torch.inf)"),
    Bug("base: row factor divides instead of multiplying", "lazyxform/recipes/base.py", "return (scale.float() * factor).to(scale.dtype)", "return (scale.float() / factor).to(scale.dtype)"),
    # fp8.py
    Bug("fp8: block scales laid out transposed", "lazyxform/recipes/fp8.py", "lambda s: s.reshape(ob, ib),", "lambda s: s.reshape(ib, ob).T,"),
    Bug("fp8: per-tensor activations declared dynamic", "lazyxform/recipes/fp8.py", 'return Target(fp8_args("tensor", False), fp8_args("tensor", False), "float-quantized")', 'return Target(fp8_args("tensor", False), fp8_args("tensor", True), "float-quantized")'),
    # int8.py
    Bug("int8: W8A16 weight_scale kept in fp32, not the model dtype", "lazyxform/recipes/int8.py", "per_row_scale(m, out, row_factor, m.model_dtype),", "per_row_scale(m, out, row_factor, torch.float32),"),
    Bug("int8: SmoothQuant row fold dropped", "lazyxform/recipes/int8.py", "return [passthrough(m.key(\"weight\")), per_row_scale(m, out, row_factor, torch.float32)]", "return [passthrough(m.key(\"weight\")), per_row_scale(m, out, None, torch.float32)]"),
    # int4.py and its kernel
    Bug("int4: default group size 64", "lazyxform/recipes/int4.py", "DEFAULT_GROUP = 128", "DEFAULT_GROUP = 64"),
    Bug("int4: nibble sign decoded as unsigned", "lazyxform/ops/int4.py", "rows = torch.stack(((low ^ 8) - 8, (high ^ 8) - 8), dim=-2)", "rows = torch.stack((low - 8, high - 8), dim=-2)"),
    Bug("int4: W4A8 activations static", "lazyxform/recipes/int4.py", 'return Target(int4_group_weights(cfg), fp8_args("token", True), "pack-quantized")', 'return Target(int4_group_weights(cfg), fp8_args("token", False), "pack-quantized")'),
    # fp4.py and its ops
    Bug("fp4: global scale not inverted", "lazyxform/ops/fp4.py", "return torch.reciprocal(scale.float()).reshape(1)", "return scale.float().reshape(1)"),
    Bug("fp4: W4A8_NVFP4_FP8 blocks taken as 16 columns", "lazyxform/recipes/fp4.py", "    default_block = 32", "    default_block = 16"),
    Bug("fp4: SVD low-rank branch dropped", "lazyxform/recipes/fp4.py", "effective = residual + t[lora_b].double() @ t[lora_a].double()", "effective = residual"),
    # mx.py
    Bug("mx: E8M0 NaN not recognised", "lazyxform/recipes/mx.py", "E8M0_NAN = 255", "E8M0_NAN = 254"),
    Bug("mx: W4A8 MXFP4 activations as MXFP4", "lazyxform/recipes/mx.py", 'return Target(PRESETS["MXFP4", "weights"], fp8_args("token", True), "mxfp4-pack-quantized")', 'return Target(PRESETS["MXFP4", "weights"], PRESETS["MXFP4", "input_activations"], "mxfp4-pack-quantized")'),
    # kv.py
    Bug("kv: v scales not recognised", "lazyxform/recipes/kv.py", r'KV_SCALE = re.compile(r"^(?P<attn>.+?)\.(?:[kv]_proj\.)?(?P<kind>[kv])_scale$")', r'KV_SCALE = re.compile(r"^(?P<attn>.+?)\.(?:[kv]_proj\.)?(?P<kind>[k])_scale$")'),
    # prequant.py and topology.py
    Bug("prequant: norm fold divides", "lazyxform/prequant.py", "return {norm_w: (g.float() * shared.float()).to(g.dtype)}", "return {norm_w: (g.float() / shared.float()).to(g.dtype)}"),
    Bug("prequant: o_proj folds into v_proj over a quantized KV cache", "lazyxform/prequant.py", "if leaf not in topology.row_producers or (leaf in topology.through_attention and kv_algo is not None):", "if leaf not in topology.row_producers:"),
    Bug("prequant: bias of a row-scaled producer not scaled", "lazyxform/prequant.py", "return {bias: row_scaled(t[bias], t[factor.name], factor.first_row)}", "return {bias: t[bias]}"),
    Bug("prequant: a stored-fused producer's factor on its first rows", "lazyxform/recipes/base.py", "torch.cat([factor.new_ones(first_row), factor])", "torch.cat([factor, factor.new_ones(first_row)])"),
    Bug("prequant: ModelOpt's defective norm fold not warned about", "lazyxform/prequant.py", "if not stripped or not any(name in with_pqs for name in awq):", "if True:"),
    Bug("topology: a router does not stop the MLP norm fold", "lazyxform/prequant.py", "if parent == \"mlp\" and _mlp_has_other_consumers(layer, tensors, topology.mlp_leaves):", "if False:"),
)


def copy_repository(dst: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def plant(root: Path, bug: Bug) -> None:
    path = root / bug.file
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.name}: {bug.file} holds {text.count(bug.old)} copies of the line to change (expected 1); update BUGS")
    path.write_text(text.replace(bug.old, bug.new))


def catching_test(root: Path, tests: list[str]) -> tuple[str | None, float]:
    """The first failing test id with the bug planted, or None when the suite passes."""
    env = {"PYTHONPATH": f"{root}:{root / 'integrations' / 'vllm'}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [line.split()[1] for line in run.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return (failed[0] if failed else None if run.returncode == 0 else f"pytest exit {run.returncode}"), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the bugs whose name contains this text")
    parser.add_argument("--tests", nargs="+", default=["tests", "--ignore=tests/vllm", "--ignore=tests/sglang"], help="pytest arguments")
    args = parser.parse_args()
    bugs = [b for b in BUGS if args.only in b.name]
    survivors = 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        copy_repository(clean)
        for bug in bugs:
            root = Path(tmp) / "mutant"
            shutil.copytree(clean, root)
            plant(root, bug)
            caught, seconds = catching_test(root, args.tests)
            shutil.rmtree(root)
            survivors += caught is None
            print(f"{'SURVIVED' if caught is None else 'caught  '}  {bug.name:60s}  {caught or '-'}  ({seconds:.0f} s)", flush=True)
    print(f"{len(bugs) - survivors} of {len(bugs)} planted bugs caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
