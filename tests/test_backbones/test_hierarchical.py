"""Hierarchical backbones: every name builds, the smallest of each family trains a step, timm
features, input checks, and the attention schedule with the per-stage placement options."""
from functools import partial

import pytest
import timm
import torch

from subquad.backbones.hierarchical import HierarchicalTransformer
from subquad.tasks.zoo import subquad_model_names

NAMES = {
    "swin": [f"{f}_swin_{s}_patch4_window7_224" for f in ("agent", "flatten") for s in ("tiny", "small", "base")]
    + ["agent_swin_small_patch4_window9_288", "agent_swin_base_patch4_window12_384",
       "flatten_swin_base_patch4_window12_384"],
    "pvt": [f"{f}_pvt_{s}" for f in ("agent", "flatten") for s in ("tiny", "small", "medium", "large")]
    + ["agent_pvt_medium_256"],
    "pvt_v2": [f"flatten_pvt_v2_b{i}" for i in range(5)],
    "cswin": [f"{f}_cswin_{s}" for f in ("agent", "flatten") for s in ("tiny_224", "small_224", "base_224", "base_384")],
    "mavit": [f"mavit_{s}" for s in ("tiny", "small", "base", "large")],
    "hier": [f"subquad_hier_{s}" for s in ("tiny", "small", "base")],
    "nat": [f"{f}_{s}" for f in ("nat", "dinat") for s in ("mini", "tiny", "small", "base")]
    + ["dinat_large", "dinat_large_384", "dinat_large_384_11x11"]
    + [f"dinat_s_{s}" for s in ("tiny", "small", "base", "large", "large_384")],
}
RESOLUTION = {"288": 288, "384": 384, "256": 256}   # a name ending in a size (or _384_11x11) is at that size
ALL = [n for names in NAMES.values() for n in names]
SMALLEST = ["agent_swin_tiny_patch4_window7_224", "flatten_swin_tiny_patch4_window7_224", "agent_pvt_tiny",
            "flatten_pvt_tiny", "flatten_pvt_v2_b0", "agent_cswin_tiny_224", "flatten_cswin_tiny_224", "mavit_tiny",
            "nat_mini", "dinat_mini"]
SMALL = dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2))  # narrow, shallow: fast


def test_every_name_is_registered():
    assert set(ALL) <= set(subquad_model_names())


@pytest.mark.parametrize("name", ALL)
def test_builds_with_four_stages(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, HierarchicalTransformer)
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert len(model.attn_schedule.names) == sum(len(s.blocks) for s in model.stages)
    size = next((v for k, v in RESOLUTION.items() if f"_{k}" in name), 224)
    assert model.pretrained_cfg["input_size"] == (3, size, size)
    assert model.pretrained_cfg["pool_size"] == (size // 32,) * 2


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_backward_small_input(name):
    model = timm.create_model(name, num_classes=5)
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient (DDP would reject them): {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SMALLEST)
def test_torch_compile_fullgraph_captures(name):
    """Each hierarchical family traces into one graph (no graph break in the blocks, the window/patch merging or the
    attention's host code) and the captured model computes what the eager one does."""
    torch.manual_seed(0)
    torch._dynamo.reset()       # the blocks' code objects compiled by earlier tests in this worker count to its limit
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_features_only_shapes_strides_and_subsets():
    feats = timm.create_model("agent_pvt_tiny", features_only=True)
    outs = feats(torch.randn(1, 3, 64, 96))
    assert [o.shape for o in outs] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 320, 4, 6), (1, 512, 2, 3)]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert feats.feature_info.channels() == [64, 128, 320, 512]
    two = timm.create_model("agent_pvt_tiny", features_only=True, out_indices=(1, -1))
    assert [o.shape[1] for o in two(torch.randn(1, 3, 64, 64))] == [128, 512]
    assert len(two.model.stages) == 4 and two.feature_info.reduction() == [8, 32]
    early = timm.create_model("mavit_tiny", features_only=True, out_indices=(0, 2), depths=(1, 1, 1, 1))
    sum(o.sum() for o in early(torch.randn(2, 3, 64, 64))).backward()
    assert len(early.model.stages) == 3                                   # the last stage and the head are pruned
    assert all(p.grad is not None for p in early.parameters()), "unused parameters in a features_only model"


