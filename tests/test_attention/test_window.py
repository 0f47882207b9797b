"""Swin's shifted-window attention: built by name (not a family), padding and masking against dense
attention with the window mask; shifted windows against timm's Swin are in tests/test_backbones/test_swin.py."""
import pytest
import torch

import subquad.attention as attention
from subquad.attention import WindowAttention


def test_built_by_name_not_listed_among_the_families():
    attn = attention.build("window", dim=16, num_heads=2, window_size=4, shift=True)
    assert type(attn) is WindowAttention and attn.family == "window"
    assert (attn.window_size, attn.shift) == (4, True)
    assert "window" not in attention.list() and "window" in attention.standalone_names()
    assert attention.canonical_name("window") == "window"


def test_window_attention_pads_and_masks_like_whole_windows():
    """Grid 9 x 10, window 7, no shift: each token attends the real tokens of its 7 x 7 block, with the
    relative position bias of their offset; checked against dense attention with that mask."""
    attn = WindowAttention(16, num_heads=2, window_size=7).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(1, 90, 16)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(10), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    same_block = (rows[:, None] // 7 == rows[None, :] // 7) & (cols[:, None] // 7 == cols[None, :] // 7)
    offset = ((rows[:, None] - rows[None, :] + 6) * 13 + (cols[:, None] - cols[None, :] + 6)).clamp(0, 168)
    bias = attn.relative_position_bias_table[offset].permute(2, 0, 1)
    q, k, v = attn.qkv(x).reshape(1, 90, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias
    expected = scores.masked_fill(~same_block, float("-inf")).softmax(-1) @ v
    expected = attn.proj(expected.transpose(1, 2).reshape(1, 90, 16))
    torch.testing.assert_close(attn(x, grid=(9, 10)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 91, 16), grid=(9, 10), num_prefix=1)
