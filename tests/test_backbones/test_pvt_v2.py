"""FLatten-PVTv2: PVTv2's overlapping patch embedding, convolutional FFN and per-stage norms on the shared
hierarchical machinery, focused linear attention in every block over the full stage map."""
import timm
import torch
import torch.nn.functional as F


def test_layout():
    with torch.device("meta"):
        model = timm.create_model("flatten_pvt_v2_b2")
    assert model.attn_schedule.names == ["focused_linear"] * 16
    assert [s.blocks[0].attn.pos_grid for s in model.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    stem = model.patch_embed.proj
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (4, 4), (3, 3))
    down = model.stages[1].downsample.proj
    assert (down.kernel_size, down.stride, down.padding, down.bias is not None) == ((3, 3), (2, 2), (1, 1), True)
    assert all(s.pos_embed is None and isinstance(s.norm, torch.nn.LayerNorm) for s in model.stages)
    assert isinstance(model.norm, torch.nn.Identity)               # the last stage's norm is the final one
    assert [s.blocks[0].mlp.fc1.out_features for s in model.stages] == [512, 1024, 1280, 2048]


def test_conv_ffn_and_stage_norm_compose_as_pvt_v2():
    """fc1 -> 3x3 depthwise conv (no residual) -> GELU -> fc2; the stage output goes through its norm."""
    model = timm.create_model("flatten_pvt_v2_b0", num_classes=3, depths=(1, 1, 1, 1)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    mlp = model.stages[0].blocks[0].mlp
    x = torch.randn(2, 8, 8, 32)
    h = mlp.fc1(x).permute(0, 3, 1, 2)
    h = F.conv2d(h, mlp.dwconv.weight, mlp.dwconv.bias, padding=1, groups=h.shape[1]).permute(0, 2, 3, 1)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(h)))
    image = torch.randn(1, 3, 64, 64)
    feats = model.forward_intermediates(image, intermediates_only=True, output_fmt="NHWC")
    stage = model.stages[1]
    torch.testing.assert_close(feats[1], stage.norm(stage.blocks(stage.downsample(feats[0]))))
    with torch.no_grad():
        logits = model.head.fc(feats[3].mean(dim=(1, 2)))
    torch.testing.assert_close(model(image), logits)


def test_features_only():
    feats = timm.create_model("flatten_pvt_v2_b0", features_only=True, out_indices=(1, 3))
    outs = feats(torch.randn(1, 3, 64, 96))
    assert [o.shape for o in outs] == [(1, 64, 8, 12), (1, 256, 2, 3)]
    assert feats.feature_info.reduction() == [8, 32]
