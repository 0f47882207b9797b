"""The shared argument checks (kernels/core/checks.py) and the ops' option checks: every bad option a
ValueError that names it, its value and what is valid; no hang, no huge allocation, no ZeroDivisionError."""
import contextlib
import math
import signal

import numpy as np
import pytest
import torch

from subquad import attention, kernels
from subquad.kernels import checks, families
from subquad.kernels.core.dispatch import empty_output
from subquad.kernels.core.family import check_options
from subquad.kernels.core.testing import assert_rel_close
from subquad.kernels.loglinear.plan import normalize_options as loglinear_options
from subquad.kernels.radial.plan import normalize_options as radial_options


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging (top_k <= 0 used to loop forever)."""
    def fail(*_):
        raise AssertionError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def qkv(b=1, h=2, n=64, d=8, **kw):
    return tuple(torch.randn(b, h, n, d, **kw) for _ in range(3))


# --- the helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3)])
def test_ints_of_every_kind_are_ints(value):
    assert checks.check_int(value, "k") == 3 and type(checks.check_int(value, "k")) is int


@pytest.mark.parametrize("value", [3.0, 2.5, "3", True, np.True_, None, torch.tensor(3.0), [3], 0, -1])
def test_what_is_not_an_int_ge_1_is_a_value_error_naming_option_and_value(value):
    with pytest.raises(ValueError, match=r"op: k must be an int >= 1, got "):
        checks.check_int(value, "k", "op")


def test_int_patterns():
    assert checks.check_int(0, "p", minimum=0) == 0
    with pytest.raises(ValueError, match="kernel_size must be an odd int >= 1, got 4"):
        checks.check_int(4, "kernel_size", odd=True)
    assert checks.check_ints([2, np.int64(3)], "tile") == (2, 3)
    assert checks.check_ints(5, "bias_grid", lengths=(2,), scalar=True) == (5, 5)
    for bad in (0, (0, 3), (2,), (2, 2.5), "22", -1):
        with pytest.raises(ValueError, match=r"tile must be a tuple of 2 or 3 ints >= 1, got "):
            checks.check_ints(bad, "tile")
    with pytest.raises(ValueError, match=r"bias_grid must be an int >= 1 or a tuple of 2 ints >= 1, got 0"):
        checks.check_ints(0, "bias_grid", lengths=(2,), scalar=True)


def test_bool_float_and_choice_patterns():
    assert checks.check_bool(np.True_, "sink") is True and checks.check_bool(None, "sink", allow_none=True) is None
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match=r"sink must be True or False, got"):
            checks.check_bool(bad, "sink")
    assert checks.check_float(3, "p") == 3.0 and checks.check_float(np.float32(0.5), "p", positive=True) == 0.5
    for bad in (math.nan, math.inf, -math.inf, "3", True, None, 0, -1.0):
        with pytest.raises(ValueError, match=r"p must be a finite number > 0, got"):
            checks.check_float(bad, "p", positive=True)
    assert checks.check_choice("a", "layout", ("a", "b")) == "a"
    assert checks.check_choice(None, "layout", ("a", "b"), allow_none=True) is None
    with pytest.raises(ValueError, match=r"layout must be one of \('a', 'b'\) \(or None\), got 'c'"):
        checks.check_choice("c", "layout", ("a", "b"), allow_none=True)
    with pytest.raises(ValueError, match=r"got \['a'\]"):       # unhashable values are errors, not TypeErrors
        checks.check_choice(["a"], "layout", ("a", "b"))


@pytest.mark.parametrize("grid", [(8, 7.5), ("8", 8), (8.0, 8), (8, True), (0, 6), (8,), (1, 2, 3, 4), 8, "88", None])
def test_grids_are_ints_not_rounded(grid):
    q, k, v = qkv(n=64)
    with pytest.raises(ValueError, match="grid must be"):
        kernels.mala_attention(q, k, v, grid=grid)


def test_grids_of_numpy_and_torch_ints():
    assert checks.check_grid((np.int64(8), torch.tensor(8))) == (8, 8)
    assert checks.check_grid(torch.Size([2, 3, 4])) == (2, 3, 4)
    assert all(type(g) is int for g in checks.check_grid([np.int32(2), 3]))


def test_num_prefix_is_an_int_ge_0():
    q, k, v = qkv(n=65)
    for bad in (-1, 1.0, "1"):
        with pytest.raises(ValueError, match="num_prefix"):
            kernels.mala_attention(q, k, v, grid=(8, 8), num_prefix=bad)


def test_input_dtype_check_names_both_dtypes_unless_autocast():
    x = torch.randn(1, 4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"Attn has torch.float32 parameters but got a torch.float16 input"):
        checks.check_input_dtype(x, torch.float32, "Attn")
    checks.check_input_dtype(x.float(), torch.float32, "Attn")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        checks.check_input_dtype(x, torch.float32, "Attn")


# --- the ops -----------------------------------------------------------------------------------

OPS = {  # op name -> options that make an 8x8 grid a real case
    "agent_attention": dict(num_agents=4), "focused_linear_attention": {}, "mala_attention": {},
    "neighborhood_attention": dict(kernel_size=3), "radial_attention": dict(tile=(4, 4)),
    "loglinear_attention": dict(block_size=16, top_k=2),
}


@pytest.mark.parametrize("op", OPS)
def test_head_dim_0_is_a_value_error(op):
    q, k, v = qkv(d=0)
    with pytest.raises(ValueError, match="head dims must be >= 1, got d=0"):
        getattr(kernels, op)(q, k, v, grid=(8, 8), **OPS[op])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("b,h", [(0, 2), (2, 0)])
def test_no_batch_or_no_heads_gives_an_empty_output_on_every_backend(op, b, h):
    """The Triton launch grids divided by B * heads (ZeroDivisionError): the op answers before them."""
    q, k, v = qkv(b, h, 64, 8, requires_grad=True)
    for backend in kernels.available_backends(op):
        if backend == "natten":
            continue
        out = getattr(kernels, op)(q, k, v, grid=(8, 8), backend=backend, **OPS[op])
        assert out.shape == (b, h, 64, 8), backend
        out.sum().backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("b,h", [(0, 2), (2, 0)])
def test_grid_conv_with_no_batch_or_no_heads(b, h):
    x, residual = (torch.randn(b, h, 64, 8, requires_grad=True) for _ in range(2))
    weight = torch.randn(h * 8, 1, 3, 3, requires_grad=True)
    for backend in kernels.available_backends("depthwise_conv_on_grid"):
        out = kernels.depthwise_conv_on_grid(x, weight, grid=(8, 8), residual=residual, backend=backend)
        assert out.shape == x.shape, backend
        out.sum().backward()
        assert weight.grad.shape == weight.shape


def test_empty_output_is_none_when_there_is_work():
    q, k, v = qkv(1, 1, 4, 2)
    assert empty_output(q, k, v) is None
    assert empty_output(*qkv(0, 1, 4, 2)).shape == (0, 1, 4, 2)


def test_every_family_record_checks_its_option_values():
    checked = {r.name for r in families() if r.check is not None}
    assert checked == {r.name for r in families() if r.options}
    bad = {"agent": dict(num_agents=4.0), "focused_linear": dict(focusing_factor=math.nan), "mala": dict(rope="no"),
           "neighborhood": dict(dilation=0), "radial": dict(sink="no"), "loglinear": dict(top_k=0)}
    for record in families():
        for name, value in bad.get(record.name, {}).items():
            with pytest.raises(ValueError, match=rf"where: {name} must be .*got {value!r}"):
                check_options(record, {name: value}, "where")


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, -1.0, "3", True])
def test_focusing_factor_is_finite_and_positive(value):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="focusing_factor must be a finite number > 0"):
        kernels.focused_linear_attention(q, k, v, grid=(8, 8), focusing_factor=value)


def test_mala_rope_and_radial_sink_are_bools():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rope must be True or False, got 'no'"):
        kernels.mala_attention(q, k, v, grid=(8, 8), rope="no")
    with pytest.raises(ValueError, match="sink must be True, False or None, got 'no'"):
        kernels.radial_attention(q, k, v, grid=(8, 8), sink="no")


def test_agent_count_is_a_perfect_square_int():
    q, k, v = qkv()
    for bad in (4.0, "4", 0, -4, 8):
        with pytest.raises(ValueError, match="num_agents must be a perfect square"):
            kernels.agent_attention(q, k, v, grid=(8, 8), num_agents=bad)
    assert kernels.agent_attention(q, k, v, grid=(8, 8), num_agents=np.int64(4)).shape == q.shape


@pytest.mark.parametrize("kw", [dict(kernel_size=3.0), dict(kernel_size=3, dilation=0), dict(kernel_size=3, dilation="1")])
def test_neighborhood_window_options(kw):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="kernel_size|dilation"):
        kernels.neighborhood_attention(q, k, v, grid=(8, 8), **kw)


def test_unknown_backend_is_named_by_the_op_and_the_module_whatever_the_grid():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"no backend 'bogus'; available: \['reference', 'triton'\]"):
        kernels.mala_attention(q, k, v, grid=(8, 8), backend="bogus")
    for name in attention.list():
        with pytest.raises(ValueError, match=r"backend must be one of .*'reference'.* got 'bogus'"):
            attention.build(name, dim=16, num_heads=2, backend="bogus")


# --- log-linear: top_k, levels, blocks larger than the grid ------------------------------------

@pytest.mark.parametrize("top_k", [0, -1, [0], [2, 0], [], True, 2.0, "2", None])
def test_loglinear_top_k_not_positive_is_a_value_error_not_a_hang(top_k):
    q, k, v = qkv()
    with no_hang(), pytest.raises(ValueError, match="top_k must be an int >= 1"):
        kernels.loglinear_attention(q, k, v, grid=(8, 8), top_k=top_k)


def test_loglinear_levels_beyond_the_grid():
    q, k, v = qkv()
    with no_hang(), pytest.raises(ValueError, match=r"levels=3 asks for 3 levels, more than the grid \(8, 8\) has.*at most 2 levels"):
        kernels.loglinear_attention(q, k, v, grid=(8, 8), top_k=1, levels=3)
    with pytest.raises(ValueError, match=r"top_k=\(1, 1, 1\) \(one K per level\) asks for 3 levels"):
        kernels.loglinear_attention(q, k, v, grid=(8, 8), top_k=[1, 1, 1])
    with pytest.raises(ValueError, match="levels must be an int >= 1, got 0"):
        kernels.loglinear_attention(q, k, v, grid=(8, 8), top_k=1, levels=0)


def test_loglinear_block_wider_than_the_grid_is_one_covering_block():
    assert loglinear_options((8, 8), block_size=4 ** 20, top_k=1) == (8, (1,))
    assert loglinear_options((5, 9), block_size=np.int64(16), top_k=[np.int64(2)]) == (4, (2,))
    q, k, v = qkv(n=64, dtype=torch.float64)
    with no_hang(5):
        huge = kernels.loglinear_attention(q, k, v, grid=(8, 8), block_size=4 ** 20, top_k=1)
    assert_rel_close(huge, kernels.loglinear_attention(q, k, v, grid=(8, 8), block_size=100, top_k=1))


# --- radial: tiles larger than the grid ----------------------------------------------------------

@pytest.mark.parametrize("tile", [-1, 0, (0, 4), (4, -1), (4, 4.0), "44"])
def test_radial_bad_tiles(tile):
    q, k, v = qkv(n=16)
    with pytest.raises(ValueError, match="tile must be a tuple of 2 or 3 ints >= 1"):
        kernels.radial_attention(q, k, v, grid=(4, 4), tile=tile)


def test_radial_tile_larger_than_the_grid_is_clamped():
    """(1000, 1000) on 4x4 allocated terabytes, (100, 100) took 26 s: now one 4x4 tile, the same mask."""
    assert radial_options((4, 4), tile=(1000, 1000))[1] == (4, 4)
    assert radial_options((5, 20), tile=(100, 4))[1] == (8, 4)
    assert radial_options((2, 6, 6), tile=(1, 64, 3))[1] == (1, 8, 3)
    q, k, v = qkv(1, 2, 16, 8, dtype=torch.float64)
    with no_hang(5):
        out = kernels.radial_attention(q, k, v, grid=(4, 4), tile=(1000, 1000))
    assert_rel_close(out, kernels.softmax_attention(q, k, v))
    q, k, v = qkv(1, 2, 100, 8, dtype=torch.float64)
    assert_rel_close(kernels.radial_attention(q, k, v, grid=(5, 20), tile=(100, 4)),
                     kernels.radial_attention(q, k, v, grid=(5, 20), tile=(6, 4)))


def test_radial_official_block_larger_than_the_video_is_dense():
    assert radial_options((2, 3, 3), layout="official", block_size=10 ** 12)[2] == 32
    q, k, v = qkv(1, 2, 18, 8, dtype=torch.float64)
    with no_hang(5):
        out = kernels.radial_attention(q, k, v, grid=(2, 3, 3), layout="official", block_size=10 ** 12)
    assert_rel_close(out, kernels.softmax_attention(q, k, v))


# --- neighborhood: dilations larger than the grid -------------------------------------------------

def test_padded_neighborhood_lowers_a_dilation_past_every_side():
    assert checks.padded_neighborhood((8, 8), 3, 100) == (8, (24, 24))
    assert checks.padded_neighborhood((8, 20), 3, 10) == (10, (30, 30))
    assert checks.padded_neighborhood((30, 30), 3, 2) == (2, (30, 30))


def test_dilation_past_every_side_gives_the_same_module_output():
    """What padded_neighborhood relies on: with a dilation >= every side each token is alone in its
    dilation group, so the output does not depend on how large the dilation is."""
    m = attention.build("nat", dim=16, num_heads=2, qkv_bias=True, kernel_size=5, dilation=9).double()
    x = torch.randn(2, 1 + 5 * 7, 16, dtype=torch.float64)
    want = m(x, grid=(5, 7), num_prefix=1)
    m.dilation = checks.padded_neighborhood((5, 7), 5, 9)[0]
    assert m.dilation == 7
    assert_rel_close(m(x, grid=(5, 7), num_prefix=1), want)
