"""Argument checks shared by every functional op: one place, sentences a user can act on."""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import numpy as np
import torch

Grid = tuple[int, ...]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- option values: one helper per pattern; each error names the option, the value and what is valid ---

def _prefix(op: str) -> str:
    return f"{op}: " if op else ""


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (Python, NumPy or a one-element integer tensor),
    else None: bools, floats (7.0 too) and strings are not integers."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_, float, str)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    if isinstance(value, (int, torch.SymInt)):       # a symbolic size under torch.compile: specialized (guarded)
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_int(value: Any, name: str, op: str = "", *, minimum: int = 1, odd: bool = False) -> int:
    """``value`` as an int >= ``minimum`` (and odd, with ``odd=True``); ValueError otherwise."""
    number = as_int(value)
    if number is None or number < minimum or (odd and number % 2 == 0):
        what = f"an {'odd ' if odd else ''}int >= {minimum}"
        raise ValueError(f"{_prefix(op)}{name} must be {what}, got {value!r}")
    return number


def check_bool(value: Any, name: str, op: str = "", *, allow_none: bool = False) -> bool | None:
    """``value`` as a bool (True/False, NumPy bools too; None too with ``allow_none``); 0, 1 and strings are errors."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        valid = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"{_prefix(op)}{name} must be {valid}, got {value!r}")
    return bool(value)


def check_float(value: Any, name: str, op: str = "", *, positive: bool = False) -> float:
    """``value`` as a finite float (ints too; > 0 with ``positive=True``); NaN, inf, bools and strings are errors."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
        if abs(number) < math.inf and (number > 0 or not positive):      # not NaN, not inf (math.isfinite: not under dynamo)
            return number
    what = "a finite number > 0" if positive else "a finite number"
    raise ValueError(f"{_prefix(op)}{name} must be {what}, got {value!r}")


def check_choice(value: Any, name: str, choices: Sequence[str], op: str = "", *, allow_none: bool = False) -> str | None:
    """``value`` if it is one of the strings ``choices`` (or None with ``allow_none``); ValueError listing them."""
    if (value is None and allow_none) or (isinstance(value, str) and value in choices):
        return value
    none = " (or None)" if allow_none else ""
    raise ValueError(f"{_prefix(op)}{name} must be one of {tuple(choices)}{none}, got {value!r}")


def check_ints(value: Any, name: str, op: str = "", *, lengths: Sequence[int] = (2, 3), minimum: int = 1,
               scalar: bool = False) -> tuple[int, ...]:
    """``value`` as a tuple of ints >= ``minimum`` (a tuple or list of ``lengths`` items; with ``scalar=True``
    one int stands for ``lengths[0]`` copies of itself); ValueError otherwise."""
    if scalar and as_int(value) is not None:
        numbers_ = (as_int(value),) * lengths[0]
    else:
        numbers_ = tuple(as_int(v) for v in value) if isinstance(value, (tuple, list, torch.Size)) else None
    if numbers_ is None or len(numbers_) not in lengths or any(n is None or n < minimum for n in numbers_):
        counts = " or ".join(str(n) for n in lengths)
        one = f"an int >= {minimum} or " if scalar else ""
        raise ValueError(f"{_prefix(op)}{name} must be {one}a tuple of {counts} ints >= {minimum}, got {value!r}")
    return numbers_


def check_grid(grid: Sequence[int]) -> Grid:
    """Return ``grid`` as a tuple of 2 (H, W) or 3 (T, H, W) ints >= 1 (Python, NumPy or torch ints;
    7.5, 8.0 and "8" are errors, not rounded)."""
    sides = tuple(grid) if isinstance(grid, (tuple, list, torch.Size)) else None
    if sides is None or len(sides) not in (2, 3):
        raise ValueError(f"grid must be (H, W) or (T, H, W), a tuple of 2 or 3 ints, got {grid!r}")
    ints = tuple(as_int(g) for g in sides)
    if any(g is None or g < 1 for g in ints):
        raise ValueError(f"grid must be (H, W) or (T, H, W) with every side an int >= 1, got {sides}")
    return ints


def check_input_dtype(x: torch.Tensor, expected: torch.dtype, what: str) -> None:
    """A module's input must have its parameters' dtype, unless autocast is on for x's device (then the
    layers cast): a float16 input into a float32 module is a ValueError naming both dtypes."""
    if x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{what} has {expected} parameters but got a {x.dtype} input; cast the input "
                         f"(x.to({expected})) or the module (.to({x.dtype})), or run under torch.autocast")


def check_image_grid(grid: Sequence[int], op: str) -> tuple[int, int]:
    grid = check_grid(grid)
    if len(grid) != 2:
        raise ValueError(f"{op} works on image grids (H, W); got the video grid {grid}")
    return grid


