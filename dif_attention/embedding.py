"""Attribute embeddings: one trainable table per attribute, multi-valued attributes pooled."""
from __future__ import annotations

import math
import operator
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import check_bool, check_int, check_integer, check_tensor, fail, is_integer

__all__ = ["AttributeEmbedding", "item_attribute_table"]

POOLINGS = ("sum", "mean", "max")


def _eager() -> bool:
    """Range checks read tensor values (a host sync, a graph break): run them in eager mode only. Under
    ``torch.compile``/``torch.export`` an out-of-range id still fails, with PyTorch's own index error."""
    return not torch.compiler.is_compiling()


def item_attribute_table(item_to_tokens: Mapping[int, Sequence[int]], num_items: int, *,
                         max_tokens: int | None = None) -> Tensor:
    """A ``(num_items, k)`` long table, row ``i`` = item ``i``'s attribute tokens padded with 0.

    Items absent from the mapping (the padding item 0, a [MASK] id) get an all-padding row.
    ``max_tokens`` (an int >= 0) truncates long token lists (default: the longest list).
    Item ids and tokens must be non-negative ints.
    """
    if not isinstance(item_to_tokens, Mapping):
        fail("item_to_tokens", "a mapping of item id -> list of token ids", type(item_to_tokens).__name__)
    check_int("num_items", num_items)
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, minimum=0)
    rows = {}
    for item, tokens in item_to_tokens.items():
        if not _is_index(item) or not 0 <= int(item) < num_items:
            fail("item_to_tokens", f"int item ids in [0, {num_items})", f"item id {item!r}")
        if isinstance(tokens, (str, bytes, Mapping)) or not hasattr(tokens, "__iter__"):
            fail(f"item_to_tokens[{item}]", "a sequence of token ids", repr(tokens))
        tokens = list(tokens)
        if not all(_is_index(t) and int(t) >= 0 for t in tokens):
            fail(f"item_to_tokens[{item}]", "non-negative int token ids", repr(tokens))
        rows[int(item)] = [int(t) for t in tokens]
    k = max((len(v) for v in rows.values()), default=1) if max_tokens is None else max_tokens
    table = torch.zeros(num_items, max(k, 1), dtype=torch.long)
    for item, tokens in rows.items():
        tokens = tokens[:k]
        table[item, :len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return table


def _is_index(value) -> bool:
    """An int (Python or NumPy, not a bool)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


class AttributeEmbedding(nn.Module):
    """Embeds attribute tokens: ``ids[name]`` of shape ``(b, n)`` (one token per position) or
    ``(b, n, k)`` (a padded token list per position) -> ``(b, n, dims[name])``.

    Token ``padding_idx`` (0) is padding: its row is zero and never trained, and it is ignored by
    the pooling. Pooling of ``k`` tokens: ``"sum"`` (the reference's choice), ``"mean"`` over the
    valid tokens, or ``"max"`` over the valid tokens; a position with no valid token (``k = 0`` included)
    gets zeros.

    ``num_classes``: attribute -> vocabulary size ``V > padding_idx``; ``dims``: one width (an int >= 1)
    for every attribute or a width per attribute. Bad arguments raise :class:`~dif_attention.DIFError`.

    Tables are trainable and start at ``N(0, init_std)``. The reference implementation (DIF-SR,
    RecBole 1.0.0) kept its tables in a plain dict, so they were silently frozen at PyTorch's
    default ``N(0, 1)``; ``trainable=False, init_std=1.0`` reproduces that.

    ``item_tables`` (name -> ``(num_items, k)`` long, see :func:`item_attribute_table`) lets
    ``forward(items=item_ids)`` look the tokens up from item ids.
    """

    def __init__(self, num_classes: Mapping[str, int], dims: "int | Mapping[str, int]", *, pooling: str = "sum",
                 padding_idx: int = 0, trainable: bool = True, init_std: float = 0.02,
                 item_tables: Mapping[str, Tensor] | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            fail("pooling", f"one of {POOLINGS}", repr(pooling))
        if not isinstance(num_classes, Mapping) or not num_classes:
            fail("num_classes", "a non-empty mapping of attribute -> vocabulary size", repr(num_classes))
        check_int("padding_idx", padding_idx, minimum=0)
        check_bool("trainable", trainable)
        for a, v in num_classes.items():
            check_int(f"num_classes[{a!r}]", v)
            if padding_idx >= v:
                fail("padding_idx", f"a token id in [0, {v}) (num_classes[{a!r}]={v})", repr(padding_idx))
        if isinstance(dims, Mapping):
            dims = dict(dims)
            if set(dims) != set(num_classes):
                fail("dims", f"a width for each attribute {sorted(num_classes)}", f"keys {sorted(dims)}")
            for a, d in dims.items():
                check_int(f"dims[{a!r}]", d)
        else:
            check_int("dims", dims)
            dims = {a: dims for a in num_classes}
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not math.isfinite(init_std) \
                or init_std < 0:
            fail("init_std", "a finite float >= 0", repr(init_std))
        self.pooling, self.padding_idx = pooling, padding_idx
        self.num_classes, self.dims = dict(num_classes), dims
        self.tables = nn.ModuleDict()
        for a, v in num_classes.items():
            emb = nn.Embedding(v, dims[a], padding_idx=padding_idx)
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[padding_idx].zero_()
            emb.weight.requires_grad_(trainable)
            self.tables[a] = emb
        for a, t in (item_tables or {}).items():
            if a not in num_classes:
                fail("item_tables", f"keys among {sorted(num_classes)}", repr(a))
            check_tensor(f"item_tables[{a!r}]", t, ndim=2)
            check_integer(f"item_tables[{a!r}]", t, "an integer tensor of token ids")
            if _eager() and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes[a]):
                fail(f"item_tables[{a!r}]", f"token ids in [0, {num_classes[a]}) (num_classes[{a!r}])",
                     f"ids in [{int(t.min())}, {int(t.max())}]")
            self.register_buffer(f"items_{a}", t.long(), persistent=False)

    def lookup(self, items: Tensor) -> dict[str, Tensor]:
        """Item ids ``(b, n)`` -> token ids ``(b, n, k)`` per attribute (from ``item_tables``)."""
        check_tensor("items", items)
        check_integer("items", items, "an integer tensor of item ids")
        out = {}
        for a in self.num_classes:
            table = getattr(self, f"items_{a}", None)
            if table is None:
                fail("items", f"item_tables for attribute {a!r} given at construction", "no table")
            if _eager() and items.numel() and (int(items.max()) >= table.shape[0] or int(items.min()) < 0):
                fail("items", f"item ids in [0, {table.shape[0]}) (rows of item_tables[{a!r}])",
                     f"ids in [{int(items.min())}, {int(items.max())}]")
            out[a] = table[items]
        return out

    def of_items(self, items: Tensor) -> dict[str, Tensor]:
        """``forward(items=items)`` without the per-call checks, for ids the caller has checked already (a
        serving step checks its new items once against the model's item count): ``(b, n)`` -> ``(b, n, width)``
        per attribute. The item tables were checked at construction."""
        return {a: self._pool(a, getattr(self, f"items_{a}")[items]) for a in self.num_classes}

    def forward(self, ids: Mapping[str, Tensor] | None = None, *, items: Tensor | None = None) -> dict[str, Tensor]:
        if (ids is None) == (items is None):
            fail("ids", "exactly one of ids= (attribute tokens) or items= (item ids)",
                 "both" if ids is not None else "neither")
        if items is not None:
            ids = self.lookup(items)
        if set(ids) != set(self.num_classes):
            fail("ids", f"exactly the attributes {sorted(self.num_classes)}", f"keys {sorted(ids)}")
        return {a: self._embed(a, ids[a]) for a in self.num_classes}

    def _embed(self, a: str, tok: Tensor) -> Tensor:
        check_tensor(f"ids[{a!r}]", tok)
        if not is_integer(tok) or tok.ndim not in (2, 3):
            fail(f"ids[{a!r}]", "integer token ids of shape (b, n) or (b, n, k)", f"{tok.dtype} {tuple(tok.shape)}")
        v = self.num_classes[a]
        if tok.device != self.tables[a].weight.device:
            fail(f"ids[{a!r}]", f"device {self.tables[a].weight.device} (the device of the embedding tables)",
                 f"device {tok.device}")
        if _eager() and tok.numel() and (int(tok.max()) >= v or int(tok.min()) < 0):
            fail(f"ids[{a!r}]", f"token ids in [0, {v})", f"ids in [{int(tok.min())}, {int(tok.max())}]")
        return self._pool(a, tok)

    def _pool(self, a: str, tok: Tensor) -> Tensor:
        """Checked token ids ``(b, n)`` or ``(b, n, k)`` of attribute ``a`` -> ``(b, n, width)`` (pooled over k)."""
        e = self.tables[a](tok)
        if tok.ndim == 2:
            return e
        if tok.shape[-1] == 0:  # no token at any position: zeros, as for a position without a valid token
            return e.sum(-2)
        valid = (tok != self.padding_idx).unsqueeze(-1)  # (b, n, k, 1)
        if self.pooling == "sum":
            return (e * valid).sum(-2)
        if self.pooling == "mean":
            return (e * valid).sum(-2) / valid.sum(-2).clamp_min(1)
        out = e.masked_fill(~valid, float("-inf")).amax(-2)
        return torch.where(valid.any(-2), out, torch.zeros_like(out))
