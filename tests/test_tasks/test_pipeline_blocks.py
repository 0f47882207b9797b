"""The fused FLUX, SD3 and Wan blocks (tasks/pipelines/blocks.py): each fused forward against the block's own, the
helpers against their definitions, and accelerate_pipeline fusing and restoring them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import FeedForward, JointTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from subquad.kernels.core.testing import REL_TOL, relative_error
from subquad.tasks.pipelines import accelerate_pipeline
from subquad.tasks.pipelines.blocks import (FUSED_FORWARDS, feed_forward, fuse_blocks, gated_add, joined,
                                            linear_gelu, split_linear, unfuse_blocks)
from subquad.tasks.pipelines.random_models import CONFIGS, dense_attention, random_transformer, transformer_inputs

DIM, HEADS, TEXT, IMAGE = 32, 2, 5, 12


def _randomized(block: torch.nn.Module) -> torch.nn.Module:
    """Random weights of a size that moves every output (diffusers zero-initialises some)."""
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block.eval()


def _flux_rotary(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(n, DIM // HEADS // 2) * 6.3
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _wan_rotary(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(1, n, 1, DIM // HEADS // 2) * 6.3
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _block_and_call(kind: str, dtype: torch.dtype, batch: int = 2) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    temb = torch.randn(batch, DIM)
    if kind == "flux_double":
        block = FluxTransformerBlock(DIM, HEADS, DIM // HEADS)
        call = dict(hidden_states=torch.randn(batch, IMAGE, DIM), encoder_hidden_states=torch.randn(batch, TEXT, DIM),
                    temb=temb, image_rotary_emb=_flux_rotary(TEXT + IMAGE))
    elif kind == "sd3":
        block = JointTransformerBlock(DIM, HEADS, DIM // HEADS, qk_norm="rms_norm")
        call = dict(hidden_states=torch.randn(batch, IMAGE, DIM), encoder_hidden_states=torch.randn(batch, TEXT, DIM),
                    temb=temb)
    elif kind == "flux_single":
        block = FluxSingleTransformerBlock(DIM, HEADS, DIM // HEADS)
        call = dict(hidden_states=torch.randn(batch, IMAGE, DIM), encoder_hidden_states=torch.randn(batch, TEXT, DIM),
                    temb=temb, image_rotary_emb=_flux_rotary(TEXT + IMAGE))
    else:
        block = WanTransformerBlock(DIM, 3 * DIM, HEADS, cross_attn_norm=kind == "wan_cross_norm")
        call = dict(hidden_states=torch.randn(batch, IMAGE, DIM), encoder_hidden_states=torch.randn(batch, TEXT, DIM),
                    temb=torch.randn(batch, 6, DIM), rotary_emb=_wan_rotary(IMAGE))
    block = _randomized(block).to(dtype)
    call = {k: (v.to(dtype) if torch.is_tensor(v) and k != "temb" or k == "temb" and not kind.startswith("wan")
                else v) for k, v in call.items()}
    return block, call


KINDS = ["flux_double", "flux_single", "sd3", "wan", "wan_cross_norm"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_forward_matches_the_block(kind, dtype):
    block, call = _block_and_call(kind, dtype)
    with torch.no_grad():
        want = block(**call)
        assert fuse_blocks(block) == [block] and "forward" in vars(block)
        got = block(**call)
        unfuse_blocks([block])
        assert "forward" not in vars(block)
        assert block(**call)[0].equal(want[0])                   # the class forward is back
    want, got = (w if isinstance(w, tuple) else (w,) for w in (want, got))
    for a, e in zip(got, want):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert relative_error(a, e) < (1e-5 if dtype == torch.float32 else REL_TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
def test_fused_forward_gradients(kind):
    """The fused passes are differentiable: the gradients of the inputs and weights equal the block's own (in
    float64; Wan's own forward computes its norms and residual adds in float32)."""
    block, call = _block_and_call(kind, torch.float64)
    call["hidden_states"].requires_grad_()
    params = [p for p in block.parameters()]

    def grads():
        out = block(**call)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                   for o in (out if isinstance(out, tuple) else (out,)))
        return torch.autograd.grad(loss, [call["hidden_states"], *params], allow_unused=True)

    want = grads()
    fuse_blocks(block)
    got = grads()
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            assert relative_error(a, e) < (1e-6 if kind.startswith("wan") else 1e-10)


def test_wan_per_token_modulation_runs_the_original():
    block, call = _block_and_call("wan", torch.float32)
    call["temb"] = torch.randn(2, IMAGE, 6, DIM)
    with torch.no_grad():
        want = block(**call)
        fuse_blocks(block)
        assert block(**call).equal(want)


