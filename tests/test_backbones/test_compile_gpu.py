"""torch.compile (Inductor) of every DeiT family on CUDA: forward and gradients equal to eager, with the Triton
kernels as custom ops inside the graph (their fake layouts must match what the kernels return)."""
import pytest
import timm
import torch

import subquad  # noqa: F401  (registers the models)
from subquad.kernels.core.testing import assert_rel_close
from subquad.tasks.bench.measure import cuda_graphed

pytestmark = pytest.mark.gpu

FAMILIES = ("agent", "flatten", "mala", "nat", "radial", "llsa")


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_deit_matches_eager(family, mode):
    """Inductor's default and max-autotune (no CUDA graphs) modes: forward and gradients equal to eager."""
    torch.manual_seed(0)
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", img_size=512, depth=2).cuda()
    x = torch.randn(2, 3, 512, 512, device="cuda")

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x)
        out.float().square().mean().backward()
        return out.float(), [p.grad.float() for p in model.parameters() if p.grad is not None]

    out, grads = loss_and_grads(model)
    out_c, grads_c = loss_and_grads(torch.compile(model, mode=mode))
    assert_rel_close(out_c, out, tol=2e-2, what=f"{family} output")
    assert len(grads_c) == len(grads)
    for g_c, g in zip(grads_c, grads):
        assert_rel_close(g_c, g, tol=5e-2, what=f"{family} gradient")


@pytest.mark.parametrize("family", FAMILIES)
def test_deit_inference_replays_as_a_cuda_graph(family):
    """No host synchronisation in a forward: after a warm-up (plans and launch configs cached) the whole
    model captures into one CUDA graph, whose replay on new input equals the eager forward."""
    torch.manual_seed(0)
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", img_size=512, depth=2).cuda().eval()
    x = torch.randn(2, 3, 512, 512, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        expected = model(x)
    assert_rel_close(out.float(), expected.float(), tol=1e-2, what=f"{family} graph replay")


@pytest.mark.parametrize("family", FAMILIES)
def test_deit_training_step_replays_as_a_cuda_graph(family):
    """Forward, backward and a capturable fused AdamW step captured into one CUDA graph (no synchronisation in
    the backward either): replayed on new input, the gradients equal an eager step's from the same weights."""
    torch.manual_seed(0)
    model = timm.create_model(f"{family}_deit_tiny_patch16_224", img_size=512, depth=2).cuda().train()
    x = torch.randn(2, 3, 512, 512, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)

    def step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        opt.step()

    replay = cuda_graphed(step, x.device)
    x.copy_(torch.randn_like(x))
    before = [p.detach().clone() for p in model.parameters()]
    replay()
    replayed = [p.grad.float().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    for g_graph, p in zip(replayed, model.parameters()):
        assert_rel_close(g_graph, p.grad.float(), tol=5e-2, what=f"{family} gradient of the replayed step")
