"""The ``subquad`` command line end to end (as a user runs it: a subprocess of the console script), and what
``import subquad`` and ``subquad --help`` load."""
import subprocess
import sys
from pathlib import Path

import pytest

import subquad
from subquad import kernels
from subquad.tasks.zoo import subquad_model_names


def test_models_prints_every_model_with_params_and_flops(run_subquad):
    res = run_subquad("models")
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert set(lines) == set(subquad_model_names())
    tiny = lines["softmax_deit_tiny_patch16_224"]
    assert tiny[1] == "softmax" and abs(float(tiny[2]) - 5.72) < 0.01 and abs(float(tiny[3]) - 1.25) < 0.01


def test_families_prints_every_family_record(run_subquad):
    res = run_subquad("families")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[2:]}
    assert list(rows) == [r.name for r in kernels.families()]
    for record in kernels.families():
        assert record.paper in rows[record.name] and all(a in rows[record.name] for a in record.aliases)
        assert rows[record.name].rstrip().endswith("yes" if record.training_free else "no")


@pytest.mark.parametrize("args, message", [
    (["bench", "--families", "softmax,nonesuch"], "unknown attention family 'nonesuch'"),
    (["bench", "--sizes", "12x12"], "a size is BxHxW"),
])
def test_bad_input_is_a_clear_error(run_subquad, args, message):
    res = run_subquad(*args)
    assert res.returncode == 2 and message in res.stderr


HEAVY = ("torch", "timm", "diffusers", "transformers", "scipy")


def _modules_after(code: str) -> set[str]:
    """The top-level packages among ``HEAVY`` that a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)})))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["accelerate-pipeline", "--help"],
                                  ["train", "--help"], ["sample", "--help"]])
def test_help_loads_no_torch(argv):
    code = ("import contextlib, io\nfrom subquad.tasks.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main({argv!r})")
    assert _modules_after(code) == set()


def test_import_and_model_registration_load_no_diffusers_transformers_or_scipy():
    loaded = _modules_after("import subquad, timm\ntimm.create_model('agent_deit_tiny_patch16_224')\n"
                            "assert not [m for m in __import__('sys').modules if m.startswith('subquad.tasks')]")
    assert loaded.isdisjoint({"diffusers", "transformers", "scipy"}), loaded


def test_help_names_the_recipes_and_the_defaults_and_data_names_its_sub_commands(capsys):
    from subquad.tasks.cli import main
    for argv in (["train", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert "DiT" in text and "dit/synthetic" in text and "cls/mala_deit_tiny_imagenet" in text
    assert "denoising steps (default: 50)" in text and "(default: samples.png in the run folder)" in text
    assert main(["data"]) == 2
    assert "name a sub-command: synthetic" in capsys.readouterr().err


def test_run_from_the_checkout_its_folders_shadow_no_package():
    """``python -m subquad...`` or a script from the repository root: the root (the package's own folder) leaves
    sys.path on ``import subquad``, so that its ``kernels/`` is not found as Hugging Face's top-level ``kernels``
    (diffusers probes for it and imports it)."""
    root = Path(subquad.__file__).resolve().parent
    code = "import importlib.util, subquad; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert not out.strip().startswith(str(root)), out
