"""Serving the ready models: next-item scores, top-k recommendations, incremental steps, export.

    scores = model.next_scores(histories)                # (b, num_items + 1); column 0 (padding) is never an item
    items, scores = model.recommend(histories, k=10)     # (b, k) each, scores descending, the history excluded
    state = model.start(histories)                       # state.scores == model.next_scores(histories)
    scores, state = model.step(state, items)             # items (b,): one more item per history
    program = export_recommender(model, k=10)            # torch.export, dynamic batch and length

``histories``: right-padded item ids ``(b, n)`` (0 = padding, ids ``1..num_items``), any ``n``, every row with at
least one item. A history longer than ``max_len`` uses its last ``max_len`` items (BERT4Rec-style models: the
last ``max_len - 1`` and ``[MASK]`` after them). The models run as they are: call ``model.eval()`` first
(:func:`~dif_attention.models.load_model` returns eval mode), or dropout makes the scores random.

Incremental steps (causal models with the length-agnostic fusions, ``model.incremental``): ``start`` runs the
histories once and keeps every layer's keys and values (:class:`~dif_attention.KVCache`); ``step`` embeds only the
new item, at its row's own position, attends it to the cached keys of its row and appends its keys: one position
through every layer instead of the whole window. Rows of one batch hold different numbers of items: a cache slot
is a key, not a position, and a per-row slot mask says which slots hold an item of that row's window. A history
that fills ``max_len`` slides: its oldest item leaves and every other item moves one position down, so every key
and value cached for that row (computed, through every layer, from absolute position embeddings that have all
changed) is stale, and the exact thing to do is to recompute the row's whole window -- the cost of
``next_scores``, for that row, on every step from then on. Rows with room left stay incremental.
Bidirectional models (every position attends the new one) and the paper-exact fusions (``model.length_bound``:
every score row reads the whole padded window) have nothing exact to cache: their ``step`` recomputes the window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..attention import KVCache
from ..errors import check_bool, check_int, check_integer, check_tensor, fail, fmt_shape, is_integer

__all__ = ["Servable", "ServingState", "Recommender", "export_recommender", "last_items"]


def _eager() -> bool:
    """Value checks read tensors (a host sync, a graph break): eager mode only."""
    return not torch.compiler.is_compiling()


def last_items(histories: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The last ``width`` items of each right-padded history ``(b, n)``, left-aligned and right-padded to the
    longest: ``(b, min(longest, width))`` (``(b, width)`` when traced: one static width for every ``n``), and how
    many each row kept ``(b,)``."""
    b, n = histories.shape
    total = (histories != 0).sum(1)
    kept = total.clamp(max=width)
    cols = torch.arange(min(int(kept.max()), width) if _eager() else width, device=histories.device)
    idx = ((total - kept)[:, None] + cols[None, :]).clamp(max=n - 1)
    return torch.where(cols[None, :] < kept[:, None], histories.gather(1, idx), 0), kept


@dataclass(frozen=True)
class ServingState:
    """Where a batch of histories stands: returned by ``model.start`` and ``model.step``, passed back to ``step``.

    Fields (einops style; ``m`` cache slots)::

        windows : (b, max_len) long   the last items of each history (at most max_len), right-padded
        lengths : (b,) long           items in each window
        scores  : (b, num_items + 1)  next_scores of the histories so far
        caches  : one KVCache per layer of the windows' keys and values, or None (a model that recomputes)
        slots   : (b, m) bool         which cache slots hold an item of the row's window, or None

    ``owner`` is the model that made the state (a state only continues with its own model).
    """
    owner: nn.Module = field(repr=False)
    windows: Tensor
    lengths: Tensor
    scores: Tensor
    caches: tuple[KVCache, ...] | None = None
    slots: Tensor | None = None

    @property
    def batch(self) -> int:
        """The number of histories ``b``."""
        return self.lengths.shape[0]


def _rows(t: Tensor, rows: Tensor) -> Tensor:
    """Rows ``rows`` of a ``(b|1, ...)`` tensor (a batch-independent one is shared by every row)."""
    return t if t.shape[0] == 1 else t.index_select(0, rows)


