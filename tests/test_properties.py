"""Property tests: every fast path against the oracle on random problems (hypothesis).

A case draws the shapes (batch, heads, n >= 1, 1-4 sources with their own head widths, value width,
batch-independent sources), the mask (none, causal, padding, left-padded causal with fully masked
rows, random bool masks of every broadcast shape), the fusion (add, concat, gate, and the paper-exact
``max_len=n`` variants), the scale and the dtype. Values and the gradients of every input and every
fusion parameter are compared with an fp64 reference under the rule in ``precision.py``
(at most 2x the oracle's own error at the same dtype).

Two invariants run on fewer cases in fp64: every mask form (compact, expanded, ``is_causal``) gives the
same result, and a batch row's result does not depend on the other rows.

NaN / inf poisoning: the inputs the mask makes irrelevant (keys and values no query may attend, queries with
no allowed key; not the keys of the paper-exact fusions, which read every key of a row) are set to NaN, inf or
-inf; every backend ("torch", "sdpa", "math", "auto", and "triton" where it runs) must give the oracle's result
on the clean inputs under the same rule, with finite values and gradients (``decoupled_attention`` zeroes those
inputs before dispatch).

``DIF_PROPERTY_EXAMPLES`` sets the number of cases per fast path (default 200; CI-sized). A longer run,
``DIF_PROPERTY_EXAMPLES=1000 python -m pytest tests/test_properties.py``, takes about 10 minutes on 2 cores.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dif_attention import ConcatFusion, GateFusion, causal_mask, decoupled_attention, lengths_mask
from dif_attention.functional import BACKENDS
from precision import assert_all_within, assert_within

EXAMPLES = int(os.environ.get("DIF_PROPERTY_EXAMPLES", "200"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUSIONS = ["add", "concat", "concat-L", "gate", "gate-L"]
MASKS = ["none", "causal", "padding", "causal+padding", "left-padded-causal", "random", "random+causal"]
MASK_SHAPES = ["nn", "b1nn", "1hnn", "bhnn", "b11n"]


def fast_paths() -> list[str]:
    """Every backend but the oracle and the dispatcher; triton only where it can run (CUDA)."""
    paths = [b for b in BACKENDS if b not in ("auto", "torch", "triton")]
    if DEVICE == "cuda" and "triton" in BACKENDS:
        try:
            from dif_attention import ops
            if ops.available():
                paths.append("triton")
        except ImportError:
            pass
    return paths


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw, masks=tuple(MASKS)):
    b, h, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 9))
    sources = draw(st.integers(1, 4))
    return dict(
        b=b, h=h, n=n,
        widths=[draw(st.integers(1, 9)) for _ in range(sources)],
        ev=draw(st.integers(1, 9)),
        # per source: is the query / key batch-independent (batch dim 1)?
        shared=[(draw(st.booleans()), draw(st.booleans())) if draw(st.integers(0, 2)) == 0 else (False, False)
                for _ in range(sources)],
        mask=draw(st.sampled_from(masks)),
        mask_shape=draw(st.sampled_from(MASK_SHAPES)),
        fusion=draw(st.sampled_from(FUSIONS)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def make_mask(case, g):
    """(mask, is_causal) for a case; every kind but 'none'/'causal'/'padding' can leave rows fully masked."""
    b, h, n, kind = case["b"], case["h"], case["n"], case["mask"]
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind in ("padding", "causal+padding"):
        return lengths_mask(lengths, n), kind == "causal+padding"
    if kind == "left-padded-causal":  # padded queries at the front see no key at all
        keep = torch.arange(n)[None, :] >= (n - lengths)[:, None]
        return keep[:, None, None, :] & causal_mask(n), False
    shape = {"nn": (n, n), "b1nn": (b, 1, n, n), "1hnn": (1, h, n, n), "bhnn": (b, h, n, n),
             "b11n": (b, 1, 1, n)}[case["mask_shape"]]
    mask = torch.rand(shape, generator=g) < 0.6
    if len(shape) >= 2 and shape[-2] == n:  # knock out whole query rows
        mask = mask & (torch.rand(shape[:-1] + (1,), generator=g) < 0.8)
    return mask, kind == "random+causal"


def make_fusion(case, g):
    name, n, s = case["fusion"], case["n"], len(case["widths"])
    if name == "add":
        return "add"
    cls = ConcatFusion if name.startswith("concat") else GateFusion
    with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG: pin it to the case
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (), generator=g)))
        fusion = cls(max_len=n if name.endswith("-L") else None, num_sources=s).double()
    with torch.no_grad():  # move away from the near-trivial init so every parameter matters
        for p in fusion.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return fusion


def build(case):
    """Inputs at the case's dtype (leaves), and the same rounded numbers in fp64 for the reference."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, n, dtype = case["b"], case["h"], case["n"], case["dtype"]
    qs, ks = [], []
    for e, (q_shared, k_shared) in zip(case["widths"], case["shared"]):
        qs.append(torch.randn(1 if q_shared else b, h, n, e, generator=g, dtype=torch.float64))
        ks.append(torch.randn(1 if k_shared else b, h, n, e, generator=g, dtype=torch.float64))
    v = torch.randn(b, h, n, case["ev"], generator=g, dtype=torch.float64)
    mask, is_causal = make_mask(case, g)
    fusion = make_fusion(case, g)
    grad_out = torch.randn(b, h, n, case["ev"], generator=g, dtype=torch.float64)

    def at(dt):
        tensors = [t.to(dtype).to(dt).to(DEVICE).requires_grad_() for t in (*qs, *ks, v)]
        f = fusion if isinstance(fusion, str) else copy.deepcopy(fusion).to(dtype).to(dt).to(DEVICE)
        return tensors, f, grad_out.to(dtype).to(dt).to(DEVICE)

    m = None if mask is None else mask.to(DEVICE)
    return at(dtype), at(torch.float64), m, is_causal


