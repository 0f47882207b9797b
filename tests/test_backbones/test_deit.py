"""Every registered DeiT model: names, parameter counts, a training step, a local checkpoint."""
import subprocess
import sys

import pytest
import timm
import torch

import subquad
from subquad.kernels import family
from subquad.tasks.zoo import subquad_model_names

NAMES = list(subquad.backbones.deit.default_cfgs)

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
    "agent_deit_small_patch16_448": 23070472,
}
# What the papers report (millions); Agent Attention, Table 1 (DeiT rows).
PAPER_PARAMS_M = {"agent_deit_tiny_patch16_224": 6.0, "agent_deit_small_patch16_224": 22.7,
                  "agent_deit_base_patch16_224": 87.2, "agent_deit_small_patch16_448": 23.1}


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


@pytest.mark.parametrize("probe", ["", "import importlib.util; importlib.util.find_spec('timm'); ",
                                   "import diffusers; "])
def test_models_register_whenever_timm_is_imported(probe):
    """``import subquad`` first, timm later: the models are there, also when something probed for timm in
    between (diffusers looks for optional packages with importlib.util.find_spec)."""
    code = f"import subquad; {probe}import timm; print(len(timm.list_models('*_deit_tiny_patch16_224')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) >= 7


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

@pytest.mark.parametrize("name", NAMES)
def test_name_prefix_is_the_family_record(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert family(name.split("_deit_")[0]).name in model.attn_schedule.names


def test_agent_deit_448_maps_on_its_grid():
    """Agent-DeiT-S 448 (official cfgs/agent_deit_s_448.yaml): bias terms and position table on the 28x28 grid."""
    with torch.device("meta"):
        model = timm.create_model("agent_deit_small_patch16_448")
    assert model.pretrained_cfg["input_size"] == (3, 448, 448)
    assert model.pos_embed.shape == (1, 1 + 28 * 28, 384)
    assert all(b.attn.bias_grid == (28, 28) and b.attn.num_agents == 49 for b in model.blocks)
