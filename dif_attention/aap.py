"""Auxiliary attribute predictors (AAP): predict the target item's attributes from the final
representation, trained with a multi-label BCE loss added to the item loss with weight lambda::

    L = L_item + lambda * sum_j L_fj
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import check_int, check_integer, check_matches, check_tensor, fail

__all__ = ["AttributePredictor", "aap_loss", "multi_hot", "total_loss"]


def _eager() -> bool:
    """Value checks read tensors (a host sync, a graph break): eager mode only."""
    return not torch.compiler.is_compiling()


def multi_hot(tokens: Tensor, num_classes: int, *, pad_id: int = 0, arg: str = "tokens") -> Tensor:
    """Token lists ``(..., k)`` (padded with ``pad_id``) -> multi-hot ``(..., num_classes)`` float in {0, 1}
    with the ``pad_id`` column zero. (The reference summed one-hots, so a repeated token counted twice.)
    ``arg`` names ``tokens`` in error messages."""
    check_tensor(arg, tokens)
    check_integer(arg, tokens, "integer token ids")
    check_int("num_classes", num_classes)
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or not 0 <= pad_id < num_classes:
        fail("pad_id", f"an int in [0, {num_classes}) (= num_classes)", repr(pad_id))
    if _eager() and tokens.numel() and (int(tokens.max()) >= num_classes or int(tokens.min()) < 0):
        fail(arg, f"token ids in [0, {num_classes})", f"ids in [{int(tokens.min())}, {int(tokens.max())}]")
    out = torch.zeros(*tokens.shape[:-1], num_classes, device=tokens.device)
    out.scatter_(-1, tokens, 1.0)
    out[..., pad_id] = 0.0
    return out


class AttributePredictor(nn.Module):
    """One ``Linear(dim -> num_classes[name])`` head per attribute; ``forward(h)`` maps ``(..., dim)``
    to a dict of logits ``(..., num_classes[name])`` (column 0 is the padding token)."""

    def __init__(self, dim: int, num_classes: Mapping[str, int]):
        super().__init__()
        check_int("dim", dim)
        if not isinstance(num_classes, Mapping) or not num_classes:
            fail("num_classes", "a non-empty mapping of attribute name -> number of classes", repr(num_classes))
        for a, v in num_classes.items():
            check_int(f"num_classes[{a!r}]", v, minimum=2)  # the padding class 0 and at least one token
        self.dim, self.num_classes = dim, dict(num_classes)
        self.heads = nn.ModuleDict({a: nn.Linear(dim, v) for a, v in self.num_classes.items()})

    def forward(self, h: Tensor) -> dict[str, Tensor]:
        """``h (..., dim)`` -> ``{name: logits (..., num_classes[name])}``."""
        check_tensor("h", h, floating=True)
        check_matches("h", h, next(iter(self.heads.values())).weight, "AttributePredictor")
        if h.shape[-1] != self.dim:
            fail("h", f"last dim {self.dim} (= dim)", h.shape)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def init_prior_(self, rates: Mapping[str, Tensor], *, eps: float = 1e-4) -> "AttributePredictor":
        """Start each head at the label prior: bias ``b_c = log(p_c / (1 - p_c))`` with ``p_c`` the rate
        at which class ``c`` is positive (``rates[name]``: ``(num_classes[name],)`` in ``[0, 1]``, clamped to
        ``[eps, 1 - eps]``). With zero biases (the reference's init) every logit starts at 0, so the BCE
        first spends many steps pushing all ``V`` logits down through the shared representation; starting
        at the prior removes that transient. Returns ``self``."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 0.5:
            fail("eps", "a float in (0, 0.5): the rates are clamped to [eps, 1 - eps]", repr(eps))
        if not isinstance(rates, Mapping) or set(rates) != set(self.heads):
            fail("rates", f"the attributes {sorted(self.heads)}",
                 f"keys {sorted(rates)}" if isinstance(rates, Mapping) else type(rates).__name__)
        for a, head in self.heads.items():
            p = rates[a]
            check_tensor(f"rates[{a!r}]", p, floating=True)
            if p.shape != (self.num_classes[a],):
                fail(f"rates[{a!r}]", f"shape ({self.num_classes[a]},)", p.shape)
            if p.numel() and (bool((p < 0).any()) or bool((p > 1).any()) or bool(p.isnan().any())):
                fail(f"rates[{a!r}]", "rates in [0, 1]", f"values in [{float(p.min())}, {float(p.max())}]")
            p = p.to(head.bias).clamp(eps, 1 - eps)
            head.bias.copy_(torch.log(p) - torch.log1p(-p))
        return self

    def loss(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], *, valid: Tensor | None = None,
             pad_id: int = 0) -> dict[str, Tensor]:
        """Per-attribute BCE, see :func:`aap_loss`."""
        return aap_loss(logits, targets, valid=valid, pad_id=pad_id)


