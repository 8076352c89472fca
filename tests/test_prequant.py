"""lazyxform/prequant.py: AWQ / SmoothQuant pre_quant_scale folded into the norms in front of a
fused set or into the rows of the module producing the input, where exact; otherwise kept for the
engine (Checkpoint.runtime_pre_quant_scale). Which fold or stay in each fixture: tests/algos.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from algos import FIXTURE_TABLE, NORM_FOLD_BOUND, O_PROJ, SERVED, layers
from helpers import check_module, copy_fixture, edit_json, folded_row_factor, make_moe, rewrite_tensors
from reference import FIXTURES, ct_decompress, load_tensors, modelopt_weight

import lazyxform


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")  # NVFP4_SVD is dequantized
@pytest.mark.parametrize("fixture", SERVED)
def test_pre_quant_scales_fold_or_stay_as_documented(fixture):
    row = FIXTURE_TABLE[fixture]
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    orig, out = load_tensors(FIXTURES / fixture), dict(ck)
    exported = sorted(k.removesuffix(".pre_quant_scale") for k in orig if k.endswith(".pre_quant_scale"))
    assert exported == sorted(row.runtime_pqs + row.folded_pqs)
    assert ck.plan.runtime_pre_quant_scale == list(row.runtime_pqs)
    assert ck.runtime_pre_quant_scale == list(row.runtime_pqs)
    for module in row.runtime_pqs:
        assert torch.equal(out[f"{module}.pre_quant_scale"], orig[f"{module}.pre_quant_scale"])
    assert sorted(m for m in exported if f"{m}.pre_quant_scale" not in out) == list(row.folded_pqs)


def test_fused_siblings_with_different_pre_quant_scales_cannot_fold(tmp_path):
    ckpt = copy_fixture("int8_sq", tmp_path)
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.pre_quant_scale": t["model.layers.0.self_attn.k_proj.pre_quant_scale"] * 2}))
    with pytest.raises(lazyxform.InconsistentScalesError, match=r"input_layernorm.*q_proj\.pre_quant_scale and .*k_proj\.pre_quant_scale differ"):
        list(lazyxform.open(ckpt, device="cpu"))


def rms(h: torch.Tensor) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def assert_within_map(got: torch.Tensor, want: torch.Tensor, x_abs: torch.Tensor, w: torch.Tensor, what: str) -> None:
    # |sum_k x_k (g_k p_k)(1+e_k) w_jk - sum_k x_k g_k p_k w_jk| <= 2^-8 * sum_k |x_k g_k p_k w_jk|, plus fp32 noise.
    bound = NORM_FOLD_BOUND * (x_abs @ w.abs().T) + 1e-5 * want.abs().max()
    assert ((got - want).abs() <= bound).all(), f"{what}: effective map off by {(got - want).abs().max()}"


def test_smoothquant_folds_keep_the_effective_linear_maps():
    """int8_sq: q/k/v and gate/up pqs go into the norms, down_proj's into up_proj's rows, o_proj's
    (GQA: 4 heads share 2 KV heads) is kept. Compare whole sub-networks on random inputs."""
    path = FIXTURES / "int8_sq"
    ck = lazyxform.open(path, device="cpu")
    orig, out = load_tensors(path), dict(ck)
    qc = ck.quantization_config
    h = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    for layer in ("model.layers.0", "model.layers.1"):
        for norm, consumers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = orig[f"{layer}.{norm}.weight"].float()
            g_out = out[f"{layer}.{norm}.weight"].float()
            for c in consumers:
                m = f"{layer}.{c}"
                assert f"{m}.pre_quant_scale" not in out
                w = modelopt_weight("W8A8_SQ_PER_CHANNEL", orig, m)
                factor = folded_row_factor(m, orig, out)  # up_proj's rows also carry down_proj's pqs
                w = w if factor is None else w * factor.float()[:, None]
                x = rms(h) * g * orig[f"{m}.pre_quant_scale"].float()
                got = (rms(h) * g_out) @ ct_decompress(qc, m, out).float().T
                assert_within_map(got, x @ w.T, x.abs(), w, m)
        x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
        deq = {p: modelopt_weight("W8A8_SQ_PER_CHANNEL", orig, f"{layer}.mlp.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
        ct = {p: ct_decompress(qc, f"{layer}.mlp.{p}", out).float() for p in ("gate_proj", "up_proj", "down_proj")}
        z_ref = torch.nn.functional.silu(x @ deq["gate_proj"].T) * (x @ deq["up_proj"].T)
        want = (z_ref * orig[f"{layer}.mlp.down_proj.pre_quant_scale"].float()) @ deq["down_proj"].T
        got = (torch.nn.functional.silu(x @ ct["gate_proj"].T) * (x @ ct["up_proj"].T)) @ ct["down_proj"].T
        assert f"{layer}.mlp.down_proj.pre_quant_scale" not in out
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(out[f"{layer}.self_attn.o_proj.pre_quant_scale"], orig[f"{layer}.self_attn.o_proj.pre_quant_scale"])
    assert ck.plan.runtime_pre_quant_scale == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


# AWQ fixtures whose down_proj pre_quant_scale folds into up_proj's INT4 group scales (Phi-3: into the
# up half of its stored gate_up_proj's).
DOWN_INTO_UP = sorted(f for f, row in FIXTURE_TABLE.items() if row.target.family == "int4" and set(layers("mlp.down_proj")) <= set(row.folded_pqs))


def gate_and_up(decode: Callable[[str], torch.Tensor], mlp: str, model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up weights of an MLP; Phi-3 stores them as one gate_up_proj, gate rows first
    (transformers' Phi3MLP: gate, up = gate_up_proj(x).chunk(2))."""
    if model_type == "phi3":
        gate, up = decode(f"{mlp}.gate_up_proj").chunk(2)
        return gate, up
    return decode(f"{mlp}.gate_proj"), decode(f"{mlp}.up_proj")


