"""kernels.triton._common.launch: the cached launch path against Triton's own kernel[grid] path.

The CPU test drives the cache with a stand-in kernel (no GPU, no compiler): which calls go through
kernel[grid] (first use, a new specialisation) and which call the compiled launcher directly, with what
arguments. The GPU test runs a real kernel both ways, with aligned and misaligned inputs.
"""
import pytest
import torch
import triton

from subquad.kernels.core import triton_common as _common


class _Compiled:
    """Stands in for triton's CompiledKernel: ``run`` records each direct launch."""

    def __init__(self, log):
        self.run = lambda *call: log.append(("direct", call))
        self.function, self.packed_metadata = "function", "metadata"


class _Kernel:
    """Stands in for a JITFunction with parameters (x_ptr, n, scale, BLOCK, FLAG)."""
    __name__ = "stand_in_kernel"
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log)
        return run


@pytest.fixture
def fast_path(monkeypatch):
    """The cached path as it runs on a GPU: no interpreter, a supported Triton, device 0, stream 7."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(_common, "_FAST_TRITON", True)
    monkeypatch.setattr(_common, "_FAST", {})
    monkeypatch.setattr(_common, "_raw_stream", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_launch_cache_hits_only_the_same_specialisation(fast_path):
    kernel = _Kernel()
    x = torch.zeros(64)
    _common.launch(kernel, (3, 2), x, 100, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    assert [entry[0] for entry in kernel.log] == ["triton"]
    assert _common.LAUNCHED["stand_in_kernel"].function == "function"

    y = torch.ones(64)          # another tensor, same dtype and alignment, same scalars and options
    _common.launch(kernel, (5,), y, 100, 0.5, BLOCK=16, FLAG=True, num_warps=4)
    kind, call = kernel.log[-1]
    assert kind == "direct"
    assert call[:9] == (5, 1, 1, 7, "function", "metadata", None, None, None)
    assert call[9] is y and call[10:] == (100, 0.5, 16, True)      # every parameter, in signature order

    changes = [((torch.ones(64, dtype=torch.float64), 100, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)),  # dtype
               ((torch.ones(65)[1:], 100, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)),                  # alignment
               ((y, 1, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)),                                     # int value
               ((y, 100, 0.5), dict(BLOCK=32, FLAG=True, num_warps=4)),                                   # constexpr
               ((y, 100, 0.5), dict(BLOCK=16, FLAG=True, num_warps=8))]                                   # option
    for args, kwargs in changes:
        before = len(kernel.log)
        _common.launch(kernel, (1,), *args, **kwargs)
        assert kernel.log[before][0] == "triton", (args, kwargs)
        _common.launch(kernel, (1,), *args, **kwargs)
        assert kernel.log[before + 1][0] == "direct", (args, kwargs)


def test_launch_takes_tritons_path_when_it_cannot_cache(fast_path, monkeypatch):
    kernel = _Kernel()
    x = torch.zeros(64)
    monkeypatch.setattr(_common, "_FAST_TRITON", False)            # an unsupported Triton release
    for _ in range(2):
        _common.launch(kernel, (1,), x, 100, 0.5, BLOCK=16, FLAG=True)
    monkeypatch.setattr(_common, "_FAST_TRITON", True)
    for _ in range(2):                                              # an argument neither scalar nor tensor
        _common.launch(kernel, (1,), x, "100", 0.5, BLOCK=16, FLAG=True)
    hook = lambda metadata: None    # noqa: E731   a profiler's launch hook
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(2):
            _common.launch(kernel, (1,), x, 100, 0.5, BLOCK=16, FLAG=True)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.setattr(_common, "INTERPRET", True)
    for _ in range(2):
        _common.launch(kernel, (1,), x, 100, 0.5, BLOCK=16, FLAG=True)
    assert [entry[0] for entry in kernel.log] == ["triton"] * 8
    assert not _common._FAST


@pytest.mark.gpu
def test_cached_launch_matches_triton_launch_on_gpu(monkeypatch):
    """MALA's and FLatten's kernels launched through the cache give bit-identical outputs to Triton's own
    launch, also when a misaligned view (2 bytes off) follows aligned inputs: a specialisation the cache must
    not reuse."""
    from subquad.kernels.linear.triton import FOCUSED, MALA, linear_attention_forward
    b, h, n, d = 2, 3, 40 * 24, 64
    buffers = [torch.randn(b * h * n * d + 1, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    c = torch.rand(h, d, device="cuda") + 0.5
    monkeypatch.setattr(_common, "_FAST", {})
    for offset in (0, 1, 0):
        q, k, v = (t[offset: offset + b * h * n * d].view(b, h, n, d) for t in buffers)
        for feature in (MALA, FOCUSED):
            monkeypatch.setattr(_common, "_FAST_TRITON", False)
            expected = linear_attention_forward(q, k, v, c, feature, 3.0, 0, 0, 0)[0]
            monkeypatch.setattr(_common, "_FAST_TRITON", True)
            for _ in range(2):               # fills the cache for a new specialisation, then launches from it
                got = linear_attention_forward(q, k, v, c, feature, 3.0, 0, 0, 0)[0]
                torch.cuda.synchronize()
                assert torch.isfinite(got).all() and torch.equal(got, expected), (offset, feature)
    assert any(key[0].__name__ == "_output_kernel" for key in _common._FAST)


def test_host_integer_helpers_agree_with_tritons():
    """The launchers' plain-Python cdiv, next_power_of_2 and pad_dim give what triton.cdiv and
    triton.next_power_of_2 give (pad_dim: at least 16), and strides() zeroes a broadcast batch or head."""
    for n in [1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 1000, 4097]:
        assert _common.next_power_of_2(n) == triton.next_power_of_2(n)
        assert _common.pad_dim(n) == max(16, triton.next_power_of_2(n))
        for d in [1, 3, 16, 64]:
            assert _common.cdiv(n, d) == triton.cdiv(n, d)
    x = torch.empty(2, 3, 5, 4)
    assert _common.strides(x) == (60, 20, 4)
    assert _common.strides(x[:1]) == (0, 20, 4)
    assert _common.strides(x[:, :1].expand(2, 3, 5, 4)) == (60, 0, 4)
