"""The functional API: ops on (B, heads, N, d) tensors plus the grid.

Grid tokens are in raster order after ``num_prefix`` prefix tokens (cls, registers). Each op checks
its arguments, then runs the backend that ``choose_backend`` picks (``backend=`` forces one).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import checks
from .backends import choose_backend, register_backend
from .reference.agent import agent_attention_reference
from .reference.feature_maps import elu_feature_map, focused_feature_map
from .reference.grid_conv import depthwise_conv_on_grid_reference
from .reference.linear_attention import magnitude_aware_linear_attention, normalized_linear_attention
from .reference.rope import apply_rope_2d
from .reference.softmax import softmax_attention_reference, softmax_attention_sdpa


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      backend: str | None = None) -> torch.Tensor:
    """Dense softmax attention; ``sdpa`` (the default everywhere) or the explicit ``reference``."""
    checks.check_qkv(q, k, v, "softmax_attention")
    return choose_backend("softmax_attention", backend or "sdpa", q)(q, k, v)


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                    num_agents: int = 49, agent_bias: tuple[torch.Tensor, torch.Tensor] | None = None,
                    num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Agent attention (Han et al., ECCV 2024): n = a*a agents pooled from the grid queries.

    ``agent_bias``: None or (B1, B2) with B1 (heads, n, N) added to the agent-aggregation scores and
    B2 (heads, N, n) added to the agent-broadcast scores.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "agent_attention")
    grid = checks.check_image_grid(grid, "agent_attention")
    checks.check_perfect_square(num_agents, "num_agents")
    if agent_bias is not None:
        h, n, big_n = q.shape[1], num_agents, q.shape[2]
        if tuple(agent_bias[0].shape) != (h, n, big_n) or tuple(agent_bias[1].shape) != (h, big_n, n):
            raise ValueError(
                f"agent_bias must be ((heads, n, N), (heads, N, n)) = (({h}, {n}, {big_n}), ({h}, {big_n}, {n})), "
                f"got ({tuple(agent_bias[0].shape)}, {tuple(agent_bias[1].shape)})")
    fn = choose_backend("agent_attention", backend, q)
    return fn(q, k, v, grid, num_agents, agent_bias, num_prefix)


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                             focusing_factor: float = 3, scale: torch.Tensor | None = None,
                             num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Focused linear attention (FLatten, Han et al., ICCV 2023, Eq. 3-6), without its DWC term.

    ``scale`` is the learnable s of r = ReLU(x) / softplus(s), shape (heads, head_dim) or
    broadcastable to it; None means no rescaling. The focused map's norms run over the whole token
    (all heads and channels of q[b, :, n, :]), as in the official code; prefix tokens are ordinary tokens.
    """
    checks.check_self_attention(q, k, v, grid, num_prefix, "focused_linear_attention")
    if focusing_factor <= 0:
        raise ValueError(f"focusing_factor must be > 0, got {focusing_factor}")
    if scale is not None and scale.numel() not in (1, q.shape[-1], q.shape[1] * q.shape[-1]):
        raise ValueError(f"scale must have 1, head_dim={q.shape[-1]} or heads*head_dim="
                         f"{q.shape[1] * q.shape[-1]} elements, got shape {tuple(scale.shape)}")
    fn = choose_backend("focused_linear_attention", backend, q)
    return fn(q, k, v, focusing_factor, scale)


