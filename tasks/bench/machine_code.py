"""The Triton kernels' machine code for Hopper (sm_90), without a GPU.

An op runs on Triton's CPU interpreter while its launches are recorded: kernel, each argument's type and the
JIT's specialisation of it (an int equal to 1 a constant, 16-divisible ints and 16-byte aligned pointers marked
so, as ``kernel[grid](...)`` would compile them), constexprs, warps and stages; with ``run_kernels`` False the
kernels' work is skipped, so a real size records in seconds. A process without the interpreter then compiles
each launch with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and Triton's own ptxas, and reads the
registers and spilled bytes (``ptxas -v``) and the SASS (``cuobjdump -sass``): global loads and stores by width,
asynchronous copies, tensor-core instructions, shuffles and barriers. ``tests/test_kernels/core/
test_sm90_compile.py`` checks every op with it; as a command it reports one op at a chosen size::

    python -m subquad.tasks.bench.machine_code --op loglinear --grid 256x256 --heads 4 --head-dim 64
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Callable

import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import native_specialize_impl

from ... import kernels
from ...kernels.core.testing import projection_views

OPS = {"radial": ("radial_attention", {}), "neighborhood": ("neighborhood_attention", dict(kernel_size=7)),
       "loglinear": ("loglinear_attention", {}), "mala": ("mala_attention", {}),
       "flatten": ("focused_linear_attention", {}), "agent": ("agent_attention", dict(num_agents=49))}
# SASS mnemonics counted per kernel (prefixes): memory, tensor cores, shuffles, barriers
COUNTED = ("LDG", "STG", "LDGSTS", "LDS", "STS", "LDSM", "STL", "LDL", "ATOMG", "RED", "HMMA", "HGMMA", "SHFL",
           "BAR")


def specialisations(fn: InterpretedFunction, args: tuple, kwargs: dict) -> dict:
    """{argument: [type, specialisation]} of the non-constexpr arguments, as Triton's JIT specialises them
    (``do_not_specialize`` respected)."""
    plain = set(fn.kwargs.get("do_not_specialize") or ())
    return {name: list(native_specialize_impl(BaseBackend, value, False, name not in plain, True))
            for name, value in zip(fn.arg_names, args) if name not in kwargs}


@contextlib.contextmanager
def recording_launches(run_kernels: bool = True):
    """Within the block, every interpreted launch is recorded (distinct ones once) into the yielded list: kernel
    module and name, argument specialisations, constexprs and options; ``run_kernels`` False skips the kernels'
    work (outputs are left as allocated)."""
    seen, launches = set(), []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        launch = dict(module=self.fn.__module__, name=self.fn.__name__, specs=specialisations(self, args, kwargs),
                      constexprs={k: v for k, v in kwargs.items() if k in names},
                      options={k: v for k, v in kwargs.items() if k not in names})
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(launch)
        if run_kernels:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


COMPILE = textwrap.dedent("""
    import collections, importlib, json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    failures, kernels = [], {}
    for launch in json.load(sys.stdin):
        kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
        names = [p.name for p in kernel.params]
        constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.name not in
                         launch["constexprs"]}, **launch["constexprs"]}
        signature, attrs = {}, {}
        for n in names:
            kind, spec = ("constexpr", constexprs[n]) if n in constexprs else launch["specs"][n]
            if kind == "constexpr":         # declared so, or an int the JIT specialised to its value 1
                signature[n], constexprs[n] = "constexpr", spec
                continue
            signature[n] = kind
            if spec == "D":
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constexprs.items()}, attrs)
        name = f"{launch['module']}.{launch['name']} {launch['constexprs']} {launch['options']}"
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
            continue
        if SASS:
            with tempfile.TemporaryDirectory() as folder:
                ptx = os.path.join(folder, "kernel.ptx")
                with open(ptx, "w") as f:
                    f.write(compiled.asm["ptx"])
                done = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".cubin"],
                                      capture_output=True, text=True, check=True)
                sass = subprocess.run([cuobjdump, "-sass", ptx + ".cubin"], capture_output=True, text=True,
                                      check=True).stdout
            ops = collections.Counter(m.group(1) for m in re.finditer(
                r"^\\s+/\\*[0-9a-f]+\\*/\\s+(?:@!?U?P\\w+\\s+)?([A-Z0-9_.]+)", sass, re.M))
            kernels[name] = dict(
                registers=int(re.search(r"Used ([0-9]+) registers", done.stderr).group(1)),
                spills=int(re.search(r"([0-9]+) bytes spill stores", done.stderr).group(1)),
                shared=compiled.metadata.shared,
                ops={op: n for op, n in ops.items() if op.split(".")[0] in COUNTED})
    print(json.dumps(dict(failures=failures, kernels=kernels)))
