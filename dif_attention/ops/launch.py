"""What the dispatcher (:func:`dif_attention.decoupled_attention`) asks of the fused kernels: can they run a
case (``available``, ``unsupported_reasons``), and the launcher over already-folded tensors.

    q, k    : (b, h, n, E)    the folded per-source queries/keys (dif_attention.fusion.fold_sources)
    v       : (b, h, n, ev)   dense with a unit last stride, dims in any order (a head split needs no copy)
    bias    : (1|h, n|1, n) or (1, h|1, n|1, n), or None: batch-independent raw-score table (gets a gradient)
    mask    : bool, 4-d, broadcastable to (b, h, n, n), or None (True = may attend)
    lengths : (b,) int or None: positions >= lengths[b] are padding (masked as keys and as queries)
    -> (b, h, n, ev)

This module imports only the ground floor (errors, masks, fusion); it never calls back into the dispatcher.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import check_integer, check_tensor, fail
from ..fusion import Fusion, folded_width, get_fusion
from ..masks import as_4d

__all__ = ["available", "interpreted", "unsupported_reasons", "attention", "MAX_WIDTH"]

#: widest folded query/key width and value width the kernel takes (register budget per tile)
MAX_WIDTH = 512
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` was set before
    triton was first imported (triton's own ``tl.zeros`` etc. are decorated then) and before these
    kernels were decorated."""
    if not _triton_installed():
        return False
    import triton.language.standard as std

    from . import kernels

    return all(type(f).__name__ == "InterpretedFunction" for f in (kernels.attention_fwd, std.zeros))


def available() -> bool:
    """Triton is installed and there is somewhere to run the kernels (CUDA, or the interpreter)."""
    return _triton_installed() and (torch.cuda.is_available() or interpreted())


def unsupported_reasons(queries: Sequence[Tensor], keys: Sequence[Tensor], value: Tensor, *,
                        fusion: "str | Fusion" = "add") -> list[str]:
    """Why the fused kernels cannot run this case (empty list: they can). The dispatcher falls back to
    SDPA under ``backend="auto"`` and raises ``DIFError`` listing these under ``backend="triton"``."""
    if not _triton_installed():
        return ["triton is not installed (pip install 'dif-attention[triton]')"]
    reasons = []
    dev = value.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreted())):
        reasons.append(f"value is on {dev}: the kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1, set "
                       "before triton is first imported)")
    if value.dtype not in _DTYPES:
        reasons.append(f"dtype {value.dtype}: the kernel takes float16, bfloat16 or float32")
    if value.dtype == torch.bfloat16 and dev.type == "cpu":
        reasons.append("bfloat16 under TRITON_INTERPRET=1: the interpreter's tl.dot mishandles bf16 "
                       "(triton-lang/triton#11584); use float16/float32 or a GPU")
    if queries[0].shape[-2] != value.shape[-2]:
        reasons.append(f"{queries[0].shape[-2]} query rows over {value.shape[-2]} keys: the kernel takes as many "
                       "queries as keys")
    e = folded_width(queries, keys, get_fusion(fusion))
    if e > MAX_WIDTH:
        reasons.append(f"folded query/key width {e} > {MAX_WIDTH}")
    if value.shape[-1] > MAX_WIDTH:
        reasons.append(f"value width {value.shape[-1]} > {MAX_WIDTH}")
    return reasons


def _dense(t: Tensor) -> bool:
    """Unit last stride and no gaps or overlaps (dims may be permuted, e.g. (b, n, h, e) seen as (b, h, n, e))."""
    if t.stride(-1) != 1:
        return False
    expected = 1
    for d in sorted(range(t.ndim), key=lambda d: (t.stride(d), -d)):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _kernel_mask(mask: Tensor | None, is_causal: bool):
    """(mask for the kernel or None, causal flag). The kernel ANDs the flag and the mask, so passing
    both is always exact. A CPU mask equal to the causal one becomes the flag alone; on CUDA (and under
    torch.compile) that check would be a host sync, so the mask is read as given."""
    if mask is None:
        return None, is_causal
    m = as_4d(mask)
    if (is_causal and m.shape[:2] == (1, 1) and m.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(torch.equal(m[0, 0], torch.ones_like(m[0, 0]).tril()))):
        return None, True
    return m, is_causal


def _check_lengths(lengths, b, device):
    check_tensor("lengths", lengths, ndim=1)
    check_integer("lengths", lengths, "an integer tensor of sequence lengths")
    if lengths.shape[0] != b:
        fail("lengths", f"shape ({b},) = (b,)", lengths.shape)
    if lengths.device != device:
        fail("lengths", f"device {device} (the device of value)", f"device {lengths.device}")
    return lengths.to(torch.int32).contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None = None,
              mask: Tensor | None = None, lengths: Tensor | None = None, is_causal: bool = False,
              dropout_p: float = 0.0, seed: int | None = None, block: int | None = None) -> Tensor:
    """One fused attention over folded ``q``/``k`` (see the module docstring for shapes): softmax over keys of
    ``scale * (q @ k^T + bias)``, masked. ``scale`` is the caller's (``1/sqrt(e_0)`` of the item source in
    :func:`~dif_attention.decoupled_attention`, not one over the folded width).

    ``seed``: the dropout seed (default: drawn from torch's generator, so ``torch.manual_seed`` makes runs
    reproducible); ``block``: force a tile size (a power of two >= 16; tests use it to cover multi-tile loops).
    The inputs are taken as checked (the dispatcher validated them); only the kernel's own arguments are
    checked here.
    """
    b, h, n, e = q.shape
    if lengths is not None:
        lengths = _check_lengths(lengths, b, v.device)
    if block is not None and (block < 16 or block & (block - 1)):
        fail("block", "a power of two >= 16 (or None)", repr(block))
    scale = float(scale)
    if bias is not None:  # one (h, n, n) table in v's dtype
        bias = bias.reshape(bias.shape[-3:]) if bias.ndim == 4 else bias
        bias = bias.to(v.dtype).expand(h, n, n).contiguous()
    # fusion parameters may promote a source (fp32 weight x half q under autocast): one dtype for the kernel
    q, k = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous()
    mask, causal = _kernel_mask(mask, is_causal)
    seed_t = None
    if dropout_p > 0:
        if seed is None:
            seed_t = torch.randint(0, 2 ** 31 - 1, (1,), device=v.device, dtype=torch.int64)
        else:
            seed_t = torch.tensor([int(seed)], device=v.device, dtype=torch.int64)
    from .attention_op import fused_attention

    v = v if _dense(v) else v.contiguous()  # a head split (b, n, h, e) is read in place
    out, _ = fused_attention(q, k, v, bias, mask, lengths, seed_t, causal, scale, float(dropout_p), int(block or 0))
    return out
