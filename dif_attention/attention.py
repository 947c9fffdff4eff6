"""``DecoupledAttention``: the drop-in replacement for a transformer block's attention call."""
from __future__ import annotations

from typing import Mapping

from einops import rearrange
from torch import Tensor, nn

from .errors import DIFError, check_divisible, check_int, check_matches, check_probability, check_tensor, fail
from .errors import check_finite as check_finite_values
from .functional import BACKENDS, ScoreMaps, decoupled_attention, reference_attention
from .fusion import Fusion, get_fusion

__all__ = ["DecoupledAttention", "check_attr_dims"]

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
        self.dim, self.heads, self.position = dim, heads, bool(position)
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
        return rearrange(t, "... n (h e) -> ... h n e", h=self.heads)

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
                mask: Tensor | None = None, is_causal: bool = False,
                return_scores: bool = False) -> Tensor | tuple[Tensor, ScoreMaps]:
        """Returns ``(b, n, dim)``; with ``return_scores=True`` returns ``(out, maps)``, ``maps`` a
        :class:`~dif_attention.ScoreMaps` computed by the oracle: ``maps.sources`` maps each source name
        (``"item"``, ``"position"``, attribute names) to its raw score matrix ``(b|1, heads, n, n)``, plus
        ``maps.fused`` (raw fused scores), ``maps.probs`` (attention) and ``maps.gates`` (gate fusion)."""
        queries, keys, value = self.project(x, attrs=attrs, pos=pos)
        kw = dict(mask=mask, is_causal=is_causal, fusion=self.fusion, scale=1.0 / self.dim_head ** 0.5,
                  dropout_p=self.attn_dropout if self.training else 0.0, check_finite=self.check_finite)
        if return_scores:
            out, maps = reference_attention(queries, keys, value, names=self.sources, **kw)
        else:
            out = decoupled_attention(queries, keys, value, backend=self.backend, **kw)
        out = self.to_out(rearrange(out, "b h n e -> b n (h e)"))
        return (out, maps) if return_scores else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, sources={self.sources}, "
                f"fusion={type(self.fusion).__name__}(max_len={self.fusion.max_len}), backend={self.backend!r}")
