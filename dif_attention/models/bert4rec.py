"""Bidirectional (masked-item) models: BERT4Rec and DIF-BERT4Rec.

They attend both ways and reserve item id ``num_items + 1`` for ``[MASK]`` (``model.mask_id``); to score the
next item, append ``[MASK]`` to the history and read its position.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from .base import init_weights
from .sasrec import SASRec, DIFMixin

__all__ = ["BERT4Rec", "DIFBERT4Rec"]


class BERT4Rec(SASRec):
    """Stock BERT4Rec (current RecBole): bidirectional, ``[MASK] = num_items + 1``, output head
    ``LN(GELU(Linear(h)))`` then tied item embeddings plus a per-item bias."""

    causal = False

    def __init__(self, **kw):
        super().__init__(_extra_items=1, **kw)
        self.mask_id = self.num_items + 1
        self.head = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.LayerNorm(self.dim, eps=1e-12))
        self.out_bias = nn.Parameter(torch.zeros(self.num_items + 1))
        init_weights(self)

    def output_layer(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.head(h), self.item_emb.weight[: self.num_items + 1], self.out_bias


class DIFBERT4Rec(DIFMixin, BERT4Rec):
    """DIF-BERT4Rec: BERT4Rec with decoupled attention; ``[MASK]`` has the padding attributes; AAP at the
    masked positions."""

    def __init__(self, *, item_tables: Mapping[str, Tensor], num_classes: Mapping[str, int], attr_dim: int = 64,
                 fusion: str = "gate", exact_fusion: bool = False, pooling: str = "sum",
                 trainable_attributes: bool = True, attr_init_std: float = 0.02, input_fusion: bool = False, **kw):
        super().__init__(**kw)
        del self.encoder  # BERT4Rec's stock encoder: built (its init draws are part of the seeded stream), replaced
        self._build_dif(item_tables=item_tables, num_classes=num_classes, attr_dim=attr_dim, fusion=fusion,
                        exact_fusion=exact_fusion, pooling=pooling, trainable_attributes=trainable_attributes,
                        attr_init_std=attr_init_std, input_fusion=input_fusion, extra_items=1)
        init_weights(self)
