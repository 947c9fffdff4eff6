"""The math of decoupled attention, as functions.

Shape legend (einops style)::

    queries[s]          : (b, h, n_q, e_s)  source s; s = 0 is the item stream; e_s may differ per
    keys[s]             : (b, h, n_k, e_s)  source; the batch dim may be 1 for a batch-independent
                                            source (the position stream); n_q <= n_k
    value               : (b, h, n_k, e_v)  from the item stream only; e_v may differ from every e_s
    mask                : bool, broadcastable to (b, h, n_q, n_k); True = query i may attend to key j
    output              : (b, h, n_q, e_v)

Usually ``n_q == n_k == n``. Fewer queries than keys are the last ``n_q`` positions (new positions over a
cache of earlier keys): query ``i`` sits at key position ``n_k - n_q + i``, which ``is_causal`` respects.

Semantics (``backend="torch"`` computes exactly this, materialising every matrix)::

    S_s   = queries[s] @ keys[s]^T                     (b, h, n_q, n_k) per source, unscaled
    S     = fusion(S_0, ..., S_{s-1})                  add / concat / gate, before any scaling
    P     = softmax(scale * S  masked to -inf where ~mask)   rows with no allowed key -> all 0
    out   = dropout(P, dropout_p) @ value

``scale`` defaults to ``1 / sqrt(e_0)``, the *item* head width, for every source (as the
reference implementation). Every fast path folds the fusion into one attention over concatenated
queries/keys (:func:`dif_attention.fusion.fold_sources`); batch-independent sources become one shared
``(h, n_q, n_k)`` score bias computed once instead of once per batch row.

This module is the only dispatcher: it validates once, asks :mod:`dif_attention.ops` whether the fused
kernels take a case (``unsupported_reasons``), and falls back to SDPA itself.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import check_finite as check_finite_values
from .errors import check_probability, check_tensor, fail
from .fusion import Fusion, GateFusion, fold_sources, get_fusion
from .masks import as_4d, check_mask, combine_masks

__all__ = ["decoupled_attention", "reference_attention", "ScoreMaps", "BACKENDS", "MATH_MAX_N", "MAX_SCALE",
           "TRITON_ENV"]

BACKENDS = ("auto", "torch", "sdpa", "math", "triton")

#: on CPU with gradients, ``"auto"`` uses the ``"math"`` path up to this length (see ``_prefer_math``)
MATH_MAX_N = 128

#: the largest ``scale=`` accepted: beyond it the scaled scores overflow (and the softmax is one-hot anyway)
MAX_SCALE = 1e4

#: the environment switch of the fused kernels: ``1`` lets ``"auto"`` use them on CUDA, ``0`` turns them off
TRITON_ENV = "DIF_ATTENTION_TRITON"


@dataclass(frozen=True)
class ScoreMaps:
    """What the softmax saw, materialised by the oracle (``return_scores=True`` everywhere in the library).

    ``sources``: source name -> raw (unscaled, unmasked) score matrix ``S_s`` ``(b|1, h, n_q, n_k)``, in source
    order. ``fused``: the raw fused scores ``S`` ``(b, h, n_q, n_k)``. ``probs``: the attention ``P`` (before
    dropout). ``gates``: the gate weights ``(b, h, n_q, s)`` of the ``gate`` fusion, else ``None``.
    ``maps["fused"]``, ``maps["probs"]``, ``maps["gates"]`` and ``maps[source name]`` index the same tensors.
    """
    sources: dict
    fused: Tensor
    probs: Tensor
    gates: Tensor | None = None

    def __getitem__(self, key: str) -> Tensor:
        if key in ("fused", "probs", "gates"):
            value = getattr(self, key)
            if value is not None:
                return value
        elif key in self.sources:
            return self.sources[key]
        raise KeyError(f"{key!r}: the score maps hold {self.keys()}")

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> list[str]:
        """The names ``maps[name]`` takes: the sources, then ``fused``, ``probs`` (and ``gates``)."""
        return list(self.sources) + ["fused", "probs"] + (["gates"] if self.gates is not None else [])


def _validate(queries, keys, value, check_finite: bool):
    if not isinstance(queries, (list, tuple)) or not isinstance(keys, (list, tuple)):
        fail("queries", "a list of per-source tensors (and keys likewise)",
             f"{type(queries).__name__} / {type(keys).__name__}")
    if len(queries) == 0:
        fail("queries", "at least one source", "an empty list")
    if len(queries) != len(keys):
        fail("keys", f"{len(queries)} tensors, one per query source", f"{len(keys)} tensors")
    check_tensor("value", value, ndim=4, floating=True)
    b, h, n_k, _ = value.shape
    check_tensor("queries[0]", queries[0], ndim=4, floating=True)
    if queries[0].shape[-1] == 0:
        fail("queries[0]", "an item head width e_0 >= 1 (the default scale is 1/sqrt(e_0))", queries[0].shape)
    n_q = queries[0].shape[2]
    if n_q > n_k:
        fail("queries[0]", f"at most n_k={n_k} query rows (the rows of value and keys; fewer queries are the last "
             "positions)", queries[0].shape)
    for s, (q, k) in enumerate(zip(queries, keys)):
        check_tensor(f"queries[{s}]", q, ndim=4, floating=True)
        check_tensor(f"keys[{s}]", k, ndim=4, floating=True)
        if q.shape[0] not in (1, b) or q.shape[1:3] != (h, n_q):
            fail(f"queries[{s}]", f"shape ({b} or 1, {h}, {n_q}, e_{s}) to match value (b, h, n_k, e_v)="
                 f"{tuple(value.shape)} and the {n_q} rows of queries[0]", q.shape)
        if k.shape[0] not in (1, b) or k.shape[1:3] != (h, n_k):
            fail(f"keys[{s}]", f"shape ({b} or 1, {h}, {n_k}, e_{s}) to match value (b, h, n_k, e_v)="
                 f"{tuple(value.shape)} (keys have the n_k rows of value; only the queries may be fewer, "
                 f"queries[0] has {n_q})", k.shape)
        for name, t in ((f"queries[{s}]", q), (f"keys[{s}]", k)):
            if t.dtype != value.dtype:
                fail(name, f"dtype {value.dtype} (the dtype of value)", f"dtype {t.dtype}")
            if t.device != value.device:
                fail(name, f"device {value.device} (the device of value)", f"device {t.device}")
        if q.shape[-1] != k.shape[-1]:
            fail(f"keys[{s}]", f"width e_{s}={q.shape[-1]} (the width of queries[{s}])", k.shape)
    if check_finite:
        for s, (q, k) in enumerate(zip(queries, keys)):
            check_finite_values(f"queries[{s}]", q)
            check_finite_values(f"keys[{s}]", k)
        check_finite_values("value", value)
    return b, h, n_q, n_k


def _prepare(queries, keys, value, mask, is_causal, fusion, scale, dropout_p, check_finite):
    """Every check of the public functions, once: -> ``(b, fusion, allowed, scale)``."""
    b, h, n_q, n_k = _validate(queries, keys, value, check_finite)
    fusion = get_fusion(fusion)
    fusion.check(len(queries), n_q, n_keys=n_k)
    mask = check_mask(mask, b, h, n_q, n_keys=n_k)
    if mask is not None and mask.device != value.device:
        fail("mask", f"device {value.device} (the device of value)", f"device {mask.device}")
    allowed = combine_masks(mask, is_causal, n_q, value.device, n_keys=n_k)
    if scale is None:
        scale = 1.0 / math.sqrt(queries[0].shape[-1])
    elif (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(float(scale))
          or not 0 < float(scale) <= MAX_SCALE):
        fail("scale", f"a positive float <= {MAX_SCALE:g} (or None for 1/sqrt(e_0)); larger scales overflow the "
             "scaled scores", repr(scale))
    check_probability("dropout_p", dropout_p)
    return b, fusion, allowed, float(scale)


def _sanitize(queries, keys, value, allowed, fusion):
    """Zero the inputs the mask makes irrelevant -- keys and values no query may attend, queries with no
    allowed key -- so NaN/inf there (uninitialised padding, say) never reaches an output or a gradient, on
    every backend alike (the score ``0 * NaN`` would). Batch-independent sources keep their shape (a
    per-batch mask cannot make them irrelevant). A lone causal mask (2-d) has no such position.

    The paper-exact fusions (``max_len`` set) read every key of a row, masked or not, as the reference does:
    their keys are left as they are (NaN in a padded key reaches them there too); values and queries are
    still cleaned, which never changes a finite result."""
    if allowed is None or allowed.ndim < 4:
        return queries, keys, value
    key_ok = allowed.any(-2).unsqueeze(-1)  # (b|1, h|1, n_k, 1): some query may attend key j
    row_ok = allowed.any(-1, keepdim=True)  # (b|1, h|1, n_q, 1): query i may attend some key
    if (allowed.device.type == "cpu" and not torch.compiler.is_compiling()  # a host sync elsewhere: skip it
            and bool(key_ok.all()) and bool(row_ok.all())):
        return queries, keys, value

    def clean(t, ok):
        if t.shape[0] == 1 and ok.shape[0] > 1:
            return t
        return torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device))

    keys = list(keys) if fusion.max_len is not None else [clean(k, key_ok) for k in keys]
    return [clean(q, row_ok) for q in queries], keys, clean(value, key_ok)


def reference_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], value: Tensor, *,
                        mask: Tensor | None = None, is_causal: bool = False, fusion: "str | Fusion" = "add",
                        scale: float | None = None, dropout_p: float = 0.0, check_finite: bool = False,
                        names: Sequence[str] | None = None) -> tuple[Tensor, ScoreMaps]:
    """The oracle: materialises every score matrix. Returns ``(out, maps)``, ``maps`` a :class:`ScoreMaps`
    whose sources are named by ``names`` (default ``"0"``, ``"1"``, ...). Arguments and shapes as
    :func:`decoupled_attention` (``n_q <= n_k`` included)."""
    _, fusion, allowed, scale = _prepare(queries, keys, value, mask, is_causal, fusion, scale, dropout_p,
                                         check_finite)
    names = [str(i) for i in range(len(queries))] if names is None else list(names)
    if len(names) != len(queries):
        fail("names", f"{len(queries)} source names, one per query source", f"{len(names)} names")
    queries, keys, value = _sanitize(queries, keys, value, allowed, fusion)
    return _reference(queries, keys, value, allowed, fusion, scale, dropout_p, names)


def _masked_softmax(logits: Tensor, allowed: Tensor | None) -> Tensor:
    """Softmax over keys where ``allowed``; rows with no allowed key give all zeros (and zero gradients)."""
    if allowed is None:
        return logits.softmax(-1)
    row_ok = allowed.any(-1, keepdim=True)
    logits = logits.masked_fill(~allowed, float("-inf")).masked_fill(~row_ok, 0.0)
    return logits.softmax(-1) * row_ok


def _score_dtype(t: Tensor) -> torch.dtype:
    """The oracle's score dtype: float16 scores are formed in float32, since ``q . k`` above 65504 would overflow
    (SDPA and the kernels accumulate in float32 too). bfloat16 has float32's range and stays bfloat16 here, each
    source's score matrix as the reference computes it; the ``math`` path forms its one folded matrix in float32."""
    return torch.float32 if t.dtype == torch.float16 else t.dtype


