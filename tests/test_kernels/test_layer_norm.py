"""LayerNorm after a residual add (kernels/layer_norm): the reference against the definition written out, the
Triton kernels against the reference (CPU: the interpreter on small shapes; ``gpu``: model sizes), and the
blocks' ``add_norm`` against the unfused add and norm.

The ground truth is the reference in float64 on the same values. Fresh allocations are NaN-filled (``poisoned``),
so an element a kernel forgets to write fails the comparison."""
import pytest
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from torch import nn

from subquad.backbones.fused_norm import add_norm
from subquad.kernels.core.testing import REL_TOL, relative_error
from subquad.kernels.layer_norm import add_layer_norm


def definition(x, y, weight, bias, gate, eps):
    """s = x + gate y; (s - mean) / sqrt(mean((s - mean)^2) + eps) * weight + bias, mean over the last axis, the
    parameters indexed per sample by hand where they are (B, C)."""
    def at(p, i):
        return p if p.dim() == 1 else p[i]

    rows = []
    for i in range(x.shape[0]):
        s = x[i] if y is None else x[i] + (1 if gate is None else at(gate, i)) * y[i]
        mean = s.mean(-1, keepdim=True)
        out = (s - mean) / torch.sqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
        rows.append((s, out * (1 if weight is None else at(weight, i)) + (0 if bias is None else at(bias, i))))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


@pytest.mark.parametrize("with_y,weight_shape,bias_shape,gate_shape", [
    (True, (24,), (24,), None), (False, (24,), (24,), None), (True, None, (24,), None), (True, (24,), None, None),
    (True, (3, 24), (3, 24), (3, 24)), (False, (3, 24), (24,), None), (True, None, None, (24,)),
])
def test_reference_matches_definition(with_y, weight_shape, bias_shape, gate_shape):
    def make(shape):
        return torch.randn(shape, dtype=torch.float64, requires_grad=True) if shape else None

    x, y = make((3, 5, 24)), make((3, 5, 24) if with_y else None)
    w, b, g = make(weight_shape), make(bias_shape), make(gate_shape)
    got = add_layer_norm(x, y, w, b, 1e-5, gate=g, backend="reference")
    want = definition(x, y, w, b, g, 1e-5)
    leaves = [t for t in (x, y, w, b, g) if t is not None]
    g = [torch.randn_like(t) for t in want]
    for a, e in zip((*got, *torch.autograd.grad(got, leaves, g)), (*want, *torch.autograd.grad(want, leaves, g))):
        assert relative_error(a, e) < 1e-12


def check_against_reference(shape, x_dtype, y_dtype, out_dtype, param_dtype, device="cpu", upstream=("s", "out"),
                            transposed=False, weight="shared", bias="shared", gate=None, residual_dtype=None):
    """Forward and every gradient of backend="triton" against the float64 reference; the (what, error, tolerance)
    that failed. ``upstream``: which outputs the loss reads; ``transposed``: x and y as non-contiguous views;
    ``weight``, ``bias``, ``gate``: None, "shared" ((C,)) or "per_sample" ((B, C)); ``residual_dtype``: s's."""
    dev = torch.device(device)
    x = torch.randn(shape, device=dev).to(x_dtype)
    if transposed:
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    x.requires_grad_()
    y = torch.randn(shape, device=dev).to(y_dtype) if y_dtype is not None else None
    if transposed and y is not None:
        y = y.transpose(0, 1).contiguous().transpose(0, 1)
    y = y.requires_grad_() if y is not None else None

    def param(kind, scale, offset):
        if kind is None:
            return None
        p_shape = (shape[-1],) if kind == "shared" else (shape[0], shape[-1])
        return (torch.randn(p_shape, device=dev) * scale + offset).to(param_dtype).requires_grad_()

    w, b, g = param(weight, 0.5, 1.0), param(bias, 1.0, 0.0), param(gate, 0.5, 0.5)
    inputs = (x, y, w, b, g)
    leaves = [t for t in inputs if t is not None]
    s, out = add_layer_norm(x, y, w, b, 1e-5, gate=g, out_dtype=out_dtype, residual_dtype=residual_dtype,
                            backend="triton")
    s_dtype = x_dtype if y is None else residual_dtype or torch.promote_types(
        torch.promote_types(x_dtype, y_dtype), param_dtype if g is not None else y_dtype)
    assert s.dtype == s_dtype and out.dtype == out_dtype
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx, ry, rw, rb, rg = (next(it) if t is not None else None for t in inputs)
    rs, rout = add_layer_norm(rx, ry, rw, rb, 1e-5, gate=rg, backend="reference")
    gs, gout = torch.randn_like(rs), torch.randn_like(rout)
    use_s = "s" in upstream and y is not None
    loss = ((out.double() * gout).sum() if "out" in upstream else 0) + ((s.double() * gs).sum() if use_s else 0)
    ref_loss = ((rout * gout).sum() if "out" in upstream else 0) + ((rs * gs).sum() if use_s else 0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves, allow_unused=True)
    tol = max(REL_TOL[x_dtype], REL_TOL[out_dtype], REL_TOL[y_dtype or x_dtype], REL_TOL[param_dtype],
              REL_TOL[residual_dtype or x_dtype])
    names = [n for n, t in zip(("dx", "dy", "dweight", "dbias", "dgate"), inputs) if t is not None]
    failed = []
    for what, a, e in zip(["s", "out", *names], [s, out, *grads], [rs, rout, *ref_grads]):
        if e is None:
            if a is not None and a.abs().max() > 0:
                failed.append((what, "nonzero where the reference has no gradient", 0))
            continue
        assert a.shape == e.shape, what
        err = relative_error(a, e)
        if not err < tol:
            failed.append((what, err, tol))
    return failed