def mala_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                   num_prefix: int = 0, rope: bool = False, backend: str | None = None) -> torch.Tensor:
    """Magnitude-aware linear attention (MALA, Fan et al., ICCV 2025) with phi = ELU + 1.

    ``rope=True`` applies 2D RoPE to phi(q), phi(k) inside the KV product (MAViT); needs an image grid.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "mala_attention")
    if rope:
        grid = checks.check_image_grid(grid, "mala_attention(rope=True)")
    fn = choose_backend("mala_attention", backend, q)
    return fn(q, k, v, grid if rope else None, num_prefix)


def depthwise_conv_on_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           grid: Sequence[int], num_prefix: int = 0, residual: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """residual + a depthwise k x k conv of the grid tokens of x (B, heads, N, d) (DWC / LePE).

    ``weight`` (C, 1, k, k), k odd: C = heads*d is one filter per channel (agent attention, MALA), C = d one
    filter per head channel shared by the heads (FLatten); ``bias`` None or (C,). Zero padding keeps the
    grid; a video grid (T, H, W) convolves each frame with the 2D filter. The conv is 0 on the prefix rows,
    so there the output is the residual (0 when ``residual`` is None). Backends: ``reference`` (F.conv2d on
    permuted copies), ``triton`` (in place on the token layout, the residual add fused; the default on CUDA
    for per-channel filters, ``reference`` for shared ones: see below).
    """
    grid = checks.check_grid_conv(x, weight, bias, grid, num_prefix, residual)
    if backend is None and weight.shape[0] != x.shape[1] * x.shape[-1]:
        # a filter shared by the heads: the Triton backward, which also sums dweight over heads, measured 1.3-2x
        # slower than cudnn's on an H200 (forward+backward 1.65 vs 0.83 ms at 56x56 B32, 4 heads of 64, k=5)
        backend = "reference"
    fn = choose_backend("depthwise_conv_on_grid", backend, x)
    return fn(x, weight, bias, grid, num_prefix, residual)


# --- reference backends -------------------------------------------------------------------

def _focused_linear_reference(q, k, v, focusing_factor, scale):
    if scale is not None:
        scale = scale.reshape(-1, q.shape[-1]) if scale.numel() > 1 else scale.reshape(1)
        scale = scale[:, None, :] if scale.dim() == 2 else scale     # (h or 1, 1, d) over (B, h, N, d)
    phi_q = focused_feature_map(q, focusing_factor, scale)
    phi_k = focused_feature_map(k, focusing_factor, scale)
    return normalized_linear_attention(phi_q, phi_k, v).to(q.dtype)


def _mala_reference(q, k, v, rope_grid, num_prefix):
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    rot_q = rot_k = None
    if rope_grid is not None:
        rot_q, rot_k = apply_rope_2d(phi_q, rope_grid, num_prefix), apply_rope_2d(phi_k, rope_grid, num_prefix)
    return magnitude_aware_linear_attention(phi_q, phi_k, v, rot_q, rot_k).to(q.dtype)


register_backend("softmax_attention", "sdpa", softmax_attention_sdpa)
register_backend("softmax_attention", "reference", softmax_attention_reference)
register_backend("agent_attention", "reference", agent_attention_reference)
register_backend("focused_linear_attention", "reference", _focused_linear_reference)
register_backend("mala_attention", "reference", _mala_reference)
register_backend("depthwise_conv_on_grid", "reference", depthwise_conv_on_grid_reference)


# --- block-sparse attention core ------------------------------------------------------------------

from .reference.block_sparse import block_sparse_attention_reference, check_block_sparse_args  # noqa: E402


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, row_ptr: torch.Tensor,
                           col_idx: torch.Tensor, block_m: int, block_n: int, num_prefix: int = 0,
                           tile_mask_idx: torch.Tensor | None = None, tile_masks: torch.Tensor | None = None,
                           key_bias: torch.Tensor | None = None, scale: float | None = None,
                           tile_rows: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Softmax attention of each query tile over its listed key tiles plus the prefix keys.

    Tokens are in tile order: query tile i = q[:, :, i*block_m:(i+1)*block_m], key tile j =
    k[:, :, P + j*block_n : P + (j+1)*block_n] after P = ``num_prefix`` prefix keys that every query
    attends. ``row_ptr`` (1|B, 1|heads, num_q_tiles+1) and ``col_idx`` (nnz,) int32 are a CSR of key
    tiles per query tile; ``tile_mask_idx``/``tile_masks`` mask keys inside listed tiles;
    ``key_bias`` (1|B, 1|heads, Nk) is added to the scores (-inf drops a key). A query with no key
    gets 0. ``tile_rows`` (self-attention): the tiles' token rows, so that tokens stay in place (a 2D
    tile of a raster grid, no permutation); the prefix rows of the output are then 0. Layout details:
    ``subquad.kernels.reference.block_sparse``.
    """
    checks.check_qkv(q, k, v, "block_sparse_attention")
    check_block_sparse_args(q, k, v, row_ptr, col_idx, block_m, block_n, num_prefix, tile_mask_idx, tile_masks,
                            key_bias, tile_rows)
    fn = choose_backend("block_sparse_attention", backend, q)
    return fn(q, k, v, row_ptr, col_idx, block_m, block_n, num_prefix, tile_mask_idx, tile_masks, key_bias, scale,
              tile_rows)


