"""The registered DiT models: sizes match the paper, any attention, timm creation, ``create_dit``, and
registering them loads no diffusers."""
import subprocess
import sys

import pytest
import timm
import torch

import subquad
from subquad.backbones import DiT
from subquad.backbones.dit import create_dit

# DiT paper, Table 1 (millions). The official count includes the fixed sin-cos position table
# (a frozen parameter there, 256 x hidden for a 32x32 latent at patch 2); ours computes it.
PAPER_PARAMS_M = {"dit_s_2": 33, "dit_b_2": 130, "dit_l_2": 458, "dit_xl_2": 675}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_param_counts_match_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    hidden = model.config.hidden_size
    count = sum(p.numel() for p in model.parameters()) + 256 * hidden
    assert abs(count / 1e6 / PAPER_PARAMS_M[name] - 1) < 0.01


def test_xl2_exact_count_with_position_table():
    with torch.device("meta"):
        model = timm.create_model("dit_xl_2")
    assert sum(p.numel() for p in model.parameters()) + 256 * 1152 == 675_129_632


@pytest.mark.parametrize("attn", ["softmax", "agent", "focused_linear", "mala"])
def test_forward_backward_any_attention_non_square(attn):
    model = timm.create_model("dit_s_4", attn=attn, depth=2, num_classes=10)
    x, t, y = torch.randn(2, 4, 48, 40), torch.tensor([10, 900]), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == (2, 8, 48, 40)
    # adaLN-Zero: the output layer starts at zero, so push it off zero to get gradients everywhere
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    for blk in model.blocks:
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    model(x, t, y).square().mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_latent_shape_errors():
    model = timm.create_model("dit_s_8", depth=1)
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        model(torch.randn(1, 4, 30, 32), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="expects latents"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([1]))


def test_every_dit_name_registered():
    names = list(subquad.backbones.dit.default_cfgs)
    assert len(names) == 16 and all(timm.is_model(n) for n in names)


def test_create_dit_builds_the_named_configuration():
    model = create_dit("dit_b_4", depth=1, num_classes=3)
    assert isinstance(model, DiT) and model.patch_size == 4
    assert (model.config.hidden_size, model.config.depth, model.config.num_classes) == (768, 1, 3)
    with pytest.raises(ValueError, match="dit_s_2"):
        create_dit("dit_m_2")


def test_registering_the_models_loads_no_diffusers():
    code = ("import sys, subquad, timm; timm.create_model('agent_deit_tiny_patch16_224'); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'scipy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
