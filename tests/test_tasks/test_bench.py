"""``subquad bench``: the families suite end to end on the CPU, its peers, the DiT suite on a tiny case and
the kernel suites' code paths (the real sizes need a GPU: .ci/gpu-check, .ci/gpu-tasks)."""
import csv
import math

import pytest
import timm
import torch

from subquad import attention, kernels
from subquad.kernels.grid_conv import triton as grid_conv_kernels
from subquad.tasks.bench import block_sparse as block_sparse_bench
from subquad.tasks.bench import families as bench
from subquad.tasks.bench import grid_conv
from subquad.tasks.bench.dit import bench_dit
from subquad.tasks.bench import measure
from subquad.tasks.bench.measure import timed_ms
from subquad.tasks.bench.models import (MODEL_CASES, ModelCase, attention_skipped, bench_models, profile_model,
                                         run_models_profile, save_models_plot, select_cases)
from subquad.tasks.bench.pipelines import (PIPELINE_CASES, PipelineCase, bench_pipelines, save_pipeline_plot,
                                          select_pipeline_cases)
from subquad.tasks.bench.suites import run_suite
from subquad.tasks.zoo import count_model


def test_bench_writes_table_csv_and_plot(run_subquad, tmp_path):
    res = run_subquad("bench", "--device", "cpu", "--sizes", "1x12x12,1x16x20", "--repeats", "2",
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


def test_bench_cuda_graph_needs_a_cuda_device():
    cfg = bench.BenchConfig(torch.device("cpu"), torch.float32, [(1, 12, 12)], families=["mala"], cuda_graph=True)
    with pytest.raises(ValueError, match="--cuda-graph replays CUDA graphs and needs a CUDA device"):
        bench.bench_families(cfg)


@pytest.mark.gpu
def test_gpu_bench_cuda_graph_rows():
    """With cuda_graph, each row also has its forward and forward+backward replayed from a CUDA graph, and the
    ratios to SDPA's replays."""
    cfg = bench.BenchConfig(torch.device("cuda"), torch.bfloat16, [(1, 32, 32)], families=["mala", "loglinear"],
                            repeats=3, warmup=1, cuda_graph=True)
    rows = bench.bench_families(cfg)
    assert {r["family"] for r in rows} >= {"softmax", "mala", "loglinear"}
    for r in rows:
        assert r["fwd_graph_ms"] > 0 and r["fwd_bwd_graph_ms"] > 0 and r["speedup_fwd_bwd_graph"] > 0
        if r["family"] == "softmax":
            assert r["speedup_fwd_graph"] == pytest.approx(1.0)


def test_bench_skips_a_peer_whose_package_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(bench.PEER_PACKAGES, "natten", "subquad_no_such_package")
    monkeypatch.setattr(bench, "_SKIPPED", set())
    cfg = bench.BenchConfig(torch.device("cpu"), torch.float32, [(1, 12, 12)], families=["neighborhood"],
                            repeats=1, warmup=0)
    families = {r["family"] for r in bench.bench_families(cfg)}
    assert families == {"softmax", "neighborhood", "neighborhood[flex]"}
    assert "peer 'natten' skipped" in capsys.readouterr().out


def test_peers_come_from_the_backends_of_each_family_op():
    """Other libraries' backends (natten, FlexAttention) are peers everywhere; a family with nothing but its
    reference and its Triton kernel (the linear family) is compared with its reference on CUDA."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.peers("neighborhood", cpu) == bench.peers("neighborhood", cuda) == [("natten", "natten"),
                                                                                     ("flex", "flex")]
    linear = {name for name in attention.list() if bench.peers(name, cuda) == [("reference", "reference")]}
    if "triton" in kernels.available_backends("mala_attention"):
        assert linear == {"agent", "focused_linear", "mala"}
    assert all(bench.peers(name, cpu) == [] for name in attention.list() if name != "neighborhood")


def test_bench_dit_rows_and_speedups():
    rows = bench_dit(["mala"], repeats=1, cases=[("tiny", "dit_s_8", 32, 4, 1)], device="cpu")
    assert [r["family"] for r in rows] == ["softmax", "mala"]
    for r in rows:
        assert r["tokens"] == 16 and r["train_step_ms"] > 0 and r["sample_s"] > 0
        assert math.isnan(r["train_peak_gib"])            # peak memory is the CUDA allocator's
    assert rows[0]["speedup_train"] == 1.0 and rows[0]["speedup_sample"] == 1.0
    assert math.isclose(rows[1]["speedup_train"], rows[0]["train_step_ms"] / rows[1]["train_step_ms"])


def test_grid_conv_bench_and_sweep_run_cpu(monkeypatch):
    """The grid-conv suite's code path on a tiny case, each timed call run once (do_bench needs a GPU); the
    sweep sets the kernels' tile configuration and restores it."""
    def run_once(fn):
        fn()
        return 1.0

    case = dict(device="cpu", sizes=[((3, 4), 1)], uses=[("flatten", 5, True)], dtype=torch.float32, timer=run_once)
    (row,) = grid_conv.bench_grid_conv(num_prefix=1, **case)
    assert row["use"] == "flatten" and row["channels"] == "d" and row["triton_fwd_bwd_ms"] == 1.0
    assert row["fwd_gbps"] == pytest.approx(3 * 4 * 13 * 64 * 4 / 1e-3 / 1e9) and row["x_reference_fwd"] == 1.0
    before = {key: dict(cfg) for key, cfg in grid_conv_kernels.CONFIG.items()}
    monkeypatch.setitem(grid_conv.SWEEP, "TILE", ((4, 16),))
    monkeypatch.setitem(grid_conv.SWEEP, "num_warps", (2,))
    (row,) = grid_conv.sweep(**case)
    assert row["tile"] == "4x16" and row["num_warps"] == 2
    assert grid_conv_kernels.CONFIG == before


def test_radial_video_bench_runs_cpu():
    """The radial video bench's code path on a small video grid (Triton's interpreter), each timed call run once
    (do_bench needs a GPU): the tiles listed and the full frames as spans give the same output."""
    def run_once(fn):
        fn()
        return 2.0

    (row,) = block_sparse_bench.bench_radial_video(grids=((6, 8, 16),), heads=1, head_dim=16, device="cpu",
                                                   dtype=torch.float32, timer=run_once, log=lambda _: None)
    assert row["grid"] == "6x8x16" and row["tokens"] == 768 and 0 < row["pairs"] < 1
    assert row["spans_vs_tiles_rel_diff"] < 1e-5 and row["spans_speedup"] == 1.0
    assert row["tiles_per_pair"] == pytest.approx(1 / row["pairs"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the suites")
def test_kernel_suites_need_cuda(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run_suite("linear", tmp_path)


def test_bench_pipelines_rows_bound_and_plot(tmp_path):
    """The pipeline suite's code path on tiny CPU transformers: per case the dense row first with the bound
    (dense time / the time with the attention skipped), then dense attention with the fused blocks, then each swap
    that ``families`` keeps with its speedup and output cosine; one model per kind for all its cases; a CSV kept
    after every case; a plot."""
    cases = (PipelineCase("flux", 80, 80, 1, (("neighborhood", {"kernel_size": 3}), ("radial", {"tile": (2, 2)}))),
             PipelineCase("wan", 160, 160, 13, (("radial", {"tile": (1, 2, 2)}),)),
             PipelineCase("flux", 96, 80, 1, (("radial", {"tile": (2, 2)}),)))
    rows = bench_pipelines(cases, families=["radial"], size="tiny", repeats=1, device="cpu", dtype=torch.float32,
                           csv_path=tmp_path / "p.csv")
    fused = "dense, fused blocks"
    assert [(r["case"], r["attention"]) for r in rows] == [
        ("flux 80x80", "dense"), ("flux 80x80", fused), ("flux 80x80", "radial tile=(2, 2)"), ("flux 96x80", "dense"),
        ("flux 96x80", fused), ("flux 96x80", "radial tile=(2, 2)"), ("wan 160x160x13", "dense"),
        ("wan 160x160x13", fused), ("wan 160x160x13", "radial tile=(1, 2, 2)")]
    assert [r["tokens"] for r in rows] == [25, 25, 25, 30, 30, 30, 400, 400, 400]
    for dense, same, swap in zip(rows[::3], rows[1::3], rows[2::3]):
        assert dense["speedup"] == 1.0 and dense["cosine"] == 1.0 and dense["bound"] > 0
        assert same["cosine"] > 1 - 1e-6                    # dense attention: the blocks' values up to rounding
        assert swap["bound"] == dense["bound"] and swap["speedup"] == pytest.approx(dense["ms"] / swap["ms"])
        assert 0.5 < swap["cosine"] < 1 - 1e-6              # the swap ran: close to dense, not equal
        # 50 steps, the first 5 at the dense-attention call's time
        assert dense["end_to_end"] == 1.0
        assert swap["end_to_end"] == pytest.approx(50 * dense["ms"] / (5 * same["ms"] + 45 * swap["ms"]))
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    save_pipeline_plot(rows, tmp_path / "p.png", "tiny")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_pipeline_cases_picked_by_label():
    assert select_pipeline_cases(None) == PIPELINE_CASES
    assert [c.label for c in select_pipeline_cases(["480x832x81", "flux"])] == ["flux 2048x2048", "wan 480x832x81"]
    assert [c.label for c in select_pipeline_cases(["wan"])] == [c.label for c in PIPELINE_CASES if c.kind == "wan"]
    with pytest.raises(ValueError, match="no pipeline case matches"):
        select_pipeline_cases(["sd3"])


def test_bench_models_rows_ratios_and_plot(tmp_path):
    """The models suite's code path on a tiny CPU case: the dense peer first, then the peer with its attention
    skipped (its ratio: the bound on any attention's gain), ratios to the peer, host time per block (inference
    and training), FLOP-ideal speedup from the FLOP counter, a CSV kept after every row and a plot."""
    case = ModelCase("tiny", "deit_tiny_patch16_224", ("mala_deit_tiny_patch16_224",), 32, 1)
    rows = bench_models((case,), repeats=1, device="cpu", csv_path=tmp_path / "m.csv")
    assert [r["model"] for r in rows] == ["deit_tiny_patch16_224", "deit_tiny_patch16_224 [attention skipped]",
                                          "mala_deit_tiny_patch16_224"]
    assert [r["mode"] for r in rows] == ["eager"] * 3
    peer, skipped, mala = rows
    assert peer["speedup_infer"] == peer["speedup_train"] == peer["flop_ideal"] == 1.0
    assert skipped["speedup_infer"] == pytest.approx(skipped["infer_img_s"] / peer["infer_img_s"])
    assert math.isnan(skipped["gflops"]) and "error" not in skipped
    assert mala["speedup_infer"] == pytest.approx(mala["infer_img_s"] / peer["infer_img_s"])
    assert mala["flop_ideal"] == pytest.approx(peer["gflops"] / mala["gflops"])
    for r in rows:
        assert r["infer_img_s"] > 0 and r["train_img_s"] > 0 and r["host_us_per_block"] > 0
        assert r["train_host_us_per_block"] > 0
        assert r["infer_spread"] >= 0 and r["train_spread"] >= 0
    assert peer["gflops"] > 0 and mala["gflops"] > 0
    assert [r["model"] for r in csv.DictReader(open(tmp_path / "m.csv"))] == [r["model"] for r in rows]
    save_models_plot(rows, tmp_path / "m.png", "tiny")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_models_modes_are_checked():
    case = ModelCase("tiny", "deit_tiny_patch16_224", ("mala_deit_tiny_patch16_224",), 32, 1)
    with pytest.raises(ValueError, match="unknown bench mode 'graph'; valid: eager, compile, cuda-graph"):
        bench_models((case,), repeats=1, device="cpu", modes=("eager", "graph"))
    with pytest.raises(ValueError, match="cuda-graph mode captures CUDA graphs and needs a CUDA device"):
        bench_models((case,), repeats=1, device="cpu", modes=("cuda-graph",))


@pytest.mark.gpu
def test_gpu_bench_models_cuda_graph_rows(tmp_path):
    """Inference and the training step replayed from one CUDA graph each: a row per model next to the eager one,
    ratios within the mode."""
    case = ModelCase("tiny", "deit_tiny_patch16_224", ("mala_deit_tiny_patch16_224", "agent_deit_tiny_patch16_224"),
                     224, 8)
    rows = bench_models((case,), repeats=3, modes=("eager", "cuda-graph"), csv_path=tmp_path / "m.csv")
    peers = ("deit_tiny_patch16_224", "deit_tiny_patch16_224 [attention skipped]")
    assert [(r["mode"], r["model"]) for r in rows] == [(m, n) for m in ("eager", "cuda-graph")
                                                        for n in peers + case.models]
    for r in rows:
        assert r["infer_img_s"] > 0 and r["train_img_s"] > 0 and "error" not in r
    graphed_peer = rows[4]
    assert graphed_peer["speedup_infer"] == 1.0 and rows[6]["speedup_infer"] == pytest.approx(
        rows[6]["infer_img_s"] / graphed_peer["infer_img_s"])


def test_bench_models_sizes_pick_the_cases():
    """``--sizes`` keeps the cases of those batch sizes and image sides (both 224² B128 cases), in the order given;
    a size no case has becomes a DeiT-S case; a non-square size is refused."""
    assert select_cases(None) == MODEL_CASES
    picked = select_cases([(4, 1024, 1024), (128, 224, 224)])
    assert [c.label for c in picked] == ["DeiT-S 1024", "DeiT-S 224", "Swin-T 224"]
    new, = select_cases([(16, 512, 512)])
    assert (new.peer, new.img_size, new.batch) == ("deit_small_patch16_224", 512, 16)
    assert new.models == MODEL_CASES[0].models
    with pytest.raises(ValueError, match="square images; got 2x512x256"):
        select_cases([(2, 512, 256)])


def test_bench_models_keeps_going_past_a_failing_model(tmp_path, capsys):
    case = ModelCase("tiny", "deit_tiny_patch16_224", ("no_such_model_patch16_224",), 32, 1)
    rows = bench_models((case,), repeats=1, device="cpu", csv_path=tmp_path / "m.csv")
    assert [r.get("error") for r in rows] == [None, None, "RuntimeError"]
    assert rows[0]["infer_img_s"] > 0 and math.isnan(rows[2]["infer_img_s"])
    assert "bench models: no_such_model_patch16_224 at tiny B1: RuntimeError" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(tmp_path / "m.csv")))) == 3


def test_profile_model_splits_a_forward_by_kernel(tmp_path):
    """The profile's CPU path on a tiny case: the top ops (here CPU ops) by time per forward, largest first, then
    the rest in one row; shares sum to 1 and a block's time is the forward's over the depth."""
    case = ModelCase("tiny", "deit_tiny_patch16_224", ("mala_deit_tiny_patch16_224",), 32, 1)
    rows = profile_model("mala_deit_tiny_patch16_224", case, torch.device("cpu"), steps=2, top=5)
    assert len(rows) == 6 and rows[-1]["kernel"].startswith("(the other ")
    assert [r["us_per_forward"] for r in rows[:5]] == sorted((r["us_per_forward"] for r in rows[:5]), reverse=True)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["us_per_block"] == pytest.approx(r["us_per_forward"] / 12) and r["calls_per_forward"] > 0
               for r in rows)
    every = profile_model("mala_deit_tiny_patch16_224", case, torch.device("cpu"), steps=1, top=10_000)
    assert not every[-1]["kernel"].startswith("(the other ")
    assert any("linear" in r["kernel"] or "addmm" in r["kernel"] for r in every)
    train = profile_model("mala_deit_tiny_patch16_224", case, torch.device("cpu"), steps=1, top=10_000, step="train")
    assert {r["step"] for r in train} == {"train"}
    assert sum(r["us_per_forward"] for r in train) > sum(r["us_per_forward"] for r in every)    # backward too
    assert any("backward" in r["kernel"].lower() for r in train)
    with pytest.raises(ValueError, match="step is 'infer' or 'train'"):
        profile_model("mala_deit_tiny_patch16_224", case, torch.device("cpu"), step="eval")
    saved = run_models_profile(tmp_path, (case,), device="cpu")
    assert {(r["model"], r["step"]) for r in saved} == {(m, s) for m in ("deit_tiny_patch16_224",
                                                                          "mala_deit_tiny_patch16_224")
                                                         for s in ("infer", "train")}
    assert len(list(csv.DictReader(open(tmp_path / "bench_models_profile.csv")))) == len(saved)