def _reference(queries, keys, value, allowed, fusion, scale, dropout_p, names):
    dt = _score_dtype(value)
    scores = [q.to(dt) @ k.to(dt).transpose(-1, -2) for q, k in zip(queries, keys)]
    fused = fusion.combine(scores, allowed)
    probs = _masked_softmax(fused * scale, allowed)
    attn = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    out = attn.to(value.dtype) @ value
    return out, ScoreMaps(dict(zip(names, scores)), fused, probs, fusion.weights(scores, allowed))


def _math(q, k, bias, value, allowed, scale, dropout_p):
    """One materialised score matrix over the folded q/k (never one per source). Half-precision scores and
    their softmax are formed in float32, as SDPA does: the folded matrix sums every source's scores, and in
    bfloat16 its softmax backward lost up to 10x the oracle's accuracy on the gradients."""
    dt = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
    logits = q.to(dt) @ k.to(dt).transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.to(dt)
    probs = _masked_softmax(logits * scale, allowed)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs.to(value.dtype) @ value


def _sdpa(q, k, bias, value, allowed, is_causal, scale, dropout_p):
    """One ``scaled_dot_product_attention`` call over the folded q/k."""
    # SDPA's is_causal aligns the queries to the first keys: fewer queries than keys take the explicit mask
    causal_only = is_causal and allowed is not None and allowed.ndim == 2 and q.shape[-2] == k.shape[-2]
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


