"""CSWin-layout models (Agent-CSWin, FLatten-CSWin): the papers' block layouts and stripe widths, CSWin's
stem and merging, cross-shaped window attention against dense attention with the stripe masks, features,
forward at the default and other sizes. Official key sets: test_checkpoints; parameters and FLOPs: test_parity."""
import pytest
import timm
import torch
import torch.nn.functional as F

import subquad.attention as attention
from subquad.attention import CrossWindowAttention

# per stage, the attention of every block (official cfgs/*_cswin_*.yaml): A agent, L focused linear, S CSWin
LAYOUTS = {
    "agent_cswin_tiny_224": ("A" * 2, "A" * 4, "S" * 18, "S"),
    "agent_cswin_small_224": ("A" * 3, "A" * 6, "S" * 29, "SS"),
    "agent_cswin_base_224": ("A" * 3, "A" * 6, "S" * 29, "SS"),
    "agent_cswin_base_384": ("A" * 3, "A" * 6, "S" * 29, "SS"),
    "flatten_cswin_tiny_224": ("L" * 2, "L" * 4, "S" * 18, "S"),
    "flatten_cswin_small_224": ("L" * 2, "L" * 4, "S" * 32, "SS"),
    "flatten_cswin_base_224": ("L" * 3, "L" * 6, "S" * 29, "SS"),
    "flatten_cswin_base_384": ("L" * 3, "L" * 6, "S" * 29, "SS"),
}
KINDS = {"A": "agent", "L": "focused_linear", "S": "cross_window"}
NARROW = dict(embed_dims=(32, 64, 128, 256), num_heads=(2, 2, 4, 8), depths=(1, 1, 2, 1))  # fast on a CPU


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_paper_block_layout(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.attn_schedule.names == [KINDS[k] for stage in LAYOUTS[name] for k in stage]
    size = int(name.rsplit("_", 1)[1])
    stripes = [{b.attn.stripe_width for b in s.blocks} for s in model.stages[2:]]
    assert stripes == [{size // 32}, {None}]               # CSWin's split sizes 7 (12 at 384), the whole map
    for i, stage in enumerate(model.stages[:2]):
        side = size // 4 // 2 ** i
        for block in stage.blocks:
            if name.startswith("agent"):
                assert (block.attn.num_agents, block.attn.bias_grid) == ((9, 16)[i], (side, side))
                assert block.attn.dwc.kernel_size == (3, 3)
            else:
                assert block.attn.pos_grid == (side, side) and block.attn.lepe.kernel_size == (3, 3)
                assert block.attn.dwc.kernel_size == (5, 5) and block.attn.focusing_factor == 3


def test_stem_and_merging_are_cswin_s():
    with torch.device("meta"):
        model = timm.create_model("agent_cswin_tiny_224")
    stem = model.patch_embed.proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (2, 2))
    down = model.stages[1].downsample.proj
    assert (down.kernel_size, down.stride, down.padding, down.bias is not None) == ((3, 3), (2, 2), (1, 1), True)
    assert isinstance(model.stages[1].downsample.norm, torch.nn.LayerNorm)
    assert [s.blocks[0].mlp.fc1.out_features for s in model.stages] == [256, 512, 1024, 2048]


def test_built_by_name_not_listed_among_the_families():
    attn = attention.build("cross_window", dim=16, num_heads=2, stripe_width=3)
    assert type(attn) is CrossWindowAttention and attn.stripe_width == 3
    assert "cross_window" not in attention.list() and "cross_window" in attention.standalone_names()
    with pytest.raises(ValueError, match="num_heads must be even, got 1"):
        attention.build("cross_window", dim=16, num_heads=1)
    assert attention.build("cross_window", dim=16, num_heads=1, stripe_width=None).stripe_width is None
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 10, 16), grid=(3, 3), num_prefix=1)


def stripe_lepe(v, weight, bias, stripe_of):
    """The depthwise conv of v (C, H, W) inside each stripe (zero outside it), summed over the stripes."""
    out = torch.zeros_like(v)
    for s in stripe_of.unique():
        inside = (stripe_of == s).to(v.dtype)
        out += F.conv2d((v * inside)[None], weight, bias, padding=1, groups=v.shape[0])[0] * inside
    return out


