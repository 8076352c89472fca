"""Where a model's Linears sit relative to each other, by architecture family (config.json
`model_type`): which ones the engine runs as one GEMM, which norm feeds which, whose output rows
are whose input. Planning reads these facts here and nowhere else.

An architecture not listed gets `GENERIC`: fused sets only (engines fuse by leaf name whatever the
model), and no `pre_quant_scale` fold, which is always correct: every scale is then applied at run
time by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Fused in the engine (one GEMM over one input): their per-tensor scales must agree.
FUSED_LEAVES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass(frozen=True)
class Topology:
    fused: tuple[tuple[str, ...], ...] = FUSED_LEAVES
    # norm leaf -> (parent, the leaves it alone feeds): a pre_quant_scale shared by all of them folds
    # into the norm's weight (norm(x) * g * s).
    norm_consumers: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # The leaves of a plain MLP: anything else under `mlp.` (a router, a shared expert) also reads
    # the post-attention norm, which then cannot absorb the MLP's scale.
    mlp_leaves: frozenset[str] = frozenset()
    # consumer leaf -> the sibling leaf whose output rows are its input (linear in those rows).
    row_producers: dict[str, str] = field(default_factory=dict)
    # Consumers reached through attention: their producer's rows are v's, which survive attention
    # only when every query head has its own KV head and the KV cache is not quantized (a
    # per-tensor v_scale cannot absorb row factors).
    through_attention: frozenset[str] = frozenset()

    def fused_family(self, leaf: str) -> tuple[str, ...]:
        """The leaves fused with `leaf`, itself included (a set of one when it is fused with none)."""
        return next((f for f in self.fused if leaf in f), (leaf,))


GENERIC = Topology()
# Pre-norm decoders whose input_layernorm feeds only q/k/v and whose post-attention norm feeds only
# the MLP (gated: down_proj's input is act(gate) * up, linear in up's rows; attention's output is
# linear in v's rows).
LLAMA = Topology(
    norm_consumers={
        "input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
        "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj")),
    },
    mlp_leaves=frozenset({"gate_proj", "up_proj", "down_proj"}),
    row_producers={"down_proj": "up_proj", "w2": "w3", "o_proj": "v_proj"},
    through_attention=frozenset({"o_proj"}),
)
FAMILIES: dict[str, Topology] = {
    model_type: LLAMA for model_type in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral")
}


def topology_of(hf_config: dict[str, Any]) -> Topology:
    return FAMILIES.get(str(hf_config.get("model_type")), GENERIC)
