"""Linear attention (kernels/linear): FLatten and MALA references against their definitions, the Triton kernels
against the references.

focused_linear_attention against FLatten (Han et al., ICCV 2023, Eq. 3-6) written out as N x N weights.

The feature map is brute-forced as the official code applies it: on (B, N, C) tokens before the heads are
split, C = heads * head_dim, so its norms run over all C channels of a token:
r = (ReLU(x) + 1e-6) / softplus(s),  phi_p(x) = ||r|| / ||r^p|| r^p  (elementwise power p),
then per head w_ij = phi(q_i).phi(k_j) / (sum_j phi(q_i).phi(k_j) + M eps),  O = W V.

eps = 1e-6 is the official code's: it divides by mean_j phi(q_i).phi(k_j) + eps. It matters (1e-2 relative
error and more) for a query whose r is mostly the 1e-6 floor, so the weights here keep it.

mala_attention against MALA (Fan et al., ICCV 2025, Eq. 9-11) written out as N x N weights.

phi = ELU + 1;  p_ij = phi(q_i).phi(k_j) / sqrt(d);  z_i = mean_j p_ij  (the official code's mean over the M keys);
w_ij = (1 + 1/(z_i + eps)) p_ij / M - z_i / M,  so sum_j w_ij = 1 (up to eps = 1e-6, the official code's);
with 2D RoPE, p_ij in the first term becomes (R_i phi(q_i)).(R_j phi(k_j)) / sqrt(d) while z_i stays unrotated.

The Triton backend of focused_linear_attention (FLatten) and mala_attention (MALA) against the references.

The ground truth is the reference evaluated in float64 on the same inputs (the 16-bit values upcast), so
each comparison measures the kernel's own error against the project's tolerance for its input dtype.
CPU tests run the kernels under TRITON_INTERPRET=1 (set by tests/conftest.py) with small shapes; the
`gpu` tests use real sizes and a fuzz over random configurations.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from subquad.kernels import focused_linear_attention, mala_attention
from subquad.kernels.core.testing import REL_TOL, assert_rel_close, relative_error


# --- FLatten: the reference against the definition ------------------------------------------------


NORMALISER_EPS = 1e-6


def to_tokens(x):
    """(B, h, N, d) -> (B, N, h*d): the official layout."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def to_heads(x, h):
    b, n, c = x.shape
    return x.reshape(b, n, h, c // h).transpose(1, 2)


def focused_map(x, p, s):
    """phi_p of (B, h, N, d) heads, straight from the definition on the (B, N, C) tokens in float64 (no range
    tricks). s: None or (h, d) / (d,) / scalar, laid out over C as the official (1, 1, C) parameter."""
    h, d = x.shape[1], x.shape[-1]
    r = F.relu(to_tokens(x.double())) + 1e-6
    if s is not None:
        s = s.double()
        r = r / F.softplus(s.reshape(h * d) if s.dim() == 2 else s.repeat(h) if s.dim() == 1 else s)
    rp = r ** p
    return to_heads(r.norm(dim=-1, keepdim=True) / rp.norm(dim=-1, keepdim=True) * rp, h)


def explicit_focused_weights(q, k, p, s):
    phi_q, phi_k = focused_map(q, p, s), focused_map(k, p, s)
    scores = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k)
    return scores / (scores.sum(dim=-1, keepdim=True) + scores.shape[-1] * NORMALISER_EPS)


FOCUSED_CASES = [  # grid, num_prefix, batch, heads
    ((4, 4), 0, 1, 1),
    ((3, 5), 1, 2, 3),
    ((6, 2), 4, 2, 2),
    ((2, 3, 4), 1, 2, 2),       # a video grid: FLatten needs no image structure
]


SCALES = ["none", "scalar", "channel", "head_channel"]


def make_scale(kind, h, d):
    return {"none": None, "scalar": torch.randn(()), "channel": torch.randn(d),
            "head_channel": torch.randn(h, d)}[kind]


