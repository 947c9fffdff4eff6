"""The tolerance rule shared by the property, compile and autocast tests.

It is flash-attn's rule: a result is judged against an fp64 reference computed from the *same*
(already rounded) inputs, and it may be at most ``RATIO`` times as far from that reference as
PyTorch's own materialising implementation (the oracle, ``backend="torch"``) at the same dtype::

    max|fast_d - ref64|  <=  RATIO * max|oracle_d - ref64|  +  floor_d
    floor_d = FLOOR_ULPS[d] * eps(d) * max(1, max|ref64|)

The ``RATIO`` term is the tolerance: it is the oracle's measured error at that precision, case by case.
``floor_d`` only absorbs order-of-summation noise in units of rounding (ulps) of the result: on tiny
inputs the oracle can be exact by luck, and a fast path that sums in another order must not fail
for a few ulps. The floors are about twice the largest need measured over 600-1200 random cases of
``test_properties.py``. The largest need is on the gradient of the concat weights, a reduction over every
score with cancellation, whose summands are larger than the result: on an Intel Xeon (AMX) fp32 20 ulps,
fp16 5.9, bf16 3.5; on an AMD EPYC (AVX-512), whose kernels sum in another order, fp32 100 ulps (1.19e-5 at
unit scale, oracle 2.7e-6) and fp16 15 ulps. So the floors are fp32 200, fp16 30 ulps. An error of a wrong
formula is orders of magnitude above them (200 ulps is 2.4e-5 at unit scale), and fp32 is one of the drawn
dtypes.
"""
from __future__ import annotations

from typing import Sequence

import torch

RATIO = 2.0
FLOOR_ULPS = {torch.float64: 40.0, torch.float32: 200.0, torch.float16: 30.0, torch.bfloat16: 8.0}


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return (t.detach().double() - ref.detach().double()).abs().max().item() if t.numel() else 0.0


def allowed_error(oracle: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error the rule lets a result at ``dtype`` have against ``ref``."""
    scale = max(1.0, ref.detach().abs().max().item() if ref.numel() else 0.0)
    return RATIO * max_err(oracle, ref) + FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale


def assert_within(name: str, fast: torch.Tensor, oracle: torch.Tensor, ref: torch.Tensor,
                  dtype: torch.dtype) -> None:
    assert fast.shape == ref.shape, f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
    assert bool(torch.isfinite(fast).all()), f"{name}: non-finite values in the fast result"
    err, bound = max_err(fast, ref), allowed_error(oracle, ref, dtype)
    assert err <= bound, (f"{name} ({dtype}): error {err:.3g} vs fp64 exceeds {RATIO}x the oracle's "
                          f"{max_err(oracle, ref):.3g} + floor ({bound:.3g})")


def assert_all_within(names: Sequence[str], fast, oracle, ref, dtype) -> None:
    for name, f, o, r in zip(names, fast, oracle, ref):
        assert_within(name, f, o, r, dtype)