def run(backend, tensors, fusion, grad_out, mask, is_causal, case):
    s = len(case["widths"])
    qs, ks, v = tensors[:s], tensors[s:2 * s], tensors[2 * s]
    out = decoupled_attention(qs, ks, v, mask=mask, is_causal=is_causal, fusion=fusion, scale=case["scale"],
                              backend=backend)
    params = [] if isinstance(fusion, str) else list(fusion.parameters())
    leaves = tensors + params
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return out, grads


def grad_names(case):
    s = len(case["widths"])
    names = [f"d queries[{i}]" for i in range(s)] + [f"d keys[{i}]" for i in range(s)] + ["d value"]
    return names + ["d fusion params"] * 8


def empty_rows(mask, is_causal, case):
    """(b, h, n) bool: query rows with no allowed key."""
    b, h, n = case["b"], case["h"], case["n"]
    allowed = torch.ones(b, h, n, n, dtype=torch.bool, device=DEVICE)
    if mask is not None:
        allowed = allowed & mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if is_causal:
        allowed = allowed & causal_mask(n, device=DEVICE)
    return ~allowed.any(-1)


@PROPERTY
@given(case=cases())
# bfloat16 paper-exact concat at scale 2: the math path's gradients were 10x the oracle's error when its
# scores and softmax were formed in bfloat16
@example(case={"b": 2, "h": 1, "n": 5, "widths": [7, 7, 6, 3], "ev": 7,
               "shared": [(False, False), (False, False), (False, False), (True, True)], "mask": "none",
               "mask_shape": "nn", "fusion": "concat-L", "scale": 2.0, "dtype": torch.bfloat16, "seed": 440185839})
def test_fast_paths_match_oracle(case):
    """Every fast path sees every case (so each gets EXAMPLES cases); reference and oracle run once."""
    (low, f_low, g_low), (hi, f_hi, g_hi), mask, is_causal = build(case)
    ref, ref_grads = run("torch", hi, f_hi, g_hi, mask, is_causal, case)
    oracle, oracle_grads = run("torch", low, f_low, g_low, mask, is_causal, case)
    for backend in fast_paths():
        fast, fast_grads = run(backend, low, f_low, g_low, mask, is_causal, case)
        check_fast_path(backend, case, fast, fast_grads, oracle, oracle_grads, ref, ref_grads, mask, is_causal)


def test_fast_paths_are_listed():
    assert "sdpa" in fast_paths()