def decoupled_attention(queries: Sequence[Tensor], keys: Sequence[Tensor], value: Tensor, *,
                        mask: Tensor | None = None, is_causal: bool = False, fusion: "str | Fusion" = "add",
                        scale: float | None = None, dropout_p: float = 0.0, backend: str = "auto",
                        check_finite: bool = False) -> Tensor:
    """Decoupled attention over per-source queries/keys and item-only values.

    Args:
        queries, keys: per-source ``(b|1, h, n_q, e_s)`` and ``(b|1, h, n_k, e_s)`` tensors, source 0 = item
            stream; ``n_q <= n_k`` (fewer queries are the last ``n_q`` positions, e.g. new positions over cached
            keys; the paper-exact ``max_len`` fusions need ``n_q == n_k``).
        value: ``(b, h, n_k, e_v)``.
        mask: bool, broadcastable to ``(b, h, n_q, n_k)``, True = may attend.
        is_causal: also apply the causal mask (combined with ``mask`` by ``&``); query ``i`` sits at key
            position ``n_k - n_q + i``.
        fusion: ``"add"`` or a :class:`~dif_attention.fusion.Fusion` module (``ConcatFusion``/``GateFusion``
            carry parameters, so pass an instance bound to ``len(queries)`` sources).
        scale: multiplies the *fused* scores; default ``1/sqrt(e_0)``.
        dropout_p: dropout on the attention probabilities (pass 0 in eval mode).
        backend: ``"torch"`` (the oracle: one score matrix per source), ``"sdpa"`` (one fused SDPA call),
            ``"math"`` (one materialised score matrix over the folded q/k), ``"triton"`` (the fused kernel,
            CUDA), or ``"auto"`` (sdpa; on CPU with gradients and ``n <= 128``, math; triton on CUDA only
            with ``DIF_ATTENTION_TRITON=1`` until the kernels are validated on a GPU).
        check_finite: raise ``DIFError`` on NaN/inf inputs.

    Returns ``(b, h, n_q, e_v)``. Query rows with no allowed key return zeros.
    """
    if backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", repr(backend))
    b, fusion, allowed, scale = _prepare(queries, keys, value, mask, is_causal, fusion, scale, dropout_p,
                                         check_finite)
    queries, keys, value = _sanitize(queries, keys, value, allowed, fusion)
    if backend == "torch":
        return _reference(queries, keys, value, allowed, fusion, scale, dropout_p,
                          [str(i) for i in range(len(queries))])[0]
    if backend == "triton" or (backend == "auto" and _triton_wanted(value)):
        reasons = _triton_reasons(queries, keys, value, fusion)
        if not reasons:
            return _triton(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p, b)
        if backend == "triton":
            fail("backend", "a case the Triton kernel supports (backend='triton')", "; ".join(reasons))
    q, k, bias = fold_sources(queries, keys, allowed, fusion, batch=b)
    if backend == "math" or (backend == "auto" and _prefer_math(value, queries)):
        return _math(q, k, bias, value, allowed, scale, dropout_p)
    return _sdpa(q, k, bias, value, allowed, is_causal, scale, dropout_p)