def _merge(parts: list[tuple[Tensor, Tensor]], b: int, slot_dim: int) -> Tensor:
    """One ``(b, ...)`` tensor from ``(rows, tensor)`` parts covering every row once, each padded with zeros
    (False) along ``slot_dim`` to the widest part."""
    width = max(t.shape[slot_dim] for _, t in parts)
    shape = list(parts[0][1].shape)
    shape[0], shape[slot_dim] = b, width
    out = parts[0][1].new_zeros(shape)
    for rows, t in parts:
        t = t.expand(len(rows), *t.shape[1:])
        if t.shape[slot_dim] < width:
            pad = list(t.shape)
            pad[slot_dim] = width - t.shape[slot_dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=slot_dim)
        out.index_copy_(0, rows, t)
    return out


class Servable:
    """Serving methods of the ready models (mixed into :class:`~dif_attention.models.SequenceModel`); see the
    module docstring for shapes and for what the incremental step caches."""

    @property
    def incremental(self) -> bool:
        """True when ``step`` computes only the new position (causal models with a length-agnostic fusion)."""
        return self.causal and not self.length_bound

    # ---- checks
    def check_histories(self, histories: Tensor, arg: str = "histories") -> Tensor:
        """``histories``: a 2-d integer tensor of right-padded item ids in ``[0, num_items]`` on the model's
        device, every row with at least one item (value checks in eager mode only)."""
        check_tensor(arg, histories)
        if histories.ndim != 2:
            fail(arg, "a 2-d tensor of right-padded item ids (b, n)", histories.shape)
        check_integer(arg, histories, "an integer tensor of item ids (b, n), 0 = padding")
        if histories.shape[0] < 1 or histories.shape[1] < 1:
            fail(arg, "at least one history with at least one position (b >= 1, n >= 1)", histories.shape)
        device = self.item_emb.weight.device
        if histories.device != device:
            fail(arg, f"device {device} (the model's)", f"device {histories.device}")
        if _eager():
            lo, hi = int(histories.min()), int(histories.max())
            if lo < 0 or hi > self.num_items:
                fail(arg, f"item ids in [0, {self.num_items}] (0 = padding)", f"ids in [{lo}, {hi}]")
            present = histories != 0
            gaps = (~present[:, :-1] & present[:, 1:]).any(1)
            if bool(gaps.any()):
                fail(arg, "right-padded rows (0 only after the last item)",
                     f"a 0 before an item in row {int(gaps.nonzero()[0])}")
            if not bool(present[:, 0].all()):
                fail(arg, "at least one item in every history", f"an empty row {int((~present[:, 0]).nonzero()[0])}")
        return histories

    def _check_step(self, state: ServingState, items: Tensor) -> Tensor:
        if not isinstance(state, ServingState):
            fail("state", "the ServingState returned by start() or step()", type(state).__name__)
        if state.owner is not self:
            fail("state", f"a state made by this {type(self).__name__}'s start() or step()",
                 f"a state of another {type(state.owner).__name__}")
        check_tensor("items", items)
        if items.ndim != 1 or not is_integer(items):
            fail("items", f"a 1-d integer tensor of item ids, one per history: shape ({state.batch},)",
                 f"shape {fmt_shape(items.shape)} of dtype {items.dtype}")
        if items.shape[0] != state.batch:
            fail("state", f"a state of {items.shape[0]} histories (one per item given)",
                 f"a state of {state.batch} histories")
        if items.device != state.lengths.device:
            fail("items", f"device {state.lengths.device} (the state's)", f"device {items.device}")
        lo, hi = (int(t) for t in torch.aminmax(items))
        if lo < 1 or hi > self.num_items:
            fail("items", f"item ids in [1, {self.num_items}]", f"ids in [{lo}, {hi}]")
        return items

    # ---- scores
    def _window(self, histories: Tensor) -> tuple[Tensor, Tensor]:
        """What the model reads to score the next item: ids ``(b, w)`` and the position to read ``(b,)``."""
        if self.causal:
            ids, kept = last_items(histories, self.max_len)
            slot = kept - 1
        else:  # [MASK] after the last max_len - 1 items
            ids, kept = last_items(histories, self.max_len - 1)
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], 1)], 1).scatter(1, kept[:, None], self.mask_id)
            slot = kept
        if self.length_bound and ids.shape[1] < self.max_len:  # the paper-exact fusions read max_len keys
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], self.max_len - ids.shape[1])], 1)
        return ids, slot

    def _scores(self, histories: Tensor) -> Tensor:
        ids, slot = self._window(histories)
        h = self(ids)
        return self.item_scores(h[torch.arange(ids.shape[0], device=ids.device), slot])

    @torch.no_grad()
    def next_scores(self, histories: Tensor) -> Tensor:
        """Scores of the next item after each right-padded history ``(b, n)``: ``(b, num_items + 1)``, column
        ``i`` item ``i`` (column 0 is padding, never an item). Uses the last ``max_len`` items of a longer history."""
        return self._scores(self.check_histories(histories))

    def top_k(self, scores: Tensor, *, k: int = 10, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` best items of ``scores (b, num_items + 1)``: ``(items, scores)``, each ``(b, k)``, scores
        descending, never the padding id 0 nor an item of ``exclude`` (item ids ``(b, n)``). Raises ``DIFError``
        (eager mode) when a row has fewer than ``k`` items left."""
        scores = scores.index_fill(1, torch.zeros(1, dtype=torch.long, device=scores.device), float("-inf"))
        if exclude is not None:
            scores = scores.scatter(1, exclude, float("-inf"))
        if _eager():
            left = torch.isfinite(scores).sum(1)
            if int(left.min()) < k:
                r = int(left.argmin())
                fail("k", f"at most {int(left[r])}, the items left for row {r} once its history is excluded",
                     repr(k))
        values, items = scores.topk(k, dim=1)
        return items, values

    @torch.no_grad()
    def recommend(self, histories: Tensor, *, k: int = 10, exclude_seen: bool = True) -> tuple[Tensor, Tensor]:
        """The top ``k`` next items of each right-padded history ``(b, n)``: ``(items, scores)``, each ``(b, k)``,
        scores descending; never the padding id 0 (nor ``[MASK]``), and with ``exclude_seen`` never an item of
        the history (all of it, also beyond the last ``max_len``). ``k`` in ``[1, num_items]``."""
        check_int("k", k)
        if k > self.num_items:
            fail("k", f"an int in [1, {self.num_items}] (the item count)", repr(k))
        check_bool("exclude_seen", exclude_seen)
        histories = self.check_histories(histories)
        return self.top_k(self._scores(histories), k=k, exclude=histories if exclude_seen else None)

    # ---- incremental
    def _prefill(self, windows: Tensor, lengths: Tensor) -> tuple[Tensor, tuple[KVCache, ...], Tensor]:
        """Run windows ``(b, w)`` once, keeping every layer's keys: ``(scores, caches, slots)``."""
        x, side = self.inputs(windows)
        h, caches = self.encoder(x, **side, mask=self.mask(windows), is_causal=True,
                                 cache=[KVCache()] * len(self.encoder.layers))
        scores = self.item_scores(h[torch.arange(windows.shape[0], device=windows.device), lengths - 1])
        return scores, tuple(caches), windows != 0

    def _extend(self, caches, slots: Tensor, lengths: Tensor,
                items: Tensor) -> tuple[Tensor, tuple[KVCache, ...], Tensor]:
        """One new item per row at position ``lengths`` over the cached slots: ``(scores, caches, slots)``."""
        x, side = self.step_inputs(items, lengths)
        slots = torch.cat([slots, slots.new_ones(slots.shape[0], 1)], 1)
        mask = None if bool(slots.all()) else slots[:, None, None, :]
        h, caches = self.encoder(x, **side, mask=mask, cache=list(caches))
        return self.item_scores(h[:, 0]), tuple(caches), slots

    def _state(self, windows: Tensor, lengths: Tensor, scores, caches=None, slots=None) -> ServingState:
        if windows.shape[1] < self.max_len:
            windows = torch.cat([windows, windows.new_zeros(windows.shape[0], self.max_len - windows.shape[1])], 1)
        return ServingState(self, windows, lengths, scores, caches, slots)

    @torch.no_grad()
    def start(self, histories: Tensor) -> ServingState:
        """The :class:`ServingState` of right-padded ``histories (b, n)`` for :meth:`step`; ``state.scores`` is
        ``next_scores(histories)``. Incremental models run the windows once and cache every layer's keys."""
        histories = self.check_histories(histories)
        windows, lengths = last_items(histories, self.max_len)
        if not self.incremental:
            return self._state(windows, lengths, self._scores(windows))
        return self._state(windows, lengths, *self._prefill(windows, lengths))

    @torch.no_grad()
    def step(self, state: ServingState, items: Tensor) -> tuple[Tensor, ServingState]:
        """Append ``items (b,)`` (one item id per history) to the histories of ``state``: returns
        ``(next_scores of the grown histories, the new state)``.

        Incremental models compute only the new position of a row whose window has room. A row whose window is
        full (``max_len`` items) slides: its oldest item drops out and every other item moves one position
        down, so all its cached keys and values (computed at the old absolute positions, through every layer)
        are stale and its whole window is recomputed -- a full forward of ``max_len`` positions for that row,
        every step from then on (exact; the rows with room stay incremental). Other models recompute the
        window every step."""
        items = self._check_step(state, items)
        lengths, full = state.lengths, state.lengths >= self.max_len
        if state.caches is not None and not bool(full.any()):  # the common case: every row has room
            windows = state.windows.scatter(1, lengths[:, None], items[:, None])
            return self._finish(windows, lengths + 1, *self._extend(state.caches, state.slots, lengths, items))
        rows = torch.arange(state.batch, device=items.device)
        slot = torch.where(full, self.max_len - 1, lengths)
        windows = torch.where(full[:, None], state.windows.roll(-1, 1), state.windows)
        windows = windows.index_put((rows, slot), items)
        new_lengths = (lengths + 1).clamp(max=self.max_len)
        if state.caches is None:
            return self._finish(windows, new_lengths, self._scores(windows))
        if bool(full.all()):
            return self._finish(windows, new_lengths, *self._prefill(windows, new_lengths))
        grow, slide = (~full).nonzero().squeeze(1), full.nonzero().squeeze(1)
        g_scores, g_caches, g_slots = self._extend(
            [KVCache(tuple(_rows(k, grow) for k in c.keys), _rows(c.value, grow)) for c in state.caches],
            state.slots[grow], lengths[grow], items[grow])
        s_scores, s_caches, s_slots = self._prefill(windows[slide], new_lengths[slide])
        b = state.batch
        caches = tuple(
            KVCache(tuple(_merge([(grow, kg), (slide, ks)], b, 2) for kg, ks in zip(cg.keys, cs.keys)),
                    _merge([(grow, cg.value), (slide, cs.value)], b, 2))
            for cg, cs in zip(g_caches, s_caches))
        return self._finish(windows, new_lengths, _merge([(grow, g_scores), (slide, s_scores)], b, 1), caches,
                            _merge([(grow, g_slots), (slide, s_slots)], b, 1))

    def _finish(self, windows, lengths, scores, caches=None, slots=None) -> tuple[Tensor, ServingState]:
        return scores, ServingState(self, windows, lengths, scores, caches, slots)


class Recommender(nn.Module):
    """``model.recommend`` as a module, for ``torch.export`` / ONNX: ``forward(histories (b, n))`` ->
    ``(items, scores)``, each ``(b, k)``. Exported programs skip the eager value checks (an out-of-range id
    fails with PyTorch's own index error, a row with fewer than ``k`` unseen items gets ``-inf`` scores)."""

    def __init__(self, model: nn.Module, *, k: int = 10, exclude_seen: bool = True):
        super().__init__()
        check_int("k", k)
        if k > model.num_items:
            fail("k", f"an int in [1, {model.num_items}] (the item count)", repr(k))
        self.model, self.k, self.exclude_seen = model, k, check_bool("exclude_seen", exclude_seen)

    def forward(self, histories: Tensor) -> tuple[Tensor, Tensor]:
        """``histories (b, n)`` -> ``(items, scores)``, each ``(b, k)``."""
        return self.model.recommend(histories, k=self.k, exclude_seen=self.exclude_seen)


def export_recommender(model: nn.Module, *, k: int = 10, exclude_seen: bool = True) -> torch.export.ExportedProgram:
    """``model.recommend(histories, k=k, exclude_seen=...)`` as a ``torch.export`` program with a dynamic batch
    and history length (any ``b >= 1``, ``n >= 1``). ``torch.export.save`` it; ``torch.export.load(path).module()``
    runs it without this package. The model must be in eval mode."""
    if model.training:
        fail("model", "a model in eval mode (model.eval())", "a model in training mode")
    example = torch.tensor([[1, 2, 0], [3, 0, 0]], device=model.item_emb.weight.device)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    return torch.export.export(Recommender(model, k=k, exclude_seen=exclude_seen), (example,),
                               dynamic_shapes=(dims,))
