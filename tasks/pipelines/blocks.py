"""Diffusers transformer blocks with their adaLN modulation, gates and residual adds fused.

Around its attention and feed-forward, a FLUX, SD3 or Wan block makes a dozen elementwise passes over the (B, N, C)
residual stream: the LayerNorm, the modulation by (1 + scale) and shift, each branch's gate and residual add
(Wan's in float32, with casts there and back), and FLUX's single blocks concatenate the attention and MLP
outputs before their output projection. ``fuse_blocks`` gives each block a forward that computes the same with
``add_norm_modulate`` (residual add, norm and modulation in one pass), one-pass gated adds, the tanh GELU in the
epilogue of the product before it (CUDA), and the single blocks' output projection as two products into one
output; the weights, the attention (the swapped processor) and the rest of the feed-forward stay the block's own.
The values are diffusers' up to rounding: each fused pass computes in float32 and rounds once where diffusers'
bfloat16 blocks round after every op.

    FluxTransformerBlock        adaLN-Zero (Peebles & Xie 2023, Sec. 3.2) of the image and text streams
    JointTransformerBlock       SD3's, the same (not its dual-attention or last, context-pre-only blocks)
    FluxSingleTransformerBlock  the joint stream; its input is not copied where it is one buffer already
    WanTransformerBlock         one modulation per sample (Wan 2.1, 2.2 A14B); per-token modulation (TI2V) as written
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward, JointTransformerBlock
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle, FP32LayerNorm
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch import nn

from ...backbones.fused_norm import add_norm_modulate
from ...kernels import add_layer_norm


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y with ``gate`` (B, C) per sample, computed in float32 (or the operands' wider type) and rounded
    once to x's dtype: one pass (diffusers: the product, the sum and, in Wan, the casts, each a pass)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, y)):
        return torch.addcmul(x, gate[:, None], y).to(x.dtype)          # out= records no gradient
    return torch.addcmul(x, gate[:, None], y, out=torch.empty_like(x))


def linear_gelu(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """gelu(linear(x), approximate="tanh") (FLUX's and Wan's MLP input): in inference on CUDA one cuBLASLt product
    with the GELU in its epilogue, applied to the float32 accumulator (``torch._addmm_activation``: no pass over the
    4C-wide output); else the two ops. A module other than exactly ``nn.Linear`` (a LoRA or quantized layer) runs
    as itself."""
    if type(linear) is not nn.Linear:
        return F.gelu(linear(x), approximate="tanh")
    recording = torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
    if x.is_cuda and linear.bias is not None and not recording and not torch.compiler.is_compiling():
        out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def feed_forward(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)``; of diffusers' FeedForward, its first product and tanh GELU as ``linear_gelu``."""
    if type(ff) is not FeedForward:
        return ff(x)
    first, *rest = ff.net
    x = linear_gelu(first.proj, x) if type(first) is GELU and first.approximate == "tanh" else first(x)
    for module in rest:
        x = module(x)
    return x