@pytest.mark.parametrize("scale_kind", SCALES)
@pytest.mark.parametrize("p", [1, 2, 3, 4.5])
@pytest.mark.parametrize("grid,num_prefix,b,h", FOCUSED_CASES)
def test_focused_matches_explicit_weights_float64(grid, num_prefix, b, h, p, scale_kind):
    n_tokens, d = num_prefix + math.prod(grid), 8
    q, k, v = (torch.randn(b, h, n_tokens, d, dtype=torch.float64) for _ in range(3))
    s = make_scale(scale_kind, h, d)
    s = None if s is None else s.double()
    w = explicit_focused_weights(q, k, p, s)
    out = focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    assert_rel_close(out, w @ v, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_prefix,p", [(0, 3), (1, 2.5)])
def test_gradients_match_explicit_weights(dtype, num_prefix, p):
    """Forward and gradients of q, k, v and the scale s at fp32 / bf16 inputs against the float64 brute force."""
    grid, h, d = (3, 5), 3, 8
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(2, h, n_tokens, d).to(dtype).requires_grad_() for _ in range(3))
    s = torch.randn(h, d, requires_grad=True)
    out = focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, s), grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, s)]
    expected = explicit_focused_weights(exact[0], exact[1], p, exact[3]) @ exact[2]
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    assert_rel_close(out, expected, dtype, what="out")
    for what, a, e in zip(("dq", "dk", "dv", "ds"), grads, expected_grads):
        assert_rel_close(a, e, dtype, what=what)


def test_norms_span_all_heads():
    """Scaling one head's channels of a token changes the other heads' outputs (per-head norms would not)."""
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64).abs() + 0.1 for _ in range(3))
    s = torch.randn(2, 8, dtype=torch.float64)
    base = focused_linear_attention(q, k, v, grid=(4, 4), scale=s)
    k2 = k.clone()
    k2[:, 1] *= 3.0
    moved = focused_linear_attention(q, k2, v, grid=(4, 4), scale=s)
    assert (moved[:, 0] - base[:, 0]).norm() / base[:, 0].norm() > 1e-2


def test_implied_weights_are_a_distribution():
    """The op is linear in v: with v = I its output is its N x N weight matrix, non-negative with rows summing to 1
    up to the epsilon: every q and k has positive entries, but the whole-token norms leave a head whose r is
    small next to the other head's with normalisers down to ~1e-2, where eps = 1e-6 shows at ~1e-5."""
    q, k = (torch.randn(2, 2, 1 + 20, 8, dtype=torch.float64).abs() + 0.1 for _ in range(2))
    eye = torch.eye(21, dtype=torch.float64).expand(2, 2, 21, 21)
    w = focused_linear_attention(q, k, eye, grid=(4, 5), scale=torch.randn(2, 8, dtype=torch.float64), num_prefix=1)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 21, dtype=torch.float64), rtol=0, atol=1e-4)


def test_per_channel_scale_matters():
    """A per-channel s changes the direction of r, hence the weights (a uniform s cancels: phi is 1-homogeneous)."""
    q, k = (torch.randn(1, 2, 16, 8, dtype=torch.float64).abs() + 0.1 for _ in range(2))
    v = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    base = focused_linear_attention(q, k, v, grid=(4, 4))
    uniform = focused_linear_attention(q, k, v, grid=(4, 4), scale=torch.tensor(2.0, dtype=torch.float64))
    per_channel = focused_linear_attention(q, k, v, grid=(4, 4), scale=torch.randn(2, 8, dtype=torch.float64))
    assert_rel_close(uniform, base, tol=1e-5)        # up to the epsilons
    assert (per_channel - base).norm() / base.norm() > 1e-2


@pytest.mark.parametrize("p,num_prefix,fast", [(3, 1, False), (2.5, 0, True), (3, 4, True)])
def test_focused_gradcheck_float64(p, num_prefix, fast):
    """Gradients of q, k, v and the learnable scale s."""
    grid = (2, 3) if not fast else (3, 4)
    n_tokens, d = num_prefix + math.prod(grid), 4
    q, k, v = (torch.randn(2, 2, n_tokens, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = torch.randn(2, d, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, s):
        return focused_linear_attention(q, k, v, grid=grid, focusing_factor=p, scale=s, num_prefix=num_prefix)
    assert torch.autograd.gradcheck(fn, (q, k, v, s), fast_mode=fast)


@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 1e2), (torch.bfloat16, 1e4), (torch.bfloat16, 1e15),
                                             (torch.float16, 1e2), (torch.float16, 1e4)])
