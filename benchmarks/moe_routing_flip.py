"""Is a MoE run's outlying prompt position a routing flip at a near-tie? (docs/vllm.md, deepseek_v3_nvfp4)

    python benchmarks/moe_routing_flip.py RUN_DIR NAME [--fixtures DIR]

RUN_DIR is a `gpu_fixtures.py serve` output (NAME.pt, runs.json); the run is compared, as `compare` does,
with the reference of its fixture (H200_CASES where the H200 computes another function, else the CPU
case). For routers that pick experts by sigmoid score plus a correction bias (DeepSeek-V3's
`e_score_correction_bias`), it prints:

1. the position where the run deviates most from the reference, and the largest deviation elsewhere;
2. the router's margin at every position and MoE layer: the score of the last expert it chose minus
   the best score it did not choose (the two that a rounding error would swap); the outlier's margin,
   its rank among all positions, and how far the reference's own bf16-vs-fp32 rounding moves margins;
3. the reference recomputed with the layer of the smallest margin there choosing that best unchosen
   expert instead of its last chosen one, at the outlier position only: the run's deviation from that
   forced reference at the outlier, against its deviation from the unforced one.

If (3) brings the outlier within the noise, the run differs from the reference by that one choice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_fixtures import FIXTURES, H200_CASES, Run, reference_checkpoint, tests_on_path  # noqa: E402

Reference = Any  # tests/vllm/modelopt_reference.Reference, importable once tests_on_path() ran


def routers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's MoE routers of the kind this script understands: sigmoid score + correction bias,
    one expert group (with several, the best unchosen expert could sit in a group the router masked)."""
    found = {name: m for name, m in model.named_modules() if hasattr(m, "e_score_correction_bias") and hasattr(m, "top_k")}
    grouped = [name for name, m in found.items() if getattr(m, "num_group", 1) > 1]
    if grouped:
        sys.exit(f"{grouped[0]}: {found[grouped[0]].num_group} expert groups; this script handles one")
    return found


def scores_for_choice(router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid scores, scores + bias) per token, in float32, as the router computes them."""
    hidden = hidden.reshape(-1, router.weight.shape[1])
    scores = F.linear(hidden.float(), router.weight.float()).sigmoid()
    return scores, scores + router.e_score_correction_bias.float()


def logprobs_and_margins(ref: Reference, ids: list[list[int]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference's logprobs, rows of all prompts stacked as the run's, and per router its margin at
    each of those rows; one forward pass per prompt."""
    found: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(router, args, out):
            _, choice = scores_for_choice(router, args[0])
            chosen = torch.zeros_like(choice, dtype=torch.bool).scatter_(1, out[2], True)
            last = choice.masked_fill(~chosen, float("inf")).min(dim=1).values
            best_other = choice.masked_fill(chosen, float("-inf")).max(dim=1).values
            found.setdefault(name, []).append(last - best_other)

        return hook

    handles = [r.register_forward_hook(record(n)) for n, r in routers(ref.model).items()]
    try:
        # logprobs row i of a prompt is position i's distribution; the last position has no row
        logprobs = torch.cat([ref.logprobs(p)[:-1] for p in ids])
    finally:
        for h in handles:
            h.remove()
    assert all(len(ms) == len(ids) for ms in found.values()), "a router ran more than once per prompt"
    return logprobs, {n: torch.cat([m[:-1] for m in ms]) for n, ms in found.items()}


def forced_logprobs(ref: Reference, prompt: list[int], position: int, router_name: str) -> torch.Tensor:
    """The reference's logprobs for `prompt` with `router_name` choosing, at `position` only, its best
    unchosen expert instead of its last chosen one (weights recomputed as the router does)."""
    router = routers(ref.model)[router_name]

    def hook(router, args, out):
        logits, _, indices = out
        scores, choice = scores_for_choice(router, args[0])
        indices = indices.clone()
        row = choice[position]
        chosen = torch.zeros_like(row, dtype=torch.bool).scatter_(0, indices[position], True)
        last = row.masked_fill(~chosen, float("inf")).argmin()
        best_other = row.masked_fill(chosen, float("-inf")).argmax()
        indices[position][indices[position] == last] = best_other
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, (weights * router.routed_scaling_factor).to(out[1].dtype), indices

    handle = router.register_forward_hook(hook)
    try:
        return ref.logprobs(prompt)[:-1]
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    args = parser.parse_args()
    tests_on_path()
    from modelopt_reference import Reference
    from test_vllm_fixtures import CASES

    run = next(r for r in json.loads((args.run_dir / "runs.json").read_text()) if r["name"] == args.name)
    fixture = run["fixture"]
    ckpt = reference_checkpoint(Run(fixture, run["route"], run["tag"]), args.fixtures, args.run_dir)
    options = H200_CASES[fixture][0] if fixture in H200_CASES else CASES[fixture].reference
    got = torch.load(args.run_dir / f"{args.name}.pt", weights_only=False)
    ids, logprobs = got["ids"], got["logprobs"]
    ref = Reference(ckpt, **options)
    want, fp32 = logprobs_and_margins(ref, ids)
    in_bf16, bf16 = logprobs_and_margins(Reference(ckpt, **options, dtype=torch.bfloat16), ids)
    noise = (in_bf16 - want).abs()
    err = (logprobs - want).abs().max(dim=1).values
    row = int(err.argmax())
    rows_per_prompt = [len(p) - 1 for p in ids]
    prompt = next(i for i in range(len(ids)) if row < sum(rows_per_prompt[: i + 1]))
    position = row - sum(rows_per_prompt[:prompt])
    print(f"{args.name} against {fixture}'s reference {options}: {len(err)} positions")
    print(f"1. largest deviation {err[row]:.4f} at row {row} (prompt {prompt}, position {position}); "
          f"largest elsewhere {err[torch.arange(len(err)) != row].max():.4f}; reference's bf16 noise max {noise.max():.4f}")

    if not fp32:
        sys.exit(f"{fixture}: no router with a correction bias; nothing to analyse")
    for name, m in fp32.items():
        rank = int((m.abs() < m[row].abs()).sum()) + 1
        shift = (bf16[name] - m).abs()
        print(f"2. {name}: margin at row {row} {m[row]:.2e}, rank {rank} of {len(m)} from the smallest; "
              f"1st percentile {m.abs().quantile(0.01):.2e}, median {m.abs().median():.2e}; "
              f"bf16 reference moves it by {shift[row]:.2e} there (median over rows {shift.median():.2e})")
    tightest = min(fp32, key=lambda n: fp32[n][row].abs())
    forced = forced_logprobs(ref, ids[prompt], position, tightest)
    at = sum(rows_per_prompt[:prompt])
    forced_err = (logprobs[at : at + rows_per_prompt[prompt]] - forced).abs().max(dim=1).values
    print(f"3. {tightest} forced to its best unchosen expert at row {row}: the run deviates {forced_err[position]:.4f} "
          f"from the forced reference there ({err[row]:.4f} unforced); prompt {prompt}'s other rows: max "
          f"{forced_err[torch.arange(len(forced_err)) != position].max():.4f} forced")


if __name__ == "__main__":
    main()