@pytest.mark.parametrize("fixture", DOWN_INTO_UP)
def test_mlp_with_down_proj_scale_folded_into_up_proj_rows(fixture):
    """down((silu(x G^T) * x U^T) * pqs) against the rewritten down(silu(x G'^T) * x U'^T). The
    elementwise bounds are the guarantee; this checks the factor sits where it belongs, in up's rows:
    the rounding leaves ~2^-8 of the output norm, the factor (pqs 0.86-1.16 here) missing ~5%, in
    gate's rows instead 1.2-1.5%."""
    path = FIXTURES / fixture
    ck = lazyxform.open(path, device="cpu")
    orig, out, row, qc = load_tensors(path), dict(ck), FIXTURE_TABLE[fixture], ck.quantization_config
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    silu = torch.nn.functional.silu
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        pqs = orig[f"{layer}.down_proj.pre_quant_scale"].double()
        g_w, u_w = gate_and_up(lambda m: modelopt_weight(row.algo, orig, m), layer, row.model_type)
        g_c, u_c = gate_and_up(lambda m: ct_decompress(qc, m, out).double(), layer, row.model_type)
        d_w, d_c = modelopt_weight(row.algo, orig, f"{layer}.down_proj"), ct_decompress(qc, f"{layer}.down_proj", out).double()
        want = (silu(x @ g_w.T) * (x @ u_w.T) * pqs) @ d_w.T
        got = (silu(x @ g_c.T) * (x @ u_c.T)) @ d_c.T
        assert (got - want).norm() <= 2**-7 * want.norm(), layer
        unfolded = (silu(x @ g_c.T) * (x @ u_w.T)) @ d_c.T
        in_gate = (silu(x @ (g_w * pqs[:, None]).T) * (x @ u_w.T)) @ d_c.T
        for wrong in (unfolded, in_gate):
            assert (wrong - want).norm() > 2**-7 * want.norm(), "the check cannot tell a missing or misplaced fold"


# Fixtures with Llama's attention (q/k/v_proj) keeping o_proj's scale under GQA; made MHA, it folds
# into v_proj's rows iff the algo's weight scales absorb a row factor.
O_PROJ_KEPT = sorted(f for f, row in FIXTURE_TABLE.items() if set(O_PROJ) <= set(row.runtime_pqs) and row.model_type in ("llama", "qwen3_moe", "gemma3_text"))


