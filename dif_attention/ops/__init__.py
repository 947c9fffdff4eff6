"""Fused GPU kernels (Triton). Imported lazily: ``import dif_attention`` works without triton.

    available()                     -> bool: triton installed and CUDA (or TRITON_INTERPRET=1) present
    unsupported_reasons(q, k, v, fusion=...) -> list[str]: why backend="triton" cannot run a case
    triton_decoupled_attention(...) -> the fused attention (what backend="triton" calls)
    dropout_keep_mask(seed, b, h, n, p) -> the kernels' dropout pattern (bool (b, h, n, n)), for tests

Tests on CPU: set ``TRITON_INTERPRET=1`` before this package's kernels are first imported.
"""
from __future__ import annotations

from .dispatch import MAX_WIDTH, available, interpreted, triton_decoupled_attention, unsupported_reasons

__all__ = ["available", "interpreted", "unsupported_reasons", "triton_decoupled_attention", "dropout_keep_mask",
           "MAX_WIDTH"]


def dropout_keep_mask(seed, b: int, h: int, n: int, dropout_p: float):
    """The keep pattern the kernels use for integer ``seed`` as a bool ``(b, h, n, n)`` tensor on
    ``seed``'s device (pass a ``(1,)`` int64 tensor) -- True = kept (scaled by ``1/(1-p)``)."""
    from .attention_op import dropout_keep_mask as _impl

    return _impl(seed, b, h, n, dropout_p)