def test_attention_skipped_only_within_its_block():
    """A timm dense model's output changes while SDPA is skipped (values passed through) and is back after."""
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with attention_skipped():
            skipped = model(x)
        after = model(x)
    assert torch.equal(before, after) and not torch.allclose(before, skipped)


@pytest.mark.parametrize("family", ["agent", "flatten", "mala", "nat", "radial", "llsa"])
def test_flops_are_counted_at_any_input_size(family):
    """The models suite counts FLOPs on the meta device at the case's size (agent and FLatten resize their
    bias and positional maps there): more tokens, more FLOPs."""
    name = f"{family}_deit_tiny_patch16_224"
    small, large = (count_model(name, img_size=size)["gflops"] for size in (64, 128))
    assert 0 < small < large


def test_timed_ms_reports_the_median_and_the_interquartile_spread(monkeypatch):
    """Calls of 1, 1, 1, 1, 1, 5 ms (a fake clock): the median 1 ms and the quartiles too (one outlier moves
    neither); then 1, 2, 3, 4 ms: quartiles 1.75 and 3.25 around the median 2.5, a spread of 0.6."""
    now = [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: now[0])
    durations = iter([1, 1, 1, 1, 1, 5, 1, 2, 3, 4])

    def call():
        now[0] += next(durations) / 1e3

    assert timed_ms(call, torch.device("cpu"), repeats=6, warmup=0) == pytest.approx((1.0, 0.0))
    assert timed_ms(call, torch.device("cpu"), repeats=4, warmup=0) == pytest.approx((2.5, 0.6))
