"""Segmentation: UPerNet and Semantic FPN on features_only backbones, sliding windows, training on synthetic shapes."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from subquad.tasks.train.config import parse_config
from subquad.tasks.train.data.ade20k import ADE20K, IGNORE_INDEX
from subquad.tasks.train.data.synthetic import SEGMENTATION_CLASSES, write_segmentation
from subquad.tasks.train.heads import SemanticFPNHead, UPerHead
from subquad.tasks.train.segmentation import build_segmentation_model, slide_inference
from subquad.tasks.train.trainer import train

TINY_DEIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=64, window_size=4)


def recipe(root, out, backbone, kwargs, head, out_indices, crop, steps) -> dict:
    return {
        "task": "seg",
        "model": {"backbone": backbone, "kwargs": kwargs, "out_indices": out_indices, "head": head,
                  "head_channels": 32, "aux_channels": 16},
        "data": {"root": str(root), "num_classes": len(SEGMENTATION_CLASSES), "crop_size": crop,
                 "scale": [2 * crop, crop], "eval_stride": 3 * crop // 4, "batch_size": 8, "workers": 0},
        "optim": {"lr": 2e-3, "weight_decay": 0.01},
        "schedule": {"sched": "poly", "steps": steps, "warmup_steps": 5, "min_lr": 0.0},
        "run": {"output_dir": str(out), "log_interval": 10, "eval_interval": steps, "checkpoint_interval": steps},
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_segmentation(tmp_path_factory.mktemp("data") / "ADEChallengeData2016", train=48, val=12,
                              size_range=(32, 48))


def test_upernet_on_a_deit_learns_the_synthetic_shapes(shapes, tmp_path, capsys):
    cfg = parse_config(recipe(shapes, tmp_path / "run", "softmax_deit_tiny_patch16_224", TINY_DEIT, "upernet",
                              [0, 1], crop=32, steps=80))
    metrics = train(cfg)
    # The best constant guess, "background" everywhere, scores aAcc = its pixel share, mIoU = share / 7.
    labels = torch.cat([torch.from_numpy(y).flatten() for _, y in ADE20K(shapes, "validation", 7)])
    share = 100 * (labels == 0).sum().item() / (labels != IGNORE_INDEX).sum().item()
    assert metrics["aAcc"] > share + 10 and metrics["mIoU"] > 3 * share / 7, (metrics, share)
    assert set(metrics["per_class"]) == set(SEGMENTATION_CLASSES)
    out = capsys.readouterr().out
    assert "final (step 80/80): mIoU" in out and "background" in out and "images/s" in out


@pytest.mark.parametrize("head", ["upernet", "fpn"])
@pytest.mark.parametrize("backbone, kwargs, out_indices, strides", [
    ("softmax_deit_tiny_patch16_224", TINY_DEIT, [0, 1], [4, 4]),                  # one stride, NCHW
    ("swin_tiny_patch4_window7_224", TINY_SWIN, None, [4, 8, 16, 32]),             # four strides, NHWC
])
def test_heads_give_full_size_logits_on_any_features_only_backbone(head, backbone, kwargs, out_indices, strides):
    cfg = parse_config(recipe("unused", "unused", backbone, kwargs, head, out_indices, crop=64, steps=1)).model
    model = build_segmentation_model(cfg, num_classes=5)
    assert model.backbone.feature_info.reduction() == strides
    size = kwargs["img_size"]
    out = model(torch.randn(2, 3, size, size))
    assert out["out"].shape == out["aux"].shape == (2, 5, size, size)
    (out["out"].sum() + out["aux"].sum()).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    model.eval()
    assert list(model(torch.randn(1, 3, size, size))) == ["out"]


def test_backbone_weights_come_from_a_classifier_checkpoint(tmp_path):
    classifier = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **TINY_SWIN)
    save_file(classifier.state_dict(), str(tmp_path / "swin.safetensors"))
    cfg = parse_config(recipe("unused", "unused", "swin_tiny_patch4_window7_224", TINY_SWIN, "fpn", None, crop=64,
                              steps=1)).model
    cfg.checkpoint = str(tmp_path / "swin.safetensors")
    model = build_segmentation_model(cfg, num_classes=5)
    own = dict(model.backbone.named_parameters())
    assert torch.equal(own["layers_2.blocks.0.attn.qkv.weight"], classifier.layers[2].blocks[0].attn.qkv.weight)
    other = timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **{**TINY_SWIN, "embed_dim": 32})
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    cfg.checkpoint = str(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit model swin_tiny_patch4_window7_224"):
        build_segmentation_model(cfg, num_classes=5)


def test_semantic_fpn_upsamples_each_level_to_the_finest_stride():
    head = SemanticFPNHead([8, 16, 32], strides=[4, 8, 32], num_classes=3, channels=16)
    stages = [sum(isinstance(m, nn.Upsample) for m in h.modules()) for h in head.scale_heads]
    assert stages == [0, 1, 3]
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 2, 2)]
    assert head(features).shape == (2, 3, 16, 16)
    assert UPerHead([8, 16, 32], num_classes=3, channels=16)(features).shape == (2, 3, 16, 16)


class PixelwiseModel(nn.Module):
    """A 1x1 convolution: its logits do not depend on where a window starts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


@pytest.mark.parametrize("height, width", [(50, 70), (32, 32), (20, 25)])
def test_sliding_windows_average_to_the_whole_image_logits(height, width):
    model = PixelwiseModel()
    image = torch.randn(1, 3, height, width)
    logits = slide_inference(model, image, num_classes=4, crop=32, stride=20, batch_size=3)
    torch.testing.assert_close(logits, model(image)["out"])