def test_focused_low_precision_large_magnitudes(dtype, magnitude):
    """Large q, k in 16 bits (1e15: r^3 alone would overflow float32): finite, within the bf16 tolerance of float64."""
    q, k = ((torch.randn(2, 2, 1 + 48, 16) * magnitude).to(dtype) for _ in range(2))
    v = torch.randn(2, 2, 1 + 48, 16).to(dtype)
    s = torch.randn(2, 16)
    out = focused_linear_attention(q, k, v, grid=(6, 8), scale=s, num_prefix=1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_rel_close(out, explicit_focused_weights(q, k, 3, s) @ v.double(), dtype)


def test_focused_bad_input_names_the_values():
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(ValueError, match=r"N=12.*P=1.*\(3, 4\)"):
        focused_linear_attention(q, q, q, grid=(3, 4), num_prefix=1)
    with pytest.raises(ValueError, match="focusing_factor.*-1"):
        focused_linear_attention(q, q, q, grid=(3, 4), focusing_factor=-1)
    with pytest.raises(ValueError, match=r"head_dim=8.*heads\*head_dim=16.*\(3,\)"):
        focused_linear_attention(q, q, q, grid=(3, 4), scale=torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(2, 12, 8\)"):
        focused_linear_attention(q[0], q[0], q[0], grid=(3, 4))


# --- MALA: the reference against the definition ---------------------------------------------------


EPS = 1e-6


def elu_plus_one(x):
    x = x.double()
    return torch.where(x > 0, x + 1, torch.exp(x))


def inverse_elu_plus_one(y):
    return torch.where(y >= 1, y - 1, torch.log(y))


def rope_matrices(num_prefix, grid, d, base=10000.0):
    """(N, d, d): identity for prefix tokens; for grid token (r, c) a block-diagonal rotation of channel pairs
    (2i, 2i+1) by r f_i for the first d/4 pairs and c f_i for the last d/4, f = base^-linspace(0, 1, d/4)
    (the frequency layout of the official MAViT code)."""
    f = base ** -torch.linspace(0, 1, d // 4, dtype=torch.float64)
    mats = [torch.eye(d, dtype=torch.float64) for _ in range(num_prefix)]
    for r in range(grid[0]):
        for c in range(grid[1]):
            m = torch.zeros(d, d, dtype=torch.float64)
            for i in range(d // 2):
                angle = (r * f[i]) if i < d // 4 else (c * f[i - d // 4])
                cos, sin = math.cos(angle), math.sin(angle)
                m[2 * i, 2 * i], m[2 * i, 2 * i + 1] = cos, -sin
                m[2 * i + 1, 2 * i], m[2 * i + 1, 2 * i + 1] = sin, cos
            mats.append(m)
    return torch.stack(mats)


def explicit_mala_weights(q, k, rope=None):
    """(B, h, N, N) weights in float64; rope: None or the (N, d, d) rotations."""
    phi_q, phi_k = elu_plus_one(q), elu_plus_one(k)
    m, d = k.shape[-2], k.shape[-1]
    p = torch.einsum("bhid,bhjd->bhij", phi_q, phi_k) / math.sqrt(d)
    z = p.mean(dim=-1, keepdim=True)
    if rope is not None:
        rot_q, rot_k = (torch.einsum("nde,bhne->bhnd", rope, x) for x in (phi_q, phi_k))
        p = torch.einsum("bhid,bhjd->bhij", rot_q, rot_k) / math.sqrt(d)
    return (1 + 1 / (z + EPS)) * p / m - z / m


def implied_weights(q, k, **kw):
    """The op is linear in v: with v = I (N x N) its output is its weight matrix."""
    n = k.shape[-2]
    return mala_attention(q, k, torch.eye(n, dtype=q.dtype).expand(*k.shape[:2], n, n), **kw)


MALA_CASES = [  # grid, num_prefix, batch, heads
    ((4, 4), 0, 1, 1),
    ((3, 5), 1, 2, 3),
    ((5, 2), 4, 2, 2),
    ((1, 7), 1, 1, 2),
]


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("grid,num_prefix,b,h", MALA_CASES)
def test_mala_matches_explicit_weights_float64(grid, num_prefix, b, h, rope):
    n_tokens, d = num_prefix + math.prod(grid), 8
    q, k, v = (torch.randn(b, h, n_tokens, d, dtype=torch.float64) for _ in range(3))
    w = explicit_mala_weights(q, k, rope_matrices(num_prefix, grid, d) if rope else None)
    out = mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=rope)
    assert_rel_close(out, w @ v, torch.float64)


def test_video_grid_without_rope():
    q, k, v = (torch.randn(2, 2, 1 + 24, 8, dtype=torch.float64) for _ in range(3))
    out = mala_attention(q, k, v, grid=(2, 3, 4), num_prefix=1)
    assert_rel_close(out, explicit_mala_weights(q, k) @ v, torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_sum_to_one(seed):
    torch.manual_seed(seed)
    q, k = (torch.randn(2, 3, 1 + 30, 8, dtype=torch.float64) for _ in range(2))
    w = implied_weights(q, k, grid=(5, 6), num_prefix=1)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 31, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (w < 0).any()          # not a convex combination: gamma_i subtracts from every weight


def test_rope_weights_depend_on_relative_position_only():
    """With the same phi(q) at every grid token and the same phi(k), w_ij (i, j grid tokens) depends on
    pos_j - pos_i only: a property of RoPE, checked without writing RoPE down."""
    grid, d = (4, 5), 8
    q = torch.randn(1, 1, 1, d, dtype=torch.float64).expand(1, 1, 20, d)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64).expand(1, 1, 20, d)
    w = implied_weights(q, k, grid=grid, rope=True)[0, 0]
    pos = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    by_offset = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            by_offset.setdefault((rj - ri, cj - ci), []).append(w[i, j])
    spread = max(float(torch.stack(ws).std()) if len(ws) > 1 else 0.0 for ws in by_offset.values())
    assert spread < 1e-12
    assert len({round(float(ws[0]), 9) for ws in by_offset.values()}) > len(by_offset) // 2   # offsets do matter


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaling_phi_q_sharpens_mala_but_not_linear_attention(seed):
    """The paper's claim, checked exactly. Scale phi(q_i) by c = 1, 2, 4 (q_c = phi^-1(c phi(q))). For MALA,
    every query's largest weight strictly increases and its smallest strictly decreases, the rows still sum to 1,
    and W_c = A + c (W_1 - A), where A_ij = phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j) are plain linear
    attention's weights, which do not depend on c at all (the scale cancels): MALA moves linearly away from
    linear attention as the query grows, linear attention stays put."""
    torch.manual_seed(seed)
    q, k = (torch.randn(1, 2, 25, 8, dtype=torch.float64) for _ in range(2))
    phi_q = elu_plus_one(q)
    weights = {c: implied_weights(inverse_elu_plus_one(c * phi_q), k, grid=(5, 5)) for c in (1, 2, 4)}
    p = torch.einsum("bhid,bhjd->bhij", phi_q, elu_plus_one(k))
    a = p / p.sum(dim=-1, keepdim=True)
    for c, w in weights.items():
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 25, dtype=torch.float64), rtol=0, atol=1e-6)
        assert_rel_close(w - a, c * (weights[1] - a), tol=1e-5)
    mx = torch.stack([weights[c].amax(-1) for c in (1, 2, 4)])
    mn = torch.stack([weights[c].amin(-1) for c in (1, 2, 4)])
    assert (mx[1:] > mx[:-1]).all() and (mn[1:] < mn[:-1]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaling_q_sharpens_mala_while_flatten_and_relu_linear_attention_ignore_it(seed):
    """Scale the raw query q by c = 1, 2, 4 (the ops' own input). What is checked:
    - MALA (ELU+1 is not homogeneous, so per query this is not exact): averaged over queries, the largest
      weight and the distance ||w_i - 1/M|| to uniform weights both strictly increase with c.
    - linear attention with a 1-homogeneous feature map, i.e. focused_linear_attention with p = 1 (ReLU linear
      attention) and FLatten's p = 3: the weights at c = 2, 4 equal those at c = 1 (to the 1e-6 epsilons)."""
    torch.manual_seed(seed)
    q, k = (torch.randn(1, 2, 36, 8, dtype=torch.float64) for _ in range(2))
    eye = torch.eye(36, dtype=torch.float64).expand(1, 2, 36, 36)
    mala = {c: implied_weights(c * q, k, grid=(6, 6)) for c in (1, 2, 4)}
    max_w = torch.stack([mala[c].amax(-1).mean() for c in (1, 2, 4)])
    spread = torch.stack([(mala[c] - 1 / 36).norm(dim=-1).mean() for c in (1, 2, 4)])
    assert (max_w[1:] > max_w[:-1]).all() and (spread[1:] > spread[:-1]).all()
    qp, kp = q.abs() + 0.1, k.abs() + 0.1        # O(1) normalisers so that the epsilons stay negligible
    for p in (1, 3):
        flat = {c: focused_linear_attention(c * qp, kp, eye, grid=(6, 6), focusing_factor=p) for c in (1, 2, 4)}
        for c in (2, 4):
            assert_rel_close(flat[c], flat[1], tol=1e-5, what=f"p={p} c={c}")
        mala_p = {c: implied_weights(c * qp, kp, grid=(6, 6)) for c in (1, 4)}
        assert (mala_p[4] - mala_p[1]).norm() / mala_p[1].norm() > 0.1   # the same inputs do move MALA


@pytest.mark.parametrize("rope,num_prefix,fast", [(False, 1, False), (True, 1, False), (True, 4, True),
                                                  (False, 0, True)])
def test_mala_gradcheck_float64(rope, num_prefix, fast):
    grid = (2, 3) if not fast else (3, 4)
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(2, 2, n_tokens, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=rope)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 1e2), (torch.bfloat16, 1e4), (torch.float16, 1e2)])
def test_mala_low_precision_large_magnitudes(dtype, magnitude, rope):
    """Large q, k in 16 bits with unit v (so that the true output fits fp16): z_i and the KV state are formed in
    float32, no overflow or NaN, within the bf16/fp16 tolerance of float64."""
    q, k = ((torch.randn(2, 2, 1 + 48, 16) * magnitude).to(dtype) for _ in range(2))
    v = torch.randn(2, 2, 1 + 48, 16).to(dtype)
    out = mala_attention(q, k, v, grid=(6, 8), num_prefix=1, rope=rope)
    assert out.dtype == dtype and torch.isfinite(out).all()
    w = explicit_mala_weights(q, k, rope_matrices(1, (6, 8), 16) if rope else None)
    assert_rel_close(out, w @ v.double(), dtype)


