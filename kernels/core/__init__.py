"""Pieces every family shares: dispatch (backends with declared requirements), the family records,
argument checks, the 2D tile layout, gathered-attention references, 2D RoPE, per-grid constants under
torch.compile, test tolerances, and the Triton common module and op registration."""
