"""The attention interface every family implements: ``attn(x, grid=(H, W), num_prefix=P)``."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import checks, softmax_attention
from .registry import module_backends, module_options

# a tensor made from the parameters (resized biases, encodings) is "small" next to the call's activations when it
# holds at most 1 / SMALL_FRACTION of the values of one (B, N, C) activation: at 224 px B128 agent attention's two
# biases are 1% of it, at 1024 px B4 38% (FLatten's key encoding 25%), at 2048 px B1 1.5x
SMALL_FRACTION = 8


def small_next_to_activations(values: int, activation: int) -> bool:
    """Whether ``values`` elements are small next to an activation of ``activation`` elements (``SMALL_FRACTION``):
    small ones are kept (for inference across calls, for the backward), large ones rebuilt where needed."""
    return values * SMALL_FRACTION <= activation


class _AddedToKeys(torch.autograd.Function):
    """qkv (B * (P + N), 3 C) from the qkv projection with a key offset (h, N, d) added in place into the columns
    of its N grid keys (one pass in float32 when the offset is, rounded into qkv's dtype; no copy of the keys;
    ``mark_dirty`` on the product's own output, not a view, keeps autograd from copying it whole in the backward).
    The gradient passes through; the offset's is the grid keys' summed over B, in the offset's dtype."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, offset: torch.Tensor, batch: int, num_prefix: int) -> torch.Tensor:
        h, n, d = offset.shape
        keys = qkv.view(batch, num_prefix + n, 3, h, d)[:, num_prefix:, 1]
        keys.add_(offset.transpose(0, 1))              # not "+=": its setitem copies back
        ctx.mark_dirty(qkv)
        ctx.shape, ctx.num_prefix, ctx.offset_dtype = (batch, n, h, d), num_prefix, offset.dtype
        return qkv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (batch, n, h, d), p = ctx.shape, ctx.num_prefix
        d_offset = None
        if ctx.needs_input_grad[1]:
            keys = grad.reshape(batch, p + n, 3, h, d)[:, p:, 1]
            d_offset = keys.sum(0, dtype=ctx.offset_dtype).transpose(0, 1)
        return grad, d_offset, None, None


def _heads(qkv: torch.Tensor, batch: int, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, h, N, d) as views of the qkv projection's output (B * N, 3 C)."""
    return qkv.reshape(batch, qkv.shape[0] // batch, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _HeadsOfQKV(torch.autograd.Function):
    """``_heads`` whose backward stacks the three gradients straight into the product's (B * N, 3 C) layout, one
    pass; autograd's unbind + permute + reshape stack them head-major and then copy the whole stack into that
    layout."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, batch: int, heads: int):
        ctx.rows = qkv.shape[0]
        return _heads(qkv, batch, heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):      # an unused part's gradient comes as zeros (materialize_grads)
        return torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).view(ctx.rows, -1), None, None


def split_heads_of_qkv(qkv: torch.Tensor, batch: int, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, h, N, d) views of the qkv projection's output (B * N, 3 C), whose backward is one stack into
    the product's layout (``_HeadsOfQKV``; the plain views when compiling: the compiler fuses the copies)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not qkv.requires_grad:
        return _heads(qkv, batch, heads)
    return _HeadsOfQKV.apply(qkv, batch, heads)


class GridAttention(nn.Module):
    """Multi-head attention over prefix tokens + a 2D (or 3D) grid of tokens.

    The constructor takes timm ``Attention``'s keywords (``device``/``dtype`` too: timm's ``Block`` passes
    them), so a subclass can be handed to timm's ``VisionTransformer(attn_layer=...)``.
    ``forward(x, grid, num_prefix)``: x is (B, N, C) with N = num_prefix + prod(grid), grid tokens in
    raster order. Subclasses implement ``attend``, and move the parameters they add with
    ``self.to(**self.factory_kwargs)``.
    """

    family: str = "base"

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., norm_layer: type[nn.Module] | None = None,
                 backend: str | None = None, device=None, dtype=None, **unknown) -> None:
        super().__init__()
        name = type(self).__name__
        if unknown:
            raise ValueError(f"{name}: unknown options {sorted(unknown)}; valid: {module_options(type(self))}")
        dim, num_heads = checks.check_int(dim, "dim", name), checks.check_int(num_heads, "num_heads", name)
        if dim % num_heads:
            raise ValueError(f"{name}: num_heads={num_heads} must divide dim={dim}")
        for flag, value in (("qkv_bias", qkv_bias), ("qk_norm", qk_norm), ("scale_norm", scale_norm),
                            ("proj_bias", proj_bias)):
            checks.check_bool(value, flag, name)
        if attn_drop:
            raise ValueError(f"{name} does not support attn_drop={attn_drop} "
                             "(no attention matrix is formed); use proj_drop or drop_path")
        if not 0 <= checks.check_float(proj_drop, "proj_drop", name) < 1:
            raise ValueError(f"{name}: proj_drop must be a probability in [0, 1), got {proj_drop!r}")
        checks.check_choice(backend, "backend", module_backends(type(self)), name, allow_none=True)
        norm_layer = norm_layer or nn.LayerNorm
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._said_dense = False
        self._dense_grids: dict[tuple[int, ...], bool] = {}
        self._cached: dict[str, tuple[tuple, Any]] = {}
        self.factory_kwargs = {"device": device, "dtype": dtype}
        self.to(**self.factory_kwargs)

    def attend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               grid: tuple[int, ...], num_prefix: int) -> torch.Tensor:
        """Mix the heads' values: (B, h, N, d) in, (B, h, N, d) out. ``x`` is the block input."""
        raise NotImplementedError

    def key_offset(self, grid: tuple[int, ...], activation: int) -> torch.Tensor | None:
        """A (h, N, d) tensor added to the N grid keys (after ``k_norm``; not the prefix keys) before ``attend``,
        or None (the default): a positional encoding of the keys, in any float dtype (the sum is rounded to the
        keys'). Added in place into the qkv projection's output when ``k_norm`` is the identity
        (``_AddedToKeys``), so that training keeps no second copy of the keys for the backward. ``activation``: the
        elements of one (B, N, C) activation of the call (for ``cached_for_inference``)."""
        return None

    def needs_dense(self, grid: tuple[int, ...]) -> bool:
        """True when the grid is so small that the mechanism is pointless (exact dense attention instead)."""
        return False

    def _needs_dense_on(self, grid: tuple[int, ...]) -> bool:
        """``needs_dense`` remembered per grid in eager mode (the options are fixed at construction; planning a
        mask to find out costs tens of microseconds of every call's host time)."""
        if torch.compiler.is_compiling():
            return self.needs_dense(grid)
        if grid not in self._dense_grids:
            self._dense_grids[grid] = self.needs_dense(grid)
        return self._dense_grids[grid]

    def cached_for_inference(self, name: str, key: tuple, params: Sequence[torch.Tensor],
                             build: Callable[[], Any], activation: int) -> Any:
        """``build()`` (tensors made from ``params`` alone, e.g. bias maps resized to the grid), kept under
        ``name`` for the last ``key`` in eager inference (no autograd, not compiling) while ``params`` are
        unchanged: same storage and version counter (``load_state_dict`` and optimizer steps bump it; ``.to``
        and the like drop every kept value). Saves the value's small ops of host time in every call; kept only
        where small next to one (B, N, C) activation of ``activation`` elements (``small_next_to_activations``),
        as kept values add to every later call's memory (12 blocks' agent biases at 1024 px B4: 115 MiB, against
        the dense DeiT-S's 0.39 GiB inference peak)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        key = (key, *((t.data_ptr(), t._version) for t in params))
        kept = self._cached.pop(name, None)                 # (key, value, its elements)
        if kept is None or kept[0] != key:
            value = build()
            tensors = value if isinstance(value, (tuple, list)) else (value,)
            kept = (key, value, sum(t.numel() for t in tensors))
        if small_next_to_activations(kept[2], activation):
            self._cached[name] = kept
        return kept[1]

    def _apply(self, fn, recurse=True):
        self._cached.clear()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, grid: Sequence[int], num_prefix: int = 0) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        checks.check_input_dtype(x, self.qkv.weight.dtype, type(self).__name__)
        grid = checks.check_grid(grid)
        b, n, c = x.shape
        checks.check_tokens(n, grid, num_prefix)
        qkv = self.qkv(x.reshape(b * n, c))             # 2D: the product's own output, not a view of it
        offset = self.key_offset(grid, b * n * c)
        if offset is not None and isinstance(self.k_norm, nn.Identity) and not torch.compiler.is_compiling():
            qkv = _AddedToKeys.apply(qkv, offset, b, num_prefix)
            offset = None
        q, k, v = split_heads_of_qkv(qkv, b, self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if offset is not None:
            k = (k + F.pad(offset, (0, 0, num_prefix, 0))).to(k.dtype)
        if self._needs_dense_on(grid):
            if not self._said_dense and not torch.compiler.is_compiling():     # warnings.warn cannot be traced
                warnings.warn(f"{self.family} attention on the grid {grid} ({math.prod(grid)} tokens) is "
                              "pointless; using exact dense attention for this grid", stacklevel=2)
                self._said_dense = True
            y = softmax_attention(q, k, v)
        else:
            y = self.attend(x, q, k, v, grid, num_prefix)
        y = y.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(self.norm(y)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
