"""Auxiliary attribute predictors (AAP): predict the target item's attributes from the final
representation, trained with a multi-label BCE loss added to the item loss with weight lambda::

    L = L_item + lambda * sum_j L_fj
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import check_matches, check_tensor, fail

__all__ = ["AttributePredictor", "aap_loss", "multi_hot", "total_loss"]


def multi_hot(tokens: Tensor, num_classes: int, *, pad_id: int = 0) -> Tensor:
    """Token lists ``(..., k)`` (padded with ``pad_id``) -> multi-hot ``(..., num_classes)`` float in {0, 1}
    with the ``pad_id`` column zero. (The reference summed one-hots, so a repeated token counted twice.)"""
    if tokens.is_floating_point():
        fail("tokens", "integer token ids", f"dtype {tokens.dtype}")
    eager = not torch.compiler.is_compiling()  # the range check reads values: eager mode only
    if eager and tokens.numel() and (int(tokens.max()) >= num_classes or int(tokens.min()) < 0):
        fail("tokens", f"token ids in [0, {num_classes})", f"ids in [{int(tokens.min())}, {int(tokens.max())}]")
    out = torch.zeros(*tokens.shape[:-1], num_classes, device=tokens.device)
    out.scatter_(-1, tokens, 1.0)
    out[..., pad_id] = 0.0
    return out


class AttributePredictor(nn.Module):
    """One ``Linear(dim -> num_classes[name])`` head per attribute; ``forward(h)`` maps ``(..., dim)``
    to a dict of logits ``(..., num_classes[name])`` (column 0 is the padding token)."""

    def __init__(self, dim: int, num_classes: Mapping[str, int]):
        super().__init__()
        if not num_classes:
            fail("num_classes", "at least one attribute", "an empty mapping")
        self.dim, self.num_classes = dim, dict(num_classes)
        self.heads = nn.ModuleDict({a: nn.Linear(dim, v) for a, v in self.num_classes.items()})

    def forward(self, h: Tensor) -> dict[str, Tensor]:
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
        if set(rates) != set(self.heads):
            fail("rates", f"the attributes {sorted(self.heads)}", f"keys {sorted(rates)}")
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
    ``pad_id``), one token ``(...)`` (long), or a multi-hot ``(..., V)`` float. ``valid``: bool ``(...)``
    selecting the rows that count (e.g. the masked positions of BERT4Rec); rows whose target item
    is padding should be excluded with it. A loss over zero valid rows is 0.
    """
    if set(logits) != set(targets):
        fail("targets", f"the attributes {sorted(logits)}", f"keys {sorted(targets)}")
    out = {}
    for a, lg in logits.items():
        t = targets[a]
        v = lg.shape[-1]
        if t.is_floating_point():
            if t.shape != lg.shape:
                fail(f"targets[{a!r}]", f"a multi-hot of shape {tuple(lg.shape)}", t.shape)
            y = t
        else:
            if t.shape == lg.shape[:-1]:
                t = t.unsqueeze(-1)
            if t.shape[:-1] != lg.shape[:-1]:
                fail(f"targets[{a!r}]", f"token ids of shape {tuple(lg.shape[:-1])} + (k,)", t.shape)
            y = multi_hot(t, v, pad_id=pad_id).to(lg.dtype)
        keep = torch.ones(v, dtype=torch.bool, device=lg.device)
        keep[pad_id] = False
        per = F.binary_cross_entropy_with_logits(lg, y, reduction="none")[..., keep]  # (..., V-1)
        if valid is not None:
            check_tensor("valid", valid)
            if valid.dtype != torch.bool:  # an int 0/1 tensor would silently index rows instead of selecting
                fail("valid", f"a bool tensor of shape {tuple(lg.shape[:-1])}", f"dtype {valid.dtype}")
            if valid.shape != lg.shape[:-1]:
                fail("valid", f"bool of shape {tuple(lg.shape[:-1])}", valid.shape)
            per = per[valid]
        out[a] = per.mean() if per.numel() else lg.sum() * 0.0
    return out


def total_loss(item_loss: Tensor, aap_losses: Mapping[str, Tensor], *, lamb: "float | Mapping[str, float]") -> Tensor:
    """``L_item + sum_j lambda_j * L_fj`` (``lamb`` a float for all attributes, or one per attribute)."""
    total = item_loss
    for a, l in aap_losses.items():
        if isinstance(lamb, Mapping) and a not in lamb:
            fail("lamb", f"a weight for every attribute {sorted(aap_losses)}", f"keys {sorted(lamb)}")
        w = lamb[a] if isinstance(lamb, Mapping) else lamb
        total = total + w * l
    return total
