"""``DecoupledAttention``: the drop-in replacement for a transformer block's attention call, and
:class:`KVCache`, the keys and values of the positions it has already seen (incremental decoding)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import (DIFError, check_bool, check_divisible, check_int, check_matches, check_probability,
                     check_tensor, fail)
from .errors import check_finite as check_finite_values
from .functional import BACKENDS, ScoreMaps, decoupled_attention, reference_attention
from .fusion import Fusion, get_fusion

__all__ = ["DecoupledAttention", "KVCache", "PackedBuffer", "check_attr_dims", "check_cache"]


@dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values of the positions it has already seen.

    Shapes (einops style), ``m`` cached positions (key slots)::

        keys[s] : (b|1, h, m, e_s)   one per source, in the attention's source order (``attn.sources``);
                                     batch dim 1 for a batch-independent source (the position stream)
        value   : (b, h, m, e_v)

    ``KVCache()`` is the empty cache (``m = 0``). An attention called with ``cache=`` computes only the
    positions it is given, attends them to the cached keys and to themselves, and returns the cache grown by
    them (:meth:`append`); masks then broadcast to ``(b, h, n, m + n)``. Slots need not be positions: a mask
    says which slots a query may attend, so rows of a batch may hold different numbers of items.
    """
    keys: tuple[Tensor, ...] = ()
    value: Tensor | None = None

    @property
    def length(self) -> int:
        """``m``, the number of cached key slots."""
        return 0 if self.value is None else self.value.shape[-2]

    def append(self, keys: Sequence[Tensor], value: Tensor) -> "KVCache":
        """This cache followed by new positions' ``keys`` (per source ``(b|1, h, n, e_s)``) and ``value``
        ``(b, h, n, e_v)``: ``(b|1, h, m + n, e_s)`` and ``(b, h, m + n, e_v)``. A batch-independent source
        stays batch-independent only where both parts are."""
        if self.value is None:
            return KVCache(tuple(keys), value)
        if len(self.keys) != len(keys):
            fail("cache", f"keys of {len(keys)} sources (one per source of the attention)",
                 f"{len(self.keys)} key tensors")
        b = value.shape[0]
        if self.value.shape[0] != b or self.value.shape[1] != value.shape[1] or self.value.shape[3] != value.shape[3]:
            fail("cache", f"a value of shape ({b}, {value.shape[1]}, m, {value.shape[3]}) = (b, heads, m, e_v)",
                 self.value.shape)
        grown = []
        for s, (old, new) in enumerate(zip(self.keys, keys)):
            if old.shape[1] != new.shape[1] or old.shape[3] != new.shape[3] or old.shape[2] != self.length \
                    or old.shape[0] not in (1, b):
                fail(f"cache.keys[{s}]", f"shape ({b if b == 1 else f'{b} or 1'}, {new.shape[1]}, {self.length}, "
                     f"{new.shape[3]}) = (b|1, heads, m, e_{s})", old.shape)
            if old.shape[0] != new.shape[0]:
                old, new = old.expand(b, -1, -1, -1), new.expand(b, -1, -1, -1)
            grown.append(torch.cat([old, new], dim=-2))
        return KVCache(tuple(grown), torch.cat([self.value, value], dim=-2))

    # ---- packed storage (the inference step of DecoupledEncoder)
    _buffer = None  # a PackedBuffer whose first ``length`` slots this cache is, or None (not a dataclass field)

    @property
    def packed_keys(self) -> Tensor | None:
        """The keys of every source side by side, ``(b, h, m, E)`` with ``E = sum_s e_s`` (source ``s`` in
        columns ``sum_{t<s} e_t ..``), when this cache was grown by :meth:`append_packed`; else ``None``."""
        return None if self._buffer is None else self._buffer.keys[:, :, :self.length]

    def append_packed(self, keys: Tensor, value: Tensor, widths: Sequence[int]) -> "KVCache":
        """:meth:`append` for new positions whose keys come packed: ``keys (b, h, n, E)`` (the sources side by
        side, widths ``widths``), ``value (b, h, n, e_v)``. Returns the grown cache, stored in a preallocated
        buffer: its ``keys[s]`` are column views of :attr:`packed_keys` (batch dim ``b`` for every source).

        The new rows are written in place, without copying the ``m`` cached ones, when this cache is the
        latest grown from its buffer (no other cache has written past its ``m`` slots) and the buffer has room;
        otherwise (the first packed append, a cache appended to twice, a full buffer) they go with a copy of
        the cache into a new buffer with room for more. Caches already handed out are never changed.
        No checks: the caller (``DecoupledEncoder``'s inference step) has checked the shapes."""
        m, n = self.length, keys.shape[-2]
        buf, widths = self._buffer, tuple(widths)
        if buf is None or buf.used != m or m + n > buf.keys.shape[-2] or buf.widths != widths \
                or buf.keys.shape[0] != keys.shape[0] or buf.keys.dtype != keys.dtype:
            b, h, _, width = keys.shape
            room = m + n + max(32, (m + n) // 2)
            new = PackedBuffer(keys.new_empty(b, h, room, width), value.new_empty(b, h, room, value.shape[-1]),
                               widths)
            if buf is not None and buf.widths == widths and buf.keys.shape[0] == b:
                new.keys[:, :, :m] = buf.keys[:, :, :m]
            elif m:
                for k, lo, hi in zip(self.keys, new.offsets, new.offsets[1:]):
                    new.keys[:, :, :m, lo:hi] = k  # a batch-independent source broadcasts to every row
            if m:
                new.value[:, :, :m] = self.value
            buf = new
        buf.keys[:, :, m:m + n] = keys
        buf.value[:, :, m:m + n] = value
        buf.used = m + n
        grown = KVCache(tuple(buf.keys[:, :, :m + n].split(widths, -1)), buf.value[:, :, :m + n])
        object.__setattr__(grown, "_buffer", buf)  # frozen dataclass: the buffer is not a field
        return grown


class PackedBuffer:
    """Preallocated storage of :meth:`KVCache.append_packed`: ``keys (b, h, room, E)`` (the sources side by
    side, widths ``widths``), ``value (b, h, room, e_v)``, and ``used``, the slots written so far (the length
    of the latest cache grown from it: only that cache may append in place)."""

    __slots__ = ("keys", "value", "widths", "offsets", "used")

    def __init__(self, keys: Tensor, value: Tensor, widths: tuple[int, ...]):
        self.keys, self.value, self.widths, self.used = keys, value, widths, 0
        self.offsets = [0]
        for w in widths:
            self.offsets.append(self.offsets[-1] + w)

RESERVED = ("item", "position", "fused", "probs")


def check_attr_dims(attr_dims: Mapping[str, int] | None, heads: int) -> dict[str, int]:
    """Attribute name -> width, each name an identifier (not a reserved map name), each width a positive int
    divisible by ``heads``."""
    if attr_dims is not None and not isinstance(attr_dims, Mapping):
        fail("attr_dims", "a mapping of attribute name -> width", type(attr_dims).__name__)
    attr_dims = dict(attr_dims or {})
    for name, d in attr_dims.items():
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED:
            fail("attr_dims", f"attribute names that are identifiers and not one of {RESERVED}", repr(name))
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            fail(f"attr_dims[{name!r}]", "a positive int width", repr(d))
        check_divisible(f"attr_dims[{name!r}]", d, heads)
    return attr_dims


def check_cache(cache, return_scores: bool = False) -> KVCache:
    """``cache`` is a :class:`KVCache` (and the call does not also ask for score maps)."""
    if not isinstance(cache, KVCache):
        fail("cache", "a KVCache (KVCache() to start an empty one)", type(cache).__name__)
    if return_scores:
        fail("return_scores", "False with cache= (score maps come from the oracle over full sequences)", True)
    return cache


class DecoupledAttention(nn.Module):
    """Multi-head decoupled attention (DIF-SR, SIGIR 2022).

    The item stream ``x``, the position embedding and each attribute embedding get their own
    query/key projections; the per-source score matrices are fused (``add``, ``concat``, ``gate``)
    before one softmax; values come from the item stream alone. No residual and no norm inside.

    Shapes::

        x            : (b, n, dim)               item stream
        attrs[name]  : (b, n, attr_dims[name])   one entry per declared attribute
        pos          : (n, dim) or (b, n, dim)   position embedding (required when position=True)
        mask         : bool, broadcastable to (b, heads, n, n), True = may attend
        output       : (b, n, dim)

    With ``cache=`` (a :class:`KVCache` of ``m`` earlier positions) the inputs are the ``n`` new positions only,
    the mask broadcasts to ``(b, heads, n, m + n)``, ``is_causal`` treats them as the last ``n`` positions, and
    the forward returns ``(out, grown cache)``.

    Head widths: ``dim // heads`` for item and position, ``attr_dims[name] // heads`` for attributes.
    Scores are scaled by ``1/sqrt(dim // heads)`` after fusion (as the reference).

    Args:
        dim, heads: model width and number of heads (``dim % heads == 0``).
        attr_dims: attribute name -> embedding width (each divisible by ``heads``).
        position: give the position embedding its own decoupled score (DIF-SR does).
        fusion: ``"add"`` (the library's default), ``"concat"``, ``"gate"`` (the DIF-SR configs' and the
            example models' choice) or a :class:`Fusion` instance.
        max_len: with ``fusion="concat"``/``"gate"`` by name, select the paper-exact variant tied to ``max_len``.
        attn_dropout: dropout on the attention probabilities.
        backend: ``"auto"``, ``"sdpa"``, ``"torch"`` (oracle) or ``"triton"``.
        bias: whether the projections have biases (the reference's do).
    """

    def __init__(self, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None, position: bool = True,
                 fusion: "str | Fusion" = "add", max_len: int | None = None, attn_dropout: float = 0.0,
                 backend: str = "auto", bias: bool = True, check_finite: bool = False):
        super().__init__()
        check_int("heads", heads)
        check_int("dim", dim)
        self.dim_head = check_divisible("dim", dim, heads)
        if backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}", repr(backend))
        self.dim, self.heads, self.position = dim, heads, check_bool("position", position)
        self.attr_dims = check_attr_dims(attr_dims, heads)
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        self.backend, self.check_finite = backend, check_finite
        self.sources = ["item"] + (["position"] if position else []) + list(self.attr_dims)

        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        if position:
            self.pos_q = nn.Linear(dim, dim, bias=bias)
            self.pos_k = nn.Linear(dim, dim, bias=bias)
        self.attr_q = nn.ModuleDict({a: nn.Linear(d, d, bias=bias) for a, d in self.attr_dims.items()})
        self.attr_k = nn.ModuleDict({a: nn.Linear(d, d, bias=bias) for a, d in self.attr_dims.items()})
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.fusion = get_fusion(fusion, num_sources=len(self.sources), max_len=max_len)

    def _heads(self, t: Tensor) -> Tensor:
        """``(..., n, (h e)) -> (..., h, n, e)`` (einops notation; written with view ops, the hot path of a step)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def _check_input(self, arg: str, t: Tensor) -> None:
        check_matches(arg, t, self.to_q.weight, "DecoupledAttention")
        if self.check_finite:
            check_finite_values(arg, t)

    def project(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None,
                pos: Tensor | None = None) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Validate inputs and return ``(queries, keys, value)`` in the functional layout: per-source
        ``(b|1, heads, n, e_s)`` queries and keys in the order of ``self.sources``, value ``(b, heads, n, e)``."""
        check_tensor("x", x, ndim=3, floating=True)
        b, n, d = x.shape
        if d != self.dim:
            fail("x", f"last dim {self.dim} (= dim), shape (b, n, {self.dim})", x.shape)
        self._check_input("x", x)
        queries, keys = [self._heads(self.to_q(x))], [self._heads(self.to_k(x))]
        value = self._heads(self.to_v(x))
        if self.position:
            if pos is None:
                raise DIFError("pos: expected the position embedding (n, dim) or (b, n, dim) because "
                               "position=True, got None")
            check_tensor("pos", pos, floating=True)
            self._check_input("pos", pos)
            if pos.ndim == 2:
                if pos.shape != (n, self.dim):
                    fail("pos", f"shape ({n}, {self.dim}) = (n, dim)", pos.shape)
                qp, kp = self._heads(self.pos_q(pos))[None], self._heads(self.pos_k(pos))[None]  # (1, h, n, e)
            elif pos.ndim == 3:
                if pos.shape[0] not in (1, b) or pos.shape[1:] != (n, self.dim):
                    fail("pos", f"shape ({b} or 1, {n}, {self.dim}) = (b, n, dim)", pos.shape)
                qp, kp = self._heads(self.pos_q(pos)), self._heads(self.pos_k(pos))
            else:
                fail("pos", f"shape ({n}, {self.dim}) or ({b}, {n}, {self.dim})", pos.shape)
            queries.append(qp.to(value.dtype))
            keys.append(kp.to(value.dtype))
        elif pos is not None:
            raise DIFError("pos: expected None because position=False, got a tensor of shape "
                           f"{tuple(pos.shape)}")
        if attrs is not None and not isinstance(attrs, Mapping):
            fail("attrs", "a mapping of attribute name -> (b, n, width) tensor", type(attrs).__name__)
        attrs = dict(attrs or {})
        missing, extra = set(self.attr_dims) - set(attrs), set(attrs) - set(self.attr_dims)
        if missing or extra:
            fail("attrs", f"exactly the declared attributes {sorted(self.attr_dims)}",
                 f"keys {sorted(attrs)} (missing {sorted(missing)}, undeclared {sorted(extra)})")
        for a, width in self.attr_dims.items():
            t = check_tensor(f"attrs[{a!r}]", attrs[a], ndim=3, floating=True)
            self._check_input(f"attrs[{a!r}]", t)
            if t.shape != (b, n, width):
                fail(f"attrs[{a!r}]", f"shape ({b}, {n}, {width}) = (b, n, attr_dims[{a!r}])", t.shape)
            queries.append(self._heads(self.attr_q[a](t)).to(value.dtype))
            keys.append(self._heads(self.attr_k[a](t)).to(value.dtype))
        return queries, keys, value

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: KVCache | None = None) -> Tensor | tuple[Tensor, ScoreMaps] | tuple[Tensor, KVCache]:
        """Returns ``(b, n, dim)``; with ``return_scores=True`` returns ``(out, maps)``, ``maps`` a
        :class:`~dif_attention.ScoreMaps` computed by the oracle: ``maps.sources`` maps each source name
        (``"item"``, ``"position"``, attribute names) to its raw score matrix ``(b|1, heads, n, n)``, plus
        ``maps.fused`` (raw fused scores), ``maps.probs`` (attention) and ``maps.gates`` (gate fusion).
        With ``cache=`` (a :class:`KVCache`; ``KVCache()`` to start one) ``x``, ``attrs`` and ``pos`` are the new
        positions, attended to the cached ones too, and the result is ``(out, cache grown by them)``."""
        queries, keys, value = self.project(x, attrs=attrs, pos=pos)
        kw = dict(mask=mask, is_causal=is_causal, fusion=self.fusion, scale=1.0 / self.dim_head ** 0.5,
                  dropout_p=self.attn_dropout if self.training else 0.0, check_finite=self.check_finite)
        if cache is not None:
            cache = check_cache(cache, return_scores)
            cache = cache.append(keys, value)
            out = decoupled_attention(queries, list(cache.keys), cache.value, backend=self.backend, **kw)
            return self.to_out(out.transpose(1, 2).flatten(2)), cache  # b h n e -> b n (h e)
        if return_scores:
            out, maps = reference_attention(queries, keys, value, names=self.sources, **kw)
        else:
            out = decoupled_attention(queries, keys, value, backend=self.backend, **kw)
        out = self.to_out(out.transpose(1, 2).flatten(2))  # b h n e -> b n (h e)
        return (out, maps) if return_scores else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, sources={self.sources}, "
                f"fusion={type(self.fusion).__name__}(max_len={self.fusion.max_len}), backend={self.backend!r}")
