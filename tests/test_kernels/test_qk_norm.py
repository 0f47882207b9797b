"""RMSNorm + rotary embedding of queries and keys (kernels/qk_norm): the reference against diffusers' own modules
(the definition the pipelines use), the Triton kernel against the reference (CPU: the interpreter on small shapes;
``gpu``: FLUX and Wan sizes), and its errors."""
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn import RMSNorm

from subquad.kernels.core.testing import REL_TOL, relative_error
from subquad.kernels.qk_norm import rms_norm_rope
from subquad.tasks.pipelines.processors import _wan_rotary


def flux_definition(x, weight, eps, cos, sin):
    """diffusers' FLUX processor: torch's RMSNorm(D) over each head, then apply_rotary_emb (in float32) with (N, D)
    tables whose pairs repeat one angle."""
    norm = RMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    norm.weight.data.copy_(weight)
    pairs = lambda t: t.repeat_interleave(2, dim=-1)  # noqa: E731
    return apply_rotary_emb(norm(x), (pairs(cos), pairs(sin)), sequence_dim=1)


def wan_definition(x, weight, eps, cos, sin):
    """diffusers' Wan processor: torch's RMSNorm(H * D) over the whole token, then the interleaved rotation."""
    b, n, h, d = x.shape
    norm = RMSNorm(h * d, eps=eps).to(x.dtype)
    norm.weight.data.copy_(weight)
    y = norm(x.flatten(2)).unflatten(2, (h, d))
    pairs = lambda t: t.repeat_interleave(2, dim=-1)[None, :, None]  # noqa: E731
    return _wan_rotary(y, pairs(cos), pairs(sin))


def tables(n, d, dtype=torch.float32):
    angles = torch.rand(n, d // 2, dtype=torch.float64) * 6.3
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("definition,per_token,tol", [(flux_definition, False, 1e-6),   # rotates in float32
                                                     (wan_definition, True, 1e-12)])
@pytest.mark.parametrize("shape", [(2, 7, 3, 16), (1, 10, 5, 24)])
def test_reference_matches_diffusers(definition, per_token, tol, shape):
    b, n, h, d = shape
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(h * d if per_token else d, dtype=torch.float64)
    cos, sin = tables(n, d, torch.float64)
    got = rms_norm_rope(x, weight, 1e-6, cos, sin, backend="reference")
    assert relative_error(got, definition(x, weight, 1e-6, cos, sin)) < tol


def test_reference_without_rotation_is_the_norm():
    x, weight = torch.randn(2, 5, 3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    norm = RMSNorm(8, eps=1e-5).double()
    norm.weight.data.copy_(weight)
    assert relative_error(rms_norm_rope(x, weight, 1e-5, backend="reference"), norm(x)) < 1e-12


CASES = [  # (B, N, H, D), weight per token, rotate, dtype, x a slice of a qkv projection, out a slice of a joint buffer
    ((2, 7, 3, 16), False, True, torch.float32, False, False),
    ((1, 9, 3, 40), True, True, torch.bfloat16, False, False),       # per token: 120 channels, not a power of two
    ((2, 5, 2, 24), False, False, torch.float32, False, False),      # no rotation (SD3's norms)
    ((2, 6, 4, 8), False, True, torch.bfloat16, True, True),         # strided x, out after 3 text tokens
    ((1, 33, 2, 72), True, True, torch.float16, True, True),
    ((3, 4, 1, 128), False, True, torch.float32, False, True),
]


@pytest.mark.parametrize("shape,per_token,rotate,dtype,strided,joint", CASES)
def test_triton_matches_reference_cpu(poisoned, shape, per_token, rotate, dtype, strided, joint):
    b, n, h, d = shape
    x = torch.randn(b, n, 3 * h * d).to(dtype)[..., h * d:2 * h * d] if strided else torch.randn(b, n, h * d).to(dtype)
    x = x.unflatten(-1, (h, d))
    weight = torch.randn(h * d if per_token else d)
    cos, sin = (t[:, :] for t in tables(n, d)) if rotate else (None, None)
    text = 3 if joint else 0
    buffer = torch.full((b, text + n, h, d), float("nan"), dtype=dtype)
    got = rms_norm_rope(x, weight, 1e-6, cos, sin, out=buffer[:, text:], backend="triton")
    assert got.data_ptr() == buffer[:, text:].data_ptr()
    want = rms_norm_rope(x, weight, 1e-6, cos, sin, backend="reference")
    assert relative_error(got, want) < REL_TOL[dtype]
    assert buffer[:, :text].isnan().all()                 # the text rows are left as they were


def test_triton_reads_strided_tables():
    """FLUX's tables are (N, D) with each angle repeated per pair: ``cos[:, ::2]`` is read in place."""
    x, weight = torch.randn(1, 6, 2, 16), torch.randn(16)
    cos, sin = (t.repeat_interleave(2, dim=-1) for t in tables(6, 16))
    got = rms_norm_rope(x, weight, 1e-6, cos[:, ::2], sin[:, ::2], backend="triton")
    assert relative_error(got, flux_definition(x, weight, 1e-6, cos[:, ::2], sin[:, ::2])) < 1e-5


def test_gradients_run_on_the_reference():
    x = torch.randn(1, 4, 2, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)
    cos, sin = tables(4, 8)
    out = rms_norm_rope(x, weight, 1e-6, cos, sin)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, weight))
    normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight
    want = apply_rotary_emb(normed, tuple(t.repeat_interleave(2, dim=-1) for t in (cos, sin)), sequence_dim=1)
    wx, ww = torch.autograd.grad(want.square().sum(), (x, weight))
    assert relative_error(gx, wx) < 1e-5 and relative_error(gw, ww) < 1e-5
    with pytest.raises(ValueError, match="no gradient to record"):
        rms_norm_rope(x, weight, 1e-6, cos, sin, backend="triton")


