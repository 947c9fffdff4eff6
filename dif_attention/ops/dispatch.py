"""``backend="triton"``: fold the fusion into one attention and call the fused kernel.

    queries[s], keys[s] : (b|1, h, n, e_s)   per source (source 0 = items)
    value               : (b, h, n, e_v)
    allowed             : bool, broadcastable to (b, h, n, n), or None (True = may attend)
    lengths             : (b,) int or None   positions >= lengths[b] are padding (masked as keys and
                                             as queries: their rows return zeros)
    -> (b, h, n, e_v)

Folding (``reference/kernels.md`` section 0): add/concat/gate all become ``sum_s q'_s k'_s^T (+ bias)``.
Sources whose q and k are batch-independent (batch dim 1; the position stream) become one shared
``(h, n, n)`` table computed once per call instead of once per batch row; the paper-exact concat's
key bias becomes one more shared source of width 1; the paper-exact gate's energies come from the
fused energy kernel (:mod:`dif_attention.ops.gate_op`).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ..errors import DIFError, check_tensor, fail
from ..fusion import GateFusion, get_fusion
from ..masks import check_mask

__all__ = ["available", "unsupported_reasons", "triton_decoupled_attention", "MAX_WIDTH"]

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
    """Triton is installed and there is somewhere to run the kernels (CUDA, or the interpreter).
    ``DIF_ATTENTION_TRITON=0`` in the environment turns the kernels off (``"auto"`` then never picks them)."""
    if os.environ.get("DIF_ATTENTION_TRITON") == "0" or not _triton_installed():
        return False
    return torch.cuda.is_available() or interpreted()


def folded_width(queries, keys, fusion) -> int:
    """The query/key width the kernel sees after folding (batch-independent sources leave it)."""
    b = max(k.shape[0] for k in keys)
    fusion = get_fusion(fusion)
    widths = [q.shape[-1] for q in queries]
    if b > 1 and not (isinstance(fusion, GateFusion)):  # gates make every source batch-dependent
        per_batch = [q.shape[-1] for q, k in zip(queries, keys) if max(q.shape[0], k.shape[0]) > 1]
        if per_batch:
            widths = per_batch
    return sum(widths)


def unsupported_reasons(queries, keys, value, *, fusion="add") -> list[str]:
    """Why ``backend="triton"`` cannot run this case (empty list: it can). ``"auto"`` falls back to
    the SDPA path when this is not empty; ``"triton"`` raises ``DIFError`` listing these reasons."""
    if not _triton_installed():
        return ["triton is not installed (pip install 'dif-attention[triton]')"]
    reasons = []
    if os.environ.get("DIF_ATTENTION_TRITON") == "0":
        reasons.append("the kernels are turned off (DIF_ATTENTION_TRITON=0)")
    dev = value.device
    if not (dev.type == "cuda" or (dev.type == "cpu" and interpreted())):
        reasons.append(f"value is on {dev}: the kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1, set "
                       "before triton is first imported)")
    if value.dtype not in _DTYPES:
        reasons.append(f"dtype {value.dtype}: the kernel takes float16, bfloat16 or float32")
    if value.dtype == torch.bfloat16 and dev.type == "cpu":
        reasons.append("bfloat16 under TRITON_INTERPRET=1: the interpreter's tl.dot mishandles bf16 "
                       "(triton-lang/triton#11584); use float16/float32 or a GPU")
    e = folded_width(queries, keys, fusion)
    if e > MAX_WIDTH:
        reasons.append(f"folded query/key width {e} > {MAX_WIDTH}")
    if value.shape[-1] > MAX_WIDTH:
        reasons.append(f"value width {value.shape[-1]} > {MAX_WIDTH}")
    return reasons


def _fold(queries, keys, allowed_for_fold, fusion, b, *, dtype=None, gate_kernel: bool = True):
    """-> (q (b, h, n, E), k (b, h, n, E), bias (h, n, n) or None), all contiguous. ``gate_kernel=False``
    computes the paper-exact gate with the fusion's own torch code (for other attention providers);
    ``dtype`` (default: the first query's) is the dtype of the returned q and k."""
    dtype = dtype or queries[0].dtype
    if gate_kernel and isinstance(fusion, GateFusion) and fusion.max_len is not None:
        from .gate_op import paper_gates

        g = paper_gates(list(queries), list(keys), fusion)  # (b|1, h, n, s)
        qs, ks, key_bias = [g[..., s:s + 1] * q for s, q in enumerate(queries)], list(keys), None
    else:
        qs, ks, key_bias = fusion.fold(list(queries), list(keys), allowed_for_fold)
    h, n = queries[0].shape[1], queries[0].shape[2]
    if key_bias is not None:  # additive per-key bias c_j == one more source: q = 1, k = c
        qs.append(torch.ones(1, h, n, 1, dtype=qs[0].dtype, device=qs[0].device))
        ks.append(key_bias.to(ks[0].dtype).reshape(1, 1, n, 1).expand(1, h, n, 1))
    bias = None
    shared = [i for i, (q, k) in enumerate(zip(qs, ks)) if q.shape[0] == 1 and k.shape[0] == 1] if b > 1 else []
    if shared and len(shared) < len(qs):
        for i in shared:
            term = (qs[i] @ ks[i].transpose(-1, -2))[0]  # (h, n, n): once, not once per batch row
            bias = term if bias is None else bias + term
        qs = [q for i, q in enumerate(qs) if i not in shared]
        ks = [k for i, k in enumerate(ks) if i not in shared]
    # fusion parameters may promote a source (fp32 weight x half q under autocast): one dtype for the kernel
    q = torch.cat([t.expand(b, -1, -1, -1).to(dtype) for t in qs], -1).contiguous()
    k = torch.cat([t.expand(b, -1, -1, -1).to(dtype) for t in ks], -1).contiguous()
    return q, k, (None if bias is None else bias.contiguous())


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


def _kernel_mask(allowed: Tensor | None, is_causal: bool, n: int):
    """(mask for the kernel or None, causal flag). The kernel ANDs the flag and the mask, so passing
    both is always exact. A 2-d CPU mask equal to the causal one becomes the flag alone; on CUDA (and
    under torch.compile) that check would be a host sync, so the small (n, n) mask is read from L2."""
    if allowed is None:
        return None, is_causal
    if (allowed.ndim == 2 and is_causal and allowed.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(torch.equal(allowed, torch.ones_like(allowed).tril()))):
        return None, True
    m = allowed.reshape((1,) * (4 - allowed.ndim) + tuple(allowed.shape))
    return m, is_causal


def _check_lengths(lengths, b, n, device):
    check_tensor("lengths", lengths, ndim=1)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        fail("lengths", "an integer tensor of sequence lengths", f"dtype {lengths.dtype}")
    if lengths.shape[0] != b:
        fail("lengths", f"shape ({b},) = (b,)", lengths.shape)
    if lengths.device != device:
        fail("lengths", f"device {device} (the device of value)", f"device {lengths.device}")
    return lengths.to(torch.int32).contiguous()


def _lengths_allowed(lengths, n):
    pos = torch.arange(n, device=lengths.device)
    valid = pos[None, :] < lengths[:, None]  # (b, n)
    return valid[:, None, :, None] & valid[:, None, None, :]  # (b, 1, n, n)


def _fold_mask(allowed, is_causal, lengths, n, device):
    """The combined bool mask, for fusions whose fold reads it (the default gate)."""
    m = allowed
    if lengths is not None:
        la = _lengths_allowed(lengths, n)
        m = la if m is None else m & la
    if is_causal:
        c = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        m = c if m is None else m & c
    return m


def triton_decoupled_attention(queries, keys, value, *, allowed: Tensor | None = None, is_causal: bool = False,
                               fusion="add", scale: float | None = None, dropout_p: float = 0.0,
                               strict: bool = True, lengths: Tensor | None = None, seed: int | None = None,
                               block: int | None = None) -> Tensor:
    """Decoupled attention through the fused Triton kernel.

    Args beyond :func:`dif_attention.decoupled_attention`'s: ``allowed`` -- the bool mask (True = may
    attend), combined with ``is_causal`` and ``lengths`` by ``&``; ``lengths`` -- ``(b,)`` right-padding
    lengths (padded query rows return zeros); ``strict`` -- raise ``DIFError`` when the case is not
    supported (else fall back to the SDPA path); ``seed`` -- the dropout seed (default: drawn from
    torch's generator, so ``torch.manual_seed`` makes runs reproducible); ``block`` -- force a tile size
    (a power of two >= 16; tests use it to cover multi-tile loops).
    """
    from ..functional import _validate

    b, h, n = _validate(queries, keys, value, False)
    fusion = get_fusion(fusion)
    fusion.check(len(queries), n)
    if allowed is not None:
        checked = check_mask(allowed, b, h, n, arg="allowed")
        allowed = allowed if (allowed.ndim == 2 and is_causal) else checked  # keep a 2-d causal mask 2-d
    if allowed is not None and allowed.device != value.device:
        fail("allowed", f"device {value.device} (the device of value)", f"device {allowed.device}")
    if lengths is not None:
        lengths = _check_lengths(lengths, b, n, value.device)
    if scale is None:
        scale = 1.0 / math.sqrt(queries[0].shape[-1])
    if not (0.0 <= float(dropout_p) < 1.0):
        fail("dropout_p", "a probability in [0, 1)", repr(dropout_p))
    if block is not None and (block < 16 or block & (block - 1)):
        fail("block", "a power of two >= 16 (or None)", repr(block))
    reasons = unsupported_reasons(queries, keys, value, fusion=fusion)
    if reasons:
        if strict:
            raise DIFError("backend: expected a case the Triton kernel supports (backend='triton'), got: "
                           + "; ".join(reasons))
        from ..functional import _sdpa

        if allowed is None and lengths is None:  # causal or nothing: SDPA's own fast paths
            return _sdpa(queries, keys, value, _fold_mask(None, is_causal, None, n, value.device), is_causal,
                         fusion, float(scale), float(dropout_p))
        mask = _fold_mask(allowed, is_causal, lengths, n, value.device)  # fully combined, made 4-d so that
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # _sdpa never reads it as causal-only
        return _sdpa(queries, keys, value, mask, False, fusion, float(scale), float(dropout_p))
    needs_mask = isinstance(fusion, GateFusion) and fusion.max_len is None
    fold_mask = _fold_mask(allowed, is_causal, lengths, n, value.device) if needs_mask else None
    q, k, bias = _fold(queries, keys, fold_mask, fusion, b, dtype=value.dtype)
    mask, causal = _kernel_mask(allowed, is_causal, n)
    seed_t = None
    if dropout_p > 0:
        if seed is None:
            seed_t = torch.randint(0, 2 ** 31 - 1, (1,), device=value.device, dtype=torch.int64)
        else:
            seed_t = torch.tensor([int(seed)], device=value.device, dtype=torch.int64)
    from .attention_op import fused_attention

    value = value if _dense(value) else value.contiguous()  # a head split (b, n, h, e) is read in place
    out, _ = fused_attention(q, k, value, bias, mask, lengths, seed_t, causal, float(scale),
                             float(dropout_p), int(block or 0))
    return out