def _prefer_math(value: Tensor, queries) -> bool:
    """On CPU, SDPA's flash backward loses to one materialised matmul-softmax at short lengths when
    gradients are needed; its forward, and long sequences, favour SDPA (benchmarks/attention_speed.py)."""
    if value.device.type != "cpu" or not torch.is_grad_enabled() or value.shape[-2] > MATH_MAX_N:
        return False
    return value.requires_grad or any(q.requires_grad for q in queries)


def _triton_switch() -> str | None:
    """The one read of ``DIF_ATTENTION_TRITON``: ``"1"``, ``"0"`` or ``None`` (unset / anything else)."""
    value = os.environ.get(TRITON_ENV)
    return value if value in ("0", "1") else None


def _triton_wanted(value: Tensor) -> bool:
    """``"auto"`` picks the Triton kernels only on CUDA and, until they have been validated on a GPU
    (benchmarks/gpu_check.sh; none was available when they were written), only when the user opts in
    with ``DIF_ATTENTION_TRITON=1``. ``backend="triton"`` always tries them."""
    return value.is_cuda and _triton_switch() == "1"


def _triton_reasons(queries, keys, value, fusion) -> list[str]:
    if _triton_switch() == "0":
        return [f"the kernels are turned off ({TRITON_ENV}=0)"]
    try:
        from . import ops
    except ImportError as err:  # pragma: no cover - ops imports triton lazily
        return [f"dif_attention.ops cannot be imported: {err}"]
    return ops.unsupported_reasons(queries, keys, value, fusion=fusion)


def _triton(queries, keys, value, allowed, is_causal, fusion, scale, dropout_p, b):
    from . import ops

    gates = None
    if isinstance(fusion, GateFusion) and fusion.max_len is not None:
        gates = ops.paper_gates(list(queries), list(keys), fusion)  # no (s, b, h, n, n) score rows
    q, k, bias = fold_sources(queries, keys, allowed, fusion, batch=b, gates=gates)
    lone_causal = allowed is not None and allowed.ndim == 2  # user masks are 4-d after check_mask
    mask = None if allowed is None or lone_causal else as_4d(allowed)
    return ops.attention(q, k, value, bias=bias, mask=mask, is_causal=is_causal, scale=scale, dropout_p=dropout_p)
