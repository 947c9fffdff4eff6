"""Causal models: SASRec, SASRecF (early fusion), NOVA, DIF-SASRec.

Every model maps right-padded item ids ``(b, n)`` (0 = padding) to hidden states ``(b, n, dim)``::

    h = model(ids)                                  # (b, n, dim)
    h, maps = model(ids, return_scores=True)        # one ScoreMaps per layer; maps[l].fused: (b, heads, n, n)

The attention of every model is the library's (``DecoupledEncoder`` / ``decoupled_attention``): a stock model
is the one-source special case (``position=False``, no attributes), so speed comparisons between the stock and
the DIF models measure DIF, not two different attention codes.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..aap import AttributePredictor
from ..baselines import EarlyFusionAttention, InputFusion
from ..embedding import AttributeEmbedding
from ..encoder import DecoupledEncoder
from ..errors import check_bool, check_tensor, fail
from .base import SequenceModel, init_weights

__all__ = ["SASRec", "SASRecF", "NOVA", "DIFSASRec", "DIFMixin", "check_item_tables"]

FUSIONS = ("add", "concat", "gate")


def check_item_tables(item_tables, num_classes, num_items: int) -> tuple[dict, dict]:
    """``item_tables``: attribute -> ``(num_items + 1, k)`` long token table; ``num_classes``: attribute -> V."""
    if not isinstance(item_tables, Mapping) or not item_tables:
        fail("item_tables", "a non-empty mapping of attribute -> (num_items + 1, k) token table (this model "
             "needs item attributes)", repr(item_tables) if item_tables is None else type(item_tables).__name__)
    if not isinstance(num_classes, Mapping) or set(num_classes) != set(item_tables):
        fail("num_classes", f"a mapping with one class count per attribute {sorted(item_tables)}",
             repr(num_classes))
    for a, t in item_tables.items():
        check_tensor(f"item_tables[{a!r}]", t, ndim=2)
        if t.shape[0] != num_items + 1:
            fail(f"item_tables[{a!r}]", f"{num_items + 1} rows (= num_items + 1)", t.shape)
    return dict(item_tables), dict(num_classes)


class SASRec(SequenceModel):
    """Stock SASRec (RecBole): ``x = Drop(LN(E_item + E_pos))``, post-LN causal transformer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoder = DecoupledEncoder(self.layers, self.dim, self.heads, position=False, **self.enc_kwargs)
        init_weights(self)

    def embed(self, ids: Tensor, pos: Tensor) -> Tensor:
        """The input sum before LayerNorm and dropout: ``E_item(ids) + pos``."""
        return self.item_emb(ids) + pos

    def inputs(self, ids: Tensor, positions: Tensor | None = None) -> tuple[Tensor, dict]:
        """The encoder's input for ``ids (b, n)`` at ``positions`` (``(b, n)``; default ``0..n-1``): the stream
        ``Drop(LN(embed))`` ``(b, n, dim)`` and the encoder's side keywords (none: one fused stream)."""
        x = self.in_drop(self.in_norm(self.embed(ids, self.position_embedding(ids, positions))))
        return x, {}


