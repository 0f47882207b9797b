"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, ICCV 2023), any attention family.

Class-conditional, adaLN-Zero blocks (Sec. 3.2), fixed 2D sin-cos positions, optional learned sigma.
A diffusers ``ModelMixin``/``ConfigMixin``: diffusers schedulers drive it and ``save_pretrained`` /
``from_pretrained`` work on a local folder. The attention is the only moving part: ``attn`` names it
for every block or per block (``AttentionSchedule``) and each block gets the latent token grid
explicitly.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Mlp, PatchEmbed
from torch import nn

from ..attention import build
from .attention_schedule import AttentionSchedule, AttnEntry
from .fused_norm import add_norm_modulate
from .patchify import PatchifyConv2d


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def sincos_pos_embed(dim: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE / DiT), (H*W, dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64, device=device),
                                torch.arange(grid[1], dtype=torch.float64, device=device), indexing="ij")
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; label ``num_classes`` is the null class for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning regresses shift/scale/gate of both sub-layers."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attn: str, attn_options: dict) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build(attn, dim=hidden_size, num_heads=num_heads, qkv_bias=True, **attn_options)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x, h = add_norm_modulate(self.norm1, x, shift1, scale1)
        x, h = add_norm_modulate(self.norm2, x, shift2, scale2, self.attn(h, grid), gate1)
        return x + gate2.unsqueeze(1) * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(add_norm_modulate(self.norm_final, x, shift, scale)[1])


class DiT(ModelMixin, ConfigMixin):
    """``DiT(input_size, patch_size, ...)(x, t, y)``: noise (and sigma) prediction for latents x (B, C, H, W).

    Any H, W divisible by ``patch_size`` work; the token grid (H/p, W/p) is passed to every block.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True,
                 attn: AttnEntry | Sequence[AttnEntry] = "softmax",
                 attn_kwargs: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_classes = patch_size, num_classes
        self.gradient_checkpointing = False
        self.attn_schedule = schedule = AttentionSchedule(attn, attn_kwargs, depth)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True, strict_img_size=False)
        self.x_embedder.proj = PatchifyConv2d.from_conv(self.x_embedder.proj)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, *schedule[i]) for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero adaLN modulations and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for mod in [blk.adaLN_modulation for blk in self.blocks] + [self.final_layer.adaLN_modulation]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H*W, p*p*C) -> (B, C, H*p, W*p)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], *grid, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, grid[0] * p, grid[1] * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"DiT expects latents (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by patch_size={self.patch_size}")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.x_embedder(x) + sincos_pos_embed(self.config.hidden_size, grid, x.device).to(x.dtype)
        c = self.t_embedder(t.expand(x.shape[0]) if t.dim() == 0 else t) + self.y_embedder(y)
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(blk, tokens, c, grid, use_reentrant=False)
            else:
                tokens = blk(tokens, c, grid)
        return self.unpatchify(self.final_layer(tokens, c), grid)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on the noise channels: one batched pass over (conditional, null) labels."""
        null = torch.full_like(y, self.config.num_classes)
        out = self(torch.cat([x, x]), torch.cat([t, t]) if t.dim() else t, torch.cat([y, null]))
        eps, rest = out[:, :self.config.in_channels], out[:, self.config.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([guided, rest.chunk(2)[0]], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for gradient checkpointing."""
        self.gradient_checkpointing = enable
