"""The one error type of the library, and the small checks that raise it.

Every message names the argument, what was seen and what was expected, e.g.::

    DIFError: x: expected last dim 64 (= dim), got shape (8, 50, 32)
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["DIFError", "fail", "is_integer", "check_integer", "check_tensor", "check_finite", "check_matches",
           "check_divisible", "check_int", "check_bool", "check_probability", "fmt_shape"]


class DIFError(ValueError):
    """Invalid input to a dif_attention function or module.

    A ``ValueError``, so code that already catches ``ValueError`` keeps working.
    """


def fmt_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def fail(arg: str, expected: str, seen: Any) -> None:
    if isinstance(seen, torch.Size) or (isinstance(seen, tuple) and all(isinstance(s, int) for s in seen)):
        seen = f"shape {fmt_shape(seen)}"
    raise DIFError(f"{arg}: expected {expected}, got {seen}")


def is_integer(t: torch.Tensor) -> bool:
    """``t`` holds integers (ids, lengths): not floating point, complex or bool."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_integer(arg: str, t: torch.Tensor, expected: str) -> None:
    """Raise, naming ``arg``, ``expected`` and the dtype seen, unless ``t`` holds integers (:func:`is_integer`)."""
    if not is_integer(t):
        fail(arg, expected, f"dtype {t.dtype}")


def check_tensor(arg: str, t: Any, *, ndim: int | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(arg, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.ndim != ndim:
        fail(arg, f"a {ndim}-d tensor", t.shape)
    if floating and not t.is_floating_point():
        fail(arg, "a floating-point tensor", f"dtype {t.dtype}")
    return t


def check_finite(arg: str, t: torch.Tensor, *, expected: str = "finite values (check_finite=True)") -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        fail(arg, expected, f"{bad} non-finite entries in shape {fmt_shape(t.shape)}")


def check_matches(arg: str, t: torch.Tensor, param: torch.Tensor, owner: str) -> None:
    """``t`` must live on ``param``'s device and, outside autocast, have its dtype (``owner`` names the module)."""
    if t.device != param.device:
        fail(arg, f"device {param.device} (the device of {owner}'s parameters)", f"device {t.device}")
    if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
        fail(arg, f"dtype {param.dtype} (the dtype of {owner}'s parameters; cast the module with .to(dtype) "
             "or run under torch.autocast)", f"dtype {t.dtype}")


def check_divisible(arg: str, width: int, heads: int) -> int:
    if width % heads != 0:
        fail(arg, f"a width divisible by heads={heads}", f"width {width}")
    return width // heads


def check_int(arg: str, value: Any, *, minimum: int | None = 1) -> int:
    """``value`` is an int (not a bool) and, unless ``minimum`` is None, at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        fail(arg, "an int" if minimum is None else f"an int >= {minimum}", repr(value))
    if minimum is not None and value < minimum:
        fail(arg, f"an int >= {minimum}", repr(value))
    return value


def check_bool(arg: str, value: Any) -> bool:
    """``value`` is ``True`` or ``False`` (a string such as ``"no"`` is not: it would count as true)."""
    if not isinstance(value, bool):
        fail(arg, "True or False", repr(value))
    return value


def check_probability(arg: str, p: Any) -> float:
    """A dropout probability: a real number in ``[0, 1)``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        fail(arg, "a probability in [0, 1)", repr(p))
    return float(p)
