"""The family records: one per family, names and aliases unique, each naming an op of subquad.kernels
whose family options it takes."""
import inspect

import pytest

import subquad.kernels as kernels
from subquad.kernels.core.family import Family, check_options, register_family


def test_every_family_has_one_record_in_table_order():
    names = [f.name for f in kernels.families()]
    assert names == ["softmax", "agent", "focused_linear", "mala", "neighborhood", "radial", "loglinear"]
    every = [n for f in kernels.families() for n in f.names]
    assert len(every) == len(set(every))
    assert kernels.family("llsa").name == "loglinear" and kernels.family("flatten").name == "focused_linear"
    with pytest.raises(ValueError, match="unknown attention family 'nope'; valid names: .*nat"):
        kernels.family("nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_family(Family(name="nat", title="", paper="", cost="", op="softmax_attention"))


@pytest.mark.parametrize("record", kernels.families(), ids=lambda f: f.name)
def test_options_are_the_ops_keywords(record):
    """Each option is a keyword of the op (or of its **options), so the tables built from it are true."""
    op = getattr(kernels, record.op)
    params = inspect.signature(op).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for option in record.options:
        assert takes_any or option in params, (record.op, option)
    assert set(record.grid_ranks) <= {2, 3}


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"radial_attention: unknown options \['window'\]; valid: \('layout'"):
        check_options(kernels.family("radial"), {"window": 3})