def test_mala_bad_input_names_the_values():
    q = torch.randn(1, 2, 13, 6)
    with pytest.raises(ValueError, match=r"N=13.*P=0.*\(3, 4\)"):
        mala_attention(q, q, q, grid=(3, 4))
    with pytest.raises(ValueError, match="divisible by 4.*6"):
        mala_attention(q, q, q, grid=(3, 4), num_prefix=1, rope=True)
    with pytest.raises(ValueError, match=r"\(1, 3, 4\)"):
        mala_attention(q, q, q, grid=(1, 3, 4), num_prefix=1, rope=True)
    with pytest.raises(ValueError, match=r"\(2, 13, 6\)"):
        mala_attention(q[0], q[0], q[0], grid=(3, 4), num_prefix=1)


# --- the Triton kernels against the references ----------------------------------------------------


def _poison_allocator(device, numel):
    """Leave NaN in the caching allocator's free blocks, so an output element the kernel forgets to write
    shows up as NaN rather than as a stale plausible value."""
    if device.type == "cuda":
        torch.empty(numel, device=device).fill_(float("nan"))


def _run(kind, q, k, v, scale, grid, num_prefix, opts, backend):
    if kind == "flatten":
        return focused_linear_attention(q, k, v, grid=grid, focusing_factor=opts["p"], scale=scale,
                                        num_prefix=num_prefix, backend=backend)
    return mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=opts.get("rope", False), backend=backend)


