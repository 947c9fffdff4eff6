"""The example models: SASRec, SASRecF, NOVA, DIF-SASRec, BERT4Rec, DIF-BERT4Rec.

Every model maps right-padded item ids ``(b, n)`` (0 = padding) to hidden states ``(b, n, dim)``::

    h = model(ids)                                  # (b, n, dim)
    h, maps = model(ids, return_scores=True)        # maps: one dict per layer, maps[l]["fused"]: (b, heads, n, n)
    scores = model.item_scores(h_rows)              # (..., num_items + 1), column 0 = padding
    aap = model.attribute_logits(h_rows)            # {attribute: (..., V)} for DIF models, else None

``maps[l]["fused"]`` is the raw (pre-scale, pre-mask, pre-softmax) score matrix the softmax acts on:
``q @ k^T`` of the single fused stream for SASRec / SASRecF / NOVA / BERT4Rec, the fused decoupled scores for
the DIF models (whose maps also hold each source's matrix: ``"item"``, ``"position"``, attribute names).

Causal models (``model.causal``) attend to earlier positions only; BERT4Rec-style models attend both ways
and reserve item id ``num_items + 1`` for ``[MASK]`` (``model.mask_id``).

The attention of every model is the library's (``DecoupledEncoder`` / ``functional.decoupled_attention``):
a stock model is the one-source special case (``position=False``, no attributes), so speed comparisons
between the stock and the DIF models measure DIF, not two different attention codes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dif_attention import (AttributeEmbedding, AttributePredictor, DecoupledEncoder, FeedForward, functional,
                           padding_mask)

__all__ = ["SASRec", "SASRecF", "NOVA", "DIFSASRec", "BERT4Rec", "DIFBERT4Rec", "MODELS", "build_model"]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for Linear / Embedding weights, zero biases, LayerNorm (1, 0) -- as RecBole; attribute
    tables keep the library's own init; padding rows are zeroed."""
    for m in module.modules():
        if isinstance(m, AttributeEmbedding):
            continue
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and not any(m is t for t in _attribute_tables(module)):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _attribute_tables(module: nn.Module):
    return [t for m in module.modules() if isinstance(m, AttributeEmbedding) for t in m.tables.values()]


