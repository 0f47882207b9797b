"""Option checks at construction (issue: every bad input a clear error, no hang, no silent NaN): the
modules, the model builders' attn/attn_kwargs, the pipeline accelerator; and a seeded property test
over random option values of every family's module."""
import math
import random
import warnings

import numpy as np
import pytest
import timm
import torch

import subquad.attention as attention
from subquad.backbones import AttentionSchedule
from subquad.kernels import families
from subquad.kernels.core.testing import assert_rel_close


def build(name, **kw):
    return attention.build(name, **{"dim": 16, "num_heads": 2, **kw})


@pytest.mark.parametrize("name,kw,match", [
    ("loglinear", dict(top_k=0), "LogLinearSparseAttention: top_k must be an int >= 1, got 0"),
    ("loglinear", dict(top_k=(2, 0)), r"top_k must be an int >= 1 or a non-empty tuple .*got \(2, 0\)"),
    ("loglinear", dict(block_size=8), "block_size must be a perfect square int >= 4"),
    ("loglinear", dict(levels=1.5), "levels must be an int >= 1, got 1.5"),
    ("radial", dict(tile=-1), "tile must be a tuple of 2 or 3 ints >= 1, got -1"),
    ("radial", dict(tile=(0, 4)), r"tile must be .*got \(0, 4\)"),
    ("radial", dict(sink="yes"), "sink must be True, False or None, got 'yes'"),
    ("radial", dict(layout="radial"), r"layout must be one of \('official', 'frames', 'distance'\)"),
    ("radial", dict(decay_factor=math.nan), "decay_factor must be a finite number > 0, got nan"),
    ("focused_linear", dict(focusing_factor=math.inf), "focusing_factor must be a finite number > 0, got inf"),
    ("focused_linear", dict(kernel_size=4), "kernel_size must be an odd int >= 1, got 4"),
    ("focused_linear", dict(pos_grid=(14, 0)), r"pos_grid must be a tuple of 2 ints >= 1, got \(14, 0\)"),
    ("focused_linear", dict(num_heads=0), "num_heads must be an int >= 1, got 0"),
    ("agent", dict(num_agents=4.0), "num_agents must be a perfect square int >= 1 .*got 4.0"),
    ("agent", dict(bias_grid=0), "bias_grid must be an int >= 1 or a tuple of 2 ints >= 1, got 0"),
    ("agent", dict(dwc_kernel_size=0), "dwc_kernel_size must be an odd int >= 1, got 0"),
    ("agent", dict(prefix_bias="no"), "prefix_bias must be True or False, got 'no'"),
    ("mala", dict(rope=1), "rope must be True or False, got 1"),
    ("mala", dict(dim=12, rope=True), r"divisible by 4, got head_dim=6 \(dim=12 / num_heads=2\)"),
    ("mala", dict(lepe_kernel_size=2.0), "lepe_kernel_size must be an odd int >= 1, got 2.0"),
    ("neighborhood", dict(kernel_size=3, dilation=0), "dilation must be an int >= 1, got 0"),
    ("neighborhood", dict(rpb="yes"), "rpb must be True or False, got 'yes'"),
    ("softmax", dict(dim=0), "dim must be an int >= 1, got 0"),
    ("softmax", dict(dim=-4), "dim must be an int >= 1, got -4"),
    ("softmax", dict(dim=16.0), "dim must be an int >= 1, got 16.0"),
    ("softmax", dict(num_heads=3), "num_heads=3 must divide dim=16"),
    ("softmax", dict(qkv_bias="yes"), "qkv_bias must be True or False"),
    ("softmax", dict(proj_drop=math.nan), "proj_drop must be a finite number"),
    ("softmax", dict(proj_drop=1.5), r"proj_drop must be a probability in \[0, 1\), got 1.5"),
    ("softmax", dict(backend="triton"), r"backend must be one of \('reference', 'sdpa'\) \(or None\), got 'triton'"),
    ("window", dict(window_size=0), "window_size must be an int >= 1, got 0"),
    ("softmax_rope", dict(dim=12, num_heads=4), "2D RoPE needs head_dim divisible by 4, got head_dim=3"),
])
def test_bad_options_fail_at_construction_naming_the_value(name, kw, match):
    with pytest.raises(ValueError, match=match):
        build(name, **kw)


