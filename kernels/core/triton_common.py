"""Helpers shared by the Triton kernels: the cached launch, launch geometry and strides; tile loads and
stores, matrix products with 16-bit operands (hi + lo splits of fp32 values) for the linear family; and the
flash-attention steps (FlashAttention-2, Dao 2023, Alg. 1-2) of the softmax-attention kernels (block-sparse
core, neighborhood attention), whose scores live in the log2 domain (exp2) with float32 accumulation."""
import functools
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .dispatch import INTERPRET


# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr functions
# whose every host call unwraps its arguments (microseconds each, several per launch).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def pad_dim(n: int) -> int:
    """Padded channel count: a power of two, at least 16 (the smallest tl.dot operand side)."""
    return max(16, next_power_of_2(n))


# INTERPRET (kernels run on Triton's CPU interpreter) as a constexpr, for jit functions that read it as a global
INTERPRETING = tl.constexpr(INTERPRET)
LOG2E = tl.constexpr(1.4426950408889634)     # scores in the log2 domain: exp(x) = exp2(x * LOG2E)


def precision_flags(dtype: torch.dtype) -> Dict[str, bool]:
    """LOWP: 16-bit inputs, so products take 16-bit operands (fp32 values as hi + lo pairs where it
    matters); fp32 inputs keep exact fp32 products."""
    return dict(LOWP=dtype != torch.float32)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_target(device: torch.device, per_sm: int = 4) -> int:
    """Programs that fill the device: ``per_sm`` per SM on a GPU; a handful under the CPU interpreter."""
    if device.type == "cuda":
        return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def split_tokens(groups: int, n: int, block_n: int, target: int, max_tiles: int = 1 << 30) -> Tuple[int, int]:
    """(num_splits, chunk): cut N into chunks of whole tiles so that groups * num_splits programs fill
    the device (small batch, large N) while each chunk spans at most ``max_tiles`` tiles."""
    tiles = cdiv(n, block_n)
    splits = min(tiles, max(cdiv(target, groups), cdiv(tiles, max_tiles)))
    chunk = cdiv(tiles, splits) * block_n
    return cdiv(n, chunk), chunk


LAUNCHED: Dict[str, object] = {}
# Triton releases whose launch path (JITFunction.run calling CompiledKernel.run with every bound argument in
# signature order, launch hooks as HookChain) the fast path below reproduces; others take kernel[grid] always.
_FAST_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) in {(3, 6), (3, 7), (3, 8)}
_FAST: Dict[tuple, tuple] = {}
try:        # the current stream's handle, read as Triton's own launch path reads it
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:
    _raw_stream = lambda device: torch.cuda.current_stream(device).cuda_stream    # noqa: E731
_SCALARS = frozenset((int, float, bool, type(None)))
_FAST_MAX = 4096      # cached launches before the table is cleared (new shapes, dtypes or options)


