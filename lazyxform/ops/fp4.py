"""FP4 (E2M1) transforms: global-scale reciprocals, block-scale splitting, nibble decoding."""

from __future__ import annotations

import torch

# Magnitudes of the E2M1 codes 0..7; bit 3 of a nibble is the sign.
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def reciprocal_global_scale(scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's per-tensor multiplier (weight_scale_2, input_scale) -> compressed-tensors'
    global scale, which is a divisor: 1 / scale in fp32, shape [1]."""
    return torch.reciprocal(scale.float()).reshape(1)


def split_block_scales(scale: torch.Tensor, parts: int) -> torch.Tensor:
    """Block scales [..., G] of blocks of `parts * b` columns -> [..., G * parts] for blocks of `b`:
    each scale repeated, so every element keeps exactly the scale it had."""
    return scale.unsqueeze(-1).expand(*scale.shape, parts).reshape(*scale.shape[:-1], scale.shape[-1] * parts)


def e2m1_to_float(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I/2] (low nibble = even column) -> float32 [..., I], exact."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=packed.device)
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    magnitude = table[(nibbles & 0x7).long()]
    return torch.where((nibbles & 0x8).bool(), -magnitude, magnitude)
