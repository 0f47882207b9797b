"""The DiT model class: adaLN-Zero, diffusers save/load, classifier-free guidance with a diffusers scheduler."""
import torch
from diffusers import DDIMScheduler

from subquad.backbones.diffusion_transformer import DiT


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