class SASRecF(SASRec):
    """Early fusion (RecBole SASRecF): ``Linear([E_item, f_1, ..., f_F]) + E_pos`` with each attribute embedded
    at ``dim`` (pooled), then the stock encoder -- one fused stream. ``aap=True`` adds the attribute predictors
    (the paper's "w/o DIF" ablation)."""

    def __init__(self, *, item_tables: Mapping[str, Tensor], num_classes: Mapping[str, int], pooling: str = "sum",
                 trainable_attributes: bool = True, attr_init_std: float = 0.02, aap: bool = False, **kw):
        super().__init__(**kw)
        self.item_tables, self.num_classes = check_item_tables(item_tables, num_classes, self.num_items)
        self.pooling, self.attr_init_std = pooling, attr_init_std
        self.trainable_attributes = check_bool("trainable_attributes", trainable_attributes)
        self.attr_emb = AttributeEmbedding(self.num_classes, self.dim, pooling=pooling, item_tables=self.item_tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        self.fuse = InputFusion(self.dim, attr_dims={a: self.dim for a in self.num_classes}, combine="concat")
        self.aap = self.has_aap = check_bool("aap", aap)
        self.predictor = AttributePredictor(self.dim, self.num_classes) if aap else None
        init_weights(self)

    def attribute_logits(self, h: Tensor) -> dict[str, Tensor] | None:
        return self.predictor(h) if self.predictor is not None else None

    def embed(self, ids: Tensor, pos: Tensor) -> Tensor:
        return self.fuse(self.item_emb(ids), attrs=self.attr_emb(items=ids), pos=pos)


class NOVA(SequenceModel):
    """NOVA-SASRec (Liu et al., AAAI 2021) with ``sum`` fusion: queries and keys from ``h + E_pos + sum_j f_j``
    (each attribute embedded at ``dim``), values from the item stream ``h`` alone; post-LN blocks."""

    def __init__(self, *, item_tables: Mapping[str, Tensor], num_classes: Mapping[str, int], pooling: str = "sum",
                 trainable_attributes: bool = True, attr_init_std: float = 0.02, **kw):
        super().__init__(**kw)
        self.item_tables, self.num_classes = check_item_tables(item_tables, num_classes, self.num_items)
        self.pooling, self.attr_init_std = pooling, attr_init_std
        self.trainable_attributes = check_bool("trainable_attributes", trainable_attributes)
        self.attr_emb = AttributeEmbedding(self.num_classes, self.dim, pooling=pooling, item_tables=self.item_tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        dims = {a: self.dim for a in self.num_classes}
        kw = self.enc_kwargs

        def attention(_layer: int) -> nn.Module:
            return EarlyFusionAttention(self.dim, self.heads, attr_dims=dims, style="nova", combine="sum",
                                        attn_dropout=kw["attn_dropout"], backend=kw["backend"])

        self.encoder = DecoupledEncoder(self.layers, self.dim, self.heads, attention=attention, **kw)
        init_weights(self)

    def inputs(self, ids: Tensor, positions: Tensor | None = None) -> tuple[Tensor, dict]:
        """The item stream ``(b, n, dim)`` and the side keywords ``attrs``, ``pos`` of every layer."""
        h = self.in_drop(self.in_norm(self.item_emb(ids)))
        return h, {"attrs": self.attr_emb(items=ids), "pos": self.position_embedding(ids, positions)}


class DIFMixin:
    """DIF-SR input and heads: the item stream gets LN + dropout; position and attributes enter every layer's
    decoupled attention raw; AAP predicts the target item's attributes.

    ``fusion``: ``"add"``, ``"concat"`` or ``"gate"`` (the DIF-SR configs'); ``exact_fusion=True`` takes the
    paper-exact variant tied to ``max_len`` (it reads the whole padded row, so only prefix-mode training at
    length ``max_len`` is exact); the default is the length-agnostic, causal-safe one.

    ``input_fusion=True`` (not DIF-SR; off by default): the attributes also enter the item stream, as SASRecF's
    do, ``Linear([E_item, f_1, ..., f_F])`` before the LayerNorm, so the values carry them too; the decoupled
    scores are unchanged. A hybrid of early and decoupled fusion."""

    has_aap = True

    def _build_dif(self, *, item_tables, num_classes, attr_dim, fusion, exact_fusion, pooling,
                   trainable_attributes, attr_init_std, input_fusion=False, extra_items=0):
        self.item_tables, self.num_classes = check_item_tables(item_tables, num_classes, self.num_items)
        if fusion not in FUSIONS:  # a name, not a module: the model must rebuild from its config
            fail("fusion", f"one of {FUSIONS} (exact_fusion=True selects the paper-exact variant)", repr(fusion))
        self.attr_dim, self.fusion, self.exact_fusion = attr_dim, fusion, check_bool("exact_fusion", exact_fusion)
        self.pooling, self.attr_init_std = pooling, attr_init_std
        self.trainable_attributes = check_bool("trainable_attributes", trainable_attributes)
        dims = {a: attr_dim for a in self.num_classes}
        tables = self.item_tables
        if extra_items:  # the [MASK] id gets the padding attributes (no leak of the target's attributes)
            tables = {a: torch.cat([t, t.new_zeros(extra_items, t.shape[1])]) for a, t in tables.items()}
        self.attr_emb = AttributeEmbedding(self.num_classes, dims, pooling=pooling, item_tables=tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        self.encoder = DecoupledEncoder(self.layers, self.dim, self.heads, attr_dims=dims, fusion=fusion,
                                        max_len=self.max_len if exact_fusion and fusion != "add" else None,
                                        position=True, **self.enc_kwargs)
        self.predictor = AttributePredictor(self.dim, self.num_classes)
        self.input_fusion = check_bool("input_fusion", input_fusion)
        if self.input_fusion:  # built last: the default model's seeded init is unchanged
            self.item_fuse = InputFusion(self.dim, attr_dims=dims, combine="concat")

    @property
    def length_bound(self) -> bool:
        """True for the paper-exact fusions: inputs must be padded to exactly ``max_len``."""
        return self.exact_fusion and self.fusion != "add"

    def inputs(self, ids: Tensor, positions: Tensor | None = None) -> tuple[Tensor, dict]:
        """The item stream ``(b, n, dim)`` and the raw side inputs of every layer's decoupled attention: the
        attributes of the items and the position embedding (``(n, dim)``, or ``(b, n, dim)`` at ``positions``)."""
        attrs = self.attr_emb(items=ids)
        e = self.item_emb(ids)
        if self.input_fusion:
            e = self.item_fuse(e, attrs=attrs)
        return self.in_drop(self.in_norm(e)), {"attrs": attrs, "pos": self.position_embedding(ids, positions)}

    def step_inputs(self, items: Tensor, positions: Tensor) -> tuple[Tensor, dict]:
        """:meth:`inputs` of one new item per row (``items (b,)`` checked by ``step``, at ``positions (b,)``), the
        attributes looked up without :class:`~dif_attention.AttributeEmbedding`'s per-call range checks (its
        item tables were checked when it was built; the pooling is the same)."""
        attrs = self.attr_emb.of_items(items[:, None])
        e = self.item_emb(items[:, None])
        if self.input_fusion:
            e = self.item_fuse(e, attrs=attrs)
        x = self.in_norm(e) if not self.training else self.in_drop(self.in_norm(e))
        return x, {"attrs": attrs, "pos": self.pos_emb(positions[:, None])}

    def attribute_logits(self, h: Tensor) -> dict[str, Tensor]:
        return self.predictor(h)


class DIFSASRec(DIFMixin, SequenceModel):
    """DIF-SASRec (DIF-SR): decoupled attention over item, position and attribute scores, plus AAP."""

    def __init__(self, *, item_tables: Mapping[str, Tensor], num_classes: Mapping[str, int], attr_dim: int = 64,
                 fusion: str = "gate", exact_fusion: bool = False, pooling: str = "sum",
                 trainable_attributes: bool = True, attr_init_std: float = 0.02, input_fusion: bool = False, **kw):
        super().__init__(**kw)
        self._build_dif(item_tables=item_tables, num_classes=num_classes, attr_dim=attr_dim, fusion=fusion,
                        exact_fusion=exact_fusion, pooling=pooling, trainable_attributes=trainable_attributes,
                        attr_init_std=attr_init_std, input_fusion=input_fusion)
        init_weights(self)
