"""The blocks' fused residual add + LayerNorm (``add_norm``) changes no model's output or gradients: each model
against itself with ``add_norm`` replaced by the unfused add and norm, under bf16 autocast as trained. On the CPU
both sides run PyTorch ops (the fusion is a CUDA kernel), so these tests need a GPU."""
import pytest
import timm
import torch

import subquad  # noqa: F401  (registers the models)
from subquad.backbones import hierarchical, vit
from subquad.kernels.core.testing import relative_error


def unfused(norm, x, y=None):
    s = x if y is None else x + y
    return s, norm(s)


def _output_and_grads(model, images):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.float(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("name,img_size", [("mala_deit_tiny_patch16_224", 224), ("nat_deit_tiny_patch16_224", 320),
                                           ("agent_swin_tiny_patch4_window7_224", 224), ("nat_tiny", 224)])
def test_fused_norm_model_equals_unfused(monkeypatch, name, img_size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **({} if img_size == 224 else {"img_size": img_size}))
    model = model.cuda().eval()       # no drop path: both runs compute the same function (gradients still flow)
    images = torch.randn(2, 3, img_size, img_size, device="cuda")
    out, grads = _output_and_grads(model, images)
    for module in (vit, hierarchical):
        monkeypatch.setattr(module, "add_norm", unfused)
    want, want_grads = _output_and_grads(model, images)
    assert relative_error(out, want) < 1e-2
    assert grads.keys() == want_grads.keys()
    flat = torch.cat([grads[n].float().flatten() for n in grads])
    assert relative_error(flat, torch.cat([want_grads[n].float().flatten() for n in grads])) < 1e-2
