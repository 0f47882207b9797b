"""PatchifyConv2d (the patch embedding as one matrix product) computes what the convolution it replaces does."""
import pytest
import timm
import torch
from torch import nn

import subquad  # noqa: F401  (registers the models)
from subquad.backbones.patchify import PatchifyConv2d
from subquad.kernels.core.testing import relative_error


@pytest.mark.parametrize("in_chans,dim,patch,size", [(3, 24, 16, (64, 48)), (4, 16, 2, (10, 6)), (3, 8, 4, (12, 20)),
                                                     (3, 8, (2, 4), (6, 8))])
def test_equals_the_conv(in_chans, dim, patch, size):
    conv = nn.Conv2d(in_chans, dim, patch, patch)
    fast = PatchifyConv2d.from_conv(conv)
    assert type(fast) is PatchifyConv2d and fast.weight is conv.weight and fast.bias is conv.bias
    x = torch.randn(2, in_chans, *size, requires_grad=True)
    out, want = fast(x), conv(x)
    assert out.shape == want.shape and relative_error(out, want) < 1e-5
    assert out.flatten(2).transpose(1, 2).is_contiguous()          # tokens (B, N, D) are a view
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(out, (x, conv.weight, conv.bias), g),
                    torch.autograd.grad(want, (x, conv.weight, conv.bias), g)):
        assert relative_error(a, e) < 1e-5


def test_autocast_output_matches_the_conv():
    conv = nn.Conv2d(3, 16, 4, 4)
    x = torch.randn(2, 3, 16, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = PatchifyConv2d.from_conv(conv)(x), conv(x)
    assert out.dtype == want.dtype == torch.bfloat16
    assert relative_error(out.float(), want.float()) < 1e-2


def test_sides_not_a_multiple_of_the_patch_run_the_conv():
    conv = nn.Conv2d(3, 8, 4, 4)
    x = torch.randn(1, 3, 10, 13)
    assert torch.equal(PatchifyConv2d.from_conv(conv)(x), conv(x))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 8, 7, 4, padding=3), nn.Conv2d(3, 8, 4, 2),
                                  nn.Conv2d(4, 8, 2, 2, groups=2), nn.Conv2d(3, 8, 2, 2, dilation=2)])
def test_other_convs_are_kept(conv):
    assert PatchifyConv2d.from_conv(conv) is conv


@pytest.mark.parametrize("name,path", [("mala_deit_tiny_patch16_224", "patch_embed.proj"),
                                       ("agent_swin_tiny_patch4_window7_224", "patch_embed.proj"),
                                       ("dit_b_2", "x_embedder.proj")])
def test_models_embed_patches_by_one_product(name, path):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert type(model.get_submodule(path)) is PatchifyConv2d