def aap_loss(logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], *, valid: Tensor | None = None,
             pad_id: int = 0) -> dict[str, Tensor]:
    """Multi-label BCE per attribute: mean over (valid rows) x (classes without ``pad_id``).

    ``logits[name]``: ``(..., V)``. ``targets[name]``: token lists ``(..., k)`` (long, padded with
    ``pad_id``), one token ``(...)`` (long), or a multi-hot ``(..., V)`` float in ``[0, 1]``. ``valid``: bool
    ``(...)`` selecting the rows that count (e.g. the masked positions of BERT4Rec); rows whose target item
    is padding should be excluded with it. A loss over zero valid rows is 0. Written without data-dependent
    shapes, so a training step with it compiles with ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(logits, Mapping) or not isinstance(targets, Mapping):
        fail("targets", "mappings of attribute name -> tensor (logits and targets)",
             f"{type(logits).__name__} / {type(targets).__name__}")
    if set(logits) != set(targets):
        fail("targets", f"the attributes {sorted(logits)}", f"keys {sorted(targets)}")
    if valid is not None:
        check_tensor("valid", valid)
        if valid.dtype != torch.bool:  # an int 0/1 tensor would silently weight rows by its values
            fail("valid", f"a bool tensor of shape {tuple(next(iter(logits.values())).shape[:-1])}",
                 f"dtype {valid.dtype}")
    out = {}
    for a, lg in logits.items():
        check_tensor(f"logits[{a!r}]", lg, floating=True)
        t = targets[a]
        check_tensor(f"targets[{a!r}]", t)
        v = lg.shape[-1]
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or not 0 <= pad_id < v:
            fail("pad_id", f"an int in [0, {v}) (= num_classes of logits[{a!r}])", repr(pad_id))
        if t.is_floating_point():
            if t.shape != lg.shape:
                fail(f"targets[{a!r}]", f"a multi-hot of shape {tuple(lg.shape)}", t.shape)
            if _eager() and t.numel() and (bool((t < 0).any()) or bool((t > 1).any()) or bool(t.isnan().any())):
                fail(f"targets[{a!r}]", "multi-hot values in [0, 1]",
                     f"values in [{float(t.min())}, {float(t.max())}]")
            y = t.to(lg.dtype)
        else:
            if t.shape == lg.shape[:-1]:
                t = t.unsqueeze(-1)
            if t.shape[:-1] != lg.shape[:-1]:
                fail(f"targets[{a!r}]", f"token ids of shape {tuple(lg.shape[:-1])} + (k,)", t.shape)
            y = multi_hot(t, v, pad_id=pad_id, arg=f"targets[{a!r}]").to(lg.dtype)
        if valid is not None and valid.shape != lg.shape[:-1]:
            fail("valid", f"bool of shape {tuple(lg.shape[:-1])}", valid.shape)
        per = F.binary_cross_entropy_with_logits(lg, y, reduction="none")  # (..., V)
        classes = torch.ones(v, dtype=per.dtype, device=per.device)
        classes[pad_id] = 0.0
        per = per * classes
        if valid is None:
            rows = per.numel() // max(v, 1)
            total = per.sum()
        else:
            rows = valid.sum()
            total = (per * valid.unsqueeze(-1).to(per.dtype)).sum()
        count = rows * (v - 1)
        out[a] = total / torch.clamp(torch.as_tensor(count, device=per.device, dtype=per.dtype), min=1.0)
    return out


def total_loss(item_loss: Tensor, aap_losses: Mapping[str, Tensor], *, lamb: "float | Mapping[str, float]") -> Tensor:
    """``L_item + sum_j lambda_j * L_fj`` (``lamb`` a float for all attributes, or one per attribute)."""
    total = item_loss
    for a, l in aap_losses.items():
        if isinstance(lamb, Mapping) and a not in lamb:
            fail("lamb", f"a weight for every attribute {sorted(aap_losses)}", f"keys {sorted(lamb)}")
        w = lamb[a] if isinstance(lamb, Mapping) else lamb
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            fail("lamb" if not isinstance(lamb, Mapping) else f"lamb[{a!r}]", "a finite weight >= 0", repr(w))
        total = total + w * l
    return total
