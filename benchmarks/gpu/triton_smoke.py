"""One trivial Triton kernel: fails fast when Triton cannot compile or launch on this machine."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


def add_matches_torch(device: str = "cuda", n: int = 1000) -> bool:
    """``x + y`` by the kernel equals torch's (CPU tensors need ``TRITON_INTERPRET=1``)."""
    x = torch.randn(n, device=device)
    y = torch.randn(n, device=device)
    out = torch.empty_like(x)
    _add[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
    return torch.equal(out, x + y)