def test_blocks_with_their_own_forward_or_other_norms_are_left_alone():
    hooked, _ = _block_and_call("flux_single", torch.float32)
    hooked.forward = lambda *a, **k: None                       # as accelerate's hooks set it
    changed, _ = _block_and_call("flux_double", torch.float32)
    changed.norm2 = torch.nn.LayerNorm(DIM)                     # affine: not adaLN's plain norm
    last = JointTransformerBlock(DIM, HEADS, DIM // HEADS, context_pre_only=True)         # SD3's last block
    dual = JointTransformerBlock(DIM, HEADS, DIM // HEADS, use_dual_attention=True)       # SD3.5 Medium's first
    assert fuse_blocks(hooked) == fuse_blocks(changed) == fuse_blocks(last) == fuse_blocks(dual) == []


def test_gated_add_rounds_once_in_float32():
    x, y = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    gate = torch.randn(2, 8)
    want = (x.float() + gate[:, None] * y.float()).bfloat16()
    assert gated_add(x, gate, y).equal(want)
    y.requires_grad_()
    out = gated_add(x, gate, y)
    assert out.dtype == torch.bfloat16 and out.equal(want) and out.requires_grad


class Adapted(torch.nn.Module):
    """A linear layer with an adapter (as peft's LoRA wraps one): its weight alone is not what it computes."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.base, self.in_features, self.out_features = linear, linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.down, self.up = torch.nn.Linear(linear.in_features, 2, bias=False), torch.nn.Linear(2, linear.out_features)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("kind", ["flux_single", "flux_double"])
def test_adapted_linear_layers_run_as_themselves(kind):
    """The fused forward reads a linear layer's weight in place only where it is exactly nn.Linear."""
    block, call = _block_and_call(kind, torch.float32)
    if kind == "flux_single":
        block.proj_out, block.proj_mlp = Adapted(block.proj_out), Adapted(block.proj_mlp)
    else:
        block.ff.net[0].proj = Adapted(block.ff.net[0].proj)
    _randomized(block)
    with torch.no_grad():
        want = block(**call)
        fuse_blocks(block)
        got = block(**call)
    for a, e in zip(got, want):
        assert relative_error(a, e) < 1e-5


def test_feed_forward_is_the_module():
    ff = _randomized(FeedForward(8, dim_out=8, activation_fn="gelu-approximate"))
    x = torch.randn(2, 3, 8)
    assert feed_forward(ff, x).equal(ff(x))


@pytest.mark.gpu
def test_gpu_linear_gelu_in_the_epilogue_is_the_tanh_gelu():
    """On CUDA the GELU runs in the product's epilogue (on the float32 accumulator): within bf16 rounding of the
    two ops (FLUX's MLP width)."""
    linear = torch.nn.Linear(3072, 12288, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = F.gelu(F.linear(x.double(), linear.weight.double(), linear.bias.double()), approximate="tanh")
        assert relative_error(linear_gelu(linear, x), want) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_fused_forward_matches_the_block(kind):
    """On CUDA (Triton norms, the GELU epilogue) at bfloat16."""
    block, call = _block_and_call(kind, torch.bfloat16)
    block = block.cuda()
    call = {k: (tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()) for k, v in call.items()}
    with torch.no_grad():
        want = block(**call)
        fuse_blocks(block)
        got = block(**call)
    for a, e in zip(*(w if isinstance(w, tuple) else (w,) for w in (got, want))):
        assert relative_error(a, e) < REL_TOL[torch.bfloat16]


def test_split_linear_is_the_linear_of_the_concatenation():
    linear = torch.nn.Linear(5 + 7, 4)
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 7)
    assert relative_error(split_linear(linear, a, b), linear(torch.cat([a, b], -1))) < 1e-6


@pytest.mark.parametrize("batch", [1, 3])
def test_joined_is_a_view_of_one_buffer_else_a_copy(batch):
    buffer = torch.randn(batch, 9, 4)
    a, b = buffer[:, :3], buffer[:, 3:]
    view = joined(a, b)
    assert view.data_ptr() == buffer.data_ptr() and view.equal(buffer)
    a, b = torch.randn(batch, 3, 4), torch.randn(batch, 6, 4)
    copy = joined(a, b)
    assert copy.equal(torch.cat([a, b], 1))
    swapped = joined(buffer[:, 3:], buffer[:, :3])               # the order matters
    assert swapped.equal(torch.cat([buffer[:, 3:], buffer[:, :3]], 1))


def _transformer(kind: str) -> torch.nn.Module:
    if kind != "sd3":
        return random_transformer(kind)
    torch.manual_seed(0)    # three blocks, none dual-attention: the first two fused, the last (context-pre-only) not
    return _randomized(SD3Transformer2DModel(**{**CONFIGS["sd3"]["tiny"], "num_layers": 3,
                                                "dual_attention_layers": ()}))


@pytest.mark.parametrize("kind", ["flux", "sd3", "wan"])
def test_accelerate_pipeline_fuses_every_block_and_restores(kind):
    model = _transformer(kind)
    inputs = transformer_inputs(kind, model, latent_size=(10, 10), latent_frames=2, batch=2, text_tokens=7)
    blocks = [m for m in model.modules() if type(m) in FUSED_FORWARDS and FUSED_FORWARDS[type(m)][1](m)]
    with torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
        with accelerate_pipeline(model, dense_attention) as swap:
            assert swap.fused_blocks == blocks and len(blocks) >= 2
            got = model(**inputs, return_dict=False)[0]
        with accelerate_pipeline(model, dense_attention,
                                 fused_blocks=False) as swap:
            assert swap.fused_blocks == []
        assert all("forward" not in vars(m) for m in blocks)
        assert model(**inputs, return_dict=False)[0].equal(want)
    assert relative_error(got, want) < 1e-5


def test_fused_blocks_must_be_a_bool():
    with pytest.raises(ValueError, match="fused_blocks"):
        accelerate_pipeline(random_transformer("flux"), "radial", fused_blocks="yes")


def test_compiled_fullgraph_with_fused_blocks():
    """torch.compile(fullgraph=True) traces an accelerated Wan whole, fused blocks and radial attention included
    (the fused passes' references and plain ops under the compiler), and gives the eager output."""
    model = random_transformer("wan")
    inputs = transformer_inputs("wan", model, latent_size=(16, 16), latent_frames=3, batch=1, text_tokens=7)
    with torch.no_grad(), accelerate_pipeline(model, "radial", tile=(1, 2, 2)) as swap:
        assert len(swap.fused_blocks) == 2
        eager = model(**inputs, return_dict=False)[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs, return_dict=False)[0]
    assert relative_error(compiled, eager) < 1e-6
