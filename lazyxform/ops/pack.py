"""Integer packing into compressed-tensors' pack-quantized layout, and the small conversions done
for many tensors at once (one kernel launch for a batch, not one per tensor)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_int32_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ints [..., I] -> int32 [..., ceil(I * bits / 32)]: values stored offset-binary
    (q + 2^(bits-1)), `32 // bits` per word along the last dim, column i of a word in bits
    [bits*i, bits*(i+1)), zero padding at the end."""
    per_word = 32 // bits
    cols = q.shape[-1]
    words = -(-cols // per_word)
    u = (q.to(torch.int32) + (1 << (bits - 1))) & ((1 << bits) - 1)
    if words * per_word != cols:
        u = torch.nn.functional.pad(u, (0, words * per_word - cols))
    u = u.reshape(*q.shape[:-1], words, per_word)
    packed = u[..., 0].clone(memory_format=torch.contiguous_format)
    for i in range(1, per_word):
        packed |= u[..., i] << (bits * i)
    return packed


def shape_tensor(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 [len(shape)] on `device` (compressed-tensors' `weight_shape`)."""
    return shape_tensors([shape], device)[0]


def shape_tensors(shapes: Sequence[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    """`shape_tensor` of each shape (all of one length): rows of one tensor, in one copy made without
    waiting (`torch.tensor(..., device="cuda")` would block the host until the device caught up)."""
    return list(torch.tensor(shapes, dtype=torch.int64).to(device, non_blocking=True).unbind(0))


def converted(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each tensor in `dtype`, the same values as `t.to(dtype)`. Those that need converting are
    converted in one kernel per source dtype and device, into views of one buffer."""
    out = list(tensors)
    kinds: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.dtype != dtype:
            kinds.setdefault((t.dtype, t.device), []).append(i)
    for idx in kinds.values():
        parts = [tensors[i].reshape(-1) for i in idx]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(dtype)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out
