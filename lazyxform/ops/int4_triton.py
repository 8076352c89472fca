"""The GPU kernel of `int4_rows_to_ct_packed`: one pass, each ModelOpt byte read once.

Eight bytes of one packed row (input columns 8j..8j+7 of output rows 2i and 2i+1) are loaded as
one 64-bit word and split into 32-bit halves (64-bit integer arithmetic costs two instructions
per operation on the GPU). For row 2i the low nibbles of the eight bytes are put side by side
(column order 0 4 1 5 2 6 3 7) and two delta swaps restore the order 0..7, column 8j+t in bits
[4t, 4t+4); row 2i+1 likewise with the high nibbles. XOR 8 turns a two's-complement nibble n into
n + 8 (mod 16): the offset binary compressed-tensors stores. About 34 integer operations per 8
bytes (the 64-bit first version took about 56), headroom for GPUs with faster memory. Runs on
the CPU too under TRITON_INTERPRET=1 (how CI checks it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# On the lent H100 every block shape tried ran a 14336x4096 weight in the time of a device copy of
# the same bytes (~22 us, 2.7 TB/s read + write): the kernel is bound by memory, not by its shape.
BLOCK_ROWS = 16
BLOCK_WORDS = 64


@triton.jit
def _delta_swap(x, shift: tl.constexpr, mask: tl.constexpr):
    """Swap the bits of `x` selected by `mask` with those `shift` bits above them."""
    t = (x ^ (x >> shift)) & mask
    return x ^ t ^ (t << shift)


@triton.jit
def _in_order(interleaved):
    """Nibbles in column order 0 4 1 5 2 6 3 7 -> 0 1 2 3 4 5 6 7, then offset binary."""
    x = _delta_swap(interleaved, 4, 0x00F000F0)  # 0 1 4 5 2 3 6 7
    x = _delta_swap(x, 8, 0x0000FF00)  # 0 1 2 3 4 5 6 7
    return (x ^ 0x88888888).to(tl.int32, bitcast=True)


@triton.jit
def _repack(src, dst, rows, words, BR: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)[:, None]
    j = tl.program_id(1) * BW + tl.arange(0, BW)[None, :]
    mask = (r < rows) & (j < words)
    v = tl.load(src + r * words + j, mask=mask).to(tl.uint64, bitcast=True)
    lo = v.to(tl.uint32)  # bytes 0..3: columns 8j..8j+3
    hi = (v >> 32).to(tl.uint32)  # bytes 4..7
    even = _in_order((lo & 0x0F0F0F0F) | ((hi & 0x0F0F0F0F) << 4))
    odd = _in_order(((lo >> 4) & 0x0F0F0F0F) | (hi & 0xF0F0F0F0))
    tl.store(dst + (2 * r) * words + j, even, mask=mask)
    tl.store(dst + (2 * r + 1) * words + j, odd, mask=mask)


def int4_rows_to_ct_packed_triton(packed_rows: torch.Tensor, block_rows: int = BLOCK_ROWS, block_words: int = BLOCK_WORDS, num_warps: int = 4) -> torch.Tensor:
    """uint8 [..., O/2, I] -> int32 [..., O, I/8], I a multiple of 8; same bits as the torch-ops
    version. The block sizes are tuning knobs (benchmarks/bench_load.py measures them)."""
    *lead, half, cols = packed_rows.shape
    words = cols // 8
    src = packed_rows.contiguous()
    if src.storage_offset() % 8:  # 64-bit loads need 8-byte-aligned rows
        src = src.clone()
    src = src.view(torch.int64)
    out = torch.empty(*lead, 2 * half, words, dtype=torch.int32, device=packed_rows.device)
    rows = src.numel() // words if words else 0
    if rows:
        bw = min(block_words, triton.next_power_of_2(words))
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(words, bw))
        _repack[grid](src, out, rows, words, BR=block_rows, BW=bw, num_warps=num_warps)
    return out
