"""The one table of per-algo and per-fixture facts the tests read: what each ModelOpt algo becomes
(compressed-tensors target, stream outputs, exactness bound, the vLLM scheme it selects) and what
each bundled fixture holds (its algo, KV-cache algo, which pre_quant_scales fold or stay).

A recipe or fixture without a row fails tests/test_algos.py, by name. Nothing here imports
lazyxform: the facts are stated, not read back from the code under test.

Bounds are elementwise, relative to reference.modelopt_weight (float32 for FP8/INT8 formats,
float64 for the others):
- FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, W8A8_SQ_PER_CHANNEL: 0 (scales stay fp32; bit-exact).
- W8A16, W4A16_AWQ, W4A8_AWQ: 2^-7 (WNA16 holds the scale in bf16, unit roundoff 2^-8, and
  dequantizes in bf16, 2^-8).
- NVFP4, NVFP4_AWQ, W4A16_NVFP4, W4A8_NVFP4_FP8: 2^-8 + 2^-22 (the decompressor returns bf16;
  weight_scale / (1 / weight_scale_2) is two fp32 roundings).
- MXFP8, MXFP4, W4A8_MXFP4_FP8: 0 (power-of-two scales times FP8 / E2M1 values: exact in bf16).
- NVFP4_SVD (dequantized): 2^-8 + 2^-24 (formed exactly in float64, rounded to bf16 through fp32).
- plus ROW_FOLD_EXTRA where a consumer's pre_quant_scale was folded into the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "modelopt"

ROW_FOLD_EXTRA = 2**-22  # ws * pqs is formed in fp32 before the one rounding to the scale dtype
NORM_FOLD_BOUND = 2**-8  # pqs folded into a bf16 norm weight: g * pqs rounded to bf16
WNA16_BOUND = 2**-7
NVFP4_BOUND = 2**-8 + 2**-22

NVFP4_W = ("float", 4, "tensor_group", 16)
NVFP4_A = ("float", 4, "tensor_group", "local")
WNA16_OUT = frozenset({"weight_packed", "weight_scale", "weight_shape"})
NVFP4_OUT = frozenset({"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"})
NVFP4_A16_OUT = frozenset({"weight_packed", "weight_scale", "weight_global_scale"})


@dataclass(frozen=True)
class Algo:
    """What lazyxform makes of one ModelOpt quant_algo."""

    family: str  # the recipe module, lazyxform/recipes/<family>.py
    fixture: str  # a bundled fixture that exports this algo
    format: str  # compressed-tensors format; "dense": no scheme, dequantized (the fallback)
    weights: tuple | None  # (type, num_bits, strategy, group_size) of the target's weights
    activations: tuple | None  # (type, num_bits, strategy, dynamic); None: weight-only
    bound: float  # elementwise relative bound of the decompressed weight (module docstring)
    outputs: frozenset[str]  # a module's tensors in the stream, besides bias and pre_quant_scale
    scale_dtype: str | None  # dtype of the streamed weight_scale (model dtype: bfloat16 here)
    # How the stored bits relate to the export (helpers.check_stored_bits): "int4" (re-packed
    # nibbles, bf16 group scales), "codes" (the same code bytes, block scales repeated), "dense"
    # (a model-dtype weight); None: the bit-exact value check (bound 0) is the whole check.
    stored: str | None = None
    vllm_scheme: str | None = None  # vLLM's compressed-tensors scheme for the target (None: not predicted)
    fp32_decode_bound: float | None = None  # decoding in fp32 (tests/vllm portable kernels); None: `bound`
    batched: bool = False  # rules share a `many`: a GPU batch runs all such rules in a few launches
    row_fold: bool = False  # weight scales absorb a consumer's pre_quant_scale row-wise (per-row fp32/bf16 scales)

    @property
    def decode_bound(self) -> float:
        return self.bound if self.fp32_decode_bound is None else self.fp32_decode_bound


ALGOS: dict[str, Algo] = {
    "FP8": Algo("fp8", "fp8", "float-quantized", ("float", 8, "tensor", None), ("float", 8, "tensor", False), 0.0,
                frozenset({"weight", "weight_scale", "input_scale"}), "float32", fp32_decode_bound=0.0),
    "FP8_PER_CHANNEL_PER_TOKEN": Algo("fp8", "fp8_pc_pt", "float-quantized", ("float", 8, "channel", None), ("float", 8, "token", True), 0.0,
                                      frozenset({"weight", "weight_scale"}), "float32", fp32_decode_bound=0.0),
    "FP8_PB_WO": Algo("fp8", "fp8_2d_blockwise_wo", "float-quantized", ("float", 8, "block", None), ("float", 8, "group", True), 0.0,
                      frozenset({"weight", "weight_scale"}), "float32", fp32_decode_bound=0.0),
    # The same blocks exported from already block-quantized weights (`fp8_pb_real`): the scale is 2-D.
    "FP8_PB_REAL": Algo("fp8", "fp8_pb_real", "float-quantized", ("float", 8, "block", None), ("float", 8, "group", True), 0.0,
                        frozenset({"weight", "weight_scale"}), "float32", fp32_decode_bound=0.0),
    "W8A8_SQ_PER_CHANNEL": Algo("int8", "int8_default", "int-quantized", ("int", 8, "channel", None), ("int", 8, "tensor", False), 0.0,
                                frozenset({"weight", "weight_scale", "input_scale"}), "float32", fp32_decode_bound=0.0, batched=True, row_fold=True),
    "W8A16": Algo("int8", "int8_wo", "pack-quantized", ("int", 8, "channel", None), None, WNA16_BOUND, WNA16_OUT, "bfloat16",
                  fp32_decode_bound=2**-8, batched=True, row_fold=True),  # fp32 decode: only the bf16 scale rounds
    "W4A16_AWQ": Algo("int4", "int4_awq", "pack-quantized", ("int", 4, "group", 128), None, WNA16_BOUND, WNA16_OUT, "bfloat16",
                      stored="int4", vllm_scheme="WNA16", batched=True, row_fold=True),
    "W4A8_AWQ": Algo("int4", "w4a8_awq", "pack-quantized", ("int", 4, "group", 128), ("float", 8, "token", True), WNA16_BOUND, WNA16_OUT,
                     "bfloat16", stored="int4", vllm_scheme="W4A8Fp8", batched=True, row_fold=True),
    "NVFP4": Algo("fp4", "nvfp4", "nvfp4-pack-quantized", NVFP4_W, NVFP4_A, NVFP4_BOUND, NVFP4_OUT, "float8_e4m3fn",
                  stored="codes", vllm_scheme="W4A4Fp4", batched=True),
    "NVFP4_AWQ": Algo("fp4", "nvfp4_awq_lite", "nvfp4-pack-quantized", NVFP4_W, NVFP4_A, NVFP4_BOUND, NVFP4_OUT, "float8_e4m3fn",
                      stored="codes", vllm_scheme="W4A4Fp4", batched=True),
    "W4A16_NVFP4": Algo("fp4", "w4a16_nvfp4", "nvfp4-pack-quantized", NVFP4_W, None, NVFP4_BOUND, NVFP4_A16_OUT, "float8_e4m3fn",
                        stored="codes", vllm_scheme="W4A4Fp4(use_a16)", batched=True),
    "W4A8_NVFP4_FP8": Algo("fp4", "w4a8_nvfp4_fp8", "nvfp4-pack-quantized", NVFP4_W, None, NVFP4_BOUND, NVFP4_A16_OUT, "float8_e4m3fn",
                           stored="codes", vllm_scheme="W4A4Fp4(use_a16)", batched=True),
    "NVFP4_SVD": Algo("fp4", "nvfp4_svdquant", "dense", None, None, 2**-8 + 2**-24, frozenset({"weight"}), None, stored="dense"),
    "MXFP8": Algo("mx", "mxfp8", "mxfp8-quantized", ("float", 8, "group", 32), ("float", 8, "group", True), 0.0,
                  frozenset({"weight", "weight_scale"}), "uint8", stored="codes", vllm_scheme="W8A8Mxfp8"),
    "MXFP4": Algo("mx", "mxfp4", "mxfp4-pack-quantized", ("float", 4, "group", 32), ("float", 4, "group", True), 0.0,
                  frozenset({"weight_packed", "weight_scale"}), "uint8", stored="codes", vllm_scheme="W4A4Mxfp4"),
    "W4A8_MXFP4_FP8": Algo("mx", "w4a8_mxfp4_fp8", "mxfp4-pack-quantized", ("float", 4, "group", 32), ("float", 8, "token", True), 0.0,
                           frozenset({"weight_packed", "weight_scale"}), "uint8", stored="codes", vllm_scheme="W4A8Mxfp4"),
}  # fmt: skip

# What each algo's linear layers run on an SM 9.0 and an SM 10.0 GPU with SGLang 0.5.23: the
# compressed-tensors linear scheme SGLang picks (CompressedTensorsConfig._get_scheme_from_parts) inside
# its CompressedTensorsLinearMethod. SM 9.0 has no FP4 GEMM: SGLang serves NVFP4 W4A4 weight-only
# there (FP4 Marlin). None: SGLang has no such linear scheme (lazyxform refuses the layer by name);
# "dense": no compressed-tensors equivalent, dequantized by lazyxform.
# FP8 and NVFP4 are methods, not schemes: for ModelOpt's FP8 recipe (per-tensor weights, static
# per-tensor input) SGLang picks CompressedTensorsW8A8Fp8, and lazyxform hands SGLang's native
# ModelOptFp8LinearMethod instead, the same bits as SGLang's ModelOpt path, where the
# compressed-tensors scheme runs another GEMM; for NVFP4 (without a pre_quant_scale) its
# ModelOptFp4LinearMethod, which runs FP4 Marlin on SM 9.0, where SGLang 0.5.17 has no
# compressed-tensors scheme (LazyxformConfig.modelopt_method). The other FP8 recipes, and NVFP4_AWQ,
# keep SGLang's compressed-tensors scheme.
_W8A8FP8 = ("CompressedTensorsW8A8Fp8",) * 2
_W4A16FP4 = ("CompressedTensorsW4A16Fp4",) * 2
SGLANG_SCHEME: dict[str, tuple[str | None, str | None]] = {
    "FP8": ("ModelOptFp8LinearMethod",) * 2,
    **dict.fromkeys(("FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "FP8_PB_REAL"), _W8A8FP8),
    **dict.fromkeys(("W4A16_AWQ", "W8A16"), ("CompressedTensorsWNA16",) * 2),
    "W8A8_SQ_PER_CHANNEL": ("CompressedTensorsW8A8Int8",) * 2,
    "NVFP4": ("ModelOptFp4LinearMethod",) * 2,
    "NVFP4_AWQ": ("CompressedTensorsW4A16Fp4", "CompressedTensorsW4A4Fp4"),
    **dict.fromkeys(("W4A16_NVFP4", "W4A8_NVFP4_FP8"), _W4A16FP4),
    **dict.fromkeys(("MXFP4", "MXFP8", "W4A8_AWQ", "W4A8_MXFP4_FP8"), (None, None)),
    "NVFP4_SVD": ("dense", "dense"),
}

# SGLang 0.5.23's compressed-tensors fused-MoE scheme for each algo's experts on (SM 9.0, SM 10.0)
# (CompressedTensorsConfig.get_moe_scheme), for the MoE fixtures' algos whose experts SGLang runs there.
# FP8 experts (per tensor, static input), as FP8 linear layers above: SGLang picks
# CompressedTensorsW8A8Fp8MoE, lazyxform hands SGLang's native ModelOptFp8MoEMethod instead.
SGLANG_MOE_SCHEME: dict[str, tuple[str, str]] = {
    "FP8": ("ModelOptFp8MoEMethod",) * 2,
    "NVFP4": ("CompressedTensorsW4A16Nvfp4MoE", "CompressedTensorsW4A4Nvfp4MoE"),
    "W4A16_AWQ": ("CompressedTensorsWNA16MoE", "CompressedTensorsWNA16TritonMoE"),  # Marlin, Triton
}

# Other names of an algo in ALGOS (same recipe, same output): the tests stream the canonical algo's
# fixture with the alias written into a copy of its config (and fp8_block_scales_inv is one).
ALIASES: dict[str, str] = {"FP8_BLOCK_SCALES": "FP8_PB_WO"}


def algo_row(algo: str) -> Algo:
    """The row of an algo or of the algo it is an alias of."""
    return ALGOS[ALIASES.get(algo, algo)]


def layers(*leaves: str) -> tuple[str, ...]:
    """model.layers.{0,1}.<leaf> for each leaf (every fixture has two decoder layers)."""
    return tuple(f"model.layers.{i}.{leaf}" for i in (0, 1) for leaf in leaves)


def experts(layer: int, *projs: str, count: int = 4) -> tuple[str, ...]:
    """model.layers.<layer>.mlp.experts.{0..count-1}.<proj> for each proj."""
    return tuple(f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(count) for p in projs)


O_PROJ = layers("self_attn.o_proj")
ALL_LINEARS = tuple(sorted(layers(*(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
ATTENTION_AND_GATE_UP = tuple(sorted(layers(*(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")), "mlp.gate_proj", "mlp.up_proj")))


@dataclass(frozen=True)
class Fixture:
    """What one bundled fixture (tests/fixtures/modelopt/<name>) holds."""

    algo: str  # its quant_algo, upper case (an ALIASES name where the checkpoint uses one)
    model_type: str = "llama"  # config.json's
    kv: str | None = None  # kv_cache_quant_algo
    runtime_pqs: tuple[str, ...] = ()  # modules whose pre_quant_scale the engine must apply (GQA o_proj)
    folded_pqs: tuple[str, ...] = ()  # modules whose pre_quant_scale the stream folds away
    modules: int = 14  # quantized modules
    experts: int = 0  # of those, routed experts' projections (mlp.experts.{e}.*), each MoE layer with a router
    mtp_modules: int = 0  # of those, in multi-token-prediction layers (model.layers.{num_hidden_layers}.*)
    mixed_precision: bool = False  # quant_algo MIXED_PRECISION, `algo` named per module in quantized_layers
    # Norms into which ModelOpt's exporter folded a scale that the norm's other readers do not share:
    # lazyxform warns, naming each (docs/recipes.md, "ModelOpt defect").
    defective_norm_folds: tuple[str, ...] = ()
    # A typed error lazyxform.open raises (its message says this); None: served. A refused fixture
    # is in no test that streams every fixture, only in the tests of its refusal.
    refused: str | None = None

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def pre_quant_scale(self) -> bool:
        """The checkpoint has pre_quant_scale tensors."""
        return bool(self.runtime_pqs or self.folded_pqs)

    @property
    def target(self) -> Algo:
        return algo_row(self.algo)


FIXTURE_TABLE: dict[str, Fixture] = {
    "fp8": Fixture("FP8"),
    "fp8_2d_blockwise_wo": Fixture("FP8_PB_WO"),
    "fp8_kv_fp8": Fixture("FP8", kv="FP8"),
    "fp8_pc_pt": Fixture("FP8_PER_CHANNEL_PER_TOKEN"),
    # AWQ: down_proj's pqs -> up_proj's rows (INT4 group scales absorb it); GQA keeps o_proj's.
    "int4_awq": Fixture("W4A16_AWQ", runtime_pqs=O_PROJ, folded_pqs=layers("mlp.down_proj")),
    "int4_blockwise_wo": Fixture("W4A16_AWQ"),
    "int8_default": Fixture("W8A8_SQ_PER_CHANNEL"),
    # SmoothQuant: q/k/v and gate/up pqs -> the norms, down_proj's -> up_proj's rows, o_proj's kept.
    "int8_sq": Fixture("W8A8_SQ_PER_CHANNEL", runtime_pqs=O_PROJ,
                       folded_pqs=tuple(sorted(layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))),
    "int8_wo": Fixture("W8A16"),
    "mxfp4": Fixture("MXFP4"),
    "mxfp8": Fixture("MXFP8"),
    "nvfp4": Fixture("NVFP4"),
    "nvfp4_awq_clip": Fixture("NVFP4"),
    "nvfp4_awq_lite": Fixture("NVFP4_AWQ", runtime_pqs=O_PROJ),  # FP8 block scales cannot absorb a row factor
    "nvfp4_kv_fp8": Fixture("NVFP4", kv="FP8"),
    "nvfp4_kv_nvfp4": Fixture("NVFP4", kv="NVFP4"),
    "nvfp4_mlp_only": Fixture("NVFP4", modules=6),
    "nvfp4_svdquant": Fixture("NVFP4_SVD", folded_pqs=ALL_LINEARS),  # dequantized: pqs multiplied into the columns
    "qwen3moe_fp8": Fixture("FP8", "qwen3_moe", kv="FP8", modules=32, experts=24),
    # ModelOpt averages the experts' gate/up scales per layer (one vector each); down_proj's fold
    # into each expert's up rows. Attention is GQA: o_proj's stay.
    "qwen3moe_int4_awq": Fixture("W4A16_AWQ", "qwen3_moe", runtime_pqs=tuple(sorted(O_PROJ + experts(0, "gate_proj", "up_proj") + experts(1, "gate_proj", "up_proj"))),
                                 folded_pqs=experts(0, "down_proj") + experts(1, "down_proj"), modules=32, experts=24),
    # Phi-3: pre-fused qkv_proj / gate_up_proj (8 modules). ModelOpt folds no AWQ scale into a norm for
    # a single Linear; lazyxform folds qkv's into input_layernorm, gate_up's into
    # post_attention_layernorm and down_proj's into the up half of gate_up_proj's rows. GQA (4 query
    # heads, 2 KV heads): o_proj's stays.
    "phi3_fp8": Fixture("FP8", "phi3", modules=8),
    "phi3_int4_awq": Fixture("W4A16_AWQ", "phi3", runtime_pqs=O_PROJ,
                             folded_pqs=tuple(sorted(layers("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"))), modules=8),
    "phi3_nvfp4": Fixture("NVFP4", "phi3", modules=8),
    # Gemma 3: no norm fold ((1 + w) norms); Llama's row folds: down_proj's into up_proj's rows.
    "gemma3_fp8": Fixture("FP8", "gemma3_text"),
    "gemma3_int4_awq": Fixture("W4A16_AWQ", "gemma3_text", runtime_pqs=O_PROJ, folded_pqs=layers("mlp.down_proj")),
    "gemma3_int8_sq": Fixture("W8A8_SQ_PER_CHANNEL", "gemma3_text", runtime_pqs=ATTENTION_AND_GATE_UP, folded_pqs=layers("mlp.down_proj")),
    # DeepSeek-V3: MLA (q_a, q_b, kv_a_proj_with_mqa, kv_b, o) in both layers, a dense MLP in layer 0,
    # shared + 4 routed experts in layer 1: 28 modules. AWQ: ModelOpt folded q_a/kv_a's, the dense
    # gate/up's and the shared experts' gate/up's into the norms; lazyxform folds q_b's and kv_b's into
    # q_a_layernorm / kv_a_layernorm and every down_proj's into its up_proj's rows. The routed experts'
    # gate/up scales (one per expert) and o_proj's stay. The shared experts' fold into layer 1's norm is
    # ModelOpt's defect: the router and routed experts read that norm too.
    "deepseek_v3_fp8": Fixture("FP8", "deepseek_v3", modules=28, experts=12),
    "deepseek_v3_nvfp4": Fixture("NVFP4", "deepseek_v3", modules=28, experts=12),
    # Edited from deepseek_v3_nvfp4: layer 1 (MoE) is the multi-token-prediction layer
    # (num_hidden_layers 1, num_nextn_predict_layers 1), plus its bf16 enorm, hnorm, eh_proj,
    # shared_head and embed_tokens.
    "deepseek_v3_nvfp4_mtp": Fixture("NVFP4", "deepseek_v3", modules=28, experts=12, mtp_modules=20),
    "deepseek_v3_int4_awq": Fixture("W4A16_AWQ", "deepseek_v3", runtime_pqs=tuple(sorted(O_PROJ + experts(1, "gate_proj", "up_proj"))),
                                    folded_pqs=tuple(sorted(layers("self_attn.q_b_proj", "self_attn.kv_b_proj") + ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.down_proj") + experts(1, "down_proj"))),
                                    modules=28, experts=12, defective_norm_folds=("model.layers.1.post_attention_layernorm",)),
    # lm_head quantized (15 modules). AWQ: ModelOpt never folds into model.norm, so lm_head's stays.
    "lm_head_fp8": Fixture("FP8", modules=15),
    "lm_head_nvfp4": Fixture("NVFP4", modules=15),
    "lm_head_int4_awq": Fixture("W4A16_AWQ", runtime_pqs=("lm_head", *O_PROJ), folded_pqs=layers("mlp.down_proj"), modules=15),
    "fp8_pb_real": Fixture("FP8_PB_REAL"),
    # Edited from fp8_2d_blockwise_wo: FP8_BLOCK_SCALES per module, scales as weight_scale_inv [o/128, i/128].
    "fp8_block_scales_inv": Fixture("FP8_BLOCK_SCALES", mixed_precision=True),
    "fp8_kv_nvfp4_affine": Fixture("FP8", kv="NVFP4_AFFINE", refused="kv_cache_quant_algo 'NVFP4_AFFINE' is not supported: NVFP4 with a per-channel offset"),
    "w4a16_nvfp4": Fixture("W4A16_NVFP4"),
    "w4a8_awq": Fixture("W4A8_AWQ", runtime_pqs=O_PROJ, folded_pqs=layers("mlp.down_proj")),
    "w4a8_mxfp4_fp8": Fixture("W4A8_MXFP4_FP8"),
    "w4a8_nvfp4_fp8": Fixture("W4A8_NVFP4_FP8"),
}  # fmt: skip


def fixtures(**where) -> list[str]:
    """Fixture names, sorted, whose rows match: fixtures(kv="FP8"), fixtures(family="fp4"),
    fixtures(dense=False), fixtures(stored="codes"), or any Fixture / Algo field. Served fixtures
    only, unless `refused` is given."""
    where.setdefault("refused", None)

    def matches(f: Fixture) -> bool:
        for key, want in where.items():
            if key == "dense":
                got = f.target.format == "dense"
            elif hasattr(f, key):
                got = getattr(f, key)
            else:
                got = getattr(f.target, key)
            if got != want:
                return False
        return True

    return sorted(name for name, f in FIXTURE_TABLE.items() if matches(f))


# Every fixture lazyxform serves: what the tests that stream each fixture run on.
SERVED = fixtures()
REFUSED = sorted(set(FIXTURE_TABLE) - set(SERVED))


def representatives(**where) -> list[str]:
    """One fixture per algo (ALGOS[algo].fixture), for the algos whose rows match."""
    return sorted(a.fixture for a in ALGOS.values() if all(getattr(a, k) == v for k, v in where.items()))
