"""Every registered DeiT model: builds, trains a step, loads a local checkpoint, timm features, names."""
import subprocess
import sys

import pytest
import timm
import torch

import subquad
from subquad.tasks.zoo import subquad_model_names

NAMES = subquad.backbones.subquad_deit.deit_model_names()

# Exact parameter counts (pinned: any change is a deliberate, reviewed change).
PARAMS = {
    "agent_deit_base_patch16_224": 87204904,
    "agent_deit_small_patch16_224": 22647112,
    "agent_deit_tiny_patch16_224": 6015640,
    "flatten_deit_base_patch16_224": 88403176,
    "flatten_deit_small_patch16_224": 22978408,
    "flatten_deit_tiny_patch16_224": 6191272,
    "mala_deit_base_patch16_224": 86807272,
    "mala_deit_small_patch16_224": 22170472,
    "mala_deit_tiny_patch16_224": 5777320,
    "softmax_deit_base_patch16_224": 86567656,
    "softmax_deit_small_patch16_224": 22050664,
    "softmax_deit_tiny_patch16_224": 5717416,
    "nat_deit_tiny_patch16_224": 5723500,
    "nat_deit_small_patch16_224": 22062832,
    "nat_deit_base_patch16_224": 86591992,
    "radial_deit_tiny_patch16_224": 5717416,
    "radial_deit_small_patch16_224": 22050664,
    "radial_deit_base_patch16_224": 86567656,
    "llsa_deit_tiny_patch16_224": 5717416,
    "llsa_deit_small_patch16_224": 22050664,
    "llsa_deit_base_patch16_224": 86567656,
}
# What the papers report (millions); Agent Attention, Table 1 (DeiT rows).
PAPER_PARAMS_M = {"agent_deit_tiny_patch16_224": 6.0, "agent_deit_small_patch16_224": 22.7,
                  "agent_deit_base_patch16_224": 87.2}


def _count(name, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, **kw).parameters())


def test_every_model_is_listed_and_pinned():
    assert set(NAMES) <= set(subquad_model_names())
    assert set(PARAMS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_param_count_pinned(name):
    assert _count(name) == PARAMS[name]


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
@pytest.mark.parametrize("family", ["softmax", "radial", "llsa"])
def test_parameter_free_attention_matches_timm_deit(family, size):
    assert _count(f"{family}_deit_{size}_patch16_224") == _count(f"deit_{size}_patch16_224")


@pytest.mark.parametrize("size,heads", [("tiny", 3), ("small", 6), ("base", 12)])
def test_nat_deit_adds_only_the_relative_position_bias(size, heads):
    extra = _count(f"nat_deit_{size}_patch16_224") - _count(f"deit_{size}_patch16_224")
    assert extra == 12 * heads * 13 * 13


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_count_matches_paper(name):
    assert abs(_count(name) / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01


def test_no_name_collides_with_timm():
    code = "import timm; print('\\n'.join(timm.list_models()))"
    timm_names = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.split())
    assert len(timm_names) > 500
    assert not set(subquad_model_names()) & timm_names


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_small_input(name):
    model = timm.create_model(name, img_size=96, num_classes=7)     # a 6x6 grid
    x = torch.randn(2, 3, 96, 96)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


FAMILIES = ["agent", "flatten", "mala", "nat", "radial", "llsa", "softmax"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_img_size_follows_input(family):
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", dynamic_img_size=True, num_classes=5).eval()
    for h, w in [(224, 224), (160, 192), (256, 128)]:
        feats = model.forward_intermediates(torch.randn(1, 3, h, w), indices=[11], intermediates_only=True)
        assert feats[0].shape == (1, 192, h // 16, w // 16)


def test_local_pretrained_file_loads(tmp_path):
    src = timm.create_model("agent_deit_tiny_patch16_224")
    path = tmp_path / "agent_tiny.pth"
    torch.save(src.state_dict(), path)
    same = timm.create_model("agent_deit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), (_, b) in zip(src.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), k
    tuned = timm.create_model("agent_deit_tiny_patch16_224", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert tuned.head.out_features == 10
    assert torch.equal(tuned.blocks[3].attn.an_bias, src.blocks[3].attn.an_bias)


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
