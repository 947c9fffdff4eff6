"""The math of decoupled attention, as functions.

Shape legend (einops style)::

    queries[s], keys[s] : (b, h, n, e_s)   source s; s = 0 is the item stream; e_s may differ per
                                           source; the batch dim may be 1 for a batch-independent
                                           source (the position stream)
    value               : (b, h, n, e_v)   from the item stream only; e_v may differ from every e_s
    mask                : bool, broadcastable to (b, h, n, n); True = query i may attend to key j
    output              : (b, h, n, e_v)

Semantics (``backend="torch"`` computes exactly this, materialising every matrix)::

    S_s   = queries[s] @ keys[s]^T                     (b, h, n, n) per source, unscaled
    S     = fusion(S_0, ..., S_{s-1})                  add / concat / gate, before any scaling
    P     = softmax(scale * S  masked to -inf where ~mask)   rows with no allowed key -> all 0
    out   = dropout(P, dropout_p) @ value

``scale`` defaults to ``1 / sqrt(e_0)``, the *item* head width, for every source (as the
reference implementation). The fast path (``backend="sdpa"``) folds the fusion into one
``scaled_dot_product_attention`` call over concatenated queries/keys; batch-independent sources
become one shared ``(h, n, n)`` score bias computed once instead of once per batch row.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check_finite as _check_finite
from .errors import check_tensor, fail
from .fusion import Fusion, get_fusion
from .masks import check_mask, combine_masks

__all__ = ["decoupled_attention", "reference_attention", "BACKENDS"]

BACKENDS = ("auto", "torch", "sdpa", "math", "triton")


def _validate(queries, keys, value, check_finite: bool):
    if not isinstance(queries, (list, tuple)) or not isinstance(keys, (list, tuple)):
        fail("queries", "a list of per-source tensors (and keys likewise)",
             f"{type(queries).__name__} / {type(keys).__name__}")
    if len(queries) == 0:
        fail("queries", "at least one source", "an empty list")
    if len(queries) != len(keys):
        fail("keys", f"{len(queries)} tensors, one per query source", f"{len(keys)} tensors")
    check_tensor("value", value, ndim=4, floating=True)
    b, h, n, _ = value.shape
    for s, (q, k) in enumerate(zip(queries, keys)):
        check_tensor(f"queries[{s}]", q, ndim=4, floating=True)
        check_tensor(f"keys[{s}]", k, ndim=4, floating=True)
        for name, t in ((f"queries[{s}]", q), (f"keys[{s}]", k)):
            if t.shape[0] not in (1, b) or t.shape[1:3] != (h, n):
                fail(name, f"shape ({b} or 1, {h}, {n}, e_{s}) to match value (b, h, n, e_v)={tuple(value.shape)}",
                     t.shape)
            if t.dtype != value.dtype:
                fail(name, f"dtype {value.dtype} (the dtype of value)", f"dtype {t.dtype}")
            if t.device != value.device:
                fail(name, f"device {value.device} (the device of value)", f"device {t.device}")
        if q.shape[-1] != k.shape[-1]:
            fail(f"keys[{s}]", f"width e_{s}={q.shape[-1]} (the width of queries[{s}])", k.shape)
    if check_finite:
        for s, (q, k) in enumerate(zip(queries, keys)):
            _check_finite(f"queries[{s}]", q)
            _check_finite(f"keys[{s}]", k)
        _check_finite("value", value)
    return b, h, n


def _prepare(queries, keys, value, mask, is_causal, fusion, scale, dropout_p, check_finite):
    b, h, n = _validate(queries, keys, value, check_finite)
    fusion = get_fusion(fusion)
    fusion.check(len(queries), n)
    mask = check_mask(mask, b, h, n)
    if mask is not None and mask.device != value.device:
        fail("mask", f"device {value.device} (the device of value)", f"device {mask.device}")
    allowed = combine_masks(mask, is_causal, n, value.device)
    if scale is None:
        scale = 1.0 / math.sqrt(queries[0].shape[-1])
    elif not (math.isfinite(float(scale)) and float(scale) > 0):
        fail("scale", "a finite positive float (or None for 1/sqrt(e_0))", repr(scale))
    if not (0.0 <= float(dropout_p) < 1.0):
        fail("dropout_p", "a probability in [0, 1)", repr(dropout_p))
    return b, h, n, fusion, allowed, float(scale)


def reference_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], value: Tensor, *, mask=None,
                        is_causal: bool = False, fusion: "str | Fusion" = "add", scale: float | None = None,
                        dropout_p: float = 0.0, check_finite: bool = False):
    """The oracle: materialises every score matrix. Returns ``(out, maps)`` where ``maps`` is a dict
    with ``"sources"`` (list of raw ``S_s``), ``"fused"`` (raw fused ``S``) and ``"probs"`` (``P``)."""
    b, h, n, fusion, allowed, scale = _prepare(queries, keys, value, mask, is_causal, fusion, scale,
                                               dropout_p, check_finite)
    return _reference(queries, keys, value, allowed, fusion, scale, dropout_p)


def _masked_softmax(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over keys where ``allowed``; rows with no allowed key give all zeros (and zero gradients)."""
    if allowed is None:
        return logits.softmax(-1)
    row_ok = allowed.any(-1, keepdim=True)
    logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(~row_ok, 0.0)
    return logits.softmax(-1) * row_ok


