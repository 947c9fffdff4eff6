"""Shared builders for the tests."""
from __future__ import annotations

import torch

from dif_attention import ConcatFusion, GateFusion, causal_mask, lengths_mask

FUSIONS = ["add", "concat", "concat-L", "gate", "gate-L"]
MASKS = ["none", "causal", "padding", "causal+padding", "left-padded-causal"]


def make_fusion(name: str, n: int, num_sources: int, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    if name == "add":
        return "add"
    cls = ConcatFusion if name.startswith("concat") else GateFusion
    f = cls(max_len=n if name.endswith("-L") else None, num_sources=num_sources)
    with torch.no_grad():  # move away from the (near-trivial) init so every parameter matters
        for p in f.parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.endswith("-L") else 0.5))
    return f.to(dtype)


def make_mask(name: str, b: int, n: int, seed: int = 0):
    """(mask, is_causal). Lengths are random in [1, n]; 'left-padded-causal' has fully masked rows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    if name == "none":
        return None, False
    if name == "causal":
        return None, True
    if name == "padding":
        return lengths_mask(lengths, n), False
    if name == "causal+padding":
        return lengths_mask(lengths, n), True
    if name == "left-padded-causal":
        keep = torch.arange(n)[None, :] >= (n - lengths)[:, None]  # (b, n): items at the end
        return keep[:, None, None, :] & causal_mask(n), False
    raise KeyError(name)


def make_inputs(b=2, h=2, n=7, widths=(8, 8, 4, 2), ev=6, dtype=torch.float32, shared=(1,), seed=0,
                requires_grad=True):
    """Per-source q/k (sources listed in `shared` are batch-independent: batch dim 1) and a value."""
    g = torch.Generator().manual_seed(seed)
    qs, ks = [], []
    for s, e in enumerate(widths):
        bb = 1 if s in shared else b
        qs.append(torch.randn(bb, h, n, e, generator=g, dtype=dtype).requires_grad_(requires_grad))
        ks.append(torch.randn(bb, h, n, e, generator=g, dtype=dtype).requires_grad_(requires_grad))
    v = torch.randn(b, h, n, ev, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return qs, ks, v


def block_inputs(b=3, n=9, dim=32, attr_dims={"cat": 8, "brand": 16}, seed=0):
    """``(x (b, n, dim), attrs {name: (b, n, width)}, pos (n, dim), ids (b, n))`` for an attention block; row 1
    is padded from position 5 on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g)
    attrs = {a: torch.randn(b, n, d, generator=g) for a, d in attr_dims.items()}
    pos = torch.randn(n, dim, generator=g)
    ids = torch.randint(1, 50, (b, n), generator=g)
    ids[1, 5:] = 0
    return x, attrs, pos, ids
