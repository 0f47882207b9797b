"""subquad.kernels: functional attention ops on (B, heads, N, d) tensors plus the grid, the blocks' fused
residual add + LayerNorm and the q/k RMSNorm + rotary embedding of diffusion transformers, each with a PyTorch
reference and (on CUDA) Triton kernels; one folder per family or op, shared pieces in ``core``."""
# the families in the order of every family table (families() follows the order they register in)
from .softmax import softmax_attention  # isort: skip
from .agent import agent_attention  # isort: skip
from .linear import focused_linear_attention, mala_attention  # isort: skip
from .neighborhood import neighborhood_attention  # isort: skip
from .radial import radial_attention  # isort: skip
from .loglinear import loglinear_attention  # isort: skip
from .block_sparse import block_sparse_attention
from .core import checks
from .core.dispatch import available_backends, choose_backend
from .core.family import Family, families, family
from .core.rope import apply_rope_2d
from .grid_conv import depthwise_conv_on_grid
from .layer_norm import add_layer_norm
from .qk_norm import rms_norm_rope

__all__ = [
    "Family",
    "add_layer_norm",
    "agent_attention",
    "apply_rope_2d",
    "available_backends",
    "block_sparse_attention",
    "checks",
    "choose_backend",
    "depthwise_conv_on_grid",
    "families",
    "family",
    "focused_linear_attention",
    "loglinear_attention",
    "mala_attention",
    "neighborhood_attention",
    "radial_attention",
    "rms_norm_rope",
    "softmax_attention",
]