def _reference(queries, keys, value, allowed, fusion, scale, dropout_p):
    scores = [q @ k.transpose(-1, -2) for q, k in zip(queries, keys)]
    fused = fusion.combine(scores, allowed)
    probs = _masked_softmax(fused * scale, allowed)
    attn = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    out = attn @ value
    return out, {"sources": scores, "fused": fused, "probs": probs}


def _fold(queries, keys, value, allowed, fusion):
    """Fold the fusion into ``(q, k, bias)``: one attention over ``q, k`` (concatenated per-source
    widths) plus an additive raw-score ``bias`` (``(1|b, h|1, n|1, n)`` or None) computes the fused scores."""
    b = value.shape[0]
    qs, ks, key_bias = fusion.fold(list(queries), list(keys), allowed)
    bias = None if key_bias is None else key_bias.reshape(1, 1, 1, -1)
    if b > 1:
        shared = [i for i, (q, k) in enumerate(zip(qs, ks)) if q.shape[0] == 1 and k.shape[0] == 1]
        if shared and len(shared) < len(qs):
            for i in shared:
                term = qs[i] @ ks[i].transpose(-1, -2)  # (1, h, n, n): once, not once per batch row
                bias = term if bias is None else bias + term
            qs = [q for i, q in enumerate(qs) if i not in shared]
            ks = [k for i, k in enumerate(ks) if i not in shared]
    q = qs[0].expand(b, -1, -1, -1) if len(qs) == 1 else torch.cat([t.expand(b, -1, -1, -1) for t in qs], -1)
    k = ks[0].expand(b, -1, -1, -1) if len(ks) == 1 else torch.cat([t.expand(b, -1, -1, -1) for t in ks], -1)
    return q, k, bias


def _math(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p):
    """One materialised score matrix over the folded q/k (never one per source)."""
    q, k, bias = _fold(queries, keys, value, allowed, fusion)
    logits = q @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    probs = _masked_softmax(logits * scale, allowed)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ value


def _sdpa(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p):
    """One ``scaled_dot_product_attention`` call over the folded q/k."""
    q, k, bias = _fold(queries, keys, value, allowed, fusion)
    causal_only = is_causal and allowed is not None and allowed.ndim == 2
    if bias is None:
        if causal_only:
            return _sdpa_causal(q, k, value, dropout_p, scale)
        return _sdpa_call(q, k, value, allowed, dropout_p, scale)
    attn_mask = bias * scale
    if allowed is not None:
        attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    return _sdpa_call(q, k, value, attn_mask, dropout_p, scale)


def _sdpa_causal(q, k, v, dropout_p, scale):
    e, ev = q.shape[-1], v.shape[-1]
    if e != ev and v.device.type == "cpu" and dropout_p == 0.0:
        w = max(e, ev)
        q, k, vp = F.pad(q, (0, w - e)), F.pad(k, (0, w - e)), F.pad(v, (0, w - ev))
        return F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=scale)[..., :ev]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


