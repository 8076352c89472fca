"""lazyxform/ops/fp4.py against ModelOpt's layouts (as written in the export notes, decoded by
reference.py) and compressed-tensors' own unpacking code."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import E2M1_TABLE

from lazyxform.ops.fp4 import e2m1_to_float, reciprocal_global_scale, split_block_scales

seeds = st.integers(0, 2**31)


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
