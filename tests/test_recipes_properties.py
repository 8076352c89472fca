"""Property tests of the issue-3 transforms against ModelOpt's layouts (as written in the export
notes) and compressed-tensors' own unpacking code."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st
from recipe_reference import E2M1_TABLE

from lazyxform.ops.fp4 import e2m1_to_float, reciprocal_global_scale, split_block_scales
from lazyxform.ops.int4 import int4_rows_to_ct_packed

seeds = st.integers(0, 2**31)


def modelopt_pack_rows(q: torch.Tensor) -> torch.Tensor:
    """ModelOpt's pack_int4_in_uint8: byte [i, k] = (q[2i, k] & 0xF) | (q[2i+1, k] & 0xF) << 4."""
    return ((q[..., 0::2, :] & 0xF) | ((q[..., 1::2, :] & 0xF) << 4)).to(torch.uint8)


@settings(max_examples=200, deadline=None)
@given(experts=st.integers(0, 3), half_rows=st.integers(1, 12), cols=st.integers(1, 70), seed=seeds)
def test_int4_repack_unpacks_to_modelopts_values_with_compressed_tensors(experts, half_rows, cols, seed):
    lead = (experts,) if experts else ()
    q = torch.randint(-8, 8, (*lead, 2 * half_rows, cols), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    packed = int4_rows_to_ct_packed(modelopt_pack_rows(q))
    assert packed.dtype == torch.int32 and packed.shape == (*lead, 2 * half_rows, -(-cols // 8))
    assert packed.is_contiguous()
    for e in range(experts) if experts else [None]:
        got = unpack_from_int32(packed if e is None else packed[e], 4, torch.Size(q.shape[-2:]))
        assert torch.equal(got.int(), q if e is None else q[e])


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 0x7F7FFFFF))
def test_global_scale_is_the_correctly_rounded_fp32_reciprocal(bits):
    """Every positive finite fp32: 1/x rounded once; where x and 1/x are normal, vLLM's 1/(1/x)
    is within one ulp of x."""
    x = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    got = reciprocal_global_scale(x)
    assert got.shape == (1,) and got.dtype == torch.float32
    assert torch.equal(got, (1.0 / x.double()).float().reshape(1))
    tiny = torch.finfo(torch.float32).tiny
    if tiny <= x.item() and tiny <= got.item() < float("inf"):
        back = (1.0 / got).item()
        assert abs(back - x.item()) <= torch.finfo(torch.float32).eps * x.item()


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 9), parts=st.integers(1, 4), seed=seeds)
def test_split_block_scales_keeps_every_elements_scale(rows, groups, parts, seed):
    s = torch.rand(rows, groups, generator=torch.Generator().manual_seed(seed)).to(torch.float8_e4m3fn)
    got = split_block_scales(s, parts)
    assert got.shape == (rows, groups * parts) and got.dtype == s.dtype
    for j in range(groups * parts):
        assert torch.equal(got[:, j].view(torch.uint8), s[:, j // parts].view(torch.uint8))


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 9), half_cols=st.integers(1, 40), seed=seeds)
def test_e2m1_decoding_matches_the_table_and_compressed_tensors(rows, half_cols, seed):
    packed = torch.randint(0, 256, (rows, half_cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    got = e2m1_to_float(packed)
    low, high = E2M1_TABLE[(packed & 0xF).long()], E2M1_TABLE[(packed >> 4).long()]
    assert torch.equal(got[:, 0::2].double(), low) and torch.equal(got[:, 1::2].double(), high)
    assert torch.equal(got, unpack_fp4_from_uint8(packed, rows, 2 * half_cols, dtype=torch.float32))