def test_cross_window_matches_dense_attention_with_the_stripe_masks():
    """Grid 9 x 10, stripes of 4 (the last ones padded): heads 0-1 attend within their vertical stripe, heads
    2-3 within their horizontal one, each with its half of the LePE conv inside the stripe (Eq. 2-4)."""
    attn = CrossWindowAttention(16, num_heads=4, stripe_width=4).eval()
    x = torch.randn(2, 90, 16)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(10), indexing="ij")
    q, k, v = attn.qkv(x).reshape(2, 90, 3, 4, 4).permute(2, 0, 3, 1, 4)
    outs = []
    for heads, stripe_of in ((slice(0, 2), cols // 4), (slice(2, 4), rows // 4)):
        same = stripe_of.flatten()[:, None] == stripe_of.flatten()[None, :]
        scores = (q[:, heads] @ k[:, heads].transpose(-2, -1)) * 4 ** -0.5
        y = scores.masked_fill(~same, float("-inf")).softmax(-1) @ v[:, heads]           # (B, 2, 90, 4)
        channels = slice(heads.start * 4, heads.stop * 4)
        v_map = v[:, heads].permute(0, 1, 3, 2).reshape(2, 8, 9, 10)
        lepe = torch.stack([stripe_lepe(m, attn.lepe.weight[channels], attn.lepe.bias[channels], stripe_of)
                            for m in v_map])
        outs.append(y + lepe.reshape(2, 2, 4, 90).transpose(-2, -1))
    expected = attn.proj(torch.cat(outs, dim=1).transpose(1, 2).reshape(2, 90, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, grid=(9, 10)), expected, rtol=1e-5, atol=1e-5)


def test_whole_map_is_dense_attention_plus_lepe():
    """stripe_width=None (CSWin's last stage), and stripes at least as wide as the grid: dense attention over
    every head plus the LePE conv over the whole map."""
    whole = CrossWindowAttention(16, num_heads=2, stripe_width=None).eval()
    wide = CrossWindowAttention(16, num_heads=2, stripe_width=7).eval()
    wide.load_state_dict(whole.state_dict())
    x = torch.randn(1, 30, 16)
    q, k, v = whole.qkv(x).reshape(1, 30, 3, 2, 8).permute(2, 0, 3, 1, 4)
    v_map = v.permute(0, 1, 3, 2).reshape(1, 16, 5, 6)
    lepe = F.conv2d(v_map, whole.lepe.weight, whole.lepe.bias, padding=1, groups=16).reshape(1, 2, 8, 30)
    y = F.scaled_dot_product_attention(q, k, v) + lepe.transpose(-2, -1)
    expected = whole.proj(y.transpose(1, 2).reshape(1, 30, 16))
    with torch.no_grad():
        torch.testing.assert_close(whole(x, grid=(5, 6)), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide(x, grid=(5, 6)), expected, rtol=1e-5, atol=1e-5)


def test_features_only():
    feats = timm.create_model("flatten_cswin_tiny_224", features_only=True, **NARROW)
    outs = feats(torch.randn(1, 3, 64, 96))
    assert [o.shape for o in outs] == [(1, 32, 16, 24), (1, 64, 8, 12), (1, 128, 4, 6), (1, 256, 2, 3)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.device("meta"):
        full = timm.create_model("agent_cswin_base_224", features_only=True, out_indices=(1, 3))
    assert full.feature_info.channels() == [192, 768] and full.feature_info.reduction() == [8, 32]


@pytest.mark.parametrize("name, other", [("agent_cswin_tiny_224", 256), ("flatten_cswin_tiny_224", 256),
                                         ("agent_cswin_base_384", 320), ("flatten_cswin_base_384", 320)])
def test_forward_at_the_default_and_another_size(name, other):
    """At another size the global maps are resized and the stripes (7 or 12) no longer divide stage 3's map."""
    model = timm.create_model(name, num_classes=3, **NARROW).eval()
    size = model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        for side in (size, other):
            out = model(torch.randn(1, 3, side, side))
            assert out.shape == (1, 3) and out.isfinite().all()
