"""Fusion functions: how the per-source score matrices become one score matrix.

Shape legend: ``b`` batch, ``h`` heads, ``n`` query/key positions (``i`` rows, ``j`` keys),
``s`` sources (source 0 is the item stream), ``e`` a source's head width. Score matrices are ``(n, n)``, or
``(n_q, n_k)`` for fewer queries than keys (the last ``n_q`` positions over cached keys).

Every fusion has two faces that compute the same numbers:

* ``combine(scores, allowed)`` -- the oracle face: takes the materialised raw (unscaled)
  score matrices ``S_s = Q_s K_s^T``, each ``(b|1, h, n, n)``, and returns the fused raw
  scores ``(b, h, n, n)``.
* ``fold(queries, keys, allowed)`` -- the fast face: rewrites the per-source queries/keys
  (and an optional additive key bias) so that ``sum_s q'_s k'_s^T + bias`` *is* the fused
  score. :func:`fold_sources` then turns the folded sources into one ``(q, k, bias)`` for a single
  attention call (every fast path uses it).
* ``weights(scores, allowed)`` -- the per-row source weights the fusion applied (the gates of
  ``gate``), or ``None`` where it has none.

Two families:

* **Length-agnostic (the default).** Work for any ``n`` (and any ``n_q <= n_k``) and never read
  masked keys, so they are safe with causal training on all positions and with cached keys.
* **Paper-exact (``max_len=L``).** What the DIF-SR code computes: functions of the whole,
  *unmasked* score row of fixed length ``L``. They raise ``DIFError`` when ``n != L`` or ``n_q != n_k``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .errors import DIFError, fail

__all__ = ["Fusion", "AddFusion", "ConcatFusion", "GateFusion", "get_fusion", "fold_sources", "folded_width"]


def _masked_row_mean(queries: Sequence[Tensor], keys: Sequence[Tensor], allowed: Tensor | None) -> Tensor:
    """Mean raw score of each query row over its allowed keys, per source: ``(b|1, h, n, s)``.

    ``mean_j A_ij q_i.k_j = q_i . (A K)_i / |A_i|`` -- computed without any ``(n, n)`` score matrix.
    Rows with no allowed key get 0.
    """
    out = []
    for q, k in zip(queries, keys):
        if allowed is None:
            kbar = k.mean(dim=-2, keepdim=True)  # (b, h, 1, e)
        else:
            a = allowed.to(k.dtype)
            count = a.sum(-1, keepdim=True).clamp_min(1.0)  # (., ., n, 1)
            kbar = (a @ k) / count  # (b, h, n, e)
        out.append((q * kbar).sum(-1))  # (b, h, n)
    return torch.stack(torch.broadcast_tensors(*out), dim=-1)


def _masked_row_mean_scores(scores: Sequence[Tensor], allowed: Tensor | None) -> Tensor:
    """The oracle twin of :func:`_masked_row_mean`, from materialised scores."""
    out = []
    for s in scores:
        if allowed is None:
            out.append(s.mean(-1))
        else:
            a = allowed.to(s.dtype)
            out.append((s * a).sum(-1) / a.sum(-1).clamp_min(1.0))
    return torch.stack(torch.broadcast_tensors(*out), dim=-1)


class Fusion(nn.Module):
    """Base class. Subclasses implement ``combine`` and ``fold``; see the module docstring."""

    #: ``n`` the fusion is tied to (paper-exact variants), or ``None`` for any ``n``.
    max_len: int | None = None
    #: number of sources this instance was built for, or ``None`` if it takes any.
    num_sources: int | None = None

    def bind(self, num_sources: int) -> "Fusion":
        """Build the parameters for ``num_sources`` sources (idempotent; called by DecoupledAttention)."""
        if self.num_sources is not None and self.num_sources != num_sources:
            fail("fusion", f"a fusion built for {num_sources} sources (item, position, attributes)",
                 f"{type(self).__name__} built for num_sources={self.num_sources}")
        return self

    def check(self, num_sources: int, n: int, *, n_keys: int | None = None) -> None:
        """Raise ``DIFError`` unless this fusion takes ``num_sources`` sources, ``n`` query rows and ``n_keys``
        keys (default ``n``). The paper-exact variants need ``n == n_keys == max_len``."""
        if self.max_len is not None and n_keys is not None and n_keys != n:
            fail("queries", f"as many query rows as keys for {type(self).__name__}(max_len={self.max_len}), the "
                 "paper-exact length-bound fusion: every fused score row is a function of the whole unmasked row "
                 "of max_len keys, future and padded ones included, so the rows of earlier positions (and the "
                 "next layer's keys) change whenever a key is added, and new queries over cached keys cannot be "
                 "exact; use the length-agnostic default", f"{n} query rows and {n_keys} keys")
        if self.max_len is not None and n != self.max_len:
            fail("n", f"sequence length n == max_len={self.max_len} ({type(self).__name__}(max_len=...) "
                 "is the paper-exact, length-bound variant; pad to max_len or use the length-agnostic default)",
                 f"n={n}")
        if self._needs_sources and self.num_sources is None:
            raise DIFError(f"fusion: {type(self).__name__} has no parameters yet; pass num_sources= "
                           "or use it inside DecoupledAttention, which binds it")
        if self.num_sources is not None and self.num_sources != num_sources:
            fail("queries", f"{self.num_sources} sources (fusion was built for that many)", f"{num_sources} sources")

    _needs_sources = False

    def combine(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor:  # pragma: no cover
        """The oracle face: raw per-source scores ``(b|1, h, n, n)`` -> fused raw scores ``(b, h, n, n)``."""
        raise NotImplementedError

    def fold(self, queries: list[Tensor], keys: list[Tensor],
             allowed: Tensor | None) -> tuple[list[Tensor], list[Tensor], Tensor | None]:  # pragma: no cover
        """The fast face: ``(queries', keys', key_bias)`` with ``sum_s q'_s k'_s^T + key_bias`` the fused raw
        scores (``key_bias``: ``(n,)`` or ``None``)."""
        raise NotImplementedError

    def weights(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor | None:
        """Per-row source weights ``(b, h, n, s)`` the fusion applies, or ``None`` (``add``, ``concat``)."""
        return None


class AddFusion(Fusion):
    """``S = sum_s S_s``: the paper's ``sum`` fusion. No parameters, any ``n``."""

    def combine(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor:
        """``sum_s S_s``."""
        out = scores[0]
        for s in scores[1:]:
            out = out + s
        return out

    def fold(self, queries: list[Tensor], keys: list[Tensor],
             allowed: Tensor | None) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """The sources as they are: one attention over their concatenation is their sum."""
        return list(queries), list(keys), None


class ConcatFusion(Fusion):
    """The ``concat`` fusion.

    * ``ConcatFusion(max_len=L)`` -- **paper-exact**: each query row's score rows are concatenated
      along the key axis, ``[S_0(i,:), ..., S_{s-1}(i,:)]`` of length ``s*L``, and mapped back to ``L``
      by one ``Linear(s*L -> L)`` shared by heads: ``S(i,j) = sum_{s,k} W[j, s*L+k] S_s(i,k) + c[j]``.
      Every fused score mixes *all* keys of the row, including future and padded ones (the
      reference masks afterwards); only valid when sequences are padded to exactly ``L``.
      Weights ``N(0, 0.02)``, bias 0, as the reference. Source order is ours (item, position,
      attributes), the reference's is (attributes, item, position).
    * ``ConcatFusion()`` -- **length-agnostic default**: the part of the concat map that survives
      any ``n`` and causality is a learned mix over the *source* axis only,
      ``S(i,j) = sum_s w_s S_s(i,j)`` (a constant per-row bias is a softmax no-op and is dropped).
      ``w`` starts at 1, i.e. as ``add``.

    Fast path: ``k'_s = W_s K_s`` (keys mixed along the sequence axis) plus a key bias ``c`` for the
    paper-exact map; ``q'_s = w_s q_s`` for the default.
    """

    _needs_sources = True

    def __init__(self, *, max_len: int | None = None, num_sources: int | None = None):
        super().__init__()
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            fail("max_len", "a positive int or None", repr(max_len))
        self.max_len = max_len
        self.num_sources = None
        if num_sources is not None:
            self.bind(num_sources)

    def bind(self, num_sources: int) -> "ConcatFusion":
        """Create the per-source weights (default) or the ``Linear(s*L -> L)`` map (paper-exact)."""
        if self.num_sources is None:
            self.num_sources = num_sources
            if self.max_len is None:
                self.weight = nn.Parameter(torch.ones(num_sources))
            else:
                self.proj = nn.Linear(num_sources * self.max_len, self.max_len)
                nn.init.normal_(self.proj.weight, std=0.02)
                nn.init.zeros_(self.proj.bias)
        return super().bind(num_sources)

    def combine(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor:
        """``sum_s w_s S_s`` (default) or the paper's ``Linear`` over each row's concatenated source rows."""
        if self.max_len is None:
            out = scores[0] * self.weight[0]
            for w, s in zip(self.weight[1:], scores[1:]):
                out = out + w * s
            return out
        rows = torch.cat(torch.broadcast_tensors(*scores), dim=-1)  # (b, h, n, s*L)
        # at the scores' dtype (float16 inputs have float32 scores): the parameters cast, the module untouched
        return nn.functional.linear(rows, self.proj.weight.to(rows.dtype), self.proj.bias.to(rows.dtype))

    def fold(self, queries: list[Tensor], keys: list[Tensor],
             allowed: Tensor | None) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """``q'_s = w_s q_s`` (default); ``k'_s = W_s K_s`` and the key bias ``c`` (paper-exact)."""
        if self.max_len is None:
            return [w * q for w, q in zip(self.weight, queries)], list(keys), None
        L = self.max_len
        w = self.proj.weight  # (L, s*L)
        new_keys = [w[:, s * L:(s + 1) * L] @ k for s, k in enumerate(keys)]  # (b, h, L, e)
        return list(queries), new_keys, self.proj.bias  # bias over keys j: (L,)


class GateFusion(Fusion):
    """The ``gate`` fusion: per query row, a softmax over sources of learned energies, then
    ``S(i,:) = sum_s g_s(i) S_s(i,:)`` with ``sum_s g_s(i) = 1`` (per batch row and head).

    * ``GateFusion(max_len=L)`` -- **paper-exact**: the energy of source ``s`` is a row-MLP on its raw,
      *unmasked* score row, ``e_s(i) = Linear(L->1)(ReLU(Linear(L->L)(S_s(i,:))))``, the MLP shared by
      sources and heads (the reference's ``VanillaAttention(L, L)``). Reads future and padded keys;
      tied to ``L``. Weights ``N(0, 0.02)``, biases 0.
    * ``GateFusion()`` -- **length-agnostic default**: the same shared row-MLP idea, fed a summary of
      the row that exists for any ``n`` and reads only allowed keys: the row's mean raw score over
      its allowed keys, ``m_s(i) = mean_{j allowed} S_s(i,j)``. ``e_s(i) = MLP(m_s(i)) + b_s`` with a
      ``Linear(1->hidden) -> ReLU -> Linear(hidden->1)`` MLP shared by sources and a learned
      per-source bias ``b_s`` (starts at 0). Causal-safe: row ``i`` never sees keys it may not attend.

    Fast path: the gate is a per-row scalar per source, so ``q'_s = g_s q_s`` -- one attention.
    The default computes ``m_s`` as ``q_s . (A K_s)_i / |A_i|`` without materialising any score matrix.
    """

    def __init__(self, *, max_len: int | None = None, num_sources: int | None = None, hidden: int = 16):
        super().__init__()
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            fail("max_len", "a positive int or None", repr(max_len))
        self.max_len = max_len
        self.num_sources = None
        if max_len is None:
            self._needs_sources = True
            self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        else:
            self.mlp = nn.Sequential(nn.Linear(max_len, max_len), nn.ReLU(), nn.Linear(max_len, 1))
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        if num_sources is not None:
            self.bind(num_sources)

    def bind(self, num_sources: int) -> "GateFusion":
        """Create the per-source energy bias of the default gate."""
        if self.num_sources is None:
            self.num_sources = num_sources
            if self.max_len is None:
                self.source_bias = nn.Parameter(torch.zeros(num_sources))
        return super().bind(num_sources)

    def _mlp(self, x: Tensor) -> Tensor:
        """``self.mlp`` run at the dtype of ``x`` (its parameters cast, the module untouched)."""
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                bias = None if layer.bias is None else layer.bias.to(x.dtype)
                x = nn.functional.linear(x, layer.weight.to(x.dtype), bias)
            else:
                x = layer(x)
        return x

    def _gates_from_rows(self, rows: list[Tensor]) -> Tensor:
        energies = [self._mlp(r) for r in rows]  # each (b|1, h, n, 1)
        return torch.cat(torch.broadcast_tensors(*energies), dim=-1).softmax(-1)  # (b, h, n, s)

    def gates(self, queries: list[Tensor], keys: list[Tensor], allowed: Tensor | None) -> Tensor:
        """Gate weights ``(b, h, n, s)`` (rows sum to 1), from queries/keys.

        For float16/bfloat16 inputs the row statistics, the MLP and the softmax over sources run in
        float32 (autocast off) and the gates are rounded once: in half precision the backward of the
        ``q . mean(K)`` statistic otherwise loses up to ~20 ulps (found by tests/test_properties.py)."""
        dtype = queries[0].dtype
        if dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(queries[0].device.type, enabled=False):
                return self._gates([q.float() for q in queries], [k.float() for k in keys], allowed).to(dtype)
        return self._gates(queries, keys, allowed)

    def _gates(self, queries, keys, allowed) -> Tensor:
        if self.max_len is None:
            return self.gates_from_means(_masked_row_mean(queries, keys, allowed))
        return self._gates_from_rows([q @ k.transpose(-1, -2) for q, k in zip(queries, keys)])

    def gates_from_means(self, means: Tensor) -> Tensor:
        """The length-agnostic gates ``(b, h, n, s)`` from each source's masked row mean of its raw scores,
        ``means (b, h, n, s)``: ``softmax_s(mlp(mean_s) + bias_s)``. Every caller of the gate goes through it."""
        if self.max_len is not None:
            raise DIFError("gates_from_means: expected the length-agnostic gate (max_len=None), got "
                           f"max_len={self.max_len} (the paper-exact gate reads whole score rows)")
        return (self._mlp(means.unsqueeze(-1)).squeeze(-1) + self.source_bias).softmax(-1)

    def weights(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor:
        """The gates ``(b, h, n, s)`` from materialised raw scores (the oracle twin of :meth:`gates`)."""
        if self.max_len is None:
            return self.gates_from_means(_masked_row_mean_scores(scores, allowed))
        return self._gates_from_rows(scores)

    def combine(self, scores: list[Tensor], allowed: Tensor | None) -> Tensor:
        """``sum_s g_s(i) S_s(i, :)`` with the gates of :meth:`weights`."""
        g = self.weights(scores, allowed)
        out = g[..., 0:1] * scores[0]
        for s in range(1, len(scores)):
            out = out + g[..., s:s + 1] * scores[s]
        return out

    def fold(self, queries: list[Tensor], keys: list[Tensor], allowed: Tensor | None, *,
             gates: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """``gates``: precomputed gate weights ``(b|1, h, n, s)`` (the fused kernels compute the paper gate's
        without materialising score rows); default :meth:`gates`."""
        g = self.gates(queries, keys, allowed) if gates is None else gates
        return [g[..., s:s + 1] * q for s, q in enumerate(queries)], list(keys), None


def get_fusion(fusion: "str | Fusion", *, num_sources: int | None = None, max_len: int | None = None) -> Fusion:
    """A fusion module from a name (``"add"``, ``"concat"``, ``"gate"``) or a module (returned as is)."""
    if isinstance(fusion, Fusion):
        if num_sources is not None:
            fusion.bind(num_sources)
        return fusion
    names = {"add": AddFusion, "sum": AddFusion, "concat": ConcatFusion, "gate": GateFusion}
    if fusion not in names:
        fail("fusion", f"one of {sorted(names)} or a Fusion module", repr(fusion))
    cls = names[fusion]
    if cls is AddFusion:
        return AddFusion()
    return cls(max_len=max_len, num_sources=num_sources)


def _shared(queries, keys, batch: int) -> list[int]:
    """Indices of the sources whose q and k are both batch-independent (batch dim 1), when folding them into a
    shared score bias pays: ``batch > 1`` and at least one other source is per batch row."""
    if batch <= 1:
        return []
    shared = [i for i, (q, k) in enumerate(zip(queries, keys)) if q.shape[0] == 1 and k.shape[0] == 1]
    return shared if len(shared) < len(queries) else []


def fold_sources(queries: Sequence[Tensor], keys: Sequence[Tensor], allowed: Tensor | None, fusion: Fusion, *,
                 batch: int, gates: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fold ``fusion`` into one attention: ``(q, k, bias)`` with ``q @ k^T + bias`` = the fused raw scores.

    ``q, k``: ``(batch, h, n, E)``, the folded per-source queries/keys concatenated along the width. ``bias``:
    ``(1, h|1, n|1, n)`` or ``None`` -- the batch-independent sources (the position stream) as one shared
    ``(h, n, n)`` score table computed once, not once per batch row, plus the paper-exact concat's key bias.
    ``gates``: precomputed gates for :class:`GateFusion` (see :meth:`GateFusion.fold`).
    """
    if gates is not None:
        qs, ks, key_bias = fusion.fold(list(queries), list(keys), allowed, gates=gates)
    else:
        qs, ks, key_bias = fusion.fold(list(queries), list(keys), allowed)
    bias = None if key_bias is None else key_bias.reshape(1, 1, 1, -1)
    shared = _shared(qs, ks, batch)
    for i in shared:
        term = qs[i] @ ks[i].transpose(-1, -2)  # (1, h, n, n)
        bias = term if bias is None else bias + term
    qs = [q for i, q in enumerate(qs) if i not in shared]
    ks = [k for i, k in enumerate(ks) if i not in shared]
    q = qs[0].expand(batch, -1, -1, -1) if len(qs) == 1 else torch.cat([t.expand(batch, -1, -1, -1) for t in qs], -1)
    k = ks[0].expand(batch, -1, -1, -1) if len(ks) == 1 else torch.cat([t.expand(batch, -1, -1, -1) for t in ks], -1)
    return q, k, bias


def folded_width(queries: Sequence[Tensor], keys: Sequence[Tensor], fusion: Fusion) -> int:
    """The width ``E`` of the ``q``/``k`` that :func:`fold_sources` returns, from shapes alone (gates multiply
    every source per batch row, so under ``gate`` no source is shared)."""
    batch = max(max(q.shape[0], k.shape[0]) for q, k in zip(queries, keys))
    shared = [] if isinstance(fusion, GateFusion) else _shared(queries, keys, batch)
    return sum(q.shape[-1] for i, q in enumerate(queries) if i not in shared)
