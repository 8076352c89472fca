"""`lazyxform inspect CKPT [--json]`: what the plan does to every module, without reading weights.
`lazyxform profile CKPT [--device cuda]`: load it and report where the time and memory go."""

# Start-up: only the standard library and lazyxform.errors load at module level, so `--help` and
# `--version` need neither torch nor compressed-tensors; each command imports what it uses.

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import version
from .errors import LazyxformError

if TYPE_CHECKING:
    from .plan import Plan

NUMBERED = re.compile(r"\.(\d+)\.")


def module_pattern(name: str) -> str:
    return NUMBERED.sub(".*.", NUMBERED.sub(".*.", name))


def plan_table(plan: Plan) -> str:
    rows: dict[tuple[str, ...], int] = {}
    for m in plan.modules:
        folds = "; ".join(NUMBERED.sub(".*.", f) for f in m.folds) or "-"
        key = (
            module_pattern(m.name),
            m.algo,
            f"{m.scheme} ({m.target})",
            f"{', '.join(m.inputs)} -> {', '.join(m.outputs)}",
            module_pattern(folds),
            "; ".join(m.warnings) or "-",
        )
        rows[key] = rows.get(key, 0) + 1
    header = ("module", "algo", "target scheme", "tensors in -> out", "folds", "warnings")
    table = [header] + [(f"{k[0]} (x{n})",) + k[1:] for k, n in rows.items()]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"{len(plan.modules)} quantized modules, {len(plan.groups)} tensor groups, {len(plan.passthrough)} tensors passed through unchanged")
    if plan.runtime_pre_quant_scale:
        lines.append(f"pre_quant_scale applied at run time for: {', '.join(plan.runtime_pre_quant_scale)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lazyxform", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="show the rewrite plan of a ModelOpt checkpoint")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--json", action="store_true", help="machine-readable plan and compressed-tensors config")
    profile = sub.add_parser("profile", help="load a checkpoint; time, bytes and GB/s per stage, peak memory")
    profile.add_argument("checkpoint")
    profile.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    profile.add_argument("--out", help="directory for the table, JSON, Chrome trace and PNG (default: ./lazyxform-profile-<name>)")
    profile.add_argument("--staging-mib", type=int, help="pinned staging memory of a GPU load, MiB (default 256)")
    profile.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            return profile_load(args)
        return inspect_plan(args)
    except LazyxformError as e:
        print(f"lazyxform: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def inspect_plan(args: argparse.Namespace) -> int:
    from .checkpoint import open as open_checkpoint

    ck = open_checkpoint(args.checkpoint, device="cpu")
    if args.json:
        print(json.dumps({"plan": ck.plan.to_json(), "quantization_config": ck.quantization_config}, indent=2))
    else:
        print(plan_table(ck.plan))
    return 0


def profile_load(args: argparse.Namespace) -> int:
    from .checkpoint import open as open_checkpoint
    from .profile import Profiler

    staging = args.staging_mib << 20 if args.staging_mib else None
    ck = open_checkpoint(args.checkpoint, device=args.device, staging_bytes=staging)
    prof = Profiler(ck.device, ck.nbytes, progress=not args.no_progress, label=ck.path.name)
    for _pair in prof.iterate(ck):
        pass
    report = prof.finish()
    written = report.write(Path(args.out or f"lazyxform-profile-{ck.path.name}"), "profile")
    print(report.table())
    print(f"written: {', '.join(map(str, written))}")
    if not any(p.suffix == ".png" for p in written):
        print("no PNG: matplotlib is not installed (pip install 'lazyxform[profile]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