""")


def compile_for_sm90(launches: list[dict], sass: bool = True) -> dict:
    """Compile the launches in a process without the interpreter: {"failures": [...], "kernels": {launch:
    {"registers", "spills" (bytes of spill stores), "shared" (bytes), "ops": {SASS mnemonic: count}}}} (the
    kernels' entries only with ``sass``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = f"SASS = {sass}\nCOUNTED = {COUNTED!r}\n" + COMPILE
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(launches), capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"compiling for sm_90 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def narrow_accesses(ops: dict) -> dict:
    """The 16-bit scalar global loads and stores among a kernel's SASS counts (a tile read one value at a time)."""
    return {op: n for op, n in ops.items() if op.split(".")[0] in ("LDG", "STG") and op.endswith(("U16", "S16"))}


def op_case(op: str, grid: tuple[int, ...], batch: int, heads: int, head_dim: int, num_prefix: int,
            layout: str, backward: bool) -> Callable[[], None]:
    """A call of one op (``OPS``) in bf16 on q, k, v laid out as the models make them (``layout`` "projection":
    views of one (B, N, 3, h, d) tensor) or as separate (B, h, N, d) tensors ("heads"), forward (and backward)."""

    def case() -> None:
        name, options = OPS[op]
        n = num_prefix + math.prod(grid)
        if layout == "projection":
            (q, k, v), leaf = projection_views(batch, n, heads, head_dim)
            leaves = [leaf]
        else:
            q, k, v = leaves = [torch.randn(batch, heads, n, head_dim).bfloat16().requires_grad_() for _ in range(3)]
        out = getattr(kernels, name)(q, k, v, grid=grid, num_prefix=num_prefix, backend="triton", **options)
        if backward:
            torch.autograd.grad(out, leaves, torch.randn_like(out))

    return case


def _row(name: str, kernel: dict) -> str:
    ops = kernel["ops"]
    count = lambda *prefixes: sum(n for op, n in ops.items() if op.startswith(prefixes))  # noqa: E731
    wide = sum(n for op, n in ops.items() if op.startswith(("LDG", "LDGSTS")) and op.endswith("128"))
    return (f"{name}\n    registers {kernel['registers']}, spilled {kernel['spills']} B, shared {kernel['shared']} B;"
            f" 16-byte loads {wide}, 16-bit scalar accesses {sum(narrow_accesses(ops).values())},"
            f" async copies {count('LDGSTS')}, MMA {count('HMMA', 'HGMMA')}, shuffles {count('SHFL')},"
            f" barriers {count('BAR')}, local memory {count('STL', 'LDL')}")


def _grid(text: str) -> tuple[int, ...]:
    """HxW or TxHxW (positive ints) for ``--grid``."""
    try:
        grid = tuple(int(x) for x in text.split("x"))
    except ValueError:
        grid = ()
    if len(grid) not in (2, 3) or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW or TxHxW with positive sides, e.g. 64x64, got {text!r}")
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=sorted(OPS), required=True)
    parser.add_argument("--grid", type=_grid, default="64x64", help="HxW or TxHxW tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--num-prefix", type=int, default=0)
    parser.add_argument("--layout", choices=["projection", "heads"], default="projection")
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":     # the kernels must be interpreted from their import on
        env = dict(os.environ, TRITON_INTERPRET="1")
        sys.exit(subprocess.run([sys.executable, "-m", __spec__.name, *(argv or sys.argv[1:])], env=env).returncode)
    case = op_case(args.op, args.grid, args.batch, args.heads, args.head_dim, args.num_prefix, args.layout,
                   not args.forward_only)
    with recording_launches(run_kernels=False) as launches:
        case()
    result = compile_for_sm90(launches)
    print(f"{args.op} grid {'x'.join(map(str, args.grid))}, B {args.batch}, {args.heads} heads, d {args.head_dim}, "
          f"{args.layout} layout (sm_90, Triton's ptxas; per thread)")
    for name, kernel in result["kernels"].items():
        print(_row(name.replace("subquad.kernels.", ""), kernel))
    for failure in result["failures"]:
        print("FAILED", failure)


if __name__ == "__main__":
    main()