def check_against_reference(kind, b, h, grid, num_prefix, d, dtype, device="cpu", dv=None, scale_shape=None,
                            head_gain=1.0, **opts):
    """Forward and gradients (q, k, v and FLatten's scale) of backend="triton" vs the float64 reference;
    returns the list of (what, error, tolerance) that failed. (A single scalar scale is not drawn: the
    output depends on it only through the epsilons, so its gradient is a cancellation down to ~eps.)
    ``head_gain`` scales head 0 of q and k: small gains make FLatten's whole-token norms shrink that head's
    features until its normaliser is close to the epsilon."""
    device = torch.device(device)
    n = num_prefix + math.prod(grid)
    dv = dv or d
    gain = torch.ones(h, 1, 1, device=device)
    gain[0] = head_gain
    q, k = ((torch.randn(b, h, n, d, device=device) * gain).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, n, dv, device=device).to(dtype).requires_grad_()
    scale = (torch.randn(scale_shape, device=device).requires_grad_()
             if kind == "flatten" and scale_shape is not None else None)
    inputs = [q, k, v] + ([scale] if scale is not None else [])
    _poison_allocator(device, 4 * b * h * n * max(d, dv))
    out = _run(kind, q, k, v, scale, grid, num_prefix, opts, "triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_scale = ref_inputs[3] if scale is not None else None
    ref = _run(kind, *ref_inputs[:3], ref_scale, grid, num_prefix, opts, "reference")
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())

    tol = REL_TOL[dtype]
    failed = []
    for what, a, e in zip(["out", "dq", "dk", "dv", "dscale"], [out, *grads], [ref, *ref_grads]):
        assert a.dtype == (dtype if what != "dscale" else torch.float32), what
        err = relative_error(a, e)
        if not err < tol:
            failed.append((what, err, tol))
    return failed


