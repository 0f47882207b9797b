"""Agent, FLatten and MALA modules against a hand composition: qkv split by hand, the functional op, the
DWC / LePE / gate written with F.conv2d and F.linear on the token layout, then proj. Agent biases are built
the way the official DeiT code builds them (agent_transformer/models/agent_deit.py, window 14)."""
import math

import pytest
import torch
import torch.nn.functional as F

import subquad.attention as attention
from subquad.kernels import agent_attention, focused_linear_attention, mala_attention
from subquad.kernels.core.testing import assert_rel_close


def randomize(m):
    """Every parameter random and O(1) (zero-initialised biases and scales would hide layout mistakes)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def split_heads(m, x):
    b, n, c = x.shape
    h = m.num_heads
    return [t.reshape(b, n, h, c // h).transpose(1, 2) for t in F.linear(x, m.qkv.weight, m.qkv.bias).split(c, -1)]


def merge_heads(y):
    b, h, n, d = y.shape
    return y.transpose(1, 2).reshape(b, n, h * d)


def grid_conv(tokens, grid, num_prefix, weight, bias):
    """Depthwise conv of the grid tokens of (B, N, C) tokens, zero for the prefix tokens."""
    b, n, c = tokens.shape
    g = tokens[:, num_prefix:].reshape(b, *grid, c).permute(0, 3, 1, 2)
    g = F.conv2d(g, weight, bias, padding=weight.shape[-1] // 2, groups=c)
    return torch.cat([torch.zeros_like(tokens[:, :num_prefix]), g.permute(0, 2, 3, 1).reshape(b, -1, c)], dim=1)


# --- agent ------------------------------------------------------------------------------------

def official_agent_bias(m, grid, num_prefix):
    """(B1, B2) as agent_deit.py builds them on its 14x14 window, with the row and column terms resized
    linearly (align_corners=False) for another grid, and num_prefix copies of the cls terms."""
    h, n = m.num_heads, m.num_agents
    gh, gw = grid

    def lin(t, size):            # (..., L) -> (..., size)
        lead = t.shape[:-1]
        return F.interpolate(t.reshape(1, -1, t.shape[-1]), size=size, mode="linear").reshape(*lead, size)

    b1 = F.interpolate(m.an_bias, size=grid, mode="bilinear").reshape(h, n, -1)
    b1 = b1 + (lin(m.ah_bias.reshape(h, n, -1), gh)[..., None] + lin(m.aw_bias.reshape(h, n, -1), gw)[..., None, :]
               ).reshape(h, n, -1)
    b1 = torch.cat([m.ac_bias.reshape(h, n, 1).repeat(1, 1, num_prefix), b1], dim=-1)
    b2 = F.interpolate(m.na_bias, size=grid, mode="bilinear").reshape(h, n, -1).permute(0, 2, 1)
    rows = lin(m.ha_bias.reshape(h, -1, n).transpose(1, 2), gh).transpose(1, 2)           # (h, gh, n)
    cols = lin(m.wa_bias.reshape(h, -1, n).transpose(1, 2), gw).transpose(1, 2)           # (h, gw, n)
    b2 = b2 + (rows[:, :, None] + cols[:, None]).reshape(h, -1, n)
    b2 = torch.cat([m.ca_bias.reshape(h, 1, n).repeat(1, num_prefix, 1), b2], dim=-2)
    return b1, b2


LARGE = 1 << 30         # elements of an activation next to which any bias is small


def test_agent_bias_uses_the_parameters_exactly_on_the_bias_grid():
    """On the 14x14 bias grid with one cls token: B1[:, a, 1 + 14 r + c] = an(r, c) + ah[r] + aw[c] (likewise B2),
    the row, column and cls terms used exactly and the 7x7 map an upsampled bilinearly as the official code does."""
    m = randomize(attention.build("agent", dim=16, num_heads=2)).double()
    h, n = 2, 49
    maps = m.an_bias.detach().clone(), m.na_bias.detach().clone()
    with torch.no_grad():                           # first the row/column/cls terms alone: exact
        m.an_bias.zero_()
        m.na_bias.zero_()
    b1, b2 = m.agent_bias((14, 14), 1, 0)
    torch.testing.assert_close(b1[:, :, 1:].reshape(h, n, 14, 14), (m.ah_bias + m.aw_bias)[0], rtol=0, atol=0)
    torch.testing.assert_close(b2[:, 1:].reshape(h, 14, 14, n), (m.ha_bias + m.wa_bias)[0], rtol=0, atol=0)
    torch.testing.assert_close(b1[:, :, 0], m.ac_bias.reshape(h, n), rtol=0, atol=0)
    torch.testing.assert_close(b2[:, 0, :], m.ca_bias.reshape(h, n), rtol=0, atol=0)
    with torch.no_grad():                           # then the 7x7 maps alone
        m.an_bias.copy_(maps[0])
        m.na_bias.copy_(maps[1])
        for name in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            getattr(m, name).zero_()
    b1, b2 = m.agent_bias((14, 14), 1, 0)
    # 1e-6: resize_map interpolates in float32 even for a float64 module (attention/grid_maps.py)
    torch.testing.assert_close(b1[:, :, 1:].reshape(h, n, 14, 14),
                               F.interpolate(m.an_bias, size=(14, 14), mode="bilinear"), rtol=0, atol=1e-6)
    torch.testing.assert_close(b2[:, 1:].reshape(h, 14, 14, n),
                               F.interpolate(m.na_bias, size=(14, 14), mode="bilinear").permute(0, 2, 3, 1),
                               rtol=0, atol=1e-6)
    b1, b2 = m.agent_bias((7, 7), 0, 0)             # and used exactly on a 7x7 grid
    torch.testing.assert_close(b1.reshape(h, n, 7, 7), m.an_bias, rtol=0, atol=0)
    torch.testing.assert_close(b2.reshape(h, 7, 7, n), m.na_bias.permute(0, 2, 3, 1), rtol=0, atol=0)


def test_agent_bias_kept_for_inference_only_while_the_parameters_are_unchanged():
    """Without autograd the resized pair is reused for the same grid (beside large activations); an in-place update,
    load_state_dict, an optimizer step, a dtype change or another grid rebuilds it; with autograd it is built every
    call."""
    m = randomize(attention.build("agent", dim=16, num_heads=2, num_agents=4))
    fresh = lambda grid, prefix: m._resized_bias(grid, prefix)[0]       # noqa: E731
    with torch.no_grad():
        first = m.agent_bias((9, 10), 1, LARGE)
        assert m.agent_bias((9, 10), 1, LARGE)[0] is first[0]
        other = m.agent_bias((8, 8), 0, LARGE)
        assert other[0] is not first[0] and other[0].shape == (2, 4, 64)
        m.an_bias.add_(1.0)
        updated = m.agent_bias((8, 8), 0, LARGE)
        torch.testing.assert_close(updated[0], fresh((8, 8), 0)[0], rtol=0, atol=0)
        assert not torch.equal(updated[0], other[0])
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})
        torch.testing.assert_close(m.agent_bias((8, 8), 0, LARGE)[1], fresh((8, 8), 0)[1], rtol=0, atol=0)
    step = torch.optim.SGD(m.parameters(), lr=1.0)
    m(torch.randn(1, 64, 16), grid=(8, 8)).sum().backward()
    step.step()
    with torch.no_grad():
        torch.testing.assert_close(m.agent_bias((8, 8), 0, LARGE)[0], fresh((8, 8), 0)[0], rtol=0, atol=0)
        m.double()
        assert m.agent_bias((8, 8), 0, LARGE)[0].dtype == torch.float64
    assert m.agent_bias((8, 8), 0, LARGE)[0].requires_grad                     # with autograd: built, differentiable


def test_agent_bias_not_kept_where_large_next_to_the_activations():
    """The pair (2 h n N values) is kept only where it holds at most 1/8 of one (B, N, C) activation's values: at
    2 x 2 x 4 x 80 = 1,280 values, kept beside 10,240 and rebuilt beside 10,239."""
    m = randomize(attention.build("agent", dim=16, num_heads=2, num_agents=4))
    with torch.no_grad():
        first = m.agent_bias((8, 10), 0, 10240)
        assert m.agent_bias((8, 10), 0, 10240)[0] is first[0]
        m.agent_bias((8, 10), 0, 10239)
        assert "agent_bias" not in m._cached                              # large next to this one: dropped
        again = m.agent_bias((8, 10), 0, 10239)
        assert again[0] is not first[0] and "agent_bias" not in m._cached
        torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)


def test_flatten_key_encoding_kept_for_inference_only_while_the_encoding_is_unchanged():
    m = randomize(attention.build("flatten", dim=16, num_heads=2, pos_grid=(4, 4))).eval()
    x = torch.randn(8, 1 + 30, 16)        # the (2, 30, 8) encoding is small next to a (8, 31, 16) activation
    with torch.no_grad():
        m(x[:2], grid=(5, 6), num_prefix=1)
        assert "key_encoding" not in m._cached                          # but not next to a (2, 31, 16) one
        first = m(x, grid=(5, 6), num_prefix=1)
        kept = m._cached["key_encoding"][1]
        assert kept.shape == (2, 30, 8)
        torch.testing.assert_close(m(x, grid=(5, 6), num_prefix=1), first, rtol=0, atol=0)
        assert m._cached["key_encoding"][1] is kept
        m.positional_encoding.mul_(2.0)
        changed = m(x, grid=(5, 6), num_prefix=1)
    torch.testing.assert_close(changed, m(x, grid=(5, 6), num_prefix=1), rtol=0, atol=0)   # with autograd: fresh
    assert not torch.equal(changed, first)


@pytest.mark.parametrize("grid", [(4, 4), (7, 5), (3, 6, 9)])
def test_flatten_key_encoding_is_the_encoding_interpolated(grid):
    """The encoding on its (4, 4) grid, bilinearly resized to the grid (each frame of a video grid alike) as
    F.interpolate does, split into heads; on its own grid a view of the parameter."""
    m = randomize(attention.build("flatten", dim=16, num_heads=2, pos_grid=(4, 4))).double()
    pe = m.positional_encoding.reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(pe, size=grid[-2:], mode="bilinear", align_corners=False).flatten(2)     # (1, 16, H*W)
    ref = ref.repeat(1, 1, math.prod(grid[:-2])).reshape(2, 8, -1).transpose(1, 2)             # (h, N, d)
    out = m.key_encoding(grid)
    assert out.shape == (2, math.prod(grid), 8)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if grid == (4, 4):
        assert out._base is m.positional_encoding
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_grid_constants_kept_within_their_byte_budget(monkeypatch):
    """Resize matrices of ever new grids do not grow the cache past CONSTANT_BYTES; the latest stays kept."""
    from subquad.attention import grid_maps
    monkeypatch.setattr(grid_maps, "_CONSTANTS", type(grid_maps._CONSTANTS)())
    monkeypatch.setattr(grid_maps, "CONSTANT_BYTES", 1_000_000)          # > one 60x60 matrix (706 kB)
    like = torch.empty(0)
    for side in range(20, 61):
        last = grid_maps.grid_resize_matrix((7, 7), (side, side), 1, like)
        assert sum(t.nbytes for t in grid_maps._CONSTANTS.values()) <= 1_000_000
    assert grid_maps.grid_resize_matrix((7, 7), (60, 60), 1, like) is last


@pytest.mark.parametrize("shape,size", [((7, 7, 12), (56, 40)), ((7, 7, 2), (5, 9)), ((1, 49, 4), (1, 13)),
                                        ((3, 5, 2), (64, 1)), ((7, 7, 1), (7, 30)), ((14, 14, 3), (14, 14))])
def test_resize_map_is_f_interpolate(shape, size):
    """resize_map (two matrix products on the channels-last map) gives F.interpolate's bilinear values and
    gradients, up and down, and is the map itself at its own size."""
    from subquad.attention.grid_maps import resize_map
    m = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = resize_map(m, size)
    ref = F.interpolate(m.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, m, g)[0], torch.autograd.grad(ref, m, g)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid,num_prefix,opts", [
    ((14, 14), 1, {}),                                          # the official DeiT setting
    ((10, 12), 0, {}),
    ((9, 20), 4, {}),
    ((5, 7), 1, {"num_agents": 9, "bias_grid": (4, 6)}),       # 3 divides neither 5 nor 7
    ((11, 6), 2, {"num_agents": 16, "bias_grid": 8, "dwc_kernel_size": 5}),
])
def test_agent_module_matches_hand_composition(grid, num_prefix, opts):
    m = randomize(attention.build("agent", dim=16, num_heads=2, qkv_bias=True, **opts)).double()
    x = torch.randn(2, num_prefix + math.prod(grid), 16, dtype=torch.float64)
    q, k, v = split_heads(m, x)
    y = merge_heads(agent_attention(q, k, v, grid=grid, num_agents=m.num_agents, num_prefix=num_prefix,
                                    agent_bias=official_agent_bias(m, grid, num_prefix)))
    y = y + grid_conv(merge_heads(v), grid, num_prefix, m.dwc.weight, m.dwc.bias)
    assert_rel_close(m(x, grid=grid, num_prefix=num_prefix), F.linear(y, m.proj.weight, m.proj.bias), torch.float64)


@pytest.mark.parametrize("grid", [(14, 14), (9, 17)])
def test_agent_gradients_reach_every_bias(grid):
    m = randomize(attention.build("agent", dim=16, num_heads=2))
    m(torch.randn(2, 1 + math.prod(grid), 16), grid=grid, num_prefix=1).pow(2).sum().backward()
    for name in ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias"):
        g = getattr(m, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# --- FLatten ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,num_prefix,opts", [
    ((6, 6), 0, {}),
    ((5, 7), 1, {"focusing_factor": 2, "kernel_size": 3}),
    ((6, 6), 1, {"pos_grid": (6, 6)}),                         # positional encoding used as is
    ((4, 9), 4, {"pos_grid": (6, 6)}),                         # resized (bilinear) to the grid
])
def test_focused_linear_module_matches_hand_composition(grid, num_prefix, opts):
    m = randomize(attention.build("focused_linear", dim=16, num_heads=2, qkv_bias=True, **opts)).double()
    x = torch.randn(2, num_prefix + math.prod(grid), 16, dtype=torch.float64)
    assert_rel_close(m(x, grid=grid, num_prefix=num_prefix), focused_hand_composition(m, x, grid, num_prefix),
                     torch.float64)


def focused_hand_composition(m, x, grid, num_prefix):
    """FLatten's module output from the functional op: heads split by hand, k_norm, the positional encoding
    resized by F.interpolate and added to the grid keys, the shared DWC of V, the projection."""
    q, k, v = split_heads(m, x)
    q, k = m.q_norm(q), m.k_norm(k)
    b, h, n, d = k.shape
    if m.positional_encoding is not None:
        pe = m.positional_encoding.reshape(1, *m.pos_grid, h * d).permute(0, 3, 1, 2)
        if tuple(grid) != m.pos_grid:
            pe = F.interpolate(pe, size=grid, mode="bilinear")
        pe = pe.flatten(2).transpose(1, 2).reshape(1, -1, h, d).transpose(1, 2)   # (1, h, H*W, d)
        k = k + F.pad(pe, (0, 0, num_prefix, 0))
    y = merge_heads(focused_linear_attention(q, k, v, grid=grid, focusing_factor=m.focusing_factor,
                                             scale=m.scale.reshape(h, d), num_prefix=num_prefix))
    # one head_dim-channel DWC shared by every head: run each head as a batch element
    v_per_head = v.reshape(b * h, 1, n, d).transpose(1, 2).reshape(b * h, n, d)
    dwc = grid_conv(v_per_head, grid, num_prefix, m.dwc.weight, m.dwc.bias).reshape(b, h, n, d)
    return F.linear(y + merge_heads(dwc), m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("pos_grid", [(3, 3), (4, 5)])
def test_focused_linear_key_encoding_gradients(qk_norm, pos_grid):
    """The key encoding (resized, or a view of the parameter on its own grid) added in place into the qkv output
    (no k_norm) or after k_norm: the gradients of the input, the qkv weights and the encoding equal the hand
    composition's (out of place)."""
    grid, num_prefix = (4, 5), 1
    m = randomize(attention.build("focused_linear", dim=16, num_heads=2, qkv_bias=True, qk_norm=qk_norm,
                                  pos_grid=pos_grid)).double()
    x = torch.randn(2, num_prefix + math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    params = (x, m.qkv.weight, m.positional_encoding)
    got = torch.autograd.grad(m(x, grid=grid, num_prefix=num_prefix).square().sum(), params)
    want = torch.autograd.grad(focused_hand_composition(m, x, grid, num_prefix).square().sum(), params)
    for g, w, name in zip(got, want, ("x", "qkv.weight", "positional_encoding")):
        assert_rel_close(g, w, torch.float64, what=f"gradient of {name}")


def test_focused_linear_key_encoding_in_bfloat16_keys():
    """Under bf16 autocast the float32 encoding is added into the bf16 keys (rounded once) and gets a float32
    gradient, both as in the float64 hand composition within bf16's tolerance."""
    grid, num_prefix = (4, 5), 1
    m = randomize(attention.build("focused_linear", dim=16, num_heads=2, pos_grid=grid))
    x = torch.randn(2, num_prefix + math.prod(grid), 16)
    with torch.autocast("cpu", torch.bfloat16):
        got = m(x, grid=grid, num_prefix=num_prefix)
    (d_pe,) = torch.autograd.grad(got.float().square().sum(), m.positional_encoding)
    assert d_pe.dtype == torch.float32
    m64 = m.double()
    want = focused_hand_composition(m64, x.double(), grid, num_prefix)
    (want_pe,) = torch.autograd.grad(want.square().sum(), m64.positional_encoding)
    assert_rel_close(got, want, torch.bfloat16, what="output")
    assert_rel_close(d_pe, want_pe, torch.bfloat16, what="gradient of the encoding")


def test_focused_linear_module_matches_official_layout():
    """The module against FLatten's forward written on (B, N, C) tokens as the official code lays it out
    (flatten_swin.py's FocusedLinearAttention): the focused map over all C channels of a token, then heads."""
    grid, h, c = (5, 6), 4, 32
    m = randomize(attention.build("focused_linear", dim=c, num_heads=h, qkv_bias=True, pos_grid=grid)).double()
    x = torch.randn(2, math.prod(grid), c, dtype=torch.float64)
    b, n, _ = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).chunk(3, dim=-1)
    k = k + m.positional_encoding
    sp = F.softplus(m.scale)
    q, k = ((F.relu(t) + 1e-6) / sp for t in (q, k))
    q, k = (t.norm(dim=-1, keepdim=True) * t ** 3 / (t ** 3).norm(dim=-1, keepdim=True) for t in (q, k))
    q, k, v = (t.reshape(b, n, h, -1).transpose(1, 2) for t in (q, k, v))
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    y = (q @ (k.transpose(-2, -1) @ v) / n * z).transpose(1, 2).reshape(b, n, c)
    v_img = v.reshape(b * h, *grid, -1).permute(0, 3, 1, 2)
    y = y + F.conv2d(v_img, m.dwc.weight, m.dwc.bias, padding=2, groups=c // h).reshape(b, c, n).transpose(1, 2)
    assert_rel_close(m(x, grid=grid), F.linear(y, m.proj.weight, m.proj.bias), torch.float64)


# --- MALA -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rope,lepe,gate", [(False, False, False), (True, False, False), (False, True, False),
                                            (False, False, True), (True, True, True)])