def _sdpa_call(q, k, v, attn_mask, dropout_p, scale):
    # Rows whose mask is all False (or all -inf) come back as zeros with zero gradients (tested).
    # SDPA's CPU flash kernel needs equal q/k and v widths and no dropout; otherwise CPU falls back to the
    # slower math kernel. Zero-padding the narrower side keeps the result exact and makes flash eligible.
    e, ev = q.shape[-1], v.shape[-1]
    if e != ev and v.device.type == "cpu" and dropout_p == 0.0:
        if e > ev:
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, e - ev)), attn_mask=attn_mask, scale=scale)
            return out[..., :ev]
        q, k = F.pad(q, (0, ev - e)), F.pad(k, (0, ev - e))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def decoupled_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], value: Tensor, *, mask: Tensor | None = None,
                        is_causal: bool = False, fusion: "str | Fusion" = "add", scale: float | None = None,
                        dropout_p: float = 0.0, backend: str = "auto", check_finite: bool = False) -> Tensor:
    """Decoupled attention over per-source queries/keys and item-only values.

    Args:
        queries, keys: per-source ``(b|1, h, n, e_s)`` tensors, source 0 = item stream.
        value: ``(b, h, n, e_v)``.
        mask: bool, broadcastable to ``(b, h, n, n)``, True = may attend.
        is_causal: also apply the causal mask (combined with ``mask`` by ``&``).
        fusion: ``"add"`` or a :class:`~dif_attention.fusion.Fusion` module (``ConcatFusion``/``GateFusion``
            carry parameters, so pass an instance bound to ``len(queries)`` sources).
        scale: multiplies the *fused* scores; default ``1/sqrt(e_0)``.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        backend: ``"torch"`` (the oracle: one score matrix per source), ``"sdpa"`` (one fused SDPA call),
            ``"math"`` (one materialised score matrix over the folded q/k), ``"triton"`` (the fused kernel,
            CUDA), or ``"auto"`` (sdpa; on CPU with gradients and ``n <= 128``, math; triton on CUDA only
            with ``DIF_ATTENTION_TRITON=1`` until the kernels are validated on a GPU).
        check_finite: raise ``DIFError`` on NaN/inf inputs.

    Returns ``(b, h, n, e_v)``. Query rows with no allowed key return zeros.
    """
    if backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", repr(backend))
    b, h, n, fusion, allowed, scale = _prepare(queries, keys, value, mask, is_causal, fusion, scale,
                                               dropout_p, check_finite)
    if backend == "torch":
        return _reference(queries, keys, value, allowed, fusion, scale, dropout_p)[0]
    if backend == "triton" or (backend == "auto" and _triton_usable(value)):
        from .ops import triton_decoupled_attention  # lazy: the package works without triton
        return triton_decoupled_attention(queries, keys, value, allowed=allowed, is_causal=is_causal,
                                          fusion=fusion, scale=scale, dropout_p=dropout_p,
                                          strict=backend == "triton")
    if backend == "math" or (backend == "auto" and _prefer_math(value, queries)):
        return _math(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p)
    return _sdpa(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p)


def _prefer_math(value: Tensor, queries) -> bool:
    """On CPU, SDPA's flash backward loses to one materialised matmul-softmax at short lengths when
    gradients are needed; its forward, and long sequences, favour SDPA (benchmarks/attention_speed.py)."""
    if value.device.type != "cpu" or not torch.is_grad_enabled() or value.shape[-2] > MATH_MAX_N:
        return False
    return value.requires_grad or any(q.requires_grad for q in queries)


#: on CPU with gradients, ``"auto"`` uses the ``"math"`` path up to this length (see ``_prefer_math``)
MATH_MAX_N = 128


def _triton_usable(value: Tensor) -> bool:
    """``"auto"`` picks the Triton kernels only on CUDA and, until they have been validated on a GPU
    (benchmarks/gpu_check.sh; none was available when they were written), only when the user opts in
    with ``DIF_ATTENTION_TRITON=1``. ``backend="triton"`` always uses them."""
    if not value.is_cuda or os.environ.get("DIF_ATTENTION_TRITON") != "1":
        return False
    try:
        from . import ops
    except ImportError:
        return False
    return ops.available()
