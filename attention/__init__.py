"""subquad.attention: every attention family behind one interface, built by name.

    attn = subquad.attention.build("mala", dim=384, num_heads=6, qkv_bias=True)
    y = attn(x, grid=(H, W), num_prefix=1)      # x: (B, 1 + H*W, 384)
"""
from .agent import AgentAttention
from .base import GridAttention
from .cross_window import CrossWindowAttention
from .focused_linear import FocusedLinearAttention
from .loglinear import LogLinearSparseAttention
from .mala import MagnitudeAwareLinearAttention
from .neighborhood import NeighborhoodAttention
from .radial import RadialAttention
from .registry import build, canonical_name, get, list, names, register, register_standalone, standalone_names
from .rope_softmax import RoPESoftmaxAttention
from .softmax import SoftmaxAttention
from .window import WindowAttention

__all__ = [
    "AgentAttention",
    "CrossWindowAttention",
    "FocusedLinearAttention",
    "GridAttention",
    "LogLinearSparseAttention",
    "MagnitudeAwareLinearAttention",
    "NeighborhoodAttention",
    "RadialAttention",
    "RoPESoftmaxAttention",
    "SoftmaxAttention",
    "WindowAttention",
    "build",
    "canonical_name",
    "get",
    "list",
    "names",
    "register",
    "register_standalone",
    "standalone_names",
]
