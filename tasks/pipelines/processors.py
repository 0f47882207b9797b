"""Diffusers attention processors that run subquad's structured attention over image or video tokens.

Each processor mirrors one diffusers processor line by line (projections, q/k norms, rotary
embeddings, output projections) and differs only in the attention call: the image (or video) tokens
get the structured op on their latent grid, while text or conditioning tokens in the same sequence
(SD3's and Flux's joint attention) become the op's dense prefix tokens. The dense branch is the
original call, so a layer or step kept dense gives the original output bit for bit.

    SelfAttnProcessor    <- AttnProcessor2_0        DiT, PixArt (attn1; the cross-attention stays)
    JointAttnProcessor   <- JointAttnProcessor2_0   SD3 (image first, text appended; attn2 image only)
    FluxAttnProcessor    <- FluxAttnProcessor       Flux (text first; single blocks: one joint sequence)
    WanAttnProcessor     <- WanAttnProcessor        Wan (attn1 over the (T, H, W) video grid)

What the processors of one transformer share (the op, its options, the current grid and denoising
step, which layers and steps stay dense) is a ``GridAttentionPolicy``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as _flux_qkv
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as _wan_qkv

from ...kernels import rms_norm_rope
from ..bench.measure import median_ms
from .families import AttentionOp

MEASURED_DEVICES = ("cuda",)    # where ``fall_back_if_slower`` times the op against dense attention


class GridAttentionPolicy:
    """The structured op and when to use it, shared by every swapped processor of a pipeline.

    ``op(q, k, v, grid=, num_prefix=, **options)`` works on (B, heads, N, d) with the prefix tokens
    first. The transformer's forward pre-hook calls ``observe`` with the latent token grid and the
    timestep of each call: a step is a distinct timestep, counted from 0 each time the timestep
    rises (a new sampling run), so classifier-free guidance run as two calls stays one step.
    ``fits(grid)`` says whether the op makes sense on a grid (a window larger than the grid does
    not, nor a mask or selection that keeps every pair); on a grid that does not fit, attention is
    dense and a warning says so once. ``fall_back_if_slower``: on a CUDA device, outside ``torch.compile``, the
    op and dense attention are timed once per call signature (grid, shapes, dtype) on the first call's inputs,
    and where dense attention is faster it runs instead (a warning gives both times; ``measured`` keeps them).
    """

    def __init__(self, name: str, op: AttentionOp, options: dict, dense_layers: Sequence[int] = (),
                 dense_steps: int = 0, fits: Callable[[tuple[int, ...]], bool] = lambda grid: True,
                 fall_back_if_slower: bool = True) -> None:
        self.name, self.op, self.options, self.fits = name, op, dict(options), fits
        self.dense_layers, self.dense_steps = frozenset(dense_layers), dense_steps
        self.fall_back_if_slower = fall_back_if_slower
        self.measured: dict[tuple, tuple[float, float]] = {}     # call signature -> (op ms, dense ms)
        self.grid: tuple[int, ...] | None = None
        self.step = 0
        self._last_timestep: float | None = None
        self._warned: set[tuple[int, ...]] = set()

    def observe(self, grid: tuple[int, ...], timestep: torch.Tensor | float | None) -> None:
        """The grid of this call and, with ``dense_steps``, its step (reading the timestep waits for the device and
        is a data-dependent branch: without dense steps a compiled transformer has none, so
        ``torch.compile(transformer, fullgraph=True)`` traces it whole)."""
        self.grid = grid
        if timestep is None or not self.dense_steps:
            return
        t = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_timestep is None or t > self._last_timestep:
            self.step = 0
        elif t < self._last_timestep:
            self.step += 1
        self._last_timestep = t

    def is_dense(self, layer: int) -> bool:
        if layer in self.dense_layers or self.step < self.dense_steps:
            return True
        if self.grid is None:
            raise RuntimeError("the token grid is unknown: the swapped transformer was called without its "
                               "forward pre-hook (call the transformer module itself, not its blocks)")
        if not self.fits(self.grid):
            if self.grid not in self._warned and not torch.compiler.is_compiling():    # warn cannot be traced
                self._warned.add(self.grid)
                warnings.warn(f"{self.name} with {self.options} does not fit the token grid {self.grid} (a window "
                              "wider than the grid, or a mask or selection that keeps every pair of it); attention "
                              "over it stays dense", stacklevel=2)
            return True
        return False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
        """The op on (B, heads, N, d) with ``num_prefix`` dense tokens first, then the grid in raster order."""
        image_tokens = math.prod(self.grid)
        if q.shape[2] != num_prefix + image_tokens:
            raise ValueError(f"{q.shape[2]} tokens in the attention, but {num_prefix} text tokens plus the latent "
                             f"grid {self.grid} ({image_tokens} tokens) were expected")
        if self._slower_than_dense(q, k, v, num_prefix):
            return F.scaled_dot_product_attention(q, k, v)
        return self._op(q, k, v, num_prefix)

    def _op(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int) -> torch.Tensor:
        return self.op(q, k, v, grid=self.grid, num_prefix=num_prefix, **self.options)

    def _slower_than_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int) -> bool:
        """Whether dense attention beat the op on this call signature (timed on its first call: median of 3
        after a warm-up call that also compiles the op's kernels)."""
        if (not self.fall_back_if_slower or q.device.type not in MEASURED_DEVICES
                or torch.compiler.is_compiling()):
            return False
        key = (self.grid, num_prefix, tuple(q.shape), tuple(v.shape), q.dtype, q.device)
        if key not in self.measured:
            op_ms = median_ms(lambda: self._op(q, k, v, num_prefix), q.device, repeats=3, warmup=1)
            dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), q.device, repeats=3, warmup=1)
            self.measured[key] = (op_ms, dense_ms)
            if dense_ms < op_ms:
                warnings.warn(f"{self.name} with {self.options} takes {op_ms:.3f} ms per attention call on the token "
                              f"grid {self.grid} ({tuple(q.shape)}, {str(q.dtype).removeprefix('torch.')}), dense "
                              f"attention {dense_ms:.3f} ms: these calls run dense attention (accelerate_pipeline("
                              f"..., fall_back_if_slower=False) keeps {self.name})", stacklevel=3)
        op_ms, dense_ms = self.measured[key]
        return dense_ms < op_ms

    @property
    def fell_back(self) -> bool:
        """Whether some call signature runs dense attention because the op was slower."""
        return any(dense < op for op, dense in self.measured.values())


