"""mala_attention against MALA (Fan et al., ICCV 2025, Eq. 9-11) written out as N x N weights.

phi = ELU + 1;  p_ij = phi(q_i).phi(k_j) / sqrt(d);  z_i = mean_j p_ij  (the official code's mean over the M keys);
w_ij = (1 + 1/(z_i + eps)) p_ij / M - z_i / M,  so sum_j w_ij = 1 (up to eps = 1e-6, the official code's);
with 2D RoPE, p_ij in the first term becomes (R_i phi(q_i)).(R_j phi(k_j)) / sqrt(d) while z_i stays unrotated.
"""
import math

import pytest
import torch

from subquad.kernels import focused_linear_attention, mala_attention
from subquad.kernels.core.testing import assert_rel_close

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


CASES = [  # grid, num_prefix, batch, heads
    ((4, 4), 0, 1, 1),
    ((3, 5), 1, 2, 3),
    ((5, 2), 4, 2, 2),
    ((1, 7), 1, 1, 2),
]


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("grid,num_prefix,b,h", CASES)
def test_matches_explicit_weights_float64(grid, num_prefix, b, h, rope):
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
def test_gradcheck_float64(rope, num_prefix, fast):
    grid = (2, 3) if not fast else (3, 4)
    n_tokens = num_prefix + math.prod(grid)
    q, k, v = (torch.randn(2, 2, n_tokens, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=rope)
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=fast)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("dtype,magnitude", [(torch.bfloat16, 1e2), (torch.bfloat16, 1e4), (torch.float16, 1e2)])
def test_low_precision_large_magnitudes(dtype, magnitude, rope):
    """Large q, k in 16 bits with unit v (so that the true output fits fp16): z_i and the KV state are formed in
    float32, no overflow or NaN, within the bf16/fp16 tolerance of float64."""
    q, k = ((torch.randn(2, 2, 1 + 48, 16) * magnitude).to(dtype) for _ in range(2))
    v = torch.randn(2, 2, 1 + 48, 16).to(dtype)
    out = mala_attention(q, k, v, grid=(6, 8), num_prefix=1, rope=rope)
    assert out.dtype == dtype and torch.isfinite(out).all()
    w = explicit_mala_weights(q, k, rope_matrices(1, (6, 8), 16) if rope else None)
    assert_rel_close(out, w @ v.double(), dtype)


def test_bad_input_names_the_values():
    q = torch.randn(1, 2, 13, 6)
    with pytest.raises(ValueError, match=r"N=13.*P=0.*\(3, 4\)"):
        mala_attention(q, q, q, grid=(3, 4))
    with pytest.raises(ValueError, match="divisible by 4.*6"):
        mala_attention(q, q, q, grid=(3, 4), num_prefix=1, rope=True)
    with pytest.raises(ValueError, match=r"\(1, 3, 4\)"):
        mala_attention(q, q, q, grid=(1, 3, 4), num_prefix=1, rope=True)
    with pytest.raises(ValueError, match=r"\(2, 13, 6\)"):
        mala_attention(q[0], q[0], q[0], grid=(3, 4), num_prefix=1)