@pytest.mark.parametrize("grid,num_prefix", [((6, 6), 0), ((5, 7), 1), ((3, 8), 4)])
def test_mala_module_matches_hand_composition(grid, num_prefix, rope, lepe, gate):
    m = randomize(attention.build("mala", dim=16, num_heads=2, qkv_bias=True, rope=rope, lepe=lepe,
                                  gate=gate)).double()
    x = torch.randn(2, num_prefix + math.prod(grid), 16, dtype=torch.float64)
    q, k, v = split_heads(m, x)
    y = merge_heads(mala_attention(q, k, v, grid=grid, num_prefix=num_prefix, rope=rope))
    if lepe:
        y = y + grid_conv(merge_heads(v), grid, num_prefix, m.lepe.weight, m.lepe.bias)
    if gate:
        y = y * F.linear(x, m.gate.weight, m.gate.bias)
    assert_rel_close(m(x, grid=grid, num_prefix=num_prefix), F.linear(y, m.proj.weight, m.proj.bias), torch.float64)


@pytest.mark.parametrize("name,opts,grid", [
    # bias_grid = grid: resize_map interpolates in float32, which float64 gradcheck cannot pass (grid_maps.py)
    ("agent", {"num_agents": 9, "bias_grid": 7}, (7, 7)),
    ("focused_linear", {"pos_grid": (4, 5)}, (4, 5)),
    ("mala", {"rope": True, "lepe": True, "gate": True}, (4, 5)),
])
def test_module_gradcheck_float64(name, opts, grid):
    """Gradients through the whole module (input and every parameter) with a cls token."""
    m = randomize(attention.build(name, dim=8, num_heads=2, **opts)).double()
    x = torch.randn(1, 1 + math.prod(grid), 8, dtype=torch.float64, requires_grad=True)
    names, params = zip(*m.named_parameters())

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,), {"grid": grid, "num_prefix": 1})
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("name,opts", [("agent", {"num_agents": 9}), ("focused_linear", {}),
                                       ("mala", {"rope": True, "lepe": True, "gate": True})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_low_precision(name, opts, dtype):
    """A 16-bit module: finite, and close to the same (16-bit-rounded) weights and input run in float64.
    Tolerance 3e-2: q, k, v, the op output and proj are each rounded to 16 bits in turn."""
    m = randomize(attention.build(name, dim=16, num_heads=2, **opts)).to(dtype)
    x = (torch.randn(2, 1 + 48, 16) * 3).to(dtype)
    y = m(x, grid=(6, 8), num_prefix=1)
    expected = m.double()(x.double(), grid=(6, 8), num_prefix=1)
    assert expected.abs().max() < 3e4               # the true output fits in fp16
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert_rel_close(y, expected, dtype, tol=3e-2)
