"""GridVisionTransformer through the named DeiT models: the grid follows the input, timm features,
grad checkpointing, per-block attention schedules, autocast and torch.compile."""
import pytest
import timm
import torch

import subquad

FAMILIES = sorted({name.split("_deit_")[0] for name in subquad.backbones.deit.default_cfgs})  # model-name prefixes


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_img_size_follows_input(family):
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", dynamic_img_size=True, num_classes=5).eval()
    for h, w in [(224, 224), (160, 192), (256, 128)]:
        feats = model.forward_intermediates(torch.randn(1, 3, h, w), indices=[11], intermediates_only=True)
        assert feats[0].shape == (1, 192, h // 16, w // 16)


def test_grad_checkpointing_gives_same_gradients():
    model = timm.create_model("mala_deit_tiny_patch16_224", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for g0, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g0, rtol=1e-4, atol=1e-6)


def test_features_only_and_reset_classifier():
    feats = timm.create_model("flatten_deit_tiny_patch16_224", features_only=True, out_indices=(2, 5, 11))
    outs = feats(torch.randn(1, 3, 224, 224))
    assert [o.shape for o in outs] == [(1, 192, 14, 14)] * 3
    assert feats.feature_info.channels() == [192] * 3
    model = timm.create_model("softmax_deit_tiny_patch16_224")
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_per_block_schedule_and_kwargs():
    sched = ["agent", "mala", "flatten", "softmax"] * 3
    model = timm.create_model("softmax_deit_tiny_patch16_224", attn=sched,
                              attn_kwargs={"agent": {"num_agents": 16}, "mala": {"gate": True}})
    kinds = [blk.attn.family for blk in model.blocks]
    assert kinds == [subquad.attention.canonical_name(n) for n in sched]
    assert model.blocks[0].attn.num_agents == 16 and model.blocks[1].attn.gate is not None
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_bad_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="valid names"):
        timm.create_model("softmax_deit_tiny_patch16_224", attn="nope")
    with pytest.raises(ValueError, match="3 names for 12 blocks"):
        timm.create_model("softmax_deit_tiny_patch16_224", attn=["agent"] * 3)


def test_bf16_autocast_forward_is_finite():
    model = timm.create_model("agent_deit_tiny_patch16_224", img_size=128).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 128, 128))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_compile_fullgraph_captures(family):
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", img_size=128, depth=2).eval()
    x = torch.randn(1, 3, 128, 128)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
