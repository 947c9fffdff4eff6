"""Fused GPU kernels (Triton). Imported lazily: ``import dif_attention`` works without triton.

A leaf: these functions take already-folded, already-checked tensors and import only the ground floor
(``errors``, ``masks``, ``fusion``); :func:`dif_attention.decoupled_attention` is the dispatcher that calls them.

    available()                      -> bool: triton installed and CUDA (or TRITON_INTERPRET=1) present
    unsupported_reasons(q, k, v, fusion=...) -> list[str]: why the kernels cannot run a case
    attention(q, k, v, bias=, mask=, lengths=, is_causal=, scale=, dropout_p=, seed=, block=)
                                     -> one fused attention over folded q/k (fusion.fold_sources)
    paper_gates(queries, keys, fusion) -> the paper-exact gate weights from the fused energy kernel
    dropout_keep_mask(seed, b, h, n, p) -> the kernels' dropout pattern (bool (b, h, n, n)), for tests

Tests on CPU: set ``TRITON_INTERPRET=1`` before this package's kernels are first imported.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from torch import Tensor

from .launch import MAX_WIDTH, attention, available, interpreted, unsupported_reasons

if TYPE_CHECKING:
    from ..fusion import GateFusion

__all__ = ["available", "interpreted", "unsupported_reasons", "attention", "paper_gates", "dropout_keep_mask",
           "MAX_WIDTH"]


def paper_gates(queries: Sequence[Tensor], keys: Sequence[Tensor], fusion: "GateFusion") -> Tensor:
    """Gate weights ``(b|1, h, n, s)`` of a paper-exact ``GateFusion(max_len=n)``, the energies from the fused
    kernel (no ``(b, h, n, n)`` score row per source in the forward)."""
    from .gate_op import paper_gates as _impl

    return _impl(list(queries), list(keys), fusion)


def dropout_keep_mask(seed: Tensor, b: int, h: int, n: int, dropout_p: float) -> Tensor:
    """The keep pattern the kernels use for integer ``seed`` as a bool ``(b, h, n, n)`` tensor on
    ``seed``'s device (pass a ``(1,)`` int64 tensor) -- True = kept (scaled by ``1/(1-p)``)."""
    from .attention_op import dropout_keep_mask as _impl

    return _impl(seed, b, h, n, dropout_p)
