"""accelerate_pipeline on tiny random transformers and pipelines of every supported class (no download)."""
from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import Transformer2DModel

from subquad import kernels
from subquad.tasks.cli import main
from subquad.tasks.pipelines import accelerate_pipeline, compare_pipeline, pipeline_families, supported_transformers
from subquad.tasks.pipelines.random_models import (KINDS, random_transformer, skip_attention, tiny_pipeline,
                                                   transformer_inputs)

# Tiny inputs: 10x10 latents with patch 2 (Flux: 2x2 packing) = a 5x5 token grid; Wan: 2 latent frames.
GRIDS = {"dit": (5, 5), "pixart": (5, 5), "sd3": (5, 5), "flux": (5, 5), "wan": (2, 5, 5)}
TEXT = 7
PREFIXES = {"dit": {0}, "pixart": {0}, "sd3": {0, TEXT}, "flux": {TEXT}, "wan": {0}}   # SD3: attn2 sees no text
LAYERS = {
    "dit": {"transformer_blocks.0.attn1": 0, "transformer_blocks.1.attn1": 1},
    "pixart": {"transformer_blocks.0.attn1": 0, "transformer_blocks.1.attn1": 1},
    "sd3": {"transformer_blocks.0.attn": 0, "transformer_blocks.0.attn2": 0, "transformer_blocks.1.attn": 1},
    "flux": {"transformer_blocks.0.attn": 0, "single_transformer_blocks.0.attn": 1},
    "wan": {"blocks.0.attn1": 0, "blocks.1.attn1": 1},
}
IMAGE_KINDS = [k for k in KINDS if k != "wan"]
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="diffusers' text-to-image pipeline classes need `transformers`")


def _model_and_inputs(kind: str):
    model = random_transformer(kind)
    return model, transformer_inputs(kind, model, latent_size=(10, 10), latent_frames=2, batch=2, text_tokens=TEXT)


@torch.no_grad()
def _run(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _processors(model) -> dict:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "set_processor")}