def check_fast_path(backend, case, fast, fast_grads, oracle, oracle_grads, ref, ref_grads, mask, is_causal):
    dtype = case["dtype"]
    names = [f"[{backend}] {name}" for name in grad_names(case)]
    assert fast.dtype == dtype
    assert_within(f"[{backend}] out", fast, oracle, ref, dtype)
    assert_all_within(names, fast_grads, oracle_grads, ref_grads, dtype)
    # fully masked query rows: exactly zero output and no gradient into their query vectors
    rows = empty_rows(mask, is_causal, case)
    assert not bool(fast[rows].any()), f"[{backend}] fully masked rows must give exactly 0"
    for i, (q_shared, _) in enumerate(case["shared"]):
        if not q_shared:
            dq = fast_grads[i].expand(case["b"], -1, -1, -1)
            assert not bool(dq[rows].any()), f"[{backend}] fully masked rows must give queries[{i}] no gradient"


@settings(PROPERTY, max_examples=max(EXAMPLES // 4, 1))
@given(case=cases(), grad=st.booleans())
def test_auto_is_a_correct_path(case, grad):
    """``backend="auto"`` (the default) obeys the same rule, whatever it dispatches to (it may choose by
    device, length and whether gradients are needed)."""
    (low, f_low, g_low), (hi, f_hi, g_hi), mask, is_causal = build(case)
    ref, ref_grads = run("torch", hi, f_hi, g_hi, mask, is_causal, case)
    oracle, oracle_grads = run("torch", low, f_low, g_low, mask, is_causal, case)
    if grad:
        out, grads = run("auto", low, f_low, g_low, mask, is_causal, case)
        check_fast_path("auto", case, out, grads, oracle, oracle_grads, ref, ref_grads, mask, is_causal)
    else:
        s = len(case["widths"])
        with torch.no_grad():
            out = decoupled_attention(low[:s], low[s:2 * s], low[2 * s], mask=mask, is_causal=is_causal,
                                      fusion=f_low, scale=case["scale"])
        assert_within("[auto, no grad] out", out, oracle, ref, case["dtype"])


# masks that can leave keys no query attends and query rows with no key (the positions poisoned below)
POISON_MASKS = ("padding", "causal+padding", "left-padded-causal", "random", "random+causal")


def allowed_4d(mask, is_causal, n):
    """The mask as ``decoupled_attention`` combines it: 4-d ``(b|1, h|1, n, n)``, causal part included."""
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    return m & causal_mask(n, device=m.device) if is_causal else m


def poison(tensors, case, mask, is_causal, value):
    """``value`` exactly where the mask makes an input irrelevant: the keys and values of key positions no query
    may attend, the queries of rows with no allowed key. A batch-independent source (batch dim 1) is irrelevant
    there only when the mask is batch-independent too (a per-batch mask leaves it needed by some row); the keys
    of a paper-exact fusion (``-L``) never are (it reads every key of a row, masked or not)."""
    s, n = len(case["widths"]), case["n"]
    keys_read = case["fusion"].endswith("-L")
    allowed = allowed_4d(mask, is_causal, n)
    dead_key = ~allowed.any(-2).unsqueeze(-1)  # (b|1, h|1, n, 1)
    dead_row = ~allowed.any(-1, keepdim=True)

    def fill(t, dead):
        if t.shape[0] < dead.shape[0]:
            return t.detach().clone().requires_grad_()
        return t.detach().masked_fill(dead.expand(t.shape[0], t.shape[1], n, 1), value).requires_grad_()

    keys = [t.detach().clone().requires_grad_() if keys_read else fill(t, dead_key) for t in tensors[s:2 * s]]
    out = [fill(q, dead_row) for q in tensors[:s]] + keys + [fill(tensors[2 * s], dead_key)]
    poisoned = sum(int((~torch.isfinite(t)).sum()) for t in out)
    return out, poisoned


@settings(PROPERTY, max_examples=max(EXAMPLES // 4, 1))
@given(case=cases(masks=POISON_MASKS), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_poisoned_masked_positions_match_the_clean_oracle(case, value):
    """NaN / inf at exactly the positions the mask makes irrelevant: every backend on the poisoned inputs gives
    what the oracle gives on the clean ones, values and gradients finite."""
    (low, f_low, g_low), (hi, f_hi, g_hi), mask, is_causal = build(case)
    ref, ref_grads = run("torch", hi, f_hi, g_hi, mask, is_causal, case)
    oracle, oracle_grads = run("torch", low, f_low, g_low, mask, is_causal, case)
    bad, poisoned = poison(low, case, mask, is_causal, value)
    for backend in ["torch", *fast_paths(), "auto"]:
        fast, fast_grads = run(backend, bad, f_low, g_low, mask, is_causal, case)
        check_fast_path(f"{backend}, {value} poisoned at {poisoned} entries", case, fast, fast_grads, oracle,
                        oracle_grads, ref, ref_grads, mask, is_causal)
        assert all(bool(torch.isfinite(g).all()) for g in fast_grads), f"[{backend}] non-finite gradient"


def test_poisoning_reaches_every_kind_of_irrelevant_position():
    """The poisoning above is not vacuous: a left-padded causal mask poisons dead keys, values and queries."""
    case = dict(b=2, h=1, n=5, widths=[2, 2], ev=3, shared=[(False, False), (True, True)],
                mask="left-padded-causal", mask_shape="nn", fusion="add", scale=None, dtype=torch.float32, seed=3)
    (low, _, _), _, mask, is_causal = build(case)
    bad, poisoned = poison(low, case, mask, is_causal, float("nan"))
    assert poisoned > 0
    assert bad[0].isnan().any() and bad[2].isnan().any() and bad[4].isnan().any()  # a query, a key, the value
    assert not bad[1].isnan().any() and not bad[3].isnan().any()  # the batch-independent source is left alone
    exact, _ = poison(low, dict(case, fusion="gate-L"), mask, is_causal, float("nan"))
    assert exact[0].isnan().any() and not exact[2].isnan().any() and exact[4].isnan().any()  # keys all read


def fp64_case(case):
    return dict(case, dtype=torch.float64)


def forward(backend, tensors, fusion, mask, is_causal, case):
    s = len(case["widths"])
    with torch.no_grad():
        return decoupled_attention(tensors[:s], tensors[s:2 * s], tensors[2 * s], mask=mask, is_causal=is_causal,
                                   fusion=fusion, scale=case["scale"], backend=backend)


@settings(PROPERTY, max_examples=max(EXAMPLES // 5, 1))
@given(case=cases())
def test_mask_forms_are_equivalent(case):
    """A compact mask, its expansion to (b, h, n, n), and ``is_causal`` vs an explicit causal mask give the
    same result on every path (the fast paths special-case compact and causal-only masks)."""
    case = fp64_case(case)
    (t, f, _), _, mask, is_causal = build(case)
    b, h, n = case["b"], case["h"], case["n"]
    explicit = torch.ones(b, h, n, n, dtype=torch.bool, device=DEVICE)
    if mask is not None:
        explicit = explicit & mask
    if is_causal:
        explicit = explicit & causal_mask(n, device=DEVICE)
    for backend in ["torch", *fast_paths()]:
        torch.testing.assert_close(forward(backend, t, f, explicit, False, case),
                                   forward(backend, t, f, mask, is_causal, case), msg=lambda m: f"[{backend}] {m}")


@settings(PROPERTY, max_examples=max(EXAMPLES // 5, 1))
@given(case=cases())
def test_batch_rows_are_independent(case):
    """Row r of a batch equals the same problem run alone (batch-independent sources, which the fast paths
    turn into one shared bias, must not mix rows)."""
    case = fp64_case(case)
    (t, f, _), _, mask, is_causal = build(case)
    b = case["b"]

    def row(x, r):
        return x if x.shape[0] == 1 else x[r:r + 1]

    for backend in fast_paths():
        full = forward(backend, t, f, mask, is_causal, case)
        for r in range(b):
            single = [row(x, r) for x in t]
            m = None if mask is None else row(mask, r) if mask.ndim == 4 else mask
            alone = forward(backend, single, f, m, is_causal, dict(case, b=1))
            torch.testing.assert_close(full[r:r + 1], alone, msg=lambda e: f"[{backend}] row {r}: {e}")


def test_tolerance_rule_rejects_a_wrong_formula():
    """The floors absorb summation-order noise, not a formula slip: a scale off by 10% fails at every dtype."""
    from precision import assert_within

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))

    def attend(q, k, v, scale):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        ref = attend(qd.double(), kd.double(), vd.double(), 8 ** -0.5)
        oracle = attend(qd.float(), kd.float(), vd.float(), 8 ** -0.5).to(dtype)
        assert_within("oracle", oracle, oracle, ref, dtype)
        wrong = attend(qd.float(), kd.float(), vd.float(), 1.1 * 8 ** -0.5).to(dtype)
        with pytest.raises(AssertionError, match="exceeds"):
            assert_within("wrong", wrong, oracle, ref, dtype)