@pytest.mark.parametrize("name", attention.list() + attention.standalone_names())
def test_an_unknown_option_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown options \['not_an_option'\]; valid: \('dim', 'num_heads'") as info:
        build(name, not_an_option=1)
    record = next((r for r in families() if r.name == name), None)
    for option in (record.options if record else ()):
        assert repr(option) in str(info.value)


def test_numpy_and_torch_ints_are_ints():
    m = build("loglinear", block_size=np.int64(16), top_k=np.int32(2), levels=torch.tensor(1))
    assert m(torch.randn(1, 64, 16), grid=(8, 8)).isfinite().all()
    assert build("agent", num_agents=np.int64(9), bias_grid=np.int64(6)).num_agents == 9


def test_unknown_backend_fails_at_construction_even_if_every_grid_would_be_dense():
    with pytest.raises(ValueError, match="got 'bogus'"):
        build("loglinear", backend="bogus")


# --- schedules and model builders ------------------------------------------------------------

def test_attn_of_the_wrong_type_names_the_valid_names():
    with pytest.raises(ValueError, match=r"attn must be a name.*got 123; valid names: .*agent"):
        AttentionSchedule(123, None, 2)
    with torch.device("meta"), pytest.raises(ValueError, match="got 123"):
        timm.create_model("softmax_deit_tiny_patch16_224", attn=123)


def test_attn_kwargs_of_a_family_no_block_uses():
    """Invalid options are an error even there; valid ones are warned about (a model's own paper options,
    such as Agent-Swin's, stay behind when attn replaces its attention)."""
    with pytest.raises(ValueError, match=r"attn_kwargs\['agent'\]: num_agents must be a perfect square .*got 5"):
        AttentionSchedule("mala", {"agent": {"num_agents": 5}}, 2)
    with torch.device("meta"), pytest.raises(ValueError, match=r"attn_kwargs\['loglinear'\]: top_k"):
        timm.create_model("mala_deit_tiny_patch16_224", attn_kwargs={"llsa": {"top_k": 0}})
    with pytest.warns(UserWarning, match=r"attn_kwargs gives options for \['agent'\], which no block uses"):
        AttentionSchedule("mala", {"agent": {"num_agents": 4}}, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionSchedule(["mala", "agent"], {"agent": {"num_agents": 4}}, 2)


def test_the_pipeline_accelerator_checks_option_values_before_changing_anything():
    from subquad.tasks.pipelines import accelerate_pipeline
    from subquad.tasks.pipelines.random_models import random_transformer

    model = random_transformer("dit")
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}
    for attn, options, match in [("llsa", dict(top_k=0), "accelerate_pipeline: top_k must be an int >= 1, got 0"),
                                 ("radial", dict(tile=(0, 8)), "tile must be"),
                                 ("nat", dict(kernel_size=4), "kernel_size must be an odd int"),
                                 ("agent", dict(num_agents=2.5), "num_agents must be a perfect square")]:
        with pytest.raises(ValueError, match=match):
            accelerate_pipeline(model, attn, **options)
    with pytest.raises(ValueError, match="dense_steps must be an int >= 0, got -1"):
        accelerate_pipeline(model, "radial", dense_steps=-1)
    with pytest.raises(ValueError, match="dense_layers must be an int >= 0, got 0.5"):
        accelerate_pipeline(model, "radial", dense_layers=[0.5])
    with pytest.raises(ValueError, match=r"dense_layers must be an iterable of block indices .*got '0,1'"):
        accelerate_pipeline(model, "radial", dense_layers="0,1")
    assert before == {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


def test_a_float16_input_into_a_float32_module_names_both_dtypes():
    """GridAttention.forward checks the input's dtype against its parameters' (not under autocast)."""
    m = build("mala")
    with pytest.raises(ValueError, match="torch.float32 parameters but got a torch.float16 input"):
        m(torch.randn(1, 64, 16, dtype=torch.float16), grid=(8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(1, 64, 16, dtype=torch.bfloat16), grid=(8, 8)).dtype == torch.bfloat16


# --- property test: random option values for every family ----------------------------------------

NAN, INF = math.nan, math.inf
GENERIC = [-2, -1, 0, 1, 2, 3, 4, 5, 7, np.int64(4), torch.tensor(3), 0.5, 2.5, -1.5, 1e-3, NAN, INF, -INF, "8", "x",
           None, True, False, np.True_, (2, 2), (4, 4), (0, 3), (1, 4, 4), [2, 1], [4], []]
SPECIFIC = {  # values that are valid for these options, besides the generic ones
    "layout": ["official", "frames", "distance"], "tile": [(2, 2), (4, 8), (100, 3), (16, 16)],
    "block_size": [4, 9, 16, 25, 64, 10 ** 6], "top_k": [(2, 1), [3], (1, 1)], "levels": [1, 2],
    "decay_factor": [0.25, 4.0, 1e6], "sink": [True, False], "pack": [True, False], "dense_radius": [1, 2, 100],
    "num_agents": [1, 4, 9, 16, 100], "focusing_factor": [1, 2, 3.5, 50], "rope": [True, False],
    "kernel_size": [1, 3, 5, 7], "dilation": [1, 2, 3, 100],
}
SMALL_INTS_ONLY = {"kernel_size", "dilation"}     # the generic large ints too: a module pads to kernel_size * dilation


def draw_value(rng: random.Random, option: str):
    if rng.random() < 0.4:
        return rng.choice(SPECIFIC[option])
    value = rng.choice(GENERIC)
    if option in SMALL_INTS_ONLY and isinstance(value, int) and value > 5:
        value = 5
    return value


def names_an_option(message: str, options) -> bool:
    return any(name in message for name in options)


def test_random_options_give_a_named_value_error_or_a_finite_output_equal_to_the_reference():
    rng = random.Random(0)
    records = [r for r in families() if r.options and r.name in attention.list()]
    outcomes = {"construction": 0, "forward": 0, "ran": 0}
    for draw in range(200):
        record = records[draw % len(records)]
        options = {name: draw_value(rng, name)
                   for name in rng.sample(sorted(record.options), rng.randint(1, min(2, len(record.options))))}
        heads = rng.choice([1, 2])
        what = f"draw {draw}: {record.name} {options}"
        try:
            m = build(record.name, num_heads=heads, qkv_bias=True, **options).double()
        except ValueError as e:
            assert names_an_option(str(e), options), f"{what}: {e}"
            outcomes["construction"] += 1
            continue
        grid = (rng.randint(1, 12), rng.randint(1, 12))
        prefix = rng.choice([0, 1])
        x = torch.randn(rng.choice([1, 2]), prefix + grid[0] * grid[1], 16, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # "pointless on this grid; dense attention"
            try:
                y = m(x, grid=grid, num_prefix=prefix)
            except ValueError as e:                      # an option (maybe with a default, levels=2 with top_k=8)
                assert names_an_option(str(e), record.options), f"{what} on {grid}: {e}"     # that does not fit the grid
                outcomes["forward"] += 1
                continue
            assert y.shape == x.shape and y.isfinite().all(), f"{what} on {grid}"
            ref = build(record.name, num_heads=heads, qkv_bias=True, backend="reference", **options).double()
            ref.load_state_dict(m.state_dict())
            assert_rel_close(y, ref(x, grid=grid, num_prefix=prefix), torch.float64, what=what)
        outcomes["ran"] += 1
    assert outcomes["construction"] >= 20 and outcomes["ran"] >= 20, outcomes    # the draws exercise both