def test_forward_intermediates_contract():
    model = timm.create_model("flatten_pvt_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    final, inter = model.forward_intermediates(x, indices=[0, 3])
    assert [t.shape for t in inter] == [(1, 64, 16, 16), (1, 512, 2, 2)]
    torch.testing.assert_close(model.forward_head(final), model(x))
    assert [t.shape[1] for t in model.forward_intermediates(x, indices=2, intermediates_only=True)] == [320, 512]
    only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    assert [t.shape[1] for t in only] == [128]


def test_input_size_must_be_multiple_of_32():
    model = timm.create_model("agent_pvt_tiny")
    with pytest.raises(ValueError, match=r"multiples of 32.*\(64, 80\).*\(64, 96\)"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.forward_intermediates(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("agent_pvt_tiny", img_size=200)


def test_out_index_out_of_range():
    with pytest.raises(ValueError, match=r"out of range.*4 stages"):
        timm.create_model("agent_pvt_tiny", features_only=True, out_indices=(0, 4))
    model = timm.create_model("agent_pvt_tiny")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[-5])


def test_grad_checkpointing_gives_same_gradients():
    model = timm.create_model("subquad_hier_tiny", attn="agent", num_classes=3, drop_path_rate=0., **SMALL)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    model(x).sum().backward()
    for g0, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g0, rtol=1e-4, atol=1e-6)


def test_reset_classifier_both_heads():
    for name, hidden in [("agent_pvt_tiny", 512), ("mavit_tiny", 2048)]:
        model = timm.create_model(name, depths=(1, 1, 1, 1))
        model.reset_classifier(3)
        assert model.get_classifier().out_features == 3 and model.head_hidden_size == hidden
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
        features = model.forward_features(torch.randn(2, 3, 64, 64))
        assert model.forward_head(features, pre_logits=True).shape == (2, hidden)


def test_generic_model_takes_any_family_and_checks_the_schedule():
    with torch.device("meta"):
        mala = timm.create_model("subquad_hier_tiny", attn="mala", attn_kwargs={"mala": {"rope": True}})
        mixed = timm.create_model("subquad_hier_tiny", attn=["flatten"] * 4 + ["agent"] * 6 + [("window", {})] * 2)
    assert set(mala.attn_schedule.names) == {"mala"} and all(o == {"rope": True} for o in mala.attn_schedule.options)
    assert mixed.stages[0].blocks[0].attn.pos_grid == (56, 56)              # FLatten's encoding on the stage map
    agent = mixed.stages[2].blocks[0].attn
    assert (agent.num_agents, agent.bias_grid) == (49, (14, 14))             # the papers' per-stage agents
    assert [b.attn.shift for b in mixed.stages[3].blocks] == [False, True]  # Swin's shift on odd blocks
    with pytest.raises(ValueError, match="valid names"):
        timm.create_model("subquad_hier_tiny", attn="nope")
    with pytest.raises(ValueError, match="3 entries for 12 blocks"):
        timm.create_model("subquad_hier_tiny", attn=["mala"] * 3)


def test_agent_blocks_take_no_prefix_biases():
    """The official Agent-Swin/PVT have no prefix tokens and no prefix-token bias parameters."""
    with torch.device("meta"):
        model = timm.create_model("subquad_hier_tiny", attn="agent")
    agent = model.stages[1].blocks[0].attn
    names = {n for n, _ in agent.named_parameters()}
    assert "an_bias" in names and not names & {"ac_bias", "ca_bias"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("channels,dtype,residual", [(64, torch.float32, True), (96, torch.float32, False),
                                                      (56, torch.bfloat16, True), (3, torch.float32, True)])
def test_depthwise_conv_on_nhwc_maps_equals_the_conv_module(monkeypatch, backend, channels, dtype, residual):
    """``forward_nhwc`` (the CPE, MAViT's and PVTv2's FFN convs: depthwise_conv_on_grid over channel groups of up
    to 64 as heads, the residual fused) against the module's own conv on the permuted map, plus the residual:
    output and the gradients of the map and the filter."""
    from subquad import kernels
    from subquad.attention import grid_maps
    from subquad.kernels.core.testing import assert_rel_close
    if backend not in kernels.available_backends("depthwise_conv_on_grid"):
        pytest.skip("the Triton backend runs on CUDA or the interpreter")
    monkeypatch.setattr(grid_maps, "depthwise_conv_on_grid", partial(kernels.depthwise_conv_on_grid, backend=backend))
    conv = grid_maps.depthwise_conv(channels, 3)
    x = torch.randn(2, 5, 7, channels).to(dtype).requires_grad_()
    got = conv.forward_nhwc(x, residual=x if residual else None)
    want = conv(x.float().permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + (x.float() if residual else 0)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, conv.weight), grad.to(got.dtype))
    want_grads = torch.autograd.grad(want, (x, conv.weight), grad)
    assert got.shape == x.shape and got.dtype == dtype
    assert_rel_close(got, want, dtype, what="out")
    for g, w, what in zip(got_grads, want_grads, ("dx", "dweight")):
        assert_rel_close(g, w, dtype, what=what)