def check_tokens(num_tokens: int, grid: Sequence[int], num_prefix: int) -> None:
    """N must equal P + prod(grid); the error names all three."""
    num_prefix = check_int(num_prefix, "num_prefix", minimum=0)
    if num_tokens != num_prefix + math.prod(grid):
        raise ValueError(
            f"token count N={num_tokens} does not match num_prefix P={num_prefix} plus the grid "
            f"{tuple(grid)} ({math.prod(grid)} tokens): expected N = {num_prefix + math.prod(grid)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str) -> None:
    """q, k, v: (B, heads, N, d), same dtype and device, floating point."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have shape (B, heads, N, head_dim), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{op}: shapes do not agree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q (B, h, N, d), k (B, h, M, d), v (B, h, M, dv))")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"{op}: head dims must be >= 1, got d={q.shape[-1]} (q, k) and dv={v.shape[-1]} (v)")


def check_self_attention(q, k, v, grid, num_prefix: int, op: str) -> Grid:
    """Checks for ops where q, k, v are the same tokens on one grid."""
    check_qkv(q, k, v, op)
    grid = check_grid(grid)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q and k must have the same token count, got {q.shape[2]} and {k.shape[2]}")
    check_tokens(q.shape[2], grid, num_prefix)
    return grid


def check_perfect_square(n: int, what: str, op: str = "") -> int:
    """The side a of ``n`` = a * a >= 1 (an int; agents are pooled to an a x a grid)."""
    number = as_int(n)
    a = math.isqrt(number) if number is not None and number >= 1 else 0
    if a < 1 or a * a != number:
        raise ValueError(f"{_prefix(op)}{what} must be a perfect square int >= 1 (agents are pooled to an a x a "
                         f"grid), got {n!r}")
    return a


# --- sparse families: neighborhood, radial, log-linear ------------------------------------

def check_neighborhood(grid: Sequence[int], kernel_size: int, dilation: int, op: str) -> tuple[int, int]:
    """(kernel_size, dilation): an odd kernel >= 1 and a dilation >= 1 whose dilated window fits every grid
    side (pass ``grid=()`` to check the two alone).

    NATTEN's rule is kernel_size * dilation <= side: each of the ``dilation`` interleaved groups of a
    side must hold a whole window (kernel_size * dilation > side implies dilation * (k-1) + 1 may
    still fit, but the smallest group does not).
    """
    kernel_size = check_int(kernel_size, "kernel_size", op, odd=True)      # odd: the window is centred on the query
    dilation = check_int(dilation, "dilation", op)
    for side in grid:
        if kernel_size * dilation > side:
            raise ValueError(
                f"{op}: kernel_size * dilation = {kernel_size} * {dilation} = {kernel_size * dilation} is larger "
                f"than the grid side {side} of {tuple(grid)}; every dilation group of a side must hold "
                "kernel_size tokens: use a smaller kernel or dilation, or dense attention")
    return kernel_size, dilation


def padded_neighborhood(grid: Sequence[int], kernel_size: int, dilation: int) -> tuple[int, tuple[int, ...]]:
    """(dilation, padded grid) for a neighborhood module on ``grid``, as NATTEN's NeighborhoodAttention2D
    (<= 0.17, which the official NAT/DiNAT models use) does it: a side under kernel_size * dilation is
    padded up to it (with tokens whose input is zero; the output is cropped).

    A dilation >= every side is first lowered to the longest side, which gives the same output: each grid
    token is then alone in its dilation group on both axes, and its window is that group, kernel_size
    positions of which only the token itself is real, whatever the dilation. Without this, kernel_size=3,
    dilation=100 on an 8x8 grid would pad to 300x300; it pads to 24x24.
    """
    dilation = min(dilation, max(grid))
    window = kernel_size * dilation
    return dilation, tuple(max(side, window) for side in grid)


def check_rpb(rpb, num_heads: int, kernel_size: int, op: str) -> None:
    if rpb is not None and tuple(rpb.shape) != (num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1):
        raise ValueError(f"{op}: rpb must have shape (heads, 2k-1, 2k-1) = ({num_heads}, {2 * kernel_size - 1}, "
                         f"{2 * kernel_size - 1}), got {tuple(rpb.shape)}")


def check_top_k(top_k: int, num_blocks: int, what: str, op: str) -> None:
    top_k = check_int(top_k, "top_k", op)
    if top_k > num_blocks:
        raise ValueError(f"{op}: top_k={top_k} is larger than the {num_blocks} {what}; "
                         "use a smaller top_k (or dense attention for so small a grid)")


# --- depthwise conv on the grid (DWC / LePE) ------------------------------------------------

def check_grid_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: Sequence[int],
                    num_prefix: int, residual: torch.Tensor | None, op: str = "depthwise_conv_on_grid") -> Grid:
    """x (B, heads, N, d) floating point; weight (C, 1, k, k) with k odd and C = heads*d or d; bias None
    or (C,); N = P + prod(grid); residual None or x's shape, dtype and device."""
    if x.dim() != 4 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be a floating point tensor (B, heads, N, head_dim), got {x.dtype} "
                         f"{tuple(x.shape)}")
    h, d = x.shape[1], x.shape[-1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{op}: weight must have shape (C, 1, k, k) (a depthwise k x k filter per channel), "
                         f"got {tuple(weight.shape)}")
    channels, k = weight.shape[0], weight.shape[-1]
    if channels not in (h * d, d):
        raise ValueError(f"{op}: weight has {channels} channels; need heads*head_dim = {h * d} (one filter per "
                         f"channel) or head_dim = {d} (one filter shared by the heads)")
    if k % 2 == 0:
        raise ValueError(f"{op}: the kernel size must be odd (the filter is centred on its token), got {k}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype not in _FLOAT_DTYPES or t.device != x.device):
            raise ValueError(f"{op}: {name} must be floating point on x's device {x.device}, got {t.dtype} on "
                             f"{t.device}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"{op}: bias must have shape (C,) = ({channels},), got {tuple(bias.shape)}")
    grid = check_grid(grid)
    check_tokens(x.shape[2], grid, num_prefix)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"{op}: residual must have x's dtype and device ({x.dtype} on {x.device}), got "
                             f"{residual.dtype} on {residual.device}")
    return grid


def check_add_layer_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, gate: torch.Tensor | None = None,
                         residual_dtype: torch.dtype | None = None, op: str = "add_layer_norm") -> None:
    """x (..., C) floating point with C >= 1; y None or x's shape on x's device; weight, bias and gate None, (C,)
    or one per sample (B, C) of x (B, ..., C), floating point on x's device; a gate only with y; residual_dtype
    None or a floating point dtype."""
    if residual_dtype is not None and residual_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: residual_dtype must be a floating point dtype, got {residual_dtype}")
    if x.dim() < 1 or x.dtype not in _FLOAT_DTYPES or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be a floating point tensor (..., C) with C >= 1, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if y is not None and (y.shape != x.shape or y.dtype not in _FLOAT_DTYPES or y.device != x.device):
        raise ValueError(f"{op}: y must be a floating point tensor of x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{y.dtype} {tuple(y.shape)} on {y.device}")
    if gate is not None and y is None:
        raise ValueError(f"{op}: a gate multiplies y, but y is None")
    c = x.shape[-1]
    shapes = [(c,)] + ([(x.shape[0], c)] if x.dim() >= 2 else [])
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate)):
        if t is not None and (tuple(t.shape) not in shapes or t.dtype not in _FLOAT_DTYPES or t.device != x.device):
            raise ValueError(f"{op}: {name} must be a floating point tensor of shape "
                             f"{' or '.join(str(s) for s in shapes)} (shared, or one per sample) on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def check_rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                        out: torch.Tensor | None, op: str = "rms_norm_rope") -> None:
    """x (B, N, H, D) floating point with D even and unit stride; weight (D,) or (H * D,); cos and sin both None
    or both (N, D / 2); out None or x's shape with unit stride in D; all on x's device."""
    if x.dim() != 4 or x.dtype not in _FLOAT_DTYPES or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"{op}: x must be a floating point tensor (B, N, H, D) with an even D of unit stride (a "
                         f"view of the (B, N, H * D) projection), got {x.dtype} {tuple(x.shape)} strides "
                         f"{x.stride()}")
    b, n, h, d = x.shape
    if weight.dim() != 1 or weight.numel() not in (d, h * d) or weight.dtype not in _FLOAT_DTYPES \
            or weight.device != x.device:
        raise ValueError(f"{op}: weight must be a floating point tensor ({d},) (a norm per head) or ({h * d},) (per "
                         f"token) on {x.device}, got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: give both cos and sin, or neither (no rotation)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (tuple(t.shape) != (n, d // 2) or t.dtype not in _FLOAT_DTYPES or t.device != x.device):
            raise ValueError(f"{op}: {name} must be a floating point tensor (N, D / 2) = ({n}, {d // 2}) on "
                             f"{x.device} (one angle per token and channel pair), got {t.dtype} {tuple(t.shape)} "
                             f"on {t.device}")
    if out is not None and (out.shape != x.shape or out.dtype not in _FLOAT_DTYPES or out.device != x.device
                            or out.stride(-1) != 1):
        raise ValueError(f"{op}: out must be a floating point tensor of x's shape {tuple(x.shape)} with unit "
                         f"stride in D on {x.device}, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