CPU_CASES = [  # shape, x dtype, y dtype, output dtype, parameter dtype, options
    ((3, 5, 48), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, {}),     # autocast: fp32 stream
    ((7, 72), torch.float32, torch.float32, torch.float32, torch.float32, {}),
    ((2, 9, 40), torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16, {}),   # a bf16 model
    ((4, 24), torch.float32, None, torch.bfloat16, torch.float32, {}),                  # the first norm: no add
    ((3, 6, 20), torch.float16, torch.float16, torch.float16, torch.float32, {}),
    ((5, 3, 33), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, dict(upstream=("out",))),
    ((5, 3, 33), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, dict(upstream=("s",))),
    ((4, 6, 16), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32, dict(transposed=True)),
    ((2, 700, 8), torch.float32, torch.float32, torch.float32, torch.float32, dict(weight=None)),  # many rows
    ((3, 10), torch.float32, torch.float32, torch.bfloat16, torch.float32, dict(bias=None)),
    # DiT's adaLN: weight = 1 + scale and bias = shift per sample, the residual branch gated per sample
    ((3, 7, 40), torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16,
     dict(weight="per_sample", bias="per_sample", gate="per_sample")),
    ((2, 300, 16), torch.float32, torch.float32, torch.float32, torch.float32,
     dict(weight="per_sample", bias="per_sample", gate="per_sample")),              # several programs per sample
    ((2, 9, 24), torch.float32, None, torch.bfloat16, torch.float32, dict(weight="per_sample", bias="per_sample")),
    ((3, 5, 24), torch.float32, torch.float32, torch.float32, torch.float32,
     dict(weight="shared", bias="per_sample", gate="shared")),                      # mixed sharing
    ((3, 5, 24), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32,
     dict(weight=None, bias=None, gate="per_sample", upstream=("s",))),            # only s read: no kernel
    ((4, 24), torch.float32, torch.float32, torch.float32, torch.float32,
     dict(weight="per_sample", bias=None, gate="per_sample")),                      # one row per sample
    ((3, 4, 16), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32,
     dict(weight="per_sample", bias="per_sample", gate="per_sample", transposed=True)),
    # Wan's blocks: a bf16 stream, float32 gates and norms, the sum rounded back to bf16
    ((2, 6, 40), torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32,
     dict(weight="shared", bias="shared", gate="per_sample", residual_dtype=torch.bfloat16)),
    ((2, 5, 24), torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32,
     dict(weight="per_sample", bias="per_sample", gate="per_sample", residual_dtype=torch.bfloat16,
          upstream=("out",))),
]


@pytest.mark.parametrize("shape,x_dtype,y_dtype,out_dtype,param_dtype,opts", CPU_CASES)
def test_triton_matches_reference_cpu(poisoned, shape, x_dtype, y_dtype, out_dtype, param_dtype, opts):
    assert check_against_reference(shape, x_dtype, y_dtype, out_dtype, param_dtype, **opts) == []


