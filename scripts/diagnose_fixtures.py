#!/usr/bin/env python3
"""What the current lazyxform does with ModelOpt fixtures: inspect, stream, exact per module.

    PYTHONPATH=.:integrations/vllm .venv/bin/python scripts/diagnose_fixtures.py NAME... [--json OUT]

For each fixture under tests/fixtures/modelopt/ (or a path):
  inspect  `python -m lazyxform.cli inspect DIR`: exit code and the head of its error;
  stream   `dict(lazyxform.open(DIR, device="cpu"))`: finishes, or the exception and where it was raised;
  exact    every quantized module (a `.weight_scale` in the checkpoint): compressed-tensors' decompressor on
           lazyxform's output against ModelOpt's dequant formula (tests/reference.py for FP8/INT8,
           tests/recipe_reference.py for the rest, with the bounds the exactness tests use), and where each
           `pre_quant_scale` went (kept for the run time, folded into rows, folded into a norm: the norm fold is
           checked against norm * pqs, and, for a (1 + w) norm, against (1 + w) * pqs - 1);
  passthrough  every other tensor is passed through unchanged.
Diagnosis only: it reads the fixtures and lazyxform's output, and changes nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "vllm")]

import torch  # noqa: E402
from recipe_reference import BOUND, ROW_FOLD_EXTRA, algo_of, check_module  # noqa: E402
from reference import FIXTURES, ct_decompress, load_tensors, modelopt_dequant  # noqa: E402

CORE = {"FP8": 0.0, "FP8_PER_CHANNEL_PER_TOKEN": 0.0, "FP8_PB_WO": 0.0, "W8A8_SQ_PER_CHANNEL": 0.0, "W8A16": 2**-7}
ONE_PLUS_W_NORMS = {"gemma", "gemma2", "gemma3", "gemma3_text"}  # RMSNorm computes x * (1 + w)


def where(e: BaseException) -> str:
    """The innermost frame inside lazyxform (file:function:line), else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/lazyxform/" in f.filename or "/lazyxform_vllm/" in f.filename]
    f = (ours or frames)[-1]
    return f"{Path(f.filename).relative_to(ROOT) if str(f.filename).startswith(str(ROOT)) else f.filename}:{f.name}:{f.lineno}"


def head(e: BaseException, n: int = 400) -> str:
    return f"{type(e).__name__}: {str(e)[:n]}"


def module_algos(path: Path, modules: list[str]) -> dict[str, str]:
    q = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    if q["quant_algo"].upper() != "MIXED_PRECISION":
        return {m: q["quant_algo"].upper() for m in modules}
    return {m: q["quantized_layers"][m]["quant_algo"].upper() for m in modules}


def check_core(algo: str, orig: dict, out: dict, qc: dict, module: str, factor: torch.Tensor | None) -> None:
    want = modelopt_dequant(algo, orig, module)
    rel = CORE[algo]
    if factor is not None:
        want = want * factor.float()[:, None]
        rel = max(rel, 2**-22)
    got = ct_decompress(qc, module, out).float()
    assert got.shape == want.shape, f"{module}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    excess = (got - want).abs() - rel * want.abs()
    assert excess.max() <= 0, f"{module}: exceeds rel {rel} by {float(excess.max()):.3g} (max abs diff {float((got - want).abs().max()):.3g})"


def row_factor(module: str, orig: dict, out: dict, ck) -> torch.Tensor | None:
    """The pqs lazyxform says it folded into this module's rows (plan notes)."""
    for mp in ck.plan.modules:
        if mp.name == module:
            for note in mp.folds:
                if note.startswith("row scales absorb "):
                    return orig[note.removeprefix("row scales absorb ")]
    return None


def pqs_fate(module: str, orig: dict, out: dict, ck, hf: dict) -> dict:
    key = f"{module}.pre_quant_scale"
    if key not in orig:
        return {}
    notes = next((mp.folds for mp in ck.plan.modules if mp.name == module), [])
    r: dict = {"notes": notes}
    if key in out:
        r["fate"] = "kept (run time)"
        return r
    norm = next((n.removeprefix("pre_quant_scale folded into ") for n in notes if n.startswith("pre_quant_scale folded into ") and n.endswith(".weight")), None)
    if norm is None:
        r["fate"] = "folded into rows" if any("output rows" in n for n in notes) else "dropped?"
        return r
    g, s, got = orig[norm].double(), orig[key].double(), out[norm].double()
    llama = (g * s).to(torch.bfloat16).double()
    one_plus = ((1 + g) * s - 1).to(torch.bfloat16).double()
    r["fate"] = f"folded into {norm}"
    r["norm_equals_w*s"] = bool(torch.equal(got, llama))
    r["norm_equals_(1+w)*s-1"] = bool(torch.equal(got, one_plus))
    if hf.get("model_type") in ONE_PLUS_W_NORMS and not r["norm_equals_(1+w)*s-1"]:
        r["error"] = f"{norm} is a (1 + w) norm: folded as w*s, max |effective scale error| {float(((1 + got) - (1 + g) * s).abs().max()):.3g}"
    return r


