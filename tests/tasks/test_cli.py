"""The ``subquad`` command line end to end (as a user runs it: a subprocess of the console script)."""
import csv
import shutil
import subprocess
import sys

import pytest
import torch

from subquad.tasks.zoo import subquad_model_names


def _subquad(*args):
    exe = shutil.which("subquad")
    cmd = [exe] if exe else [sys.executable, "-m", "subquad.tasks.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def test_models_prints_every_model_with_params_and_flops():
    res = _subquad("models")
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert set(lines) == set(subquad_model_names())
    tiny = lines["softmax_deit_tiny_patch16_224"]
    assert tiny[1] == "softmax" and abs(float(tiny[2]) - 5.72) < 0.01 and abs(float(tiny[3]) - 1.25) < 0.01


def test_bench_writes_table_csv_and_plot(tmp_path):
    res = _subquad("bench", "--device", "cpu", "--sizes", "1x12x12,1x16x20", "--repeats", "2",
                   "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    families = {r["family"] for r in rows}
    assert {"softmax", "mala", "focused_linear", "agent"} <= families
    assert {r["grid"] for r in rows} == {"12x12", "16x20"}
    assert {"neighborhood[natten]", "neighborhood[flex]"} <= families
    for r in rows:
        assert float(r["fwd_ms"]) > 0
        if "[" not in r["family"]:   # peers may lack a backward (natten on CPU) or a memory probe (flex)
            assert float(r["fwd_bwd_ms"]) > 0 and float(r["peak_mib"]) > 0
        if r["family"] == "softmax":
            assert float(r["speedup_fwd"]) == pytest.approx(1.0)
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "x SDPA fwd" in res.stdout


def test_bench_skips_a_peer_whose_package_is_missing(monkeypatch, capsys):
    from subquad.tasks import bench
    monkeypatch.setitem(bench.PEER_PACKAGES, "natten", "subquad_no_such_package")
    monkeypatch.setattr(bench, "_SKIPPED", set())
    cfg = bench.BenchConfig(torch.device("cpu"), torch.float32, [(1, 12, 12)], families=["neighborhood"],
                            repeats=1, warmup=0)
    families = {r["family"] for r in bench.bench_families(cfg)}
    assert families == {"softmax", "neighborhood", "neighborhood[flex]"}
    assert "peer 'natten' skipped" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["bench", "--families", "softmax,nonesuch"], "unknown attention family 'nonesuch'"),
    (["bench", "--sizes", "12x12"], "a size is BxHxW"),
])
def test_bad_input_is_a_clear_error(args, message):
    res = _subquad(*args)
    assert res.returncode == 2 and message in res.stderr
