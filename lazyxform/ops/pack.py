"""Integer packing into compressed-tensors' pack-quantized layout."""

from __future__ import annotations

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
    """int64 [len(shape)] on `device` (compressed-tensors' `weight_shape`). Copied without waiting:
    `torch.tensor(..., device="cuda")` would block the host until the device caught up."""
    return torch.tensor(shape, dtype=torch.int64).to(device, non_blocking=True)