class DenseSpy:
    """An op that is exact dense attention and records the grid and prefix count it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, q, k, v, *, grid, num_prefix):
        self.calls.append((tuple(grid), num_prefix, q.shape[2]))
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("kind", KINDS)
def test_token_split_and_grid(kind):
    """A dense op in every swapped layer reproduces the transformer and sees the right grid and text prefix."""
    model, inputs = _model_and_inputs(kind)
    reference = _run(model, inputs)
    spy = DenseSpy()
    with accelerate_pipeline(model, spy) as swap:
        out = _run(model, inputs)
    assert swap.layers == LAYERS[kind]
    assert {c[0] for c in spy.calls} == {GRIDS[kind]}
    assert {c[1] for c in spy.calls} == PREFIXES[kind]
    assert len(spy.calls) == len(LAYERS[kind])
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


EXACT = [(kind, "neighborhood", {"kernel_size": 5}, {"kernel_size": 3}) for kind in IMAGE_KINDS] + [
    pytest.param(kind, "radial", {}, {"tile": (2, 2)}) for kind in IMAGE_KINDS] + [
    pytest.param("wan", "radial", {}, None)]


@pytest.mark.parametrize("kind, attn, covering, sparse", EXACT)
def test_window_covering_the_grid_is_dense(kind, attn, covering, sparse):
    """A 5x5 neighborhood window, or radial attention whose first tile (8x8) holds the 5x5 grid (and, for
    video, whose dense frame distance 1 spans both latent frames), is exact dense attention; smaller
    windows or tiles are not."""
    model, inputs = _model_and_inputs(kind)
    reference = _run(model, inputs)
    with accelerate_pipeline(model, attn, **covering):
        out = _run(model, inputs)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    if sparse is not None:
        with accelerate_pipeline(model, attn, **sparse):
            assert not torch.allclose(_run(model, inputs), reference, atol=1e-3)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_loglinear_runs_close_to_dense(kind):
    """LLSA always adds pooled keys beside the selected blocks, so it is never exactly dense: close only."""
    model, inputs = _model_and_inputs(kind)
    reference = _run(model, inputs)
    with accelerate_pipeline(model, "llsa", block_size=4, top_k=2):
        out = _run(model, inputs)
    assert F.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_restore_gives_back_the_exact_processors(kind):
    model, inputs = _model_and_inputs(kind)
    before, reference = _processors(model), _run(model, inputs)
    swap = accelerate_pipeline(model, DenseSpy())
    assert all(before[name] is not model.get_submodule(name).processor for name in LAYERS[kind])
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate_pipeline(model, DenseSpy())
    swap.restore()
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not model._forward_pre_hooks
    assert torch.equal(_run(model, inputs), reference)


def test_unsupported_transformer_is_refused_and_left_unchanged():
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8, num_layers=1,
                               norm_num_groups=4)
    before = _processors(model)
    with pytest.raises(ValueError) as error:
        accelerate_pipeline(model, "agent")
    for name in supported_transformers():
        assert name in str(error.value)
    assert "Transformer2DModel" in str(error.value)
    assert all(m.processor is before[n] for n, m in model.named_modules() if n in before)


def test_bad_family_or_options_leave_the_transformer_unchanged():
    wan, dit = random_transformer("wan"), random_transformer("dit")
    before_wan, before_dit = _processors(wan), _processors(dit)
    for family in ("agent", "neighborhood"):
        with pytest.raises(ValueError, match="video grids"):
            accelerate_pipeline(wan, family, kernel_size=3)
    with pytest.raises(ValueError, match="unknown attention family"):
        accelerate_pipeline(dit, "swin")
    with pytest.raises(ValueError, match="kernel_size"):
        accelerate_pipeline(dit, "neighborhood")          # the window size has no default
    with pytest.raises(ValueError, match="do not fit agent"):
        accelerate_pipeline(dit, "agent", window=3)
    with pytest.raises(ValueError, match="out of range"):
        accelerate_pipeline(dit, "agent", dense_layers=[2])
    for model, before in ((wan, before_wan), (dit, before_dit)):
        assert all(model.get_submodule(n).processor is p for n, p in before.items())
        assert not model._forward_pre_hooks


def test_families_by_name_are_the_training_free_records():
    """The families a pipeline takes by name are the records marked training-free (dense softmax aside), with
    their aliases; a family that needs training is refused with that list."""
    offered = pipeline_families()
    assert list(offered) == [r.name for r in kernels.families() if r.training_free and r.name != "softmax"]
    assert set(offered) == {"neighborhood", "radial", "loglinear", "agent"}
    dit = random_transformer("dit")
    for name in ("softmax", "flatten", "mala"):
        with pytest.raises(ValueError, match="unknown attention family") as error:
            accelerate_pipeline(dit, name)
        assert all(n in str(error.value) for r in offered.values() for n in r.names)


def test_video_and_option_checks_of_radial_and_loglinear():
    wan = random_transformer("wan")
    before = _processors(wan)
    with pytest.raises(ValueError, match="video grids"):
        accelerate_pipeline(wan, "loglinear")
    with pytest.raises(ValueError, match="its options"):
        accelerate_pipeline(wan, "radial", window=3)
    assert all(wan.get_submodule(n).processor is p for n, p in before.items())


def test_video_pipelines_default_radial_to_decay_0_2_and_keep_given_options():
    wan, flux = random_transformer("wan"), random_transformer("flux")
    with accelerate_pipeline(wan, "radial") as swap:
        assert swap.policy.options == {"decay_factor": 0.2}
    with accelerate_pipeline(wan, "radial", decay_factor=1.0, layout="official") as swap:
        assert swap.policy.options == {"decay_factor": 1.0, "layout": "official"}
    with accelerate_pipeline(flux, "radial") as swap:                       # images: the op's defaults
        assert swap.policy.options == {}


def test_dense_layers_and_dense_steps():
    model, inputs = _model_and_inputs("dit")
    reference = _run(model, inputs)
    with accelerate_pipeline(model, "agent", num_agents=4, dense_layers=[0, 1]):
        assert torch.equal(_run(model, inputs), reference)
    with accelerate_pipeline(model, "agent", num_agents=4, dense_layers=[1]):
        assert not torch.allclose(_run(model, inputs), reference, atol=1e-3)

    def at(t: float) -> dict:
        return {**inputs, "timestep": torch.full((2,), t)}
    dense = {t: _run(model, at(t)) for t in (900.0, 500.0)}
    with accelerate_pipeline(model, "agent", num_agents=4, dense_steps=1) as swap:
        assert torch.equal(_run(model, at(900.0)), dense[900.0])          # step 0: dense
        assert torch.equal(_run(model, at(900.0)), dense[900.0])          # same timestep (CFG's second call)
        assert not torch.allclose(_run(model, at(500.0)), dense[500.0], atol=1e-3)   # step 1: agent
        assert swap.policy.step == 1
        assert torch.equal(_run(model, at(900.0)), dense[900.0])          # a new run starts dense again


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_dense_steps_of_flux_and_wan_use_the_fused_qk_norm(kind, monkeypatch):
    """FLUX's and Wan's q/k norms and rotary embedding are rms_norm_rope passes before dense attention too (dense
    steps): the output is the original's up to rounding, and every swapped layer ran the fused passes."""
    from subquad.tasks.pipelines import processors
    calls = []
    fused = processors.rms_norm_rope
    monkeypatch.setattr(processors, "rms_norm_rope", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model, inputs = _model_and_inputs(kind)
    reference = _run(model, inputs)
    with accelerate_pipeline(model, "radial", dense_steps=1):
        out = _run(model, inputs)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert len(calls) >= 2 * len(LAYERS[kind])


def test_grid_smaller_than_the_window_stays_dense():
    model, inputs = _model_and_inputs("dit")
    reference = _run(model, inputs)
    with accelerate_pipeline(model, "neighborhood", kernel_size=7), pytest.warns(UserWarning, match="stays dense"):
        out = _run(model, inputs)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("top_k", [9, 16])
def test_loglinear_selecting_every_block_stays_dense(top_k):
    """On the 5x5 grid, 2x2 blocks give 9 blocks: a top-K of 9 or more selects them all (and 16 would be an
    error in the op), so the original dense call runs, with a warning."""
    model, inputs = _model_and_inputs("dit")
    reference = _run(model, inputs)
    with accelerate_pipeline(model, "llsa", block_size=4, top_k=top_k), pytest.warns(UserWarning, match="stays dense"):
        out = _run(model, inputs)
    assert torch.equal(out, reference)


def test_flux_grid_from_image_ids_and_bad_ids():
    model, inputs = _model_and_inputs("flux")
    spy = DenseSpy()
    with accelerate_pipeline(model, spy):
        _run(model, {**inputs, "img_ids": inputs["img_ids"].reshape(5, 5, 3)[:, :4].reshape(20, 3),
                     "hidden_states": inputs["hidden_states"][:, :20]})
        assert spy.calls[0][0] == (5, 4)
        shuffled = inputs["img_ids"][torch.randperm(25)]
        with pytest.raises(ValueError, match="not one raster grid"):
            _run(model, {**inputs, "img_ids": shuffled})


@needs_transformers
@pytest.mark.parametrize("kind", KINDS)
def test_pipelines_end_to_end(kind):
    """The whole tiny pipeline, dense vs swapped from one seed: an exactly dense swap gives the same images."""
    pipe, call = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    before = _processors(pipe.transformer)
    attn, options = ("neighborhood", {"kernel_size": 5}) if kind != "wan" else (DenseSpy(), {})
    report, dense, fast = compare_pipeline(pipe, call, attn, **options)
    assert report["psnr_db"] > 60 and report["ssim"] > 0.999 and report["latent_cosine"] > 0.99999
    assert dense.shape == fast.shape and dense.shape[1] == 3
    assert all(pipe.transformer.get_submodule(n).processor is p for n, p in before.items())


def test_agent_on_a_pipeline_reports_fidelity():
    pipe, call = tiny_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report, _, _ = compare_pipeline(pipe, call, "agent", num_agents=4, dense_steps=1)
    assert 0 < report["latent_cosine"] < 1 and 0 < report["ssim"] < 1 and report["dense_s"] > 0


def test_cli_on_a_saved_pipeline(tmp_path):
    pipe, _ = tiny_pipeline("dit")
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    code = main(["accelerate-pipeline", "--model", str(tmp_path / "pipe"), "--attn", "nat", "--opt", "kernel_size=5",
                 "--class-labels", "1,2", "--num-inference-steps", "2", "--guidance-scale", "1", "--warmup", "0",
                 "--dtype", "float32", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["psnr_db"] > 60 and report["options"] == {"kernel_size": 5}
    assert (out / "dense.png").is_file() and (out / "accelerated.png").is_file()
    assert main(["accelerate-pipeline", "--model", str(tmp_path / "pipe"), "--attn", "nat", "--opt", "kernel_size=5",
                 "--prompt", "a cat", "--device", "cpu", "--out", str(out)]) == 2       # DiT takes no prompt


def test_cli_on_a_saved_pipeline_loads_without_the_torch_dtype_warning(tmp_path):
    pipe, _ = tiny_pipeline("dit")
    pipe.save_pretrained(tmp_path / "pipe")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["accelerate-pipeline", "--model", str(tmp_path / "pipe"), "--attn", "radial", "--class-labels",
                     "1", "--num-inference-steps", "1", "--guidance-scale", "1", "--warmup", "0", "--dtype",
                     "float32", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_cli_names_a_missing_model_folder(tmp_path, capsys):
    assert main(["accelerate-pipeline", "--model", str(tmp_path / "nonexistent"), "--attn", "radial"]) == 1
    assert f"--model {tmp_path / 'nonexistent'}: folder not found" in capsys.readouterr().err
    assert main(["accelerate-pipeline", "--model", str(tmp_path), "--attn", "radial"]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_cli_random_tiny_at_its_default_size_says_it_cannot_show_a_speedup(tmp_path, capsys):
    """SD3's tiny model at the default height (its position table takes at most 16x16 tokens); the speed note
    and the warning for --dense-layers that keep every block dense."""
    assert main(["accelerate-pipeline", "--random", "sd3", "--size", "tiny", "--attn", "radial", "--dense-layers",
                 "0,1", "--repeats", "1", "--warmup", "0", "--dtype", "float32", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["grid"] == [16, 16]
    err = capsys.readouterr().err.splitlines()
    assert any("tiny sizes on a CPU cannot show a speedup" in line for line in err), err
    assert any("keeps every one of the 2 blocks dense" in line for line in err), err


def test_cli_random_sd3_tiny_loglinear_on_a_grid_smaller_than_its_top_k_stays_dense(tmp_path):
    with pytest.warns(UserWarning, match="does not fit the token grid"):
        assert main(["accelerate-pipeline", "--random", "sd3", "--size", "tiny", "--attn", "loglinear", "--height",
                     "128", "--width", "128", "--repeats", "1", "--warmup", "0", "--dtype", "float32", "--device",
                     "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["grid"] == [8, 8] and report["output_cosine"] > 0.9999


def test_cli_random_full_size_beyond_the_memory_is_refused_with_the_numbers(tmp_path, capsys, monkeypatch):
    from subquad.tasks.pipelines import random_models
    monkeypatch.setattr(random_models, "available_memory", lambda device: 4 * 2 ** 30)
    assert main(["accelerate-pipeline", "--random", "flux", "--size", "full", "--attn", "radial", "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "11.90B parameters: 22.2 GiB in bfloat16" in err and "4.0 GiB of memory available" in err, err
    assert not (tmp_path / "report.json").exists()


def test_cli_random_transformer(tmp_path):
    code = main(["accelerate-pipeline", "--random", "flux", "--size", "tiny", "--attn", "neighborhood", "--opt",
                 "kernel_size=3", "--height", "80", "--width", "80", "--repeats", "1", "--dtype", "float32",
                 "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["grid"] == [5, 5] and report["dense_ms"] > 0 and report["attention_skipped_ms"] > 0
    assert report["speedup_bound"] == pytest.approx(report["dense_ms"] / report["attention_skipped_ms"])
    assert report["blocks"] == report["fused_blocks"] == 2         # tiny FLUX: one double and one single block


@pytest.mark.parametrize("op_ms,dense_ms", [(5.0, 1.0), (1.0, 5.0)])
def test_fall_back_if_slower_runs_the_faster_of_the_op_and_dense_attention(op_ms, dense_ms, monkeypatch):
    """Timed once per call signature (both DiT layers share one) on a measured device: where dense attention is
    faster the layers give the original model's output and a warning gives both times; else the op's output."""
    from subquad.tasks.pipelines import processors
    monkeypatch.setattr(processors, "MEASURED_DEVICES", ("cpu",))
    timed = []
    monkeypatch.setattr(processors, "median_ms", lambda fn, device, repeats, warmup: timed.append(fn) or
                        (op_ms, dense_ms)[len(timed) - 1])
    model, inputs = _model_and_inputs("dit")
    dense = _run(model, inputs)
    with accelerate_pipeline(model, "neighborhood", kernel_size=3, fall_back_if_slower=False):
        structured = _run(model, inputs)
    assert not timed and not torch.allclose(structured, dense, atol=1e-4)
    with warnings.catch_warnings(record=True) as caught, accelerate_pipeline(model, "neighborhood", kernel_size=3) as swap:
        warnings.simplefilter("always")
        out = _run(model, inputs)
    assert len(timed) == 2 and swap.policy.fell_back == (dense_ms < op_ms)
    slower = [str(w.message) for w in caught if "these calls run dense attention" in str(w.message)]
    if dense_ms < op_ms:
        assert torch.allclose(out, dense, atol=1e-6) and len(slower) == 1 and "5.000 ms" in slower[0], slower
    else:
        assert torch.equal(out, structured) and not slower


def test_fall_back_if_slower_is_a_bool():
    with pytest.raises(ValueError, match="fall_back_if_slower must be True or False"):
        accelerate_pipeline(random_transformer("dit"), "neighborhood", kernel_size=3, fall_back_if_slower="no")


def test_skip_attention_is_the_call_with_the_self_attention_returning_its_values(monkeypatch):
    """The speedup bound's call: DiT's self-attention swapped for skip_attention is DiT with SDPA returning v."""
    model, inputs = _model_and_inputs("dit")
    dense = _run(model, inputs)
    with accelerate_pipeline(model, skip_attention):
        skipped = _run(model, inputs)
    assert not torch.allclose(skipped, dense, atol=1e-3)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kwargs: v)
    assert torch.equal(skipped, _run(model, inputs))


@pytest.mark.parametrize("kind", ["sd3", "flux", "dit"])
def test_cli_random_transformer_end_to_end(tmp_path, kind):
    """--num-inference-steps: a denoising loop dense and accelerated from the same latents, timed end to end,
    with the final latents' cosine; with every step dense (--dense-steps = the steps) the accelerated loop is
    the dense one, exactly."""
    reports = []
    for dense_steps in (1, 3):
        out = tmp_path / str(dense_steps)
        assert main(["accelerate-pipeline", "--random", kind, "--size", "tiny", "--attn", "neighborhood", "--opt",
                     "kernel_size=3", "--height", "128", "--width", "128", "--repeats", "1", "--warmup", "0",
                     "--dtype", "float32", "--device", "cpu", "--num-inference-steps", "3", "--dense-steps",
                     str(dense_steps), "--out", str(out)]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    some_sparse, all_dense = reports
    for report in reports:
        assert report["steps"] == 3 and report["end_to_end_dense_s"] > 0 and report["end_to_end_accelerated_s"] > 0
        assert report["end_to_end_speedup"] == pytest.approx(report["end_to_end_dense_s"]
                                                             / report["end_to_end_accelerated_s"])
    assert 0.5 < some_sparse["latent_cosine"] < 1 - 1e-6
    assert all_dense["latent_cosine"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kind, attn, opts, size", [("sd3", "radial", ["--opt", "tile=[2, 2]"], "256"),
                                                    ("flux", "neighborhood", ["--opt", "kernel_size=3"], "128")])
def test_cli_random_transformer_compiled(tmp_path, kind, attn, opts, size):
    """torch.compile(transformer) after the swap: fullgraph (SD3, text tokens as the op's prefix), Flux with one
    graph break where its grid is read from img_ids; outputs as the eager ones, compile times reported."""
    code = main(["accelerate-pipeline", "--random", kind, "--size", "tiny", "--attn", attn, *opts, "--height", size,
                 "--width", size, "--repeats", "1", "--dtype", "float32", "--device", "cpu", "--compile",
                 "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["output_cosine"] < 1 - 1e-6              # the structured op ran (not dense on a too-small grid)
    assert report["compiled_output_cosine"] == pytest.approx(report["output_cosine"], abs=1e-5)
    for key in ("compiled_dense_ms", "compiled_accelerated_ms", "dense_compile_s", "accelerated_compile_s"):
        assert report[key] > 0, key


def test_cli_compile_needs_random(tmp_path, capsys):
    assert main(["accelerate-pipeline", "--model", str(tmp_path), "--attn", "radial", "--compile"]) == 2
    assert "--compile times one transformer call: give it with --random KIND" in capsys.readouterr().err