CPU_CASES = [  # kind, batch, heads, grid, num_prefix, d, dtype, options
    ("flatten", 2, 2, (5, 7), 1, 16, torch.float32, dict(p=3, scale_shape=(2, 16))),
    ("flatten", 1, 2, (6, 4), 0, 24, torch.bfloat16, dict(p=2.5, scale_shape=(24,))),       # padded d, real p
    ("flatten", 2, 1, (3, 9), 4, 16, torch.float32, dict(p=3, dv=8)),                       # no scale, dv != d
    ("flatten", 1, 2, (4, 5), 1, 16, torch.float16, dict(p=2, scale_shape=(2, 16))),
    ("flatten", 2, 3, (3, 4), 2, 16, torch.float32, dict(p=3, scale_shape=(3, 16), head_gain=0.03)),  # eps-bound head
    ("flatten", 1, 3, (5, 3), 0, 16, torch.bfloat16, dict(p=3, scale_shape=(16,), head_gain=0.1)),
    ("flatten", 2, 5, (7, 9), 2, 40, torch.bfloat16, dict(p=3, scale_shape=(5, 40))),      # 5 heads, N = 65
    ("flatten", 1, 2, (4, 4), 0, 72, torch.float32, dict(p=3, scale_shape=(2, 72))),        # DiT's head_dim 72
    # more heads than one (tokens, heads, channels) tile of the norms kernel holds: norms over head blocks
    ("flatten", 1, 6, (3, 4), 1, 72, torch.bfloat16, dict(p=3, scale_shape=(6, 72))),
    ("flatten", 1, 8, (2, 5), 0, 64, torch.bfloat16, dict(p=2.5, scale_shape=(8, 64))),
    ("mala", 2, 2, (5, 7), 1, 16, torch.float32, dict()),
    ("mala", 1, 2, (1, 6), 0, 16, torch.bfloat16, dict()),
    ("mala", 2, 2, (6, 8), 2, 16, torch.bfloat16, dict(rope=True)),
    ("mala", 1, 1, (7, 5), 0, 12, torch.float32, dict(rope=True, dv=20)),                    # padded d with RoPE
    ("mala", 2, 3, (7, 9), 2, 40, torch.bfloat16, dict(rope=True)),                          # N = 65: several tiles
    ("mala", 1, 2, (3, 4), 1, 72, torch.bfloat16, dict()),
]


@pytest.mark.parametrize("kind,b,h,grid,num_prefix,d,dtype,opts", CPU_CASES)
def test_triton_matches_reference_cpu(kind, b, h, grid, num_prefix, d, dtype, opts):
    assert check_against_reference(kind, b, h, grid, num_prefix, d, dtype, **opts) == []


def test_float64_is_the_reference_only():
    """The kernels compute in fp32: float64 named for Triton is an error saying so; unnamed, the reference runs."""
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    for op in (mala_attention, focused_linear_attention):
        with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
            op(q, k, v, grid=(3, 4), num_prefix=1, backend="triton")
        torch.testing.assert_close(op(q, k, v, grid=(3, 4), num_prefix=1),
                                   op(q, k, v, grid=(3, 4), num_prefix=1, backend="reference"))


