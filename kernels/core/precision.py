"""The precision the plain PyTorch references compute in, and the one autocast gives a layer."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a reference accumulates in: float32 for 16-bit and float32 inputs, float64 for float64
    (so that a float64 reference is a float64 ground truth and gradcheck can run on it)."""
    return torch.promote_types(x.dtype, torch.float32)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on ``device_type`` where it is on there, else None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