class _SwappedProcessor:
    """Base: one attention layer's processor, ``layer`` its block index in forward order."""

    def __init__(self, policy: GridAttentionPolicy, layer: int, original: object) -> None:
        self.policy, self.layer = policy, layer
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = None

    def _structured(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix: int,
                    prefix_last: bool = False) -> torch.Tensor:
        """The policy's op on (B, heads, N, d); ``prefix_last`` when the text tokens end the sequence."""
        if not prefix_last or num_prefix == 0:
            return self.policy(q, k, v, num_prefix)
        image = q.shape[2] - num_prefix
        to_front = lambda t: torch.cat([t[:, :, image:], t[:, :, :image]], dim=2)  # noqa: E731
        out = self.policy(to_front(q), to_front(k), to_front(v), num_prefix)
        return torch.cat([out[:, :, num_prefix:], out[:, :, :num_prefix]], dim=2)


def _no_mask(attention_mask: torch.Tensor | None, where: str) -> None:
    if attention_mask is not None:
        raise ValueError(f"{where}: an attention mask over the image tokens cannot be combined with structured "
                         "attention; keep this layer dense (dense_layers) or call without a mask")


class SelfAttnProcessor(_SwappedProcessor):
    """``AttnProcessor2_0`` on a self-attention over image tokens (DiT's and PixArt's attn1)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or hidden_states.dim() != 3:
            raise ValueError("SelfAttnProcessor serves self-attention over (B, N, C) image tokens only")
        residual, batch = hidden_states, hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.policy.is_dense(self.layer):
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        else:
            _no_mask(attention_mask, "SelfAttnProcessor")
            out = self._structured(query, key, value, num_prefix=0)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttnProcessor(_SwappedProcessor):
    """``JointAttnProcessor2_0`` (SD3): image tokens, then the text tokens as the op's dense prefix."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        _no_mask(attention_mask, "JointAttnProcessor")
        batch, image = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        split = lambda t: t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = 0
        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            eq = split(attn.add_q_proj(encoder_hidden_states))
            ek = split(attn.add_k_proj(encoder_hidden_states))
            ev = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        if self.policy.is_dense(self.layer):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            out = self._structured(query, key, value, num_prefix=text, prefix_last=True)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :image], out[:, image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, encoder_hidden_states)


def _weighted_rms_norms(*norms: nn.Module | None) -> bool:
    """Whether every norm is a torch RMSNorm with a weight (FLUX's and Wan's q/k norms), which ``rms_norm_rope``
    computes with the rotary embedding in one pass."""
    return all(isinstance(n, nn.RMSNorm) and n.weight is not None for n in norms)


