"""What every sequential model shares: item and position tables, the tied output layer, the hyper-parameter
round trip (``model.config()`` -> :func:`~dif_attention.models.build_model`), the init.

Shapes (einops style): ``ids (b, n)`` right-padded item ids (0 = padding) -> hidden ``(b, n, dim)``;
``item_scores (..., num_items + 1)`` with column 0 the padding item.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..embedding import AttributeEmbedding
from ..errors import check_int, check_integer, check_matches, check_probability, check_tensor, fail
from ..functional import BACKENDS, ScoreMaps
from ..masks import padding_mask
from .serving import Servable

__all__ = ["SequenceModel", "init_weights", "hyper_parameters"]


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for Linear / Embedding weights, zero biases, LayerNorm (1, 0) -- as RecBole; attribute
    tables keep the library's own init; padding rows are zeroed."""
    tables = [t for m in module.modules() if isinstance(m, AttributeEmbedding) for t in m.tables.values()]
    for m in module.modules():
        if isinstance(m, AttributeEmbedding):
            continue
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and not any(m is t for t in tables):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def hyper_parameters(cls: type) -> list[str]:
    """The keyword arguments a model class takes, across its ``__init__`` chain (names starting with ``_``
    are internal and not listed). Each one is also an attribute of the model (see ``SequenceModel.config``)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(vars(klass)["__init__"]).parameters.values():
            if p.kind == p.KEYWORD_ONLY and not p.name.startswith("_") and p.name not in names:
                names.append(p.name)
    return names


class SequenceModel(Servable, nn.Module):
    """Shared parts: item / position tables, the encoder input, tied item scores, the forward, and serving
    (:class:`~dif_attention.models.serving.Servable`: ``next_scores``, ``recommend``, ``start``, ``step``).

    Args (every model): ``num_items`` (ids ``1..num_items``, 0 = padding), ``dim``, ``layers``, ``heads``,
    ``max_len`` (positions), ``hidden_dropout`` (embeddings and residual branches), ``attn_dropout``
    (attention probabilities), ``ff_dim`` (feed-forward inner width, default ``4 * dim``), ``backend``
    (the attention backend, see :func:`~dif_attention.decoupled_attention`). A model defines ``encoder`` and
    ``inputs(ids, positions=None)``.
    """

    causal = True
    has_aap = False
    #: the paper-exact fusions are tied to inputs padded to ``max_len`` (the DIF models say so per instance)
    length_bound = False

    def __init__(self, *, num_items: int, dim: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 hidden_dropout: float = 0.5, attn_dropout: float = 0.5, ff_dim: int | None = None,
                 backend: str = "auto", _extra_items: int = 0):
        super().__init__()
        check_int("num_items", num_items)
        check_int("dim", dim)
        check_int("layers", layers)
        check_int("heads", heads)
        check_int("max_len", max_len)
        if ff_dim is not None:
            check_int("ff_dim", ff_dim)
        if backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}", repr(backend))
        self.num_items, self.dim, self.max_len, self.layers, self.heads = num_items, dim, max_len, layers, heads
        self.hidden_dropout = check_probability("hidden_dropout", hidden_dropout)
        self.attn_dropout = check_probability("attn_dropout", attn_dropout)
        self.ff_dim, self.backend = ff_dim, backend
        self.item_emb = nn.Embedding(num_items + 1 + _extra_items, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.in_norm, self.in_drop = nn.LayerNorm(dim, eps=1e-12), nn.Dropout(hidden_dropout)
        self.enc_kwargs = dict(ff_dim=ff_dim or 4 * dim, hidden_dropout=hidden_dropout, attn_dropout=attn_dropout,
                               backend=backend)

    # ---- hyper-parameters
    def config(self) -> dict:
        """The constructor arguments as a plain dict (``"name"`` + every hyper-parameter; attribute tables as
        tensors): ``build_model(**model.config())`` rebuilds the model, and the dict saves with ``torch.save``
        and loads with ``torch.load(weights_only=True)``."""
        return {"name": type(self).__name__, **{p: getattr(self, p) for p in hyper_parameters(type(self))}}

    # ---- shared pieces
    def check_ids(self, ids: Tensor) -> Tensor:
        """``ids``: a 2-d integer tensor of item ids in ``[0, item_emb rows)``."""
        check_tensor("ids", ids, ndim=2)
        check_integer("ids", ids, "an integer tensor of item ids (b, n)")
        if ids.shape[1] > self.max_len:
            fail("ids", f"at most max_len={self.max_len} positions (b, n <= {self.max_len})", ids.shape)
        if not torch.compiler.is_compiling() and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.item_emb.num_embeddings:
                fail("ids", f"item ids in [0, {self.item_emb.num_embeddings - 1}]", f"ids in [{lo}, {hi}]")
        return ids

    def mask(self, ids: Tensor) -> Tensor:
        """Key padding ``(b, 1, 1, n)``; causal models add ``is_causal=True`` in the encoder call."""
        return padding_mask(ids)

    def positions(self, n: int) -> Tensor:
        """The position table's first ``n`` rows ``(n, dim)`` (at most ``max_len``)."""
        if n > self.max_len:
            fail("ids", f"at most max_len={self.max_len} positions", f"{n} positions")
        return self.pos_emb.weight[:n]  # (n, dim)

    def position_embedding(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """``(n, dim)`` for positions ``0..n-1`` of ``ids (b, n)`` (shared by the batch), or ``(b, n, dim)`` for
        the given integer ``positions (b, n)`` (each row's own, e.g. new items of histories of different lengths)."""
        return self.positions(ids.shape[1]) if positions is None else self.pos_emb(positions)

    def forward(self, ids: Tensor, *, return_scores: bool = False) -> Tensor | tuple[Tensor, list[ScoreMaps]]:
        """``ids (b, n)`` -> hidden states ``(b, n, dim)`` (and one :class:`~dif_attention.ScoreMaps` per layer)."""
        self.check_ids(ids)
        x, side = self.inputs(ids)
        return self.encoder(x, **side, mask=self.mask(ids), is_causal=self.causal, return_scores=return_scores)

    def step_inputs(self, items: Tensor, positions: Tensor) -> tuple[Tensor, dict]:
        """:meth:`inputs` of one new item per row, ``items (b,)`` (ids already checked, as ``step`` does) at
        ``positions (b,)``: the stream ``(b, 1, dim)`` and the side keywords."""
        return self.inputs(items[:, None], positions=positions[:, None])

    def output_layer(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(h', weight, bias)`` with ``item_scores(h) = h' @ weight.T (+ bias)``: ``weight`` is the tied item
        table ``(num_items + 1, dim)``; the training loss uses this to fuse the full-softmax output layer."""
        return h, self.item_emb.weight[: self.num_items + 1], None

    def item_scores(self, h: Tensor) -> Tensor:
        """``(..., dim)`` -> scores over item ids ``0..num_items`` ``(..., num_items + 1)`` (tied table)."""
        check_tensor("h", h, floating=True)
        check_matches("h", h, self.item_emb.weight, type(self).__name__)
        if h.ndim == 0 or h.shape[-1] != self.dim:
            fail("h", f"last dim {self.dim} (= dim)", h.shape)
        h, weight, bias = self.output_layer(h)
        scores = h @ weight.T
        return scores if bias is None else scores + bias

    def attribute_logits(self, h: Tensor) -> dict[str, Tensor] | None:
        """AAP logits ``{attribute: (..., V)}`` of models with attribute predictors, else ``None``."""
        return None
