"""ModelOpt INT4 (two output rows per byte) -> compressed-tensors pack-quantized (eight input columns per int32)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .pack import pack_int32_cols


def int4_rows_to_ct_packed(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [..., O/2, I] -> int32 [..., O, I/8].

    ModelOpt's byte [i, k] holds signed int4 q[2i, k] in its low nibble and q[2i+1, k] in its high
    nibble (two's complement). compressed-tensors stores q + 8 in bits [4t, 4t+4) of word j for
    column 8j+t. On a GPU a one-pass Triton kernel (ops/int4_triton.py) computes the same bits;
    elsewhere pure torch ops."""
    if packed_rows.is_cuda and packed_rows.shape[-1] % 8 == 0:
        try:
            from .int4_triton import int4_rows_to_ct_packed_triton
        except ImportError:  # a CUDA torch without Triton: the torch ops below
            pass
        else:
            return int4_rows_to_ct_packed_triton(packed_rows)
    return int4_rows_to_ct_packed_torch(packed_rows)


def int4_rows_to_ct_packed_many(packed_rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`int4_rows_to_ct_packed` of each tensor, in one kernel per distinct column count and device.
    The repack is row-local, so tensors with equal columns are stacked along their rows, repacked
    at once and split back: the results are views of one buffer."""
    out: list[torch.Tensor] = list(packed_rows)
    kinds: dict[tuple[int, torch.device], list[int]] = {}
    for i, t in enumerate(packed_rows):
        kinds.setdefault((t.shape[-1], t.device), []).append(i)
    for (cols, _), idx in kinds.items():
        parts = [packed_rows[i].reshape(-1, cols) for i in idx]
        stacked = int4_rows_to_ct_packed(torch.cat(parts) if len(parts) > 1 else parts[0])
        for i, piece in zip(idx, stacked.split([2 * p.shape[0] for p in parts]), strict=True):
            t = packed_rows[i]
            out[i] = piece.view(*t.shape[:-2], 2 * t.shape[-2], piece.shape[-1])
    return out


def int4_rows_to_ct_packed_torch(packed_rows: torch.Tensor) -> torch.Tensor:
    """`int4_rows_to_ct_packed` in torch ops, on any device (the reference for the Triton kernel)."""
    return pack_int32_cols(int4_rows_values(packed_rows), 4)


def int4_rows_values(packed_rows: torch.Tensor) -> torch.Tensor:
    """uint8 [..., O/2, I] (ModelOpt: two output rows per byte, low nibble first) -> signed int8 q [..., O, I]."""
    low = (packed_rows & 0xF).to(torch.int8)
    high = (packed_rows >> 4).to(torch.int8)
    # Two's-complement nibble n -> signed value: (n ^ 8) - 8.
    rows = torch.stack(((low ^ 8) - 8, (high ^ 8) - 8), dim=-2)  # [..., O/2, 2, I]
    return rows.reshape(*packed_rows.shape[:-2], 2 * packed_rows.shape[-2], packed_rows.shape[-1])