def launch(kernel, grid: Tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with the host cost of a cached launch.

    Triton's JITFunction.run binds and specialises every argument, builds a cache key from the options'
    string and launch metadata for its hooks on each call: tens of microseconds, more than these kernels
    run at small sizes. The first call for a key (kernel, device, constexpr options, each argument's
    specialisation) goes through it and compiles; later ones call the compiled kernel's launcher directly
    with the same arguments in signature order. Launch hooks (profilers) and the CPU interpreter always
    take Triton's own path. The compiled kernel is kept by name: its n_regs / n_spills feed the resource
    report of ``python -m subquad.tasks.bench.linear``."""
    key = _launch_key(kernel, args, kwargs)
    fast = _FAST.get(key) if key is not None else None
    if fast is None:
        compiled = kernel[grid](*args, **kwargs)
        LAUNCHED[kernel.__name__] = compiled
        if key is not None:
            names = kernel.arg_names[len(args):]            # the constexprs, passed by keyword
            if all(name in kwargs for name in names):
                if len(_FAST) >= _FAST_MAX:
                    _FAST.clear()
                _FAST[key] = (compiled.run, compiled.function, compiled.packed_metadata,
                              tuple(kwargs[name] for name in names))
        return
    run, function, metadata, constexprs = fast
    grid = tuple(grid) + (1, 1)
    run(grid[0], grid[1], grid[2], _raw_stream(key[1]), function, metadata, None, None, None, *args, *constexprs)


def _launch_key(kernel, args: tuple, kwargs: dict) -> Optional[tuple]:
    """(kernel, device, options, what Triton specialises each argument on: a scalar's value (exact, so never
    coarser than Triton's int specialisations), a tensor's dtype and alignment); None where the launch is not
    cached: under hooks or the interpreter, on other Triton releases, for an argument neither scalar nor
    tensor. Built inline, as a function call per argument costs more than the key."""
    if INTERPRET or not _FAST_TRITON or triton.knobs.runtime.launch_enter_hook.calls:
        return None
    try:
        return (kernel, torch.cuda.current_device(), *kwargs.items(),
                *[a if a.__class__ in _SCALARS else (a.dtype, a.data_ptr() & 15) for a in args])
    except AttributeError:
        return None


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride on its last axis (a copy only when it has not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, head, token) strides of a (B, h, N, ...) tensor; a broadcast (size-1) batch or head gets 0."""
    shape, stride = x.shape, x.stride()
    return (0 if shape[0] == 1 else stride[0], 0 if shape[1] == 1 else stride[1], 0 if shape[2] == 1 else stride[2])


def head_strides(x: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """x (B, h, N, d) with unit stride on d (copied if not) and its (batch, head, token) strides."""
    strides = x.stride()
    if strides[-1] != 1:
        x = x.contiguous()
        strides = x.stride()
    return x, strides[0], strides[1], strides[2]


@triton.jit
def load_tile(base, offs_n, offs_c, stride_n, mask_n, mask_c, ALIGN: tl.constexpr):
    """A (tokens, channels) tile in its own dtype, zero outside the masks; rows ALIGN bytes aligned (``row_ptrs``)."""
    return tl.load(row_ptrs(base, offs_n, stride_n, ALIGN)[:, None] + offs_c[None, :],
                   mask=mask_n[:, None] & mask_c[None, :], other=0.0)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """fp32 x rounded to nearest-even in DT, as the GPU converts. The CPU interpreter truncates
    fp32 -> bfloat16, so there the bits are rounded first (the usual add-0x7fff-plus-odd-bit trick)."""
    if INTERPRETING and DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DT)


@triton.jit
def store_tile(base, offs_n, offs_c, stride_n, mask_n, mask_c, value, ALIGN: tl.constexpr):
    ptrs = row_ptrs(base, offs_n, stride_n, ALIGN)[:, None] + offs_c[None, :]
    tl.store(ptrs, round_to(value, base.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def dot(a, b, LOWP: tl.constexpr):
    """a @ b with fp32 accumulation: 16-bit operands as given (LOWP), exact fp32 products otherwise. The CPU
    interpreter multiplies bfloat16 bit patterns as integers, so there the (already rounded) operands are
    upcast first: the same products."""
    if LOWP:
        if INTERPRETING:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            out = tl.dot(a, b)
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def operand_dtype(x_ptr):
    """The dtype DT that fp32 intermediates are rounded to as tl.dot operands (split_operand, dot_split,
    dot_terms) in a kernel reading x_ptr's inputs: bf16 for fp16 inputs as for bf16 ones, the inputs' own
    dtype otherwise (fp32: exact fp32 products). fp16's range (6e-5 normal, 65504 largest) does not hold what
    such intermediates reach when the inputs are merely small or large (a linear-attention normaliser near its
    eps makes 1 / den about 1e6; features of about 1e-6 are fp16 subnormals); bf16 has fp32's, and hi + lo
    pairs still carry 16 bits. fp16 input tiles meeting bf16 operands are split exactly by dot_split_a and
    dot_split_b. Returned as a one-element zero of that dtype (a jit function returns tensors, not dtypes):
    ``DT = operand_dtype(x_ptr).dtype``."""
    DT = x_ptr.dtype.element_ty
    if DT == tl.float16:
        DT = tl.bfloat16
    return tl.zeros((1,), DT)


@triton.jit
def hi_lo(x, DT: tl.constexpr):
    """fp32 x as hi + lo in the 16-bit dtype DT: hi carries 8 (bf16) or 11 (fp16) bits, lo the next ones."""
    hi = round_to(x, DT)
    return hi, round_to(x - hi.to(tl.float32), DT)


@triton.jit
def split_operand(x, DT: tl.constexpr, LOWP: tl.constexpr):
    """(hi, lo) of an fp32 operand for dot_split: 16-bit parts with LOWP, (x, x) otherwise (lo unused)."""
    if LOWP:
        hi, lo = hi_lo(x, DT)
    else:
        hi, lo = x, x
    return hi, lo


@triton.jit
def dot_split(a, b_hi, b_lo, DT: tl.constexpr, LOWP: tl.constexpr):
    """a @ b for fp32 a and b given by split_operand, to about 2^-16 relative with 16-bit operands
    (hi*hi + hi*lo + lo*hi): for forward values, where the MALA combination can cancel."""
    if LOWP:
        a_hi, a_lo = hi_lo(a, DT)
        out = (dot(a_hi, b_hi, LOWP) + dot(a_hi, b_lo, LOWP)
               + dot(a_lo, b_hi, LOWP))
    else:
        out = dot(a, b_hi, LOWP)
    return out


@triton.jit
def dot_split_a(a, b, DT: tl.constexpr, LOWP: tl.constexpr):
    """a @ b for fp32 a and a 16-bit input tile b (exact): hi*b + lo*b. A b of another 16-bit dtype than DT
    (fp16 inputs with bf16 operands, see operand_dtype) is split too, exactly: hi*b_hi + lo*b_hi + hi*b_lo."""
    if LOWP:
        a_hi, a_lo = hi_lo(a, DT)
        if b.dtype == DT:
            out = dot(a_hi, b, LOWP) + dot(a_lo, b, LOWP)
        else:
            b_hi, b_lo = hi_lo(b.to(tl.float32), DT)
            out = dot(a_hi, b_hi, LOWP) + dot(a_lo, b_hi, LOWP) + dot(a_hi, b_lo, LOWP)
    else:
        out = dot(a, b, LOWP)
    return out


@triton.jit
def dot_split_b(a, b_hi, b_lo, LOWP: tl.constexpr):
    """a @ b for a 16-bit input tile a (exact) and fp32 b given by split_operand: a*hi + a*lo. An a of another
    16-bit dtype than b's parts (fp16 inputs with bf16 operands) is split too: a_hi*hi + a_hi*lo + a_lo*hi."""
    if LOWP:
        if a.dtype == b_hi.dtype:
            out = dot(a, b_hi, LOWP) + dot(a, b_lo, LOWP)
        else:
            a_hi, a_lo = hi_lo(a.to(tl.float32), b_hi.dtype)
            out = dot(a_hi, b_hi, LOWP) + dot(a_hi, b_lo, LOWP) + dot(a_lo, b_hi, LOWP)
    else:
        out = dot(a, b_hi, LOWP)
    return out


@triton.jit
def dot_round(a, b, DT: tl.constexpr, LOWP: tl.constexpr):
    """a @ b with each operand rounded once to DT: gradient products, where 2^-9 per element is ample."""
    return dot(round_to(a, DT), round_to(b, DT), LOWP)


@triton.jit
def dot_terms(a, b_hi, b_lo, DT: tl.constexpr, TERMS: tl.constexpr, LOWP: tl.constexpr):
    """a @ b for fp32 a and b = (b_hi, b_lo) from split_operand, in TERMS 16-bit products: 3 is dot_split
    (about 2^-16 relative), 2 rounds b once (a as hi + lo), 1 rounds both once (about 2^-9)."""
    if TERMS == 3:
        out = dot_split(a, b_hi, b_lo, DT, LOWP)
    elif TERMS == 2:
        out = dot_split_a(a, b_hi, DT, LOWP)
    else:
        out = dot(round_to(a, DT), b_hi, LOWP)
    return out


# --- flash-attention steps ---------------------------------------------------------------------



@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b at DOT_PRECISION."""
    if INTERPRETING:
        if a.dtype == tl.bfloat16:      # the CPU interpreter would multiply bfloat16's raw bits
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def row_ptrs(X, rows, stride, ALIGN: tl.constexpr):
    """Pointers to the rows ``rows`` of X, ``stride`` elements apart, each ALIGN bytes aligned (``row_alignment``):
    Triton assumes an alignment only for strides divisible by 16, so a row or head stride of 72 (head dim 72)
    would leave every access of a tile a 2-byte one, never pipelined. ``rows`` of one or two axes."""
    ptrs = X + rows * stride
    if len(rows.shape) == 2:
        ptrs = tl.multiple_of(ptrs, (ALIGN, ALIGN))
    else:
        ptrs = tl.multiple_of(ptrs, ALIGN)
    return ptrs


@triton.jit
def load_block(ptrs, rows, row_limit, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) block, zero outside [0, row_limit) x [0, HEAD_DIM); rows may have leading axes (a batch
    of blocks, ``ptrs`` of shape rows.shape + (BLOCK_D,))."""
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=tl.expand_dims(rows, -1) < row_limit, other=0.0)
        else:
            x = tl.load(ptrs, mask=(tl.expand_dims(rows, -1) < row_limit) & (cols < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols < HEAD_DIM, other=0.0)
    return x


@triton.jit
def store_block(ptrs, x, rows, row_limit, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=rows[:, None] < row_limit)
        else:
            tl.store(ptrs, x, mask=(rows[:, None] < row_limit) & (cols[None, :] < HEAD_DIM))
    else:
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=cols[None, :] < HEAD_DIM)


@triton.jit
def softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with the (M, N) log2-domain scores ``s`` (-inf: masked) of values ``v`` (N, d);
    or of a batch of them, (G, M, N) and (G, N, d), with (G, M) row statistics and a (G, M, d) accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, -1))
    # a row that has seen only -inf keeps a finite reference point so that exp2 gives 0, not NaN
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s - tl.expand_dims(m_ref, -1))
    l_i = l_i * alpha + tl.sum(p, -1)
    acc = dot_acc(p.to(v.dtype), v, acc * tl.expand_dims(alpha, -1), DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def softmax_finish(acc, m_i, l_i):
    """Normalized output and base-2 log-sum-exp (-inf for a query that saw no key; its output is 0)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))


@triton.jit
def recomputed_probabilities(x, DT: tl.constexpr):
    """exp2(x) for x = s - lse, the backward's recomputed scores less the forward's log-sum-exp: the
    probabilities, <= 1 in exact arithmetic. At large scores one fp32 rounding step is many log2 units (16 at
    |s| ~ 2^27, q and k ~ 1e4), so a recomputed score that rounds otherwise than the forward's (another sum
    order; transposed_scores avoids that in the block-sparse core) gives p = 2^16 or more. With DT = fp16, where
    p is cast to fp16 (largest 65504) before its products, that is inf and then NaN in the gradients, so x is
    capped at 0 there (NaN kept): one min per score, which bf16 and fp32 (whose p stays finite) skip."""
    if DT == tl.float16:
        x = tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.math.exp2(x)


@triton.jit
def scores(q, k, DOT_PRECISION: tl.constexpr):
    """q @ k^T (M, N): the unscaled scores of a query block and a key block; of a batch of them, (G, M, N) from
    (G, M, d) and (G, N, d) (batched products). The CPU interpreter's matmul and sums add in an order that follows
    the operands' shapes, so that a backward recomputing the scores on blocks of another height could round them
    otherwise than the forward did; there the products are added one head-dim column after the other, the same
    order for any M and N."""
    if INTERPRETING:
        qf, kf = q.to(tl.float32), k.to(tl.float32)
        cols = tl.arange(0, q.shape[-1])
        s = tl.zeros((*q.shape[:-1], k.shape[-2]), tl.float32)
        for c in tl.static_range(q.shape[-1]):
            qc = tl.sum(tl.where(cols == c, qf, 0.0), axis=-1)
            kc = tl.sum(tl.where(cols == c, kf, 0.0), axis=-1)
            s += tl.expand_dims(qc, -1) * tl.expand_dims(kc, -2)
    elif len(k.shape) == 3:
        s = dot_acc(q, tl.trans(k, (0, 2, 1)), None, DOT_PRECISION)
    else:
        s = dot_acc(q, tl.trans(k), None, DOT_PRECISION)
    return s


@triton.jit
def transposed_scores(k, q, DOT_PRECISION: tl.constexpr):
    """k @ q^T: the key side's (N, M) scores, rounded as the forward's ``scores(q, k)`` rounded them, so that
    exp2(s - lse) <= 1 holds for the recomputed scores too (see recomputed_probabilities). On the GPU an element
    of either orientation is the same tensor-core products, accumulated per k step in the same order (the gpu
    tests of tests/test_kernels/test_numerics.py check the outcome at scores of ~1e8); in the CPU interpreter the
    forward's scores are computed and transposed."""
    if INTERPRETING:
        s_t = tl.trans(scores(q, k, DOT_PRECISION))
    else:
        s_t = dot_acc(k, tl.trans(q), None, DOT_PRECISION)
    return s_t


