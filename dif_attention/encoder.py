"""The SASRec / DIF-SR transformer block built on :class:`DecoupledAttention`, and a stack of them."""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import DecoupledAttention, KVCache
from .errors import check_int, check_probability, fail
from .functional import ScoreMaps
from .fusion import AddFusion, ConcatFusion, Fusion, GateFusion

__all__ = ["FeedForward", "DecoupledEncoderLayer", "DecoupledEncoder", "InferencePlan"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": F.tanh}


class FeedForward(nn.Module):
    """``Linear(dim -> ff_dim) -> activation -> Linear(ff_dim -> dim) -> Dropout(hidden_dropout)``."""

    def __init__(self, dim: int, ff_dim: int, *, activation: str = "gelu", hidden_dropout: float = 0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            fail("activation", f"one of {sorted(_ACTIVATIONS)}", repr(activation))
        check_int("ff_dim", ff_dim)
        self.up, self.down = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.act, self.drop = _ACTIVATIONS[activation], nn.Dropout(check_probability("hidden_dropout", hidden_dropout))

    def forward(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., dim)``."""
        return self.drop(self.down(self.act(self.up(x))))


class DecoupledEncoderLayer(nn.Module):
    """Decoupled attention + feed-forward, each with dropout and a residual.

    ``norm_first=False`` (default, as the paper and the reference): post-LN,
    ``x = LN(x + Drop(Attn(x)))``, ``x = LN(x + FFN(x))``.
    ``norm_first=True``: pre-LN, ``x = x + Drop(Attn(LN(x)))``, ``x = x + FFN(LN(x))``.

    Side inputs (``attrs``, ``pos``) are used as given in every layer; only ``x`` is updated.
    ``hidden_dropout`` drops the residual branches, ``attn_dropout`` the attention probabilities.
    ``attention``: a module with :class:`DecoupledAttention`'s forward signature to use instead of one
    (e.g. :class:`~dif_attention.baselines.EarlyFusionAttention` for NOVA); the attention keywords are then unused.
    Keywords not listed go to :class:`DecoupledAttention` (``position``, ``max_len``, ``backend``, ...).
    The default fusion is ``"add"``, as :class:`DecoupledAttention`'s.
    """

    def __init__(self, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None,
                 fusion: "str | Fusion" = "add", ff_dim: int | None = None, hidden_dropout: float = 0.0,
                 attn_dropout: float = 0.0, activation: str = "gelu", norm_first: bool = False,
                 eps: float = 1e-12, attention: nn.Module | None = None, **attention_kwargs):
        super().__init__()
        if attention is None:
            attention = DecoupledAttention(dim, heads, attr_dims=attr_dims, fusion=fusion, attn_dropout=attn_dropout,
                                           **attention_kwargs)
        self.attn = attention
        self.ff = FeedForward(dim, ff_dim or dim * 4, activation=activation, hidden_dropout=hidden_dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(check_probability("hidden_dropout", hidden_dropout))
        self.norm_first = norm_first

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: KVCache | None = None) -> Tensor | tuple[Tensor, ScoreMaps] | tuple[Tensor, KVCache]:
        """``x (b, n, dim)`` -> ``(b, n, dim)``; with ``return_scores=True`` ``(x, maps)``, the attention's
        :class:`~dif_attention.ScoreMaps`; with ``cache=`` (this layer's :class:`~dif_attention.KVCache`) ``x`` is
        the new positions only and the result ``(x, grown cache)``. Keywords as :meth:`DecoupledAttention.forward`."""
        kw = dict(attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores)
        if cache is not None:
            kw["cache"] = cache
        extra = None  # the score maps or the grown cache
        if self.norm_first:
            a = self.attn(self.norm1(x), **kw)
            if return_scores or cache is not None:
                a, extra = a
            x = x + self.drop(a)
            x = x + self.ff(self.norm2(x))
        else:
            a = self.attn(x, **kw)
            if return_scores or cache is not None:
                a, extra = a
            x = self.norm1(x + self.drop(a))
            x = self.norm2(x + self.ff(x))
        return (x, extra) if return_scores or cache is not None else x


class DecoupledEncoder(nn.Module):
    """``num_layers`` independent :class:`DecoupledEncoderLayer` s (no weight sharing).

    Takes the same keywords as the layer, and the same forward keywords as :class:`DecoupledAttention`.
    A :class:`Fusion` instance passed as ``fusion`` is deep-copied per layer (one fusion per layer, as
    the reference). ``attention``: a callable ``layer index -> attention module`` to build each layer's
    attention with (see :class:`DecoupledEncoderLayer`). With ``norm_first=True`` a final LayerNorm is applied.
    With ``return_scores=True`` returns ``(x, [maps of layer 0, maps of layer 1, ...])``. With ``cache=`` (one
    :class:`~dif_attention.KVCache` per layer, ``[KVCache()] * num_layers`` to start) ``x`` and the side inputs
    are the new positions only and the result is ``(x, [grown cache of each layer])``: exactly the rows of the
    full computation at those positions (the layers are position-wise but for attention).
    """

    def __init__(self, num_layers: int, dim: int, heads: int, *, attr_dims: Mapping[str, int] | None = None,
                 fusion: "str | Fusion" = "add", norm_first: bool = False, eps: float = 1e-12,
                 attention: Callable[[int], nn.Module] | None = None, **layer_kwargs):
        super().__init__()
        check_int("num_layers", num_layers)
        self.layers = nn.ModuleList(
            DecoupledEncoderLayer(dim, heads, attr_dims=attr_dims,
                                  fusion=copy.deepcopy(fusion) if isinstance(fusion, Fusion) else fusion,
                                  norm_first=norm_first, eps=eps,
                                  attention=None if attention is None else attention(i), **layer_kwargs)
            for i in range(num_layers))
        self.final_norm = nn.LayerNorm(dim, eps=eps) if norm_first else nn.Identity()

    def forward(self, x: Tensor, *, attrs: Mapping[str, Tensor] | None = None, pos: Tensor | None = None,
                mask: Tensor | None = None, is_causal: bool = False, return_scores: bool = False,
                cache: Sequence[KVCache] | None = None
                ) -> Tensor | tuple[Tensor, list[ScoreMaps]] | tuple[Tensor, list[KVCache]]:
        """``x (b, n, dim)`` -> ``(b, n, dim)``; with ``return_scores=True`` ``(x, per-layer ScoreMaps)``; with
        ``cache=`` (one :class:`~dif_attention.KVCache` per layer) ``(x, per-layer grown caches)``."""
        if cache is not None and not return_scores and not self.training and not torch.is_grad_enabled():
            out = self._inference_step(x, attrs, pos, mask, cache)
            if out is not None:
                return out
        if cache is not None:
            if not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
                fail("cache", f"a list of {len(self.layers)} KVCache (one per layer; [KVCache()] * "
                     f"{len(self.layers)} to start)",
                     f"{len(cache)} entries" if isinstance(cache, (list, tuple)) else type(cache).__name__)
            grown = []
            for layer, c in zip(self.layers, cache):
                x, c = layer(x, attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores,
                             cache=c)
                grown.append(c)
            return self.final_norm(x), grown
        all_maps = []
        for layer in self.layers:
            x = layer(x, attrs=attrs, pos=pos, mask=mask, is_causal=is_causal, return_scores=return_scores)
            if return_scores:
                x, maps = x
                all_maps.append(maps)
        x = self.final_norm(x)
        return (x, all_maps) if return_scores else x

    # ---- the inference step: one new position over cached keys, without autograd or dropout
    def _inference_step(self, x: Tensor, attrs, pos, mask, cache) -> tuple[Tensor, list[KVCache]] | None:
        """One new position per row, ``x (b, 1, dim)``, through every layer in eval mode without gradients:
        exactly the cached forward's numbers, with the per-call overhead taken out (checked once here, not
        per layer; no dropout modules; the projections packed per layer, see :class:`InferencePlan`; keys kept
        packed in a preallocated buffer, :meth:`KVCache.append_packed`; one score matrix over the packed keys).
        Returns ``None`` where it does not apply (other attention modules or fusions, other shapes, autocast):
        the caller then takes the general path, which also raises the errors."""
        plan = self._plan()
        if plan is None or not isinstance(x, Tensor) or x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != plan.dim \
                or x.dtype != plan.dtype or x.device != plan.device or torch.is_autocast_enabled(x.device.type):
            return None
        b = x.shape[0]
        side = plan.side_inputs(attrs, pos, b)
        if side is False or not isinstance(cache, (list, tuple)) or len(cache) != len(self.layers):
            return None
        m = None
        for c in cache:
            if not isinstance(c, KVCache) or c.value is None or len(c.keys) != plan.num_sources \
                    or c.value.shape != (b, plan.heads, m if m is not None else c.value.shape[2], plan.dim_head):
                return None
            m = c.value.shape[2]
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 4
                                 or mask.shape[0] not in (1, b) or mask.shape[1:] != (1, 1, m + 1)):
            return None
        side = plan.project_side(side, b)  # (b, layers, 2, h, E - e) or None
        count = None if mask is None else mask.sum(-1).clamp_min(1)  # (b|1, 1, 1): slots each row attends
        x, grown, dim = x[:, 0], [], (plan.dim,)
        for i, c in enumerate(cache):
            norm_first, ln1, ln2, ff, _ = plan.blocks[i]
            a, c = plan.attend(i, F.layer_norm(x, dim, *ln1) if norm_first else x,
                               None if side is None else side[:, i], c, mask, count)
            grown.append(c)
            if norm_first:
                x = x + a
                x = x + _feed_forward(F.layer_norm(x, dim, *ln2), *ff)
            else:
                x = F.layer_norm(x + a, dim, *ln1)
                x = F.layer_norm(x + _feed_forward(x, *ff), dim, *ln2)
        return self.final_norm(x[:, None]), grown

    def _plan(self) -> "InferencePlan | None":
        """The :class:`InferencePlan` of the current weights (rebuilt when a parameter changed in place or
        moved: its version counter or storage changed), or ``None`` where the inference step does not apply."""
        plan = self.__dict__.get("_inference_plan")
        if plan is None or not plan.current():
            plan = InferencePlan.build(self)
            self.__dict__["_inference_plan"] = plan
        return plan if plan.usable else None


def _feed_forward(x: Tensor, up: Tensor, up_bias: Tensor, act, down: Tensor, down_bias: Tensor) -> Tensor:
    """:class:`FeedForward` without its dropout (eval mode): ``(b, dim) -> (b, dim)``."""
    return F.linear(act(F.linear(x, up, up_bias)), down, down_bias)


class InferencePlan:
    """The weights of a :class:`DecoupledEncoder`'s inference step, packed once per weight version.

    Per layer ``l``: ``qkv[l]`` the item stream's query, key and value projections as one ``Linear(dim ->
    3 dim)``. Per side source (position, then each attribute), for every layer at once: ``Linear(width ->
    layers * 2 * width)``, the query and key projections of every layer (side inputs are the same in every
    layer). ``blocks[l]``: the layer's norms, feed-forward and output projection, used as they are (looked up
    once). Parameters replaced by new objects (rather than changed in place) are not seen: rebuild the model.
    Shapes (einops)::

        side_rows : (b, layers, 2, h, E - e)   q / k of the side sources, head by head, the sources side by side
        q, k row  : (b, h, E)                  E = sum_s e_s over the attention's sources, item stream first
        seg       : (E, s)                     1 where column c belongs to source s (seg_t: its transpose)

    ``usable`` is False where the step does not apply (an attention module other than
    :class:`~dif_attention.DecoupledAttention`, a paper-exact or custom fusion, ``check_finite``, the oracle or
    Triton backend); the encoder then takes its general path.
    """

    def __init__(self):
        self.usable, self.params, self.versions = False, [], ()

    def current(self) -> bool:
        """Whether every packed parameter is unchanged since the plan was built (same version, same storage)."""
        return self.versions == tuple((p._version, p.data_ptr()) for p in self.params)

    @classmethod
    def build(cls, encoder: DecoupledEncoder) -> "InferencePlan":
        plan = cls()
        layers = list(encoder.layers)
        attns = [getattr(layer, "attn", None) for layer in layers]
        if not all(type(layer) is DecoupledEncoderLayer and type(a) is DecoupledAttention for layer, a in
                   zip(layers, attns)):
            return plan
        a0 = attns[0]
        if any(a.sources != a0.sources or a.attr_dims != a0.attr_dims or a.dim != a0.dim or a.heads != a0.heads
               or a.check_finite or a.backend not in ("auto", "sdpa", "math") or a.fusion.max_len is not None
               or type(a.fusion) not in (AddFusion, ConcatFusion, GateFusion) for a in attns):
            return plan
        with torch.no_grad():
            plan._pack(encoder, attns)
        plan.versions = tuple((p._version, p.data_ptr()) for p in plan.params)
        plan.usable = True
        return plan

    def _pack(self, encoder: DecoupledEncoder, attns: list[DecoupledAttention]) -> None:
        a0 = attns[0]
        h, dim, L = a0.heads, a0.dim, len(attns)
        self.dim, self.heads, self.dim_head, self.position = dim, h, a0.dim_head, a0.position
        self.attr_dims, self.num_sources = dict(a0.attr_dims), len(a0.sources)
        weight = a0.to_q.weight
        self.dtype, self.device = weight.dtype, weight.device

        def bias(linear: nn.Linear) -> Tensor:
            return torch.zeros(linear.out_features, dtype=weight.dtype, device=weight.device) \
                if linear.bias is None else linear.bias

        def stacked(linears: list[nn.Linear]) -> tuple[Tensor, Tensor]:
            self.params += [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
            return torch.cat([lin.weight for lin in linears]), torch.cat([bias(lin) for lin in linears])

        self.qkv = [stacked([a.to_q, a.to_k, a.to_v]) for a in attns]
        # the parameters used as they are, looked up once (a parameter changed in place is seen through them)
        self.blocks = [(layer.norm_first, (layer.norm1.weight, layer.norm1.bias, layer.norm1.eps),
                        (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
                        (layer.ff.up.weight, layer.ff.up.bias, layer.ff.act, layer.ff.down.weight,
                         layer.ff.down.bias), (a.to_out.weight, a.to_out.bias, a.fusion))
                       for layer, a in zip(encoder.layers, attns)]
        self.side = []  # (weight, bias, head width) per side source, every layer's q and k
        if self.position:
            self.side.append((*stacked([p for a in attns for p in (a.pos_q, a.pos_k)]), a0.dim_head))
        for name, d in self.attr_dims.items():
            self.side.append((*stacked([p for a in attns for p in (a.attr_q[name], a.attr_k[name])]), d // h))
        self.widths = [a0.dim_head] + [w for _, _, w in self.side]
        seg = torch.zeros(sum(self.widths), len(self.widths), dtype=weight.dtype, device=weight.device)
        lo = 0
        for s, w in enumerate(self.widths):
            seg[lo:lo + w, s] = 1.0
            lo += w
        self.seg, self.seg_t, self.scale, self.layers = seg, seg.T.contiguous(), 1.0 / a0.dim_head ** 0.5, L

    def side_inputs(self, attrs, pos, b: int) -> list[Tensor] | None | bool:
        """The side inputs of one new position, in source order, each ``(b|1, width)``; ``None`` without side
        sources; ``False`` where they are not what the step takes (the general path then checks them)."""
        out = []
        if self.position:
            if not isinstance(pos, Tensor) or pos.dtype != self.dtype or pos.device != self.device:
                return False
            if pos.ndim == 2 and pos.shape == (1, self.dim):
                out.append(pos)
            elif pos.ndim == 3 and pos.shape[0] in (1, b) and pos.shape[1:] == (1, self.dim):
                out.append(pos[:, 0])
            else:
                return False
        elif pos is not None:
            return False
        attrs = attrs or {}
        if not isinstance(attrs, Mapping) or len(attrs) != len(self.attr_dims):
            return False
        for name, d in self.attr_dims.items():
            t = attrs.get(name)
            if not isinstance(t, Tensor) or t.shape != (b, 1, d) or t.dtype != self.dtype or t.device != self.device:
                return False
            out.append(t[:, 0])
        return out or None

    def project_side(self, side: list[Tensor] | None, b: int) -> Tensor | None:
        """Every layer's side queries and keys of the new position: ``(b, layers, 2, h, E - e)``."""
        if side is None:
            return None
        parts = []
        for t, (w, bias, e) in zip(side, self.side):
            p = F.linear(t, w, bias)  # (b|1, layers * 2 * h * e)
            parts.append(p.view(p.shape[0], self.layers, 2, self.heads, e).expand(b, -1, -1, -1, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def attend(self, i: int, x: Tensor, side: Tensor | None, cache: KVCache,
               mask: Tensor | None, count: Tensor | None) -> tuple[Tensor, KVCache]:
        """Layer ``i``'s attention of the new position ``x (b, dim)`` (``side (b, 2, h, E - e)``) over ``cache``
        grown by it: ``(out (b, dim), grown cache)``. ``mask``: bool ``(b|1, 1, 1, m + 1)``, the slots the
        position may attend (``count (b|1, 1, 1)`` of them), or ``None`` (every slot). Cached keys and values are
        taken to be finite (the general path zeroes masked ones; ``check_finite`` attentions take it)."""
        b, h, e = x.shape[0], self.heads, self.dim_head
        w, bias = self.qkv[i]
        qkv = F.linear(x, w, bias)  # (b, 3 dim)
        qk = qkv[:, :2 * self.dim].view(b, 2, h, e)
        if side is not None:
            qk = torch.cat([qk, side], -1)  # (b, 2, h, E)
        cache = cache.append_packed(qk[:, 1, :, None], qkv[:, 2 * self.dim:].view(b, h, 1, e), self.widths)
        keys, value = cache.packed_keys, cache.value  # (b, h, m + 1, E), (b, h, m + 1, e)
        q = qk[:, 0, :, None]  # (b, h, 1, E)
        out_weight, out_bias, fusion = self.blocks[i][4]
        if type(fusion) is GateFusion:  # per-source raw scores: the gates read their mean over allowed slots
            scores = (q * self.seg_t) @ keys.transpose(-1, -2)  # (b, h, s, m + 1)
            mean = scores.mean(-1) if mask is None else scores.masked_fill(~mask, 0.0).sum(-1) / count
            gates = fusion.gates_from_means(mean)  # (b, h, s)
            logits = (gates * self.scale)[:, :, None] @ scores  # (b, h, 1, m + 1): the fused, scaled scores
        else:
            if type(fusion) is ConcatFusion:
                q = q * (self.seg @ (fusion.weight * self.scale))
            else:
                q = q * self.scale
            logits = q @ keys.transpose(-1, -2)  # (b, h, 1, m + 1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(-1)
        if mask is not None:  # a position with no slot to attend gets zeros (as the general path)
            probs = torch.nan_to_num(probs, nan=0.0)
        out = (probs @ value).view(b, h * e)  # b h 1 e -> b (h e)
        return F.linear(out, out_weight, out_bias), cache
