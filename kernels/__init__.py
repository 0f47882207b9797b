"""subquad.kernels: functional attention ops with a PyTorch reference and (on CUDA) Triton kernels."""
from .backends import available_backends, choose_backend
from .functional import agent_attention, depthwise_conv_on_grid, focused_linear_attention, mala_attention
from .functional import loglinear_attention, neighborhood_attention, radial_attention, softmax_attention
from .functional import block_sparse_attention

__all__ = [
    "agent_attention",
    "available_backends",
    "block_sparse_attention",
    "choose_backend",
    "depthwise_conv_on_grid",
    "focused_linear_attention",
    "loglinear_attention",
    "mala_attention",
    "neighborhood_attention",
    "radial_attention",
    "softmax_attention",
]
