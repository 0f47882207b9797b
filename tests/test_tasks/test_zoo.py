"""The packaged model table that ``subquad models`` prints: one row per registered model, each equal to a
fresh count of that model."""
import pytest

from subquad.tasks.zoo import committed_counts, count_model, subquad_model_names


def test_table_lists_every_registered_model():
    assert sorted(committed_counts()) == sorted(subquad_model_names()), \
        "model_counts.csv is stale: run `python -m subquad.tasks.zoo`"


@pytest.mark.parametrize("name", subquad_model_names())
def test_row_equals_a_fresh_count(name):
    row, fresh = committed_counts()[name], count_model(name)
    assert (row["attention"], row["input"]) == (fresh["attention"], fresh["input"])
    assert abs(row["params_m"] - fresh["params_m"]) < 1e-6 and abs(row["gflops"] - fresh["gflops"]) < 1e-4, \
        f"{name}: table {row}, counted {fresh}: run `python -m subquad.tasks.zoo`"
