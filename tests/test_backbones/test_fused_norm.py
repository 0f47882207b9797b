"""The blocks' fused residual add + LayerNorm (``add_norm``, DiT's ``add_norm_modulate``) changes no model's
output or gradients: each model against itself with the fused step replaced by the unfused add, norm (and
modulation) written out, under bf16 autocast as trained. On the CPU both sides run PyTorch ops (the fusion is a
CUDA kernel), which checks how the blocks call the fused op; on the GPU (``gpu``) the kernels run."""
import pytest
import timm
import torch
from timm.layers import DropPath, LayerScale
from torch import nn

import subquad  # noqa: F401  (registers the models)
from subquad.backbones import diffusion_transformer, hierarchical, vit
from subquad.backbones.diffusion_transformer import DiT
from subquad.backbones.fused_norm import add_norm, residual_branch
from subquad.kernels.core.testing import relative_error


def unfused(norm, x, y=None, gate=None):
    if gate is not None:
        y = y * (gate if gate.dim() == 1 else gate.reshape(gate.shape[0], *[1] * (y.dim() - 2), -1))
    s = x if y is None else x + y
    return s, norm(s)


def unfused_modulate(norm, x, shift, scale, y=None, gate=None):
    s = x if y is None else x + gate.unsqueeze(1) * y
    return s, norm(s) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _output_and_grads(model, *inputs, autocast=True):
    with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(*inputs)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.float(), grads


def _flat(grads, names):
    return torch.cat([grads[n].float().flatten() for n in names])


@pytest.mark.gpu
@pytest.mark.parametrize("name,img_size", [("mala_deit_tiny_patch16_224", 224), ("nat_deit_tiny_patch16_224", 320),
                                           ("agent_swin_tiny_patch4_window7_224", 224), ("nat_tiny", 224)])
def test_fused_norm_model_equals_unfused(monkeypatch, name, img_size):
    """Under bf16 autocast the fused and the unfused model each differ from the float32 model by bf16 rounding
    (about 1% in the gradients of a whole model): the fused one is held to the unfused one's error against the
    float32 model (output and gradients), and both to 1e-2 of each other in the output."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **({} if img_size == 224 else {"img_size": img_size}))
    model = model.cuda().eval()       # no drop path: both runs compute the same function (gradients still flow)
    images = torch.randn(2, 3, img_size, img_size, device="cuda")
    out, grads = _output_and_grads(model, images)
    for module in (vit, hierarchical):
        monkeypatch.setattr(module, "add_norm", unfused)
    want, want_grads = _output_and_grads(model, images)
    exact, exact_grads = _output_and_grads(model, images, autocast=False)
    assert relative_error(out, want) < 1e-2
    assert grads.keys() == want_grads.keys() == exact_grads.keys()
    names = list(grads)
    for fused, plain, truth in ((out, want, exact),
                                (_flat(grads, names), _flat(want_grads, names), _flat(exact_grads, names))):
        assert relative_error(fused, truth) < max(1.25 * relative_error(plain, truth), 2e-3)


def _dit(device):
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=5, attn="mala")
    for name, p in model.named_parameters():       # adaLN-Zero starts with zero gates: make every branch count
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.5)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 4]))
    return model.to(device).eval(), [t.to(device) for t in inputs]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_adaln_dit_equals_unfused(monkeypatch, device):
    model, inputs = _dit(device)
    out, grads = _output_and_grads(model, *inputs)
    monkeypatch.setattr(diffusion_transformer, "add_norm_modulate", unfused_modulate)
    want, want_grads = _output_and_grads(model, *inputs)
    assert out.abs().max() > 0 and relative_error(out, want) < 1e-2
    flat = torch.cat([grads[n].float().flatten() for n in grads])
    assert relative_error(flat, torch.cat([want_grads[n].float().flatten() for n in grads])) < 1e-2


@pytest.mark.parametrize("layer_scale,drop_prob,training", [(None, 0.5, True), (0.3, 0.0, True), (0.3, 0.5, True),
                                                            (0.3, 0.5, False), ("inplace", 0.5, True)])
def test_residual_branch_gate_is_layer_scale_and_drop_path(layer_scale, drop_prob, training):
    """LayerScale's gamma and DropPath's per-sample mask applied as the fused add's gate give what the modules give
    (same draws of the mask from the same seed), output and gradients; an in-place LayerScale runs as written."""
    norm = nn.LayerNorm(16)
    ls = (nn.Identity() if layer_scale is None else
          LayerScale(16, 0.5, inplace=True) if layer_scale == "inplace" else LayerScale(16, layer_scale))
    with torch.no_grad():
        for p in (*norm.parameters(), *ls.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    dp = DropPath(drop_prob) if drop_prob else nn.Identity()
    dp.train(training)
    x, y = torch.randn(8, 3, 5, 16, requires_grad=True), torch.randn(8, 3, 5, 16, requires_grad=True)
    leaves = [x, y, *norm.parameters(), *ls.parameters()]
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        y_out = y * 1.0                        # a sub-layer's output, not a leaf (an in-place LayerScale writes it)
        branch = residual_branch(ls, dp, y_out) if fused else (dp(ls(y_out)),)
        s, out = add_norm(norm, x, *branch)
        results.append((s, out, torch.autograd.grad((s * out).sum(), leaves)))
    (s0, out0, g0), (s1, out1, g1) = results
    torch.testing.assert_close(s1, s0)
    torch.testing.assert_close(out1, out0)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e)
    dropped = (s0 == x).flatten(1).all(1)
    assert dropped.any() == (training and drop_prob > 0), "the draws should drop some of 8 samples at p=0.5"