GPU_CASES = [
    ((4, 4097, 384), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),    # DeiT-S at 1024 px
    ((128, 197, 384), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),   # DeiT-S at 224 px, B128
    ((2, 1024, 1152), torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),   # DiT-XL width
    ((8, 56, 56, 96), torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),  # Swin-T stage 1, NHWC
    ((3, 1000, 768), torch.float32, None, torch.bfloat16, torch.float32),
    ((2, 333, 4096), torch.float32, torch.float32, torch.float32, torch.float32),        # 8 warps
]
ADALN = dict(weight="per_sample", bias="per_sample", gate="per_sample")
GPU_CASES = [(*case, {}) for case in GPU_CASES] + [
    ((8, 1024, 1152), torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, ADALN),  # DiT-XL/2 at 512 px
    ((2, 4096, 1152), torch.float32, None, torch.bfloat16, torch.bfloat16,
     dict(weight="per_sample", bias="per_sample")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,x_dtype,y_dtype,out_dtype,param_dtype,opts", GPU_CASES)
def test_gpu_triton_matches_reference(shape, x_dtype, y_dtype, out_dtype, param_dtype, opts):
    assert check_against_reference(shape, x_dtype, y_dtype, out_dtype, param_dtype, device="cuda", **opts) == []


@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("out_dtype,kept_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_backward_keeps_the_narrower_of_s_and_s_hat(poisoned, with_y, out_dtype, kept_dtype):
    """What the Triton norm keeps for the backward at full size: s_hat in the output's dtype where it is narrower
    than the float32 stream s (which is then free), else s itself."""
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = torch.randn(3, 5, 24, requires_grad=True) if with_y else None
    kept = []

    def pack(t):
        kept.append((t.dtype, tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s, out = add_layer_norm(x, y, torch.ones(24), None, out_dtype=out_dtype, backend="triton")
    full = [(dtype, ptr) for dtype, shape, ptr in kept if shape == tuple(x.shape)]
    assert [dtype for dtype, _ in full] == [kept_dtype]
    assert (full[0][1] == s.data_ptr()) == (kept_dtype == s.dtype)


def test_output_dtype_follows_autocast():
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, out = add_layer_norm(x, y, None, None)
    assert s.dtype == torch.float32 and out.dtype == torch.bfloat16
    s, out = add_layer_norm(x, y.bfloat16(), None, None)
    assert s.dtype == out.dtype == torch.float32


@pytest.mark.parametrize("args,message", [
    ((torch.ones(2, 3, dtype=torch.int64), None, None, None), "x must be a floating point tensor"),
    ((torch.randn(2, 3), torch.randn(2, 4), None, None), "y must be a floating point tensor of x's shape"),
    ((torch.randn(2, 3), None, torch.randn(4), None), "weight must be a floating point tensor of shape \\(3,\\) or "
                                                      "\\(2, 3\\)"),
    ((torch.randn(2, 3), None, None, torch.randn(3, 1)), "bias must be"),
    ((torch.randn(2, 0), None, None, None), "C >= 1"),
])
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        add_layer_norm(*args)


def test_bad_residual_dtype_raises():
    with pytest.raises(ValueError, match="residual_dtype must be a floating point dtype"):
        add_layer_norm(torch.randn(2, 3), torch.randn(2, 3), None, None, residual_dtype=torch.int32)


def test_gate_without_y_raises():
    with pytest.raises(ValueError, match="a gate multiplies y, but y is None"):
        add_layer_norm(torch.randn(2, 3), None, None, None, gate=torch.randn(3))


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        add_layer_norm(torch.randn(2, 3), None, None, None, eps=-1.0)


@pytest.mark.parametrize("norm", [nn.LayerNorm(16), TimmLayerNorm(16, eps=1e-6), nn.LayerNorm(16, bias=False),
                                  nn.RMSNorm(16)])
@pytest.mark.parametrize("with_y", [True, False])
def test_add_norm_is_add_then_norm(norm, with_y):
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = torch.randn(2, 5, 16)
    y = torch.randn(2, 5, 16) if with_y else None
    s, out = add_norm(norm, x, y)
    want = x + y if with_y else x
    assert torch.equal(s, want)
    assert relative_error(out, norm(want)) < 1e-6
