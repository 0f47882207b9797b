"""Backend choice: the first automatic backend whose requirements hold; a warning, once, when the PyTorch
reference runs on CUDA in place of a faster backend; a ValueError naming the requirement when a named
backend cannot run."""
from types import SimpleNamespace

import pytest
import torch

from subquad.kernels.core import dispatch
from subquad.kernels.core.dispatch import Requirement, choose_backend, register_backend


def fast(x):
    return "fast"


def reference(x):
    return "reference"


@pytest.fixture
def op(monkeypatch):
    """A made-up op with a fast backend that needs float16 and a head_dim <= 8, a preference-only backend,
    a peer that is never chosen automatically, and the reference."""
    monkeypatch.setattr(dispatch, "_BACKENDS", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    register_backend("op", "fast", fast, requires=(dispatch.dtypes(torch.float16), dispatch.head_dim_at_most(8)))
    register_backend("op", "peer", lambda x: "peer", auto=False)
    register_backend("op", "reference", reference)
    return "op"


def cuda_tensor(dtype=torch.float16, head_dim=8):
    """What choose_backend reads of a tensor, on a CUDA device this machine may not have."""
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 1, 4, head_dim))


def test_first_backend_whose_requirements_hold(op):
    assert choose_backend(op, None, torch.zeros(1, 1, 4, 8, dtype=torch.float16))(None) == "fast"
    assert choose_backend(op, None, torch.zeros(1, 1, 4, 16, dtype=torch.float16))(None) == "reference"
    assert choose_backend(op, None, torch.zeros(1, 1, 4, 8))(None) == "reference"
    assert choose_backend(op, "peer", torch.zeros(1, 1, 4, 8))(None) == "peer"      # named, never automatic


def test_the_choice_is_remembered_per_call_signature(op):
    x = torch.zeros(1, 1, 4, 8, dtype=torch.float16)
    assert choose_backend(op, None, x)(None) == "fast"
    dispatch._BACKENDS[op][0] = dispatch.Backend("fast", reference)        # a later change is not seen ...
    assert choose_backend(op, None, x)(None) == "fast"
    register_backend(op, "other", fast)                                     # ... until a backend registers
    assert choose_backend(op, None, x)(None) == "reference"


def test_named_backend_that_cannot_run_names_the_requirement(op):
    with pytest.raises(ValueError, match=r"op\(backend='fast'\) needs head_dim <= 8; got .*head_dim=16"):
        choose_backend(op, "fast", torch.zeros(1, 1, 4, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"has no backend 'triton'; available: \['fast', 'peer', 'reference'\]"):
        choose_backend(op, "triton", torch.zeros(1, 1, 4, 8))
    with pytest.raises(ValueError, match="already has a backend"):
        register_backend(op, "fast", fast)


def test_reference_on_cuda_warns_once_naming_what_failed(op):
    with pytest.warns(UserWarning, match="runs its PyTorch reference on CUDA.*'fast' needs inputs in float16"):
        assert choose_backend(op, None, cuda_tensor(torch.float32))(None) == "reference"
    with pytest.warns(UserWarning, match="'fast' needs head_dim <= 8"):     # another reason: said once too
        choose_backend(op, None, cuda_tensor(head_dim=64))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_backend(op, None, cuda_tensor(torch.float32))                # said already
        choose_backend(op, None, cuda_tensor())                             # the fast backend runs
        choose_backend(op, "reference", cuda_tensor(torch.float32))         # named: the user chose it


def test_preferences_fall_back_silently(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", {})
    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    register_backend("op", "fast", fast, requires=(Requirement("a wide head", lambda f: f["head_dim"] > 8,
                                                               preference=True),))
    register_backend("op", "reference", reference)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend("op", None, cuda_tensor())(None) == "reference"


def test_the_triton_device_requirement():
    """CUDA tensors; CPU tensors only under the interpreter and only when the backend is named (tests)."""
    holds = dispatch.triton_device().holds
    assert holds({"device": torch.device("cuda")})
    assert not holds({"device": torch.device("cpu")})
    assert holds({"device": torch.device("cpu"), "named": True}) == dispatch.INTERPRET


@pytest.mark.gpu
def test_real_ops_on_cuda_choose_triton_or_say_why(monkeypatch):
    """On CUDA the sparse ops run the block-sparse core's Triton kernels where its tiles fit, and otherwise
    the reference with one warning naming the tile size; float64 runs the reference, said once."""
    from subquad.kernels import radial_attention
    from subquad.kernels.radial.full_frames import radial_attention_on_triton
    from subquad.kernels.radial.reference import radial_attention_reference

    monkeypatch.setattr(dispatch, "_WARNED", set())
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    q = torch.randn(1, 2, 16 * 16, 64, device="cuda", dtype=torch.bfloat16)
    assert choose_backend("radial_attention", None, q, grid=(16, 16), tile_size=64) is radial_attention_on_triton
    with pytest.warns(UserWarning, match="radial_attention runs its PyTorch reference on CUDA.*power of two >= 16"):
        assert choose_backend("radial_attention", None, q, grid=(16, 16), tile_size=4) is radial_attention_reference
        radial_attention(q, q, q, grid=(16, 16), tile=(2, 2))
    with pytest.warns(UserWarning, match="float16, bfloat16 or float32"):
        radial_attention(q.double(), q.double(), q.double(), grid=(16, 16))