register_backend("block_sparse_attention", "reference", block_sparse_attention_reference)
try:
    from .triton.block_sparse import block_sparse_attention_triton  # noqa: E402
    register_backend("block_sparse_attention", "triton", block_sparse_attention_triton)
except ImportError:        # no Triton on this platform: the reference serves every device
    pass


# --- sparse families ----------------------------------------------------------------------

from .flex_backend import neighborhood_attention_flex  # noqa: E402
from .natten_backend import neighborhood_attention_natten  # noqa: E402
from .reference.neighborhood import neighborhood_attention_reference  # noqa: E402


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                           kernel_size: int, dilation: int = 1, rpb: torch.Tensor | None = None,
                           num_prefix: int = 0, backend: str | None = None) -> torch.Tensor:
    """Neighborhood attention (NAT, Hassani et al., CVPR 2023, Eq. 2-3; DiNAT's dilation).

    Each grid token attends to the ``kernel_size`` x ``kernel_size`` window around it (every
    ``dilation``-th token), shifted inward at borders, plus the prefix tokens; prefix queries attend
    to everything. ``rpb``: None or NAT's relative position bias (heads, 2k-1, 2k-1). Backends:
    ``reference`` (O(N k^2) memory), ``natten`` (the natten package, no rpb), ``flex`` (FlexAttention),
    ``triton`` (fused forward and backward, the default on CUDA).
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "neighborhood_attention")
    grid = checks.check_image_grid(grid, "neighborhood_attention")
    checks.check_neighborhood(grid, kernel_size, dilation, "neighborhood_attention")
    checks.check_rpb(rpb, q.shape[1], kernel_size, "neighborhood_attention")
    fn = choose_backend("neighborhood_attention", backend, q)
    return fn(q, k, v, grid, kernel_size, dilation, rpb, num_prefix)


register_backend("neighborhood_attention", "reference", neighborhood_attention_reference)
register_backend("neighborhood_attention", "natten", neighborhood_attention_natten)
register_backend("neighborhood_attention", "flex", neighborhood_attention_flex)

from .reference.radial import normalize_options as _radial_options  # noqa: E402
from .reference.radial import radial_attention_reference  # noqa: E402

RADIAL_OPTIONS = ("layout", "tile", "block_size", "decay_factor", "sink", "dense_radius")


def radial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                     num_prefix: int = 0, backend: str | None = None, **mask_opts) -> torch.Tensor:
    """Radial attention (Li et al., 2025): a static energy-decay block mask, O(n log n) pairs.

    ``mask_opts``: ``layout`` ("official", "frames" (video default), "distance" (image default)),
    ``tile`` (frames/distance tiles; (1, 8, 8) for video, (8, 8) for images), ``block_size``
    (official, 128), ``decay_factor`` (1.0), ``sink`` (attend the first frame; default on for
    video), ``dense_radius`` (distance, 1). Prefix tokens attend and are attended densely.
    Backends: ``reference`` (gathers the listed tiles), ``block_sparse`` / ``triton`` (the block-sparse
    core; ``triton`` is the default on CUDA). Details: ``subquad.kernels.reference.radial``.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "radial_attention")
    unknown = set(mask_opts) - set(RADIAL_OPTIONS)
    if unknown:
        raise ValueError(f"radial_attention: unknown mask options {sorted(unknown)}; valid: {RADIAL_OPTIONS}")
    options = _radial_options(grid, **mask_opts)
    fn = choose_backend("radial_attention", backend, q)
    return fn(q, k, v, grid, num_prefix, options)


