"""One way to make a Triton forward/backward pair a differentiable op (and a forward alone an op that
``torch.compile`` traces: ``forward_only_op``).

``triton_op`` registers the pair as ``torch.library`` custom ops (``subquad::<name>`` and
``subquad::<name>_backward``, each with its fake) wired together through ``register_autograd``, which
``torch.compile`` traces, and builds an ``autograd.Function`` twin that eager mode calls instead: its
dispatch costs a fraction of the custom op's, which matters at kernel times of tens of microseconds.
A call with no input that needs a gradient runs the forward alone (no autograd node).

The contract, for an op whose inputs are ``num_tensors`` tensors (None allowed) followed by scalars:
- ``forward(*inputs) -> Tensor | tuple[Tensor, ...]``: the result first, then what the backward
  reads (not differentiable). Its annotations give the custom op's schema; parameters with a default
  (host-only options such as a launch config for tests and sweeps) stay out of it.
- ``backward(grad, ...) -> tuple[Tensor, ...]``: the host function of the backward kernels.
- ``save(inputs, outputs)``: the tensors kept for the backward (default: the tensor inputs, then the
  outputs after the result).
- ``gradients(backward, grad, saved, args, needs)``: one gradient (or None) per tensor input, by
  calling ``backward`` (the custom op under ``torch.compile``, the host function in eager mode);
  ``needs`` says which tensor inputs need one (default: ``backward(grad, *saved, *args)``).
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .dispatch import records_grad

Gradients = Callable[[Callable, Tensor, tuple, tuple, tuple], Sequence[Optional[Tensor]]]


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _without_defaulted(fn: Callable) -> Callable:
    """``fn`` as a custom op's function: its signature without the parameters that have a default."""
    signature = inspect.signature(fn)
    required = [p for p in signature.parameters.values() if p.default is inspect.Parameter.empty]
    if len(required) == len(signature.parameters):
        return fn

    def op_function(*args):
        return fn(*args)

    op_function.__signature__ = signature.replace(parameters=required)
    op_function.__name__, op_function.__module__ = fn.__name__, fn.__module__
    return op_function


def _save_inputs_and_outputs(num_tensors: int) -> Callable[[tuple, tuple], tuple]:
    return lambda inputs, outputs: (*inputs[:num_tensors], *outputs[1:])


def _backward_as_is(backward: Callable, grad: Tensor, saved: tuple, args: tuple, needs: tuple) -> tuple:
    return tuple(backward(grad, *saved, *args))


def triton_op(name: str, forward: Callable, backward: Callable, *, num_tensors: int, forward_fake: Callable,
              backward_fake: Callable, save: Callable[[tuple, tuple], tuple] | None = None,
              gradients: Gradients = _backward_as_is) -> Callable[..., Tensor]:
    """Register ``forward``/``backward`` as the op ``subquad::<name>``; returns ``apply(*inputs) -> result``."""
    save = save or _save_inputs_and_outputs(num_tensors)
    forward_op = torch.library.custom_op(f"subquad::{name}", _without_defaulted(forward), mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"subquad::{name}_backward", _without_defaulted(backward), mutates_args=())
    backward_op.register_fake(backward_fake)

    def remember(ctx, inputs: tuple, outputs: tuple) -> None:
        ctx.save_for_backward(*save(inputs, outputs))
        ctx.args = tuple(inputs[num_tensors:])

    def grads(ctx, run_backward: Callable, grad: Tensor) -> tuple:
        needs = tuple(ctx.needs_input_grad[:num_tensors])
        return (*gradients(run_backward, grad, tuple(ctx.saved_tensors), ctx.args, needs), *([None] * len(ctx.args)))

    def setup_context(ctx, inputs, output) -> None:
        outputs = _as_tuple(output)
        remember(ctx, tuple(inputs), outputs)
        if len(outputs) > 1:
            ctx.mark_non_differentiable(*outputs[1:])

    forward_op.register_autograd(lambda ctx, grad, *_: grads(ctx, backward_op, grad), setup_context=setup_context)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            outputs = _as_tuple(forward(*inputs))
            remember(ctx, inputs, outputs)
            return outputs[0]

        @staticmethod
        def backward(ctx, grad):
            return grads(ctx, backward, grad)

    Eager.__name__ = Eager.__qualname__ = "".join(part.title() for part in name.split("_"))

    def apply(*inputs) -> Tensor:
        if torch.compiler.is_compiling():
            return _as_tuple(forward_op(*inputs))[0]
        if not records_grad(*inputs[:num_tensors]):
            return _as_tuple(forward(*inputs))[0]
        return Eager.apply(*inputs)

    apply.__name__ = name
    return apply


def forward_only_op(name: str, forward: Callable[..., Tensor], forward_fake: Callable[..., Tensor]
                    ) -> Callable[..., Tensor]:
    """Register ``forward`` as the op ``subquad::<name>`` without a backward (an inference path, whose callers send
    inputs that need gradients elsewhere); returns ``apply(*inputs)``: the custom op under ``torch.compile``,
    ``forward`` itself in eager mode (no custom-op dispatch)."""
    op = torch.library.custom_op(f"subquad::{name}", _without_defaulted(forward), mutates_args=())
    op.register_fake(forward_fake)

    def apply(*inputs) -> Tensor:
        return op(*inputs) if torch.compiler.is_compiling() else forward(*inputs)

    apply.__name__ = name
    return apply