class SequenceModel(nn.Module):
    """Shared parts: item / position tables, the encoder call, tied item scores."""

    causal = True
    has_aap = False

    def __init__(self, *, num_items: int, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5, attn_dropout: float = 0.5, ff_dim: int | None = None,
                 backend: str = "auto", extra_items: int = 0):
        super().__init__()
        self.num_items, self.dim, self.max_len = num_items, dim, max_len
        self.item_emb = nn.Embedding(num_items + 1 + extra_items, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.in_norm, self.in_drop = nn.LayerNorm(dim, eps=1e-12), nn.Dropout(dropout)
        self.enc_kwargs = dict(ff_dim=ff_dim or 4 * dim, dropout=dropout, attn_dropout=attn_dropout, backend=backend)
        self.layers, self.heads = layers, heads

    def mask(self, ids: Tensor) -> Tensor:
        """Key padding ``(b, 1, 1, n)``; causal models add ``is_causal=True`` in the encoder call."""
        return padding_mask(ids)

    def positions(self, n: int) -> Tensor:
        if n > self.max_len:
            raise ValueError(f"ids: expected at most max_len={self.max_len} positions, got {n}")
        return self.pos_emb.weight[:n]  # (n, dim)

    def output_layer(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(h', weight, bias)`` with ``item_scores(h) = h' @ weight.T (+ bias)``: ``weight`` is the tied item
        table ``(num_items + 1, dim)``; the training loss uses this to fuse the full-softmax output layer."""
        return h, self.item_emb.weight[: self.num_items + 1], None

    def item_scores(self, h: Tensor) -> Tensor:
        """``(..., dim)`` -> scores over item ids ``0..num_items`` ``(..., num_items + 1)`` (tied table)."""
        h, weight, bias = self.output_layer(h)
        scores = h @ weight.T
        return scores if bias is None else scores + bias

    def attribute_logits(self, h: Tensor):
        return None


class SASRec(SequenceModel):
    """Stock SASRec (RecBole): ``x = Drop(LN(E_item + E_pos))``, post-LN causal transformer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoder = DecoupledEncoder(self.layers, self.dim, self.heads, position=False, **self.enc_kwargs)
        init_weights(self)

    def embed(self, ids: Tensor) -> Tensor:
        return self.item_emb(ids) + self.positions(ids.shape[1])

    def forward(self, ids: Tensor, *, return_scores: bool = False):
        x = self.in_drop(self.in_norm(self.embed(ids)))
        return self.encoder(x, mask=self.mask(ids), is_causal=self.causal, return_scores=return_scores)


class SASRecF(SASRec):
    """Early fusion (RecBole SASRecF): ``Linear([E_item, f_1, ..., f_F]) + E_pos`` with each attribute embedded
    at ``dim`` (sum-pooled), then the stock encoder -- one fused stream."""

    def __init__(self, *, tables: dict, num_classes: dict, pooling: str = "sum", trainable_attributes: bool = True,
                 attr_init_std: float = 0.02, aap: bool = False, **kw):
        super().__init__(**kw)
        self.attr_emb = AttributeEmbedding(num_classes, self.dim, pooling=pooling, item_tables=tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        self.fuse = nn.Linear(self.dim * (1 + len(num_classes)), self.dim)
        self.has_aap = aap  # with AAP: the paper's "w/o DIF" ablation (early fusion + attribute predictors)
        self.predictor = AttributePredictor(self.dim, num_classes) if aap else None
        init_weights(self)

    def attribute_logits(self, h: Tensor):
        return self.predictor(h) if self.predictor is not None else None

    def embed(self, ids: Tensor) -> Tensor:
        feats = list(self.attr_emb(items=ids).values())
        return self.fuse(torch.cat([self.item_emb(ids), *feats], dim=-1)) + self.positions(ids.shape[1])


class NOVALayer(nn.Module):
    """NOVA (Liu et al., AAAI 2021) block: queries/keys from the fused stream ``h + side``, values from the
    item stream ``h`` alone; post-LN residuals and a feed-forward on the item stream."""

    def __init__(self, dim: int, heads: int, *, ff_dim: int, dropout: float, attn_dropout: float, backend: str,
                 **_):
        super().__init__()
        self.heads, self.attn_dropout, self.backend = heads, attn_dropout, backend
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.ff = FeedForward(dim, ff_dim, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-12), nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, side: Tensor, *, mask: Tensor, is_causal: bool, return_scores: bool = False):
        split = lambda t: rearrange(t, "b n (h e) -> b h n e", h=self.heads)  # noqa: E731
        fused = h + side
        q, k, v = split(self.to_q(fused)), split(self.to_k(fused)), split(self.to_v(h))
        p = self.attn_dropout if self.training else 0.0
        out = functional.decoupled_attention([q], [k], v, mask=mask, is_causal=is_causal, dropout_p=p,
                                             backend="torch" if return_scores else self.backend)
        h = self.norm1(h + self.drop(self.to_out(rearrange(out, "b h n e -> b n (h e)"))))
        h = self.norm2(h + self.ff(h))
        return (h, {"fused": q @ k.transpose(-1, -2)}) if return_scores else h


class NOVA(SequenceModel):
    """NOVA-SASRec with ``sum`` fusion of the side information (position + attributes, each at ``dim``)."""

    def __init__(self, *, tables: dict, num_classes: dict, pooling: str = "sum", trainable_attributes: bool = True,
                 attr_init_std: float = 0.02, **kw):
        super().__init__(**kw)
        self.attr_emb = AttributeEmbedding(num_classes, self.dim, pooling=pooling, item_tables=tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        self.blocks = nn.ModuleList(NOVALayer(self.dim, self.heads, **self.enc_kwargs) for _ in range(self.layers))
        init_weights(self)

    def forward(self, ids: Tensor, *, return_scores: bool = False):
        h = self.in_drop(self.in_norm(self.item_emb(ids)))
        side = self.positions(ids.shape[1]) + sum(self.attr_emb(items=ids).values())
        maps, mask = [], self.mask(ids)
        for block in self.blocks:
            h = block(h, side, mask=mask, is_causal=self.causal, return_scores=return_scores)
            if return_scores:
                h, m = h
                maps.append(m)
        return (h, maps) if return_scores else h


class DIFMixin:
    """DIF-SR input and heads: the item stream gets LN + dropout; position and attributes enter every layer's
    decoupled attention raw; AAP predicts the target item's attributes."""

    has_aap = True

    def _build_dif(self, *, tables, num_classes, attr_dim, fusion, pooling, trainable_attributes, attr_init_std,
                   extra_items=0):
        dims = {a: attr_dim for a in num_classes}
        if extra_items:  # the [MASK] id gets the padding attributes (no leak of the target's attributes)
            tables = {a: torch.cat([t, t.new_zeros(extra_items, t.shape[1])]) for a, t in tables.items()}
        self.attr_emb = AttributeEmbedding(num_classes, dims, pooling=pooling, item_tables=tables,
                                           trainable=trainable_attributes, init_std=attr_init_std)
        max_len = self.max_len if fusion in ("concat_exact", "gate_exact") else None
        self.encoder = DecoupledEncoder(self.layers, self.dim, self.heads, attr_dims=dims,
                                        fusion=fusion.replace("_exact", ""), max_len=max_len, position=True,
                                        **self.enc_kwargs)
        self.predictor = AttributePredictor(self.dim, num_classes)

    def forward(self, ids: Tensor, *, return_scores: bool = False):
        x = self.in_drop(self.in_norm(self.item_emb(ids)))
        return self.encoder(x, attrs=self.attr_emb(items=ids), pos=self.positions(ids.shape[1]),
                            mask=self.mask(ids), is_causal=self.causal, return_scores=return_scores)

    def attribute_logits(self, h: Tensor):
        return self.predictor(h)


class DIFSASRec(DIFMixin, SequenceModel):
    """DIF-SASRec (DIF-SR): decoupled attention over item, position and attribute scores, plus AAP."""

    def __init__(self, *, tables: dict, num_classes: dict, attr_dim: int = 64, fusion: str = "gate",
                 pooling: str = "sum", trainable_attributes: bool = True, attr_init_std: float = 0.02, **kw):
        super().__init__(**kw)
        self._build_dif(tables=tables, num_classes=num_classes, attr_dim=attr_dim, fusion=fusion, pooling=pooling,
                        trainable_attributes=trainable_attributes, attr_init_std=attr_init_std)
        init_weights(self)


class BERT4Rec(SASRec):
    """Stock BERT4Rec (current RecBole): bidirectional, ``[MASK] = num_items + 1``, output head
    ``LN(GELU(Linear(h)))`` then tied item embeddings plus a per-item bias."""

    causal = False

    def __init__(self, **kw):
        super().__init__(extra_items=1, **kw)
        self.mask_id = self.num_items + 1
        self.head = nn.Sequential(nn.Linear(self.dim, self.dim), nn.GELU(), nn.LayerNorm(self.dim, eps=1e-12))
        self.out_bias = nn.Parameter(torch.zeros(self.num_items + 1))
        init_weights(self)

    def output_layer(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.head(h), self.item_emb.weight[: self.num_items + 1], self.out_bias


class DIFBERT4Rec(DIFMixin, BERT4Rec):
    """DIF-BERT4Rec: BERT4Rec with decoupled attention; ``[MASK]`` has the padding attributes; AAP at the
    masked positions."""

    def __init__(self, *, tables: dict, num_classes: dict, attr_dim: int = 64, fusion: str = "gate",
                 pooling: str = "sum", trainable_attributes: bool = True, attr_init_std: float = 0.02, **kw):
        super().__init__(**kw)
        del self.encoder
        self._build_dif(tables=tables, num_classes=num_classes, attr_dim=attr_dim, fusion=fusion, pooling=pooling,
                        trainable_attributes=trainable_attributes, attr_init_std=attr_init_std, extra_items=1)
        init_weights(self)


MODELS = {"SASRec": SASRec, "SASRecF": SASRecF, "NOVA": NOVA, "DIFSASRec": DIFSASRec,
          "BERT4Rec": BERT4Rec, "DIFBERT4Rec": DIFBERT4Rec}
ATTRIBUTE_MODELS = ("SASRecF", "NOVA", "DIFSASRec", "DIFBERT4Rec")
DIF_KEYS = ("attr_dim", "fusion")


def build_model(name: str, dataset_info: dict, **hparams) -> SequenceModel:
    """``build_model("DIFSASRec", dataset.info, dim=64, layers=2, heads=2, max_len=50, fusion="gate", ...)``.

    ``dataset_info``: ``{"num_items", "tables", "num_classes"}`` (see ``examples.data.Dataset.info``).
    Keywords a model does not take (e.g. ``fusion`` for SASRec) are ignored, so one config serves all.
    """
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    hp = dict(hparams)
    if name not in ("DIFSASRec", "DIFBERT4Rec"):
        for key in DIF_KEYS:
            hp.pop(key, None)
    if name != "SASRecF":
        hp.pop("aap", None)
    if name in ATTRIBUTE_MODELS:
        if not dataset_info.get("num_classes"):
            raise ValueError(f"model {name}: needs item attributes, the dataset has none")
        hp.update(tables=dataset_info["tables"], num_classes=dataset_info["num_classes"])
    else:
        for key in ("pooling", "trainable_attributes", "attr_init_std"):
            hp.pop(key, None)
    return MODELS[name](num_items=dataset_info["num_items"], **hp)