@pytest.mark.parametrize("fixture", O_PROJ_KEPT)
def test_o_proj_scale_folds_into_v_proj_rows_only_where_row_scales_absorb_it(tmp_path, fixture):
    """Made MHA (every query head its own KV head, k/v cloned from q): INT4 group scales and INT8
    channel scales take o_proj's pre_quant_scale into v_proj's rows; NVFP4's FP8 block scales
    cannot, so it stays."""
    row = FIXTURE_TABLE[fixture]
    folds = row.target.row_fold
    ckpt = copy_fixture(fixture, tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.update(num_key_value_heads=c["num_attention_heads"]))

    def clone_q_into_k_and_v(t):
        for k in [k for k in t if ".self_attn.q_proj." in k]:
            for proj in ("k_proj", "v_proj"):
                t[k.replace("q_proj", proj)] = t[k].clone()

    rewrite_tensors(ckpt, clone_q_into_k_and_v)
    ck = lazyxform.open(ckpt, device="cpu")
    orig, out = load_tensors(ckpt), dict(ck)
    others = sorted(set(row.runtime_pqs) - set(O_PROJ))
    assert ck.plan.runtime_pre_quant_scale == sorted(others + ([] if folds else list(O_PROJ)))
    for layer in ("model.layers.0", "model.layers.1"):
        factor = folded_row_factor(f"{layer}.self_attn.v_proj", orig, out)
        assert (factor is not None) == folds
        check_module(row.algo, orig, out, ck.quantization_config, f"{layer}.self_attn.v_proj", factor)


def phi3_made_mha(tmp_path, kv: str | None) -> Path:
    """phi3_int4_awq with every query head its own KV head: qkv_proj's k and v rows are copies of its
    q rows (int4 rows are packed in pairs, q's 256 rows are 128 whole bytes), optionally with a
    quantized KV cache in the config."""
    ckpt = copy_fixture("phi3_int4_awq", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.update(num_key_value_heads=c["num_attention_heads"]))
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(kv_cache_quant_algo=kv))

    def q_rows_thrice(t):
        for layer in ("model.layers.0", "model.layers.1"):
            qkv = f"{layer}.self_attn.qkv_proj"
            t[f"{qkv}.weight"] = t[f"{qkv}.weight"][:128].repeat(3, 1)
            t[f"{qkv}.weight_scale"] = t[f"{qkv}.weight_scale"][:256].repeat(3, 1)

    rewrite_tensors(ckpt, q_rows_thrice)
    return ckpt


def attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention's output over the rows of a stored q|k|v projection, q, k, v in that order
    (transformers' Phi3Attention), before o_proj: softmax(q k^T / sqrt(d)) v per head."""
    q, k, v = (part.unflatten(-1, (heads, -1)).transpose(0, 1) for part in qkv.chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(0, 1).flatten(1)


def test_o_proj_scale_folds_into_the_v_rows_of_phi3_qkv_proj_when_mha(tmp_path):
    """Made MHA: o_proj's pre_quant_scale goes into the v rows of the stored qkv_proj. o_proj(attn(x) *
    pqs) against the rewritten o_proj(attn(x)), ModelOpt's weights against compressed-tensors'; the
    factor missing or on the q rows instead is outside the bound."""
    ckpt = phi3_made_mha(tmp_path, kv=None)
    ck = lazyxform.open(ckpt, device="cpu")
    orig, out, qc = load_tensors(ckpt), dict(ck), ck.quantization_config
    assert ck.runtime_pre_quant_scale == []
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for layer in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        check_module("W4A16_AWQ", orig, out, qc, f"{layer}.qkv_proj", folded_row_factor(f"{layer}.qkv_proj", orig, out))
        pqs = orig[f"{layer}.o_proj.pre_quant_scale"].double()
        qkv_w, o_w = (modelopt_weight("W4A16_AWQ", orig, f"{layer}.{p}") for p in ("qkv_proj", "o_proj"))
        qkv_c, o_c = (ct_decompress(qc, f"{layer}.{p}", out).double() for p in ("qkv_proj", "o_proj"))
        want = (attention(x @ qkv_w.T, 4) * pqs) @ o_w.T
        got = attention(x @ qkv_c.T, 4) @ o_c.T
        assert (got - want).norm() <= 2**-7 * want.norm(), layer
        in_q = torch.cat([qkv_w[:256] * pqs[:, None], qkv_w[256:]])
        for wrong in (attention(x @ qkv_w.T, 4) @ o_c.T, attention(x @ in_q.T, 4) @ o_c.T):
            assert (wrong - want).norm() > 2**-7 * want.norm(), "the check cannot tell a missing or misplaced fold"


def test_phi3_o_proj_scale_stays_at_run_time_over_a_quantized_kv_cache(tmp_path):
    """Made MHA as above, with an FP8 KV cache: the per-tensor v_scale cannot carry row factors."""
    ckpt = phi3_made_mha(tmp_path, kv="FP8")
    ck = lazyxform.open(ckpt, device="cpu")
    orig, out = load_tensors(ckpt), dict(ck)
    assert ck.runtime_pre_quant_scale == list(O_PROJ)
    for layer in ("model.layers.0", "model.layers.1"):
        assert folded_row_factor(f"{layer}.self_attn.qkv_proj", orig, out) is None
        check_module("W4A16_AWQ", orig, out, ck.quantization_config, f"{layer}.self_attn.qkv_proj")


def add_gate_up_pre_quant_scale(t: dict[str, torch.Tensor]) -> None:
    for name in [n for n in t if n.endswith((".gate_proj.weight", ".up_proj.weight"))]:
        t[name.removesuffix("weight") + "pre_quant_scale"] = torch.linspace(0.8, 1.2, 256).to(torch.bfloat16)


def test_post_attention_norm_never_absorbs_a_scale_when_a_router_reads_it(tmp_path):
    """Experts' (and a dense gate/up's) shared pre_quant_scale stays at run time when a router also
    reads post_attention_layernorm; without the router the same scale folds into the norm."""
    import warnings

    moe = make_moe("int4_awq", tmp_path, "qwen3_moe")
    rewrite_tensors(moe, add_gate_up_pre_quant_scale)
    dense_with_router = copy_fixture("int4_awq", tmp_path / "router")
    rewrite_tensors(dense_with_router, add_gate_up_pre_quant_scale)
    rewrite_tensors(dense_with_router, lambda t: t.update({f"model.layers.{i}.mlp.gate.weight": torch.ones(2, 256, dtype=torch.bfloat16) for i in range(2)}))
    control = copy_fixture("int4_awq", tmp_path / "control")
    rewrite_tensors(control, add_gate_up_pre_quant_scale)
    for ckpt, routed in ((moe, True), (dense_with_router, True), (control, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lazyxform.LazyxformWarning)
            ck = lazyxform.open(ckpt, device="cpu")
            dict(ck)
        kept = {m for m in ck.plan.runtime_pre_quant_scale if m.endswith(("gate_proj", "up_proj"))}
        assert bool(kept) == routed, ckpt
        norms = [f"model.layers.{i}.post_attention_layernorm.weight" for i in range(2)]
        assert all(n in ck.plan.passthrough for n in norms) == routed, ckpt


def test_o_proj_scale_stays_at_run_time_over_a_quantized_kv_cache(tmp_path):
    """Made MHA as above, but with an FP8 KV cache: v is rounded with one per-tensor v_scale, which
    cannot carry o_proj's per-row factor, so the scale stays with o_proj."""
    ckpt = copy_fixture("int4_awq", tmp_path)
    edit_json(ckpt / "config.json", lambda c: c.update(num_key_value_heads=c["num_attention_heads"]))
    edit_json(ckpt / "hf_quant_config.json", lambda c: c["quantization"].update(kv_cache_quant_algo="FP8"))

    def mha_with_kv_scales(t):
        for k in [k for k in t if ".self_attn.q_proj." in k]:
            for proj in ("k_proj", "v_proj"):
                t[k.replace("q_proj", proj)] = t[k].clone()
        for layer in ("model.layers.0", "model.layers.1"):
            t[f"{layer}.self_attn.k_proj.k_scale"] = torch.tensor(0.5)
            t[f"{layer}.self_attn.v_proj.v_scale"] = torch.tensor(0.25)

    rewrite_tensors(ckpt, mha_with_kv_scales)
    ck = lazyxform.open(ckpt, device="cpu")
    orig, out = load_tensors(ckpt), dict(ck)
    assert ck.runtime_pre_quant_scale == list(layers("self_attn.o_proj"))
    for layer in ("model.layers.0", "model.layers.1"):
        assert folded_row_factor(f"{layer}.self_attn.v_proj", orig, out) is None
        check_module("W4A16_AWQ", orig, out, ck.quantization_config, f"{layer}.self_attn.v_proj")


@pytest.mark.parametrize(("fixture", "producer", "rows"), [("int4_awq", "mlp.up_proj", 512), ("phi3_int4_awq", "mlp.gate_up_proj", 1024)])
def test_a_bias_on_the_row_producer_is_scaled_with_its_rows(tmp_path, fixture, producer, rows):
    """A bias on the producer of down_proj's input: down_proj's scale folds into those rows (Phi-3:
    gate_up_proj's up half), so their output must be (x W^T + b) * s, bias included, and the other
    rows x W^T + b (the effective map, not the formula's pieces)."""
    ckpt = copy_fixture(fixture, tmp_path)
    biases = {f"{layer}.{producer}.bias": torch.randn(rows, generator=torch.Generator().manual_seed(i)).bfloat16() for i, layer in enumerate(("model.layers.0", "model.layers.1"))}
    rewrite_tensors(ckpt, lambda t: t.update(biases))
    ck = lazyxform.open(ckpt, device="cpu")
    orig, out = load_tensors(ckpt), dict(ck)
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(7))
    for layer in ("model.layers.0", "model.layers.1"):
        module, s = f"{layer}.{producer}", orig[f"{layer}.mlp.down_proj.pre_quant_scale"].float()
        s = torch.cat([torch.ones(rows - s.shape[0]), s])  # the reader's rows are the last (Phi3MLP: gate, up = chunk(2))
        want = (x @ modelopt_weight("W4A16_AWQ", orig, module).float().T + orig[f"{module}.bias"].float()) * s
        got = x @ ct_decompress(ck.quantization_config, module, out).float().T + out[f"{module}.bias"].float()
        unscaled = x @ ct_decompress(ck.quantization_config, module, out).float().T + orig[f"{module}.bias"].float()
        assert (got - want).norm() <= 2**-6 * want.norm(), module
        assert (unscaled - want).norm() > 2**-6 * want.norm(), "the check cannot tell an unscaled bias"


# Norms that absorb the pre_quant_scale their consumers share (lazyxform/topology.py): Phi-3's
# pre-fused modules (ModelOpt folds none for a single Linear), DeepSeek's MLA latent norms.
NORM_FOLDS = [
    ("phi3_int4_awq", "input_layernorm", "self_attn.qkv_proj"),
    ("phi3_int4_awq", "post_attention_layernorm", "mlp.gate_up_proj"),
    ("deepseek_v3_int4_awq", "self_attn.q_a_layernorm", "self_attn.q_b_proj"),
    ("deepseek_v3_int4_awq", "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"),
]


@pytest.mark.parametrize(("fixture", "norm", "consumer"), NORM_FOLDS)
def test_norm_absorbs_its_consumers_pre_quant_scale(fixture, norm, consumer):
    """rms(h) * g' @ W^T against rms(h) * g * pqs @ W^T (ModelOpt's W: only the fold is under test),
    within one bf16 rounding of g * pqs; without the fold it is off by the scale (0.5-2 here)."""
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    orig, out = load_tensors(FIXTURES / fixture), dict(ck)
    for layer in ("model.layers.0", "model.layers.1"):
        norm_w, module = f"{layer}.{norm}.weight", f"{layer}.{consumer}"
        assert f"{module}.pre_quant_scale" not in out and norm_w not in ck.plan.passthrough
        g, pqs = orig[norm_w].float(), orig[f"{module}.pre_quant_scale"].float()
        w = modelopt_weight(FIXTURE_TABLE[fixture].algo, orig, module).float()
        h = rms(torch.randn(16, g.shape[0], generator=torch.Generator().manual_seed(0)))
        x = h * g * pqs
        assert_within_map(h * out[norm_w].float() @ w.T, x @ w.T, x.abs(), w, module)
        assert not torch.allclose(h * g @ w.T, x @ w.T, rtol=2**-6), "the check cannot tell a missing fold"


@pytest.mark.parametrize(
    ("fixture", "norms"),
    [
        # Gemma's (1 + w) norms absorb nothing: q/k/v and gate/up keep their scales.
        ("gemma3_int8_sq", layers("input_layernorm", "pre_feedforward_layernorm")),
        # A MoE layer's post-attention norm also feeds the router (and DeepSeek's shared experts).
        ("deepseek_v3_int4_awq", ("model.layers.1.post_attention_layernorm",)),
        ("qwen3moe_int4_awq", layers("post_attention_layernorm")),
    ],
)
def test_norms_that_cannot_absorb_a_scale_pass_through(fixture, norms):
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    orig, out = load_tensors(FIXTURES / fixture), dict(ck)
    for norm in norms:
        assert f"{norm}.weight" in ck.plan.passthrough and torch.equal(out[f"{norm}.weight"], orig[f"{norm}.weight"]), norm
        layer, mlp = norm.rsplit(".", 1)[0], "mlp.experts.0" if FIXTURE_TABLE[fixture].moe else "mlp"
        fed = "self_attn.q_proj" if norm.endswith("input_layernorm") else f"{mlp}.gate_proj"
        assert f"{layer}.{fed}" in ck.plan.runtime_pre_quant_scale, norm


@pytest.mark.filterwarnings("ignore::lazyxform.LazyxformWarning")  # NVFP4_SVD is dequantized
@pytest.mark.parametrize("fixture", SERVED)
def test_a_scale_modelopt_folded_into_a_norm_that_others_read_is_warned_about(fixture):
    """ModelOpt 0.47 folded deepseek_v3_int4_awq's shared-expert gate/up scale into a MoE layer's
    post-attention norm, which the router and routed experts also read: one plan warning per such
    norm, naming it, the stripped modules and the other readers; none for any other fixture (Llama,
    Qwen3-MoE and DeepSeek FP8 included)."""
    ck = lazyxform.open(FIXTURES / fixture, device="cpu")
    warned = [w for w in ck.plan.warnings if "_fuse_shared_input_modules" in w]
    norms = FIXTURE_TABLE[fixture].defective_norm_folds
    assert len(warned) == len(norms)
    for norm, warning in zip(norms, warned, strict=True):
        layer = norm.rsplit(".", 1)[0]
        assert f"{norm}.weight, which also feeds {layer}.mlp.experts, {layer}.mlp.gate:" in warning, warning
        assert warning.startswith(f"{layer}.mlp.shared_experts.gate_proj, {layer}.mlp.shared_experts.up_proj: AWQ modules without"), warning


def test_the_defective_norm_fold_warning_keys_on_the_missing_scale(tmp_path):
    """deepseek_v3_int4_awq warns on open (LazyxformWarning); the same checkpoint with its shared
    experts' gate/up scales in place (as ModelOpt would have left them, had it not folded) does not."""
    with pytest.warns(lazyxform.LazyxformWarning, match=r"folded their scale into model\.layers\.1\.post_attention_layernorm\.weight.*re-export"):
        lazyxform.open(FIXTURES / "deepseek_v3_int4_awq", device="cpu")
    ckpt = copy_fixture("deepseek_v3_int4_awq", tmp_path)
    shared = "model.layers.1.mlp.shared_experts"
    pqs = torch.linspace(0.8, 1.2, 256).to(torch.bfloat16)
    rewrite_tensors(ckpt, lambda t: t.update({f"{shared}.{p}.pre_quant_scale": pqs.clone() for p in ("gate_proj", "up_proj")}))
    ck = lazyxform.open(ckpt, device="cpu")
    assert ck.plan.warnings == []
    assert {f"{shared}.gate_proj", f"{shared}.up_proj"} <= set(ck.runtime_pre_quant_scale)
