"""``subquad bench --suite dit`` on the CPU with a tiny case: every row measured, speedups against the
softmax DiT of the same case (the real cases need a GPU: .ci/gpu-tasks)."""
import math

from subquad.tasks.bench_dit import bench_dit


def test_bench_dit_rows_and_speedups():
    rows = bench_dit(["mala"], repeats=1, cases=[("tiny", "dit_s_8", 32, 4, 1)], device="cpu")
    assert [r["family"] for r in rows] == ["softmax", "mala"]
    for r in rows:
        assert r["tokens"] == 16 and r["train_step_ms"] > 0 and r["sample_s"] > 0
        assert math.isnan(r["train_peak_gib"])            # peak memory is the CUDA allocator's
    assert rows[0]["speedup_train"] == 1.0 and rows[0]["speedup_sample"] == 1.0
    assert math.isclose(rows[1]["speedup_train"], rows[0]["train_step_ms"] / rows[1]["train_step_ms"])
