"""The scheduler that ViT, DiT and the hierarchical backbones share: entries, aliases, the options'
merge order, and errors that name the problem."""
import pytest

from subquad.backbones import AttentionSchedule


def test_one_name_for_every_block_and_aliases_resolve():
    schedule = AttentionSchedule("flatten", {"focused_linear": {"focusing_factor": 2}}, 3)
    assert schedule.names == ["focused_linear"] * 3
    assert list(schedule) == [("focused_linear", {"focusing_factor": 2})] * 3 and len(schedule) == 3


def test_entries_per_block_and_one_pair_for_all():
    schedule = AttentionSchedule(["nat", ("window", {"window_size": 4}), "llsa"], None, 3)
    assert schedule.names == ["neighborhood", "window", "loglinear"]
    assert schedule.options == [{}, {"window_size": 4}, {}]
    pair = AttentionSchedule(("mala", {"rope": True}), None, (1, 2))
    assert pair.names == ["mala"] * 3 and pair.options == [{"rope": True}] * 3


def test_options_merge_placement_then_attn_kwargs_then_the_entry():
    def placement(name, stage, index):
        return {"a": f"placed {stage}.{index}", "b": "placed", "c": "placed"}

    schedule = AttentionSchedule(["agent", ("agent", {"c": "own"})], {"agent": {"b": "kwargs", "c": "kwargs"}},
                                 (1, 1), placement)
    assert schedule.options == [{"a": "placed 0.0", "b": "kwargs", "c": "kwargs"},
                                {"a": "placed 1.0", "b": "kwargs", "c": "own"}]


def test_attn_kwargs_given_by_name_and_alias_are_merged():
    schedule = AttentionSchedule("neighborhood", {"nat": {"kernel_size": 5}, "neighborhood": {"dilation": 2}}, 1)
    assert schedule[0] == ("neighborhood", {"kernel_size": 5, "dilation": 2})


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="valid names.*window"):
        AttentionSchedule("nope", None, 2)
    with pytest.raises(ValueError, match="valid names"):
        AttentionSchedule("agent", {"nope": {}}, 2)
    with pytest.raises(ValueError, match=r"3 entries for 4 blocks \(depths \(2, 2\)\)"):
        AttentionSchedule(["agent"] * 3, None, (2, 2))
    with pytest.raises(ValueError, match="attn_kwargs maps a family name to its options"):
        AttentionSchedule("agent", {"agent": 49}, 2)
    with pytest.raises(ValueError, match=r"a name or \(name, options\), got 3"):
        AttentionSchedule(["agent", 3], None, 2)
