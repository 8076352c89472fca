"""lazyxform/ops/int4.py and int4_triton.py: ModelOpt's row-packed nibbles -> compressed-tensors'
column-packed int32, checked against ModelOpt's layout (as written in the export notes) and
compressed-tensors' own unpacking; batched repacks and the Triton kernel (interpreted) give the
torch ops' bits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyxform.ops.int4 import int4_rows_to_ct_packed, int4_rows_to_ct_packed_many, int4_rows_to_ct_packed_torch


def modelopt_pack_rows(q: torch.Tensor) -> torch.Tensor:
    """ModelOpt's pack_int4_in_uint8: byte [i, k] = (q[2i, k] & 0xF) | (q[2i+1, k] & 0xF) << 4."""
    return ((q[..., 0::2, :] & 0xF) | ((q[..., 1::2, :] & 0xF) << 4)).to(torch.uint8)


@settings(max_examples=200, deadline=None)
@given(experts=st.integers(0, 3), half_rows=st.integers(1, 12), cols=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_int4_repack_unpacks_to_modelopts_values_with_compressed_tensors(experts, half_rows, cols, seed):
    lead = (experts,) if experts else ()
    q = torch.randint(-8, 8, (*lead, 2 * half_rows, cols), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))
    packed = int4_rows_to_ct_packed(modelopt_pack_rows(q))
    assert packed.dtype == torch.int32 and packed.shape == (*lead, 2 * half_rows, -(-cols // 8))
    assert packed.is_contiguous()
    for e in range(experts) if experts else [None]:
        got = unpack_from_int32(packed if e is None else packed[e], 4, torch.Size(q.shape[-2:]))
        assert torch.equal(got.int(), q if e is None else q[e])


def test_int4_repacks_run_together_for_mixed_widths_and_experts():
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 16), (3, 2, 16), (8, 40), (1, 16), (5, 40)]
    xs = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    for x, got in zip(xs, int4_rows_to_ct_packed_many(xs), strict=True):
        assert torch.equal(got, int4_rows_to_ct_packed_torch(x)), x.shape


INTERPRETED = textwrap.dedent(
    """
    import torch
    from lazyxform.ops.int4 import int4_rows_to_ct_packed_torch
    from lazyxform.ops.int4_triton import int4_rows_to_ct_packed_triton
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 40), (3, 5, 16), (16, 256), (2, 7, 8), (0, 8), (9, 136)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        a, b = int4_rows_to_ct_packed_torch(x), int4_rows_to_ct_packed_triton(x)
        assert a.shape == b.shape and torch.equal(a, b), shape
    x = torch.randint(0, 256, (8 * 64 + 1,), dtype=torch.uint8, generator=g)[1:].reshape(8, 64)  # not 8-byte aligned
    assert torch.equal(int4_rows_to_ct_packed_torch(x), int4_rows_to_ct_packed_triton(x))
    print("same bits")
    """
)


def test_int4_triton_kernel_interpreted_matches_torch_ops():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and "same bits" in run.stdout, run.stderr[-2000:]
