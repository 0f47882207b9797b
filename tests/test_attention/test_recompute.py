"""Saved tensors kept as recipes (``recomputed_in_backward``): freed from the forward to the backward, rebuilt
there, gradients unchanged; agent attention's resized biases use it in training."""
import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from subquad import attention
from subquad.attention import agent as agent_module
from subquad.attention.recompute import recomputed_in_backward


def _product_and_grad(recipe: bool):
    """x * w with w = a @ b, large next to a and b: w is what mul saves for the gradient of x."""
    torch.manual_seed(0)
    x, a, b = torch.randn(64, 64, requires_grad=True), torch.randn(64, 3), torch.randn(3, 64)
    w = a @ b
    alive = weakref.ref(w)
    built = []

    def rebuild():
        built.append(1)
        return a @ b
    with recomputed_in_backward((w, rebuild)) if recipe else torch.enable_grad():
        y = (x * w).sum()
    del w
    gc.collect()
    freed = alive() is None
    y.backward()
    return freed, len(built), x.grad


def test_a_saved_tensor_kept_as_its_recipe_is_freed_and_rebuilt():
    freed, built, grad = _product_and_grad(recipe=True)
    kept, not_built, want = _product_and_grad(recipe=False)
    assert freed and built == 1
    assert not kept and not_built == 0
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_no_recipe_without_autograd_or_inside_other_saved_tensor_hooks():
    w = torch.randn(4, requires_grad=True)
    with torch.no_grad(), recomputed_in_backward((w, lambda: pytest.fail("rebuilt without autograd"))):
        (w * w).sum()
    x = torch.randn(4, requires_grad=True)

    def region(x):
        with recomputed_in_backward((w, lambda: pytest.fail("rebuilt inside checkpointing's hooks"))):
            return (x * w).sum()
    checkpoint(region, x, use_reentrant=False).backward()
    torch.testing.assert_close(x.grad, w.detach())


@pytest.mark.parametrize("batch,rebuilt", [(2, True), (16, False)])
def test_agent_biases_are_not_kept_for_the_backward_and_gradients_are_unchanged(monkeypatch, batch, rebuilt):
    """Training agent attention (Triton kernels, here under the interpreter) keeps the two resized biases (2 h n N
    values per block) as their recipe where they are large next to the batch's activations (2 h n N = 688 values
    against B N C = 2752 at B2): freed after the forward, every gradient bitwise as when they are kept; at B16
    (22,016) they are kept."""
    def run(recipe: bool):
        torch.manual_seed(0)
        m = attention.build("agent", dim=32, num_heads=2, num_agents=4, backend="triton")
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(batch, 1 + 6 * 7, 32, requires_grad=True)
        resized, alive = m._resized_bias, []

        def watched(grid, num_prefix):
            bias, rebuild = resized(grid, num_prefix)
            alive.extend(weakref.ref(t) for t in bias)
            return bias, rebuild
        monkeypatch.setattr(m, "_resized_bias", watched)
        if not recipe:
            monkeypatch.setattr(agent_module, "recomputed_in_backward", lambda *pairs: torch.enable_grad())
        y = m(x, grid=(6, 7), num_prefix=1)
        gc.collect()
        freed = [r() is None for r in alive]
        y.square().sum().backward()
        monkeypatch.undo()
        return freed, [x.grad] + [p.grad for p in m.parameters()]

    freed, grads = run(recipe=True)
    kept, want = run(recipe=False)
    assert freed == [rebuilt, rebuilt] and kept == [False, False]
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
