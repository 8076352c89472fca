"""lazyxform/ops/pack.py against compressed-tensors' own unpacking code."""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyxform.ops.pack import pack_int32_cols

shapes = st.tuples(st.integers(1, 9), st.integers(1, 70))


@settings(max_examples=200, deadline=None)
@given(shape=shapes, bits=st.sampled_from([4, 8]), seed=st.integers(0, 2**31))
def test_pack_int32_cols_unpacks_with_compressed_tensors(shape, bits, seed):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    packed = pack_int32_cols(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], -(-shape[1] * bits // 32))
    assert packed.is_contiguous() and packed.stride(-1) == 1  # engines reinterpret it with .view()
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)