def test_triton_scale_far_from_zero_cpu():
    """The kernels' softplus(s) and its derivative where e^s or e^-s is tiny (s from -14 to 28 per channel): the
    output and the gradient of s as the reference's (torch's softplus) in float32."""
    q, k, v = (torch.randn(1, 2, 1 + 20, 16) for _ in range(3))
    scale = torch.linspace(-14.0, 28.0, 32).reshape(2, 16)[:, torch.randperm(16)].requires_grad_()
    got, want = (focused_linear_attention(q, k, v, grid=(4, 5), scale=scale, num_prefix=1, backend=backend)
                 for backend in ("triton", "reference"))
    grad = torch.randn_like(want)
    (d_got,), (d_want,) = (torch.autograd.grad(out, scale, grad) for out in (got, want))
    assert_rel_close(got, want, torch.float32, what="out")
    assert_rel_close(d_got, d_want, torch.float32, what="dscale")


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration, checked by torch.library.opcheck."""
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    c = torch.rand(2, 16) + 0.5
    torch.library.opcheck(torch.ops.subquad.linear_attention.default, (q, k, v, c.requires_grad_(), 0, 3.0, 0, 0, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.subquad.linear_attention.default, (q, k, v, c.detach(), 1, 1.0, 1, 4, 5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_cpu():
    """torch.compile(fullgraph=True) traces through the custom op (fake tensors) and its autograd formula."""
    q, k, v = (torch.randn(1, 2, 21, 16, requires_grad=True) for _ in range(3))
    scale = torch.randn(2, 16, requires_grad=True)

    def fn(q, k, v, scale):
        a = focused_linear_attention(q, k, v, grid=(4, 5), scale=scale, num_prefix=1, backend="triton")
        return a + mala_attention(q, k, v, grid=(4, 5), num_prefix=1, rope=True, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, expected = compiled(q, k, v, scale), fn(q, k, v, scale)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v, scale))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, scale))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e)


REAL_SIZES = [((56, 56), 32, 1), ((128, 128), 4, 0), ((256, 256), 1, 0)]     # grid, batch, prefix tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid,b,num_prefix", REAL_SIZES)
@pytest.mark.parametrize("kind,opts", [("flatten", dict(p=3, scale_shape=(4, 64))), ("mala", dict()),
                                       ("mala", dict(rope=True))])
def test_gpu_real_sizes(kind, opts, grid, b, num_prefix, dtype):
    assert check_against_reference(kind, b, 4, grid, num_prefix, 64, dtype, device="cuda", **opts) == []


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    q, k, v = (torch.randn(2, 4, 1 + 14 * 14, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    scale = torch.randn(4, 64, device="cuda", requires_grad=True)

    def fn(q, k, v, scale):
        a = focused_linear_attention(q, k, v, grid=(14, 14), scale=scale, num_prefix=1)
        return a + mala_attention(q, k, v, grid=(14, 14), num_prefix=1, rope=True)

    compiled = torch.compile(fn, fullgraph=True)
    out, expected = compiled(q, k, v, scale), fn(q, k, v, scale)
    torch.testing.assert_close(out, expected)
    for a, e in zip(torch.autograd.grad(out.float().sum(), (q, k, v, scale)),
                    torch.autograd.grad(expected.float().sum(), (q, k, v, scale))):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_gpu_fuzz():
    """200 random configurations (op, batch, heads, grid, prefix, dtype, p, scale shape): zero failures.
    Head dims stay at 64 so that the kernels compile a handful of times (the CPU tests cover padded dims)."""
    rng = random.Random(1234)
    failures = []
    for i in range(200):
        kind = rng.choice(["flatten", "mala", "mala_rope"])
        config = dict(kind="mala" if kind == "mala_rope" else kind, b=rng.randint(1, 3), h=rng.randint(1, 4),
                      grid=(rng.randint(1, 40), rng.randint(1, 40)), num_prefix=rng.choice([0, 0, 1, 4]), d=64,
                      dtype=rng.choice([torch.float32, torch.bfloat16]))
        if kind == "flatten":
            config.update(p=rng.choice([3, 3, 2.5]), scale_shape=rng.choice([None, (64,), (config["h"], 64)]))
        else:
            config.update(rope=kind == "mala_rope")
        torch.manual_seed(i)
        failed = check_against_reference(device="cuda", **config)
        if failed:
            failures.append((config, failed))
    assert not failures, f"{len(failures)} of 200 configurations failed: {failures[:5]}"
