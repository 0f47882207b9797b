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


def test_dense_on_says_where_the_sparse_families_keep_every_pair():
    """radial: the 8x8-tile mask on a 14x14 grid keeps every tile pair, on 64x64 it does not; loglinear: a
    grid with no more blocks than the finest top-K selects them all (also where K exceeds the blocks)."""
    radial, loglinear = kernels.family("radial"), kernels.family("loglinear")
    assert radial.dense_on((14, 14), tile=(8, 8)) and not radial.dense_on((64, 64), tile=(8, 8))
    assert loglinear.dense_on((14, 14), block_size=64, top_k=4)
    assert loglinear.dense_on((8, 8), block_size=16, top_k=8) and loglinear.dense_on((8, 8), block_size=16, top_k=(9,))
    assert not loglinear.dense_on((16, 16), block_size=16, top_k=8)
    assert all(r.dense_on is None for r in kernels.families() if r.name not in ("radial", "loglinear"))
