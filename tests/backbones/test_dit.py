"""DiT: sizes match the paper, any attention, diffusers save/load and schedulers, timm creation."""
import pytest
import timm
import torch
from diffusers import DDIMScheduler

import subquad
from subquad.backbones import DiT

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


def test_adaln_zero_starts_as_zero_output():
    model = DiT(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=5)
    out = model(torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.tensor([1]))
    assert torch.count_nonzero(out) == 0


def test_diffusers_save_and_load_roundtrip(tmp_path):
    model = DiT(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=5,
                attn=["mala", "agent"], attn_kwargs={"agent": {"num_agents": 16}})
    torch.nn.init.normal_(model.final_layer.linear.weight)
    model.save_pretrained(tmp_path)
    loaded = DiT.from_pretrained(tmp_path)
    assert [b.attn.family for b in loaded.blocks] == ["mala", "agent"]
    args = torch.randn(1, 4, 16, 16), torch.tensor([7]), torch.tensor([2])
    torch.testing.assert_close(loaded.eval()(*args), model.eval()(*args))


def test_cfg_null_class_and_ddim_sampling_loop():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=3,
                learn_sigma=False).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model.forward_with_cfg(x, t.expand(2), y, cfg_scale=4.0)
            x = scheduler.step(eps, t, x).prev_sample
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()


def test_bad_latent_shape_errors():
    model = timm.create_model("dit_s_8", depth=1)
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        model(torch.randn(1, 4, 30, 32), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="expects latents"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.tensor([1]))


def test_every_dit_name_registered():
    names = subquad.backbones.subquad_dit.dit_model_names()
    assert len(names) == 16 and all(timm.is_model(n) for n in names)