def _normed_and_rotated(x: torch.Tensor, norm: nn.RMSNorm, tables: tuple[torch.Tensor, torch.Tensor] | None,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x) rotated by the pair tables (cos, sin) (N, D / 2) when given, x (B, N, H, D), into ``out``."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return rms_norm_rope(x, norm.weight, eps, *(tables or (None, None)), out=out)


def _flux_joint_qkv(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, eq: torch.Tensor | None,
                    ek: torch.Tensor | None, ev: torch.Tensor | None,
                    rotary: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, ...]:
    """FLUX's normalised, rotated q and k and its v, (B, N, H, D) with the text tokens first: each norm and its
    rotation one ``rms_norm_rope`` pass written straight into the joint buffer (diffusers: a dozen passes, then the
    concatenation). FLUX's tables repeat each angle over its channel pair: every other column is a pair's."""
    text = 0 if eq is None else eq.shape[1]

    def tables(tokens: slice) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if rotary is None else (rotary[0][tokens, ::2], rotary[1][tokens, ::2])

    def joint(image: torch.Tensor, image_norm: nn.RMSNorm, prefix: torch.Tensor | None,
              prefix_norm: nn.RMSNorm | None) -> torch.Tensor:
        b, n, h, d = image.shape
        out = image.new_empty(b, text + n, h, d)
        if text:
            _normed_and_rotated(prefix, prefix_norm, tables(slice(0, text)), out[:, :text])
        _normed_and_rotated(image, image_norm, tables(slice(text, None)), out[:, text:])
        return out

    added_q, added_k = (attn.norm_added_q, attn.norm_added_k) if text else (None, None)
    q, k = joint(query, attn.norm_q, eq, added_q), joint(key, attn.norm_k, ek, added_k)
    return q, k, torch.cat([ev, value], 1) if text else value


class FluxAttnProcessor(_SwappedProcessor):
    """``FluxAttnProcessor``: text tokens first (the prefix), then the packed latent grid.

    In the double-stream blocks the text comes as ``encoder_hidden_states``; in the single-stream
    blocks it is already the head of ``hidden_states``, and its length is what the grid leaves over.
    The q/k norms and the rotary embedding are ``rms_norm_rope`` passes, before dense attention too (dense layers and
    steps, a grid the op does not fit).
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        query, key, value, eq, ek, ev = _flux_qkv(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        if attn.added_kv_proj_dim is not None:
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        dense = self.policy.is_dense(self.layer)
        added = (attn.norm_added_q, attn.norm_added_k) if attn.added_kv_proj_dim is not None else ()
        if _weighted_rms_norms(attn.norm_q, attn.norm_k, *added):
            query, key, value = _flux_joint_qkv(attn, query, key, value, eq, ek, ev, image_rotary_emb)
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)
            if attn.added_kv_proj_dim is not None:
                eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
                query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if dense:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        else:
            _no_mask(attention_mask, "FluxAttnProcessor")
            text = query.shape[1] - math.prod(self.policy.grid)
            if text < 0 or (encoder_hidden_states is not None and text != encoder_hidden_states.shape[1]):
                raise ValueError(f"Flux attention over {query.shape[1]} tokens does not split into text tokens and "
                                 f"the latent grid {self.policy.grid}")
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            out = self._structured(q, k, v, num_prefix=text).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_hidden_states, out = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(encoder_hidden_states.contiguous())


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, as in ``WanAttnProcessor``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanAttnProcessor(_SwappedProcessor):
    """``WanAttnProcessor`` on the self-attention (attn1) over the (T, H, W) video grid; its q/k norms (over the
    token's H * D channels) and rotary embedding are ``rms_norm_rope`` passes, before dense attention too."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("WanAttnProcessor (subquad) serves the self-attention attn1 only")
        query, key, value = _wan_qkv(attn, hidden_states, None)
        dense = self.policy.is_dense(self.layer)
        if _weighted_rms_norms(attn.norm_q, attn.norm_k):
            # Wan's tables are (1, N, 1, D): a pair's cos in its even column, its sin in its odd one
            tables = None if rotary_emb is None else (rotary_emb[0][0, :, 0, 0::2], rotary_emb[1][0, :, 0, 1::2])
            query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
            query, key = _normed_and_rotated(query, attn.norm_q, tables), _normed_and_rotated(key, attn.norm_k, tables)
        else:
            query, key = attn.norm_q(query), attn.norm_k(key)
            query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
            if rotary_emb is not None:
                query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        if dense:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend)
        else:
            _no_mask(attention_mask, "WanAttnProcessor")
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            out = self._structured(q, k, v, num_prefix=0).transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