@triton.jit
def dq_step(dq, s, lse, delta, do, k, v, DOT_PRECISION: tl.constexpr):
    """dQ += dS K for one key block (unscaled) from the masked log2-domain scores ``s`` (M, N); also dS."""
    p = recomputed_probabilities(s - lse[:, None], k.dtype)
    dp = dot_acc(do, tl.trans(v), None, DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dot_acc(ds.to(k.dtype), k, dq, DOT_PRECISION), ds


@triton.jit
def dkdv_step(dk, dv, s_t, lse, delta, q, do, v, DOT_PRECISION: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q (unscaled) for one query block from the transposed masked scores
    ``s_t`` (N, M) (transposed_scores); also dS^T."""
    p_t = recomputed_probabilities(s_t - lse[None, :], do.dtype)
    dv = dot_acc(p_t.to(do.dtype), do, dv, DOT_PRECISION)
    dp_t = dot_acc(v, tl.trans(do), None, DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return dot_acc(ds_t.to(q.dtype), q, dk, DOT_PRECISION), dv, ds_t


@triton.jit
def load_row_stats(LSE, Delta, rows, row_mask):
    """Log-sum-exp (+inf for a query that attends nothing or is masked, so its probabilities are 0)
    and delta, at offsets ``rows`` where ``row_mask``."""
    lse = tl.load(LSE + rows, mask=row_mask, other=float("inf"))
    delta = tl.load(Delta + rows, mask=row_mask, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse), delta


@triton.jit(do_not_specialize=["H", "Nq"])
def delta_kernel(O, DO, Delta, sob, soh, son, sdb, sdh, sdn, H, Nq,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """delta = rowsum(dO * O) per query, (B * H, Nq) float32; ALIGN: ``row_alignment(o, do)``."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = load_block(row_ptrs(O + b * sob + h * soh, rows, son, ALIGN)[:, None] + cols[None, :], rows, Nq, cols,
                   HEAD_DIM, BLOCK_D, True)
    do = load_block(row_ptrs(DO + b * sdb + h * sdh, rows, sdn, ALIGN)[:, None] + cols[None, :], rows, Nq, cols,
                    HEAD_DIM, BLOCK_D, True)
    tl.store(Delta + bh * Nq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Nq)
