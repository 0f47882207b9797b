"""The byte alignment of tensor rows, and the aligned copies SDPA gets."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from subquad.kernels.core.alignment import row_alignment, rows_aligned
from subquad.kernels.core.testing import projection_views


def test_row_alignment_is_the_gcd_of_every_rows_address_in_bytes():
    """row_alignment: 16 for contiguous rows of 8 bf16 values; a view starting one value in, a token stride of an
    odd number of values or of 12 bytes lowers it to what every row's address is divisible by; a broadcast batch
    or head (stride 0) does not lower it."""
    x = torch.zeros(2, 3, 5, 8, dtype=torch.bfloat16)
    assert x.data_ptr() % 16 == 0
    assert row_alignment(x) == 16
    assert row_alignment(x, x.flatten()[1:].view(1, 1, -1, 1)) == 2           # starts 2 bytes in
    assert row_alignment(torch.zeros(1, 1, 6, 5, dtype=torch.bfloat16)) == 2  # rows 10 bytes apart
    assert row_alignment(torch.zeros(4, 6, 3, dtype=torch.float32)[None]) == 4   # 12-byte rows
    assert row_alignment(torch.zeros(4, 8, dtype=torch.float32)[None, None, :, :6]) == 16
    assert row_alignment(torch.zeros(1, 1, 2, 8, dtype=torch.bfloat16).expand(2, 3, 2, 8)) == 16


def test_rows_aligned_copies_only_misaligned_tensors():
    """A view starting one 16-bit value into its allocation (head dim 72, as a model's projection makes it) is
    copied to a 16-byte aligned tensor of equal values; aligned views pass through as the same objects."""
    (q, k, v), _ = projection_views(2, 17, 2, 72, offset=1)
    assert row_alignment(q) == 2
    out = rows_aligned(q[:, :, :1], k, v)
    assert all(row_alignment(x) == 16 for x in out)
    assert all(torch.equal(a, b) for a, b in zip(out, (q[:, :, :1], k, v)))
    (q, k, v), _ = projection_views(2, 17, 2, 72, offset=0)
    assert all(a is b for a, b in zip(rows_aligned(q, k, v), (q, k, v)))
    torch.testing.assert_close(F.scaled_dot_product_attention(*rows_aligned(q, k, v)),
                               F.scaled_dot_product_attention(q, k, v))