def split_linear(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``linear(torch.cat([a, b], -1))`` without the concatenation: the products of a and b with the weight's two
    column blocks (read in place) accumulate in one output. A module other than exactly ``nn.Linear`` (a LoRA or
    quantized layer) runs as itself on the concatenation."""
    if type(linear) is not nn.Linear:
        return linear(torch.cat([a, b], -1))
    c = a.shape[-1]
    out = F.linear(a, linear.weight[:, :c], linear.bias)
    out.view(-1, out.shape[-1]).addmm_(b.reshape(-1, b.shape[-1]), linear.weight[:, c:].t())
    return out


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], 1)``, as a view where b follows a in one buffer (the token halves a single block
    returned), else the copy."""
    follows = (not torch.compiler.is_compiling() and not (a.requires_grad or b.requires_grad)
               and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()
               and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
               and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
               and b.storage_offset() == a.storage_offset() + a.shape[1] * a.stride(1)
               and (a.shape[0] == 1 or a.stride(0) == (a.shape[1] + b.shape[1]) * a.stride(1)))
    if follows:
        return a.as_strided((a.shape[0], a.shape[1] + b.shape[1], *a.shape[2:]), a.stride())
    return torch.cat([a, b], 1)


def _clip_half(x: torch.Tensor) -> torch.Tensor:
    """FLUX's float16 guard: clip to the largest finite float16."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _modulated_stream(norm2: nn.LayerNorm, ff: nn.Module, x: torch.Tensor, attn_out: torch.Tensor,
                      modulation: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One stream of a double-stream block after its attention: the gated residual add, the modulated norm (one
    pass), the feed-forward and its gated residual add."""
    _, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
    x, h = add_norm_modulate(norm2, x, shift_mlp, scale_mlp, attn_out, gate_msa)
    return gated_add(x, gate_mlp, feed_forward(ff, h))


def _adaln_zero(norm: AdaLayerNormZero, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``AdaLayerNormZero``'s outputs (the modulated norm of x, gate_msa, shift_mlp, scale_mlp, gate_mlp), the
    norm and modulation in one pass."""
    shift, scale, *rest = norm.linear(norm.silu(temb)).chunk(6, dim=1)
    return (add_norm_modulate(norm.norm, x, shift, scale)[1], *rest)


def _double_stream(block: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   temb: torch.Tensor, attention_kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text streams of a FLUX double block or an SD3 joint block around their joint attention."""
    image = _adaln_zero(block.norm1, hidden_states, temb)
    text = _adaln_zero(block.norm1_context, encoder_hidden_states, temb)
    outputs = block.attn(hidden_states=image[0], encoder_hidden_states=text[0], **attention_kwargs)
    hidden_states = _modulated_stream(block.norm2, block.ff, hidden_states, outputs[0], image)
    if len(outputs) == 3:                       # an IP-adapter's output
        hidden_states = hidden_states + outputs[2]
    encoder_hidden_states = _modulated_stream(block.norm2_context, block.ff_context, encoder_hidden_states,
                                              outputs[1], text)
    return encoder_hidden_states, hidden_states


def flux_double_forward(block: FluxTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                        temb: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                        joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward``, fused."""
    encoder_hidden_states, hidden_states = _double_stream(
        block, hidden_states, encoder_hidden_states, temb,
        dict(image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})))
    return _clip_half(encoder_hidden_states), hidden_states


def sd3_forward(block: JointTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, joint_attention_kwargs: dict[str, Any] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``JointTransformerBlock.forward`` (SD3's blocks but the dual-attention and the last, context-pre-only ones),
    fused."""
    return _double_stream(block, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs or {})


def flux_single_forward(block: FluxSingleTransformerBlock, hidden_states: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                        joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward``, fused."""
    text = encoder_hidden_states.shape[1]
    x = joined(encoder_hidden_states, hidden_states)
    shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)
    _, h = add_norm_modulate(block.norm.norm, x, shift, scale)
    mlp = linear_gelu(block.proj_mlp, h) if _tanh_gelu(block.act_mlp) else block.act_mlp(block.proj_mlp(h))
    attn_out = block.attn(hidden_states=h, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    x = _clip_half(gated_add(x, gate, split_linear(block.proj_out, attn_out, mlp)))
    return x[:, :text], x[:, text:]


def wan_forward(block: WanTransformerBlock, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, rotary_emb: torch.Tensor) -> torch.Tensor:
    """``WanTransformerBlock.forward``, fused: the residual stream stays in its dtype, each pass computing in
    float32 as Wan's blocks do."""
    if temb.ndim == 4:                          # one modulation per token (Wan 2.2 TI2V): as diffusers writes it
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    dtype = hidden_states.dtype
    modulation = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, 0] for m in modulation)
    _, h = add_norm_modulate(block.norm1, hidden_states, shift, scale)
    attn_out = block.attn1(h, None, None, rotary_emb)
    if isinstance(block.norm2, nn.Identity):
        x = h = gated_add(hidden_states, gate, attn_out)
    else:
        x, h = add_layer_norm(hidden_states, attn_out, block.norm2.weight, block.norm2.bias, block.norm2.eps,
                              gate=gate, residual_dtype=dtype)
    attn_out = block.attn2(h, encoder_hidden_states, None, None)
    x, h = add_norm_modulate(block.norm3, x, c_shift, c_scale, attn_out)
    return gated_add(x, c_gate, feed_forward(block.ffn, h))


def _tanh_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "tanh"


def _plain_norm(norm: nn.Module, affine: bool = False) -> bool:
    """A LayerNorm over the last axis, exactly torch's or diffusers' float32 one, with a weight and a bias when
    ``affine``, else neither."""
    return type(norm) in (nn.LayerNorm, FP32LayerNorm) and len(norm.normalized_shape) == 1 \
        and (norm.weight is not None) == (norm.bias is not None) == affine


def _double_stream_fits(block: nn.Module) -> bool:
    return all(type(n) is AdaLayerNormZero and n.emb is None and _plain_norm(n.norm)
               for n in (block.norm1, block.norm1_context)) and _plain_norm(block.norm2) \
        and _plain_norm(block.norm2_context)


def _sd3_fits(block: JointTransformerBlock) -> bool:
    return not block.use_dual_attention and not block.context_pre_only and block._chunk_size is None \
        and _double_stream_fits(block)


def _flux_single_fits(block: FluxSingleTransformerBlock) -> bool:
    return type(block.norm) is AdaLayerNormZeroSingle and _plain_norm(block.norm.norm) \
        and block.proj_out.in_features == block.attn.inner_dim + block.mlp_hidden_dim


def _wan_fits(block: WanTransformerBlock) -> bool:
    norm2 = block.norm2
    return _plain_norm(block.norm1) and _plain_norm(block.norm3) \
        and (type(norm2) is nn.Identity or type(norm2) is FP32LayerNorm and _plain_norm(norm2, affine=True))


FUSED_FORWARDS: dict[type, tuple[Callable, Callable[[nn.Module], bool]]] = {
    FluxTransformerBlock: (flux_double_forward, _double_stream_fits),
    FluxSingleTransformerBlock: (flux_single_forward, _flux_single_fits),
    WanTransformerBlock: (wan_forward, _wan_fits),
    JointTransformerBlock: (sd3_forward, _sd3_fits),
}


def fuse_blocks(transformer: nn.Module) -> list[nn.Module]:
    """Give each block of ``transformer`` that ``FUSED_FORWARDS`` covers (exactly that class, its norms as diffusers
    builds them, no forward of its own set on the instance, as hooks do) the fused forward; returns those blocks
    (``unfuse_blocks`` takes them back)."""
    fused = []
    for module in transformer.modules():
        forward, fits = FUSED_FORWARDS.get(type(module), (None, None))
        if forward is not None and "forward" not in vars(module) and fits(module):
            module.forward = types.MethodType(forward, module)
            fused.append(module)
    return fused


def unfuse_blocks(blocks: list[nn.Module]) -> None:
    """The blocks' class forwards back."""
    for module in blocks:
        vars(module).pop("forward", None)
