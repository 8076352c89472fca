"""Where a model's Linears sit relative to each other, by architecture family (config.json
`model_type`): which ones the engine runs as one GEMM, which norm feeds which, whose output rows
are whose input. Planning reads these facts here and nowhere else.

An architecture not listed gets `GENERIC`: fused sets only (engines fuse by leaf name whatever the
model), and no `pre_quant_scale` fold, which is always correct: every scale is then applied at run
time by the engine. What each family assumes is written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Fused in the engine (one GEMM over one input): their per-tensor scales must agree.
FUSED_LEAVES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass(frozen=True)
class Topology:
    fused: tuple[tuple[str, ...], ...] = FUSED_LEAVES
    # norm (its path under the decoder layer) -> (parent, the leaves it alone feeds): a
    # pre_quant_scale shared by all of them folds into the norm's weight (norm(x) * g * s).
    norm_consumers: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # The leaves of a plain MLP: anything else under `mlp.` (a router, a shared expert) also reads
    # the post-attention norm, which then cannot absorb the MLP's scale.
    mlp_leaves: frozenset[str] = frozenset()
    # consumer leaf -> the sibling leaf whose output rows are its input (linear in those rows).
    row_producers: dict[str, str] = field(default_factory=dict)
    # Consumers reached through attention: their producer's rows are v's, which survive attention
    # only when every query head has its own KV head (the planner finds that in the sizes) and the
    # KV cache is not quantized (a per-tensor v_scale cannot absorb row factors).
    through_attention: frozenset[str] = frozenset()
    # Producers the checkpoint stores fused: leaf -> how many equal row blocks its output stacks (gate|up:
    # 2; q|k|v: 3, equal only when every query head has its own KV head). Its consumer reads the last.
    stacked_rows: dict[str, int] = field(default_factory=dict)
    # Leaves the engines build as a plain torch Linear, with no quantization method, whatever the
    # config says: a quantized one has nowhere to go (planning refuses it by name).
    never_quantized: frozenset[str] = frozenset()

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
# Phi-3 stores q/k/v and gate/up pre-fused (`qkv_proj`, `gate_up_proj`): each is a fused set of one,
# fed by a Llama-style norm. down_proj's input is act(gate) * up, linear in the up half (the second)
# of gate_up_proj's rows; o_proj's is attention's output, linear in the v rows (the last) of qkv_proj.
PHI3 = Topology(
    norm_consumers={
        "input_layernorm": ("self_attn", ("qkv_proj",)),
        "post_attention_layernorm": ("mlp", ("gate_up_proj",)),
    },
    mlp_leaves=frozenset({"gate_up_proj", "down_proj"}),
    row_producers={"down_proj": "gate_up_proj", "o_proj": "qkv_proj"},
    through_attention=frozenset({"o_proj"}),
    stacked_rows={"gate_up_proj": 2, "qkv_proj": 3},
)
# Gemma's RMSNorm multiplies by (1 + weight): a fold would store (1 + w) * s - 1 in the model dtype,
# whose rounding error is relative to |(1 + w) * s - 1|, unbounded against the effective (1 + w) * s
# when that is small; so no norm folds (and its MLP norm is pre_feedforward_layernorm, not
# post_attention_layernorm, which normalizes attention's output). Row folds are Llama's.
GEMMA = Topology(
    row_producers=LLAMA.row_producers,
    through_attention=LLAMA.through_attention,
)
# DeepSeek-V2/V3 (MLA): input_layernorm feeds q_a_proj and kv_a_proj_with_mqa, which vLLM runs as one
# GEMM (fused_qkv_a_proj); q_a_layernorm feeds only q_b_proj, kv_a_layernorm only kv_b_proj (whose
# weight vLLM absorbs into attention at load time, so its scale cannot wait for run time). Dense
# layers' MLPs are Llama's; MoE layers (router, shared and routed experts under `mlp.`) fold no norm.
# A multi-token-prediction layer, `model.layers.{num_hidden_layers}`, is one more decoder layer (the
# same facts apply: its leaves have the same names) plus enorm/hnorm, shared_head.norm/head,
# embed_tokens and `eh_proj`, which vLLM (deepseek_mtp.py) and SGLang (deepseek_nextn.py) build as a
# torch nn.Linear without a quantization method.
DEEPSEEK = Topology(
    fused=(*FUSED_LEAVES, ("q_a_proj", "kv_a_proj_with_mqa")),
    norm_consumers={
        "input_layernorm": ("self_attn", ("q_a_proj", "kv_a_proj_with_mqa")),
        "self_attn.q_a_layernorm": ("self_attn", ("q_b_proj",)),
        "self_attn.kv_a_layernorm": ("self_attn", ("kv_b_proj",)),
        "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj")),
    },
    mlp_leaves=LLAMA.mlp_leaves,
    row_producers={"down_proj": "up_proj"},
    never_quantized=frozenset({"eh_proj"}),
)
# GLM-4.5 MoE: no facts but its MTP layer's eh_proj, an nn.Linear as DeepSeek's (vLLM glm4_moe_mtp.py, SGLang
# glm4_moe_nextn.py).
GLM4_MOE = Topology(never_quantized=DEEPSEEK.never_quantized)
FAMILIES: dict[str, Topology] = {
    **{model_type: LLAMA for model_type in ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral")},
    "phi3": PHI3,
    **{model_type: GEMMA for model_type in ("gemma", "gemma2", "gemma3", "gemma3_text")},
    **{model_type: DEEPSEEK for model_type in ("deepseek_v2", "deepseek_v3")},
    "glm4_moe": GLM4_MOE,
}


def topology_of(hf_config: dict[str, Any]) -> Topology:
    return FAMILIES.get(str(hf_config.get("model_type")), GENERIC)
