"""The precision the plain PyTorch references compute in."""
import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a reference accumulates in: float32 for 16-bit and float32 inputs, float64 for float64
    (so that a float64 reference is a float64 ground truth and gradcheck can run on it)."""
    return torch.promote_types(x.dtype, torch.float32)