def diagnose(path: Path) -> dict:
    res: dict = {"fixture": path.name}
    hf = json.loads((path / "config.json").read_text())
    res["architectures"] = hf.get("architectures")
    res["quant_algo"] = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    cli = subprocess.run([sys.executable, "-m", "lazyxform.cli", "inspect", str(path)], capture_output=True, text=True)
    res["inspect"] = {"rc": cli.returncode, "tail": (cli.stderr.strip().splitlines() or cli.stdout.strip().splitlines() or [""])[-1][:400]}
    import lazyxform

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ck = lazyxform.open(path, device="cpu")
            out = dict(ck)
        res["stream"] = {"ok": True, "tensors": len(out), "warnings": [str(w.message)[:300] for w in caught if "lazyxform" in type(w.message).__name__.lower()]}
    except Exception as e:  # noqa: BLE001
        res["stream"] = {"ok": False, "error": head(e), "raised_at": where(e)}
        return res
    orig = load_tensors(path)
    qc = ck.quantization_config
    res["ct_config"] = {"format": qc.get("format"), "ignore": qc.get("ignore"), "kv_cache_scheme": qc.get("kv_cache_scheme"), "groups": {k: v.get("targets") for k, v in qc.get("config_groups", {}).items()}}
    res["runtime_pre_quant_scale"] = ck.plan.runtime_pre_quant_scale
    modules = sorted(k.removesuffix(".weight_scale") for k in orig if k.endswith(".weight_scale"))
    algos = module_algos(path, modules)
    exact: dict = {}
    for m in modules:
        algo = algo_of(algos[m])
        factor = row_factor(m, orig, out, ck)
        entry: dict = {"algo": algo}
        try:
            if algo in CORE:
                check_core(algo, orig, out, qc, m, factor)
                entry["bound"] = max(CORE[algo], 2**-22 if factor is not None else 0)
            else:
                check_module(algo, orig, out, qc, m, factor)
                entry["bound"] = BOUND[algo] + (ROW_FOLD_EXTRA if factor is not None else 0)
            entry["ok"] = True
        except Exception as e:  # noqa: BLE001
            entry["ok"] = False
            entry["error"] = head(e, 300)
        fate = pqs_fate(m, orig, out, ck, hf)
        if fate:
            entry["pre_quant_scale"] = fate
            if "error" in fate:
                entry["ok"] = False
        exact[m] = entry
    res["exact"] = exact
    res["exact_summary"] = f"{sum(e['ok'] for e in exact.values())}/{len(exact)}"
    consumed = {n for n in orig if any(n.startswith(m + ".") for m in modules)}
    changed = [n for n in orig if n not in consumed and n in out and not torch.equal(orig[n].view(torch.uint8) if orig[n].dtype.itemsize == 1 else orig[n], out[n].view(torch.uint8) if out[n].dtype.itemsize == 1 else out[n])]
    res["non_module_tensors_changed"] = changed
    res["non_module_tensors_dropped"] = [n for n in orig if n not in consumed and n not in out]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="+")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = []
    for n in args.names:
        p = Path(n) if "/" in n else FIXTURES / n
        r = diagnose(p)
        results.append(r)
        bad = {m: e for m, e in r.get("exact", {}).items() if not e["ok"]}
        print(f"== {r['fixture']}: inspect rc={r['inspect']['rc']} {r['inspect']['tail'] if r['inspect']['rc'] else ''}")
        print(f"   stream: {r['stream']}")
        if "exact" in r:
            print(f"   exact: {r['exact_summary']}  runtime pqs: {r['runtime_pre_quant_scale']}")
            for m, e in list(bad.items())[:6]:
                print(f"     FAIL {m}: {e.get('error') or e.get('pre_quant_scale')}")
            print(f"   changed non-module tensors: {r['non_module_tensors_changed']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