register_backend("radial_attention", "reference", radial_attention_reference)

from .reference.loglinear import loglinear_attention_reference  # noqa: E402
from .reference.loglinear import normalize_options as _loglinear_options  # noqa: E402

LOGLINEAR_OPTIONS = ("block_size", "top_k", "levels")


def loglinear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int],
                        num_prefix: int = 0, backend: str | None = None, **select_opts) -> torch.Tensor:
    """Log-linear sparse attention (LLSA, Zhou et al., 2025, arXiv 2512.16615) on an image grid.

    ``select_opts``: ``block_size`` (16: 4x4 patches), ``top_k`` (8; or one K per level, finest
    first), ``levels`` (None: enough levels that the coarsest selection is no costlier than the
    others). Hierarchical top-K over mean-pooled blocks; each query block attends to its selected
    blocks plus the pooled tokens of the blocks scored on the way (weighted by their sizes) and the
    prefix tokens. Selection is discrete; gradients flow to q, k, v. Backends: ``reference``
    (explicit index lists), ``block_sparse`` / ``triton`` (the block-sparse core; ``triton`` is the
    default on CUDA). Details: ``subquad.kernels.reference.loglinear``.
    """
    grid = checks.check_self_attention(q, k, v, grid, num_prefix, "loglinear_attention")
    grid = checks.check_image_grid(grid, "loglinear_attention")
    unknown = set(select_opts) - set(LOGLINEAR_OPTIONS)
    if unknown:
        raise ValueError(f"loglinear_attention: unknown options {sorted(unknown)}; valid: {LOGLINEAR_OPTIONS}")
    side, top_k = _loglinear_options(grid, **select_opts)
    fn = choose_backend("loglinear_attention", backend, q)
    return fn(q, k, v, grid, num_prefix, side, top_k)


register_backend("loglinear_attention", "reference", loglinear_attention_reference)

# radial and log-linear attention on the block-sparse core: "block_sparse" runs the core's own
# choice (Triton on CUDA), "triton" forces its Triton kernel and is the default on CUDA
from .backends import available_backends as _available  # noqa: E402
from .sparse_on_core import loglinear_attention_on_core, radial_attention_on_core, with_core_backend  # noqa: E402

register_backend("radial_attention", "block_sparse", radial_attention_on_core)
register_backend("loglinear_attention", "block_sparse", loglinear_attention_on_core)
if "triton" in _available("block_sparse_attention"):
    register_backend("radial_attention", "triton", with_core_backend(radial_attention_on_core, "triton"))
    register_backend("loglinear_attention", "triton", with_core_backend(loglinear_attention_on_core, "triton"))


# --- Triton backends of the linear family (the default on CUDA) -------------------------------
try:
    import triton  # noqa: F401
except ImportError:     # no Triton on this platform: the references remain
    pass
else:                   # imported outside the try, so that an error in these modules is not mistaken for no Triton
    from .triton.agent import agent_attention_triton
    from .triton.linear_attention import focused_linear_attention_triton, mala_attention_triton
    register_backend("agent_attention", "triton", agent_attention_triton)
    register_backend("focused_linear_attention", "triton", focused_linear_attention_triton)
    register_backend("mala_attention", "triton", mala_attention_triton)
    from .triton.neighborhood import neighborhood_attention_triton
    register_backend("neighborhood_attention", "triton", neighborhood_attention_triton)
    from .triton.grid_conv import depthwise_conv_on_grid_triton
    register_backend("depthwise_conv_on_grid", "triton", depthwise_conv_on_grid_triton)