def test_compile_fullgraph_writes_the_joint_buffer():
    """Under torch.compile the reference runs (the compiler fuses it): a text slice and an image slice of one buffer,
    traced without a graph break, equal to the eager call."""
    text, image, weight = torch.randn(1, 3, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(8)
    cos, sin = tables(8, 8)

    def joint(text, image):
        out = image.new_empty(1, 8, 2, 8)
        rms_norm_rope(text, weight, 1e-6, cos[:3], sin[:3], out=out[:, :3])
        rms_norm_rope(image, weight, 1e-6, cos[3:], sin[3:], out=out[:, 3:])
        return out

    got = torch.compile(joint, fullgraph=True, backend="aot_eager")(text, image)
    assert relative_error(got, joint(text, image)) < 1e-6


@pytest.mark.parametrize("args,kwargs,message", [
    ((torch.randn(2, 3, 8), torch.randn(8), 1e-6), {}, "x must be a floating point tensor \\(B, N, H, D\\)"),
    ((torch.randn(2, 3, 2, 7), torch.randn(7), 1e-6), {}, "an even D"),
    ((torch.randn(2, 3, 2, 8).transpose(-1, -2).contiguous().transpose(-1, -2), torch.randn(8), 1e-6), {},
     "unit stride"),
    ((torch.randn(2, 3, 2, 8), torch.randn(12), 1e-6), {}, "weight must be a floating point tensor \\(8,\\)"),
    ((torch.randn(2, 3, 2, 8), torch.randn(8), 1e-6, torch.randn(3, 4)), {}, "give both cos and sin"),
    ((torch.randn(2, 3, 2, 8), torch.randn(8), 1e-6, torch.randn(3, 8), torch.randn(3, 8)), {},
     "cos must be a floating point tensor \\(N, D / 2\\) = \\(3, 4\\)"),
    ((torch.randn(2, 3, 2, 8), torch.randn(8), 1e-6), dict(out=torch.empty(2, 4, 2, 8)), "out must be"),
    ((torch.randn(2, 3, 2, 8), torch.randn(8), 0.0), {}, "eps"),
])
def test_bad_arguments_raise(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        rms_norm_rope(*args, **kwargs)


GPU_CASES = [  # (B, N, H, D), per token, joint (text tokens before)
    ((1, 16384, 24, 128), False, 512),      # FLUX at 2048², the image tokens after the text
    ((1, 32760, 40, 128), True, 0),         # Wan 14B at 480x832, 81 frames
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,per_token,text", GPU_CASES)
def test_gpu_triton_matches_reference(shape, per_token, text):
    b, n, h, d = shape
    x = torch.randn(b, n, 3 * h * d, device="cuda", dtype=torch.bfloat16)[..., :h * d].unflatten(-1, (h, d))
    weight = torch.randn(h * d if per_token else d, device="cuda", dtype=torch.bfloat16)
    cos, sin = (t.cuda() for t in tables(n, d))
    buffer = torch.full((b, text + n, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = rms_norm_rope(x, weight, 1e-6, cos, sin, out=buffer[:, text:])
    want = rms_norm_rope(x, weight, 1e-6, cos, sin, backend="reference")
    assert relative_error(got, want) < REL_TOL[torch.bfloat16]
    assert buffer[:, :text].isnan().all()
