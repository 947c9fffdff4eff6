"""Ecosystem fit: torch.compile without graph breaks, torch.export, autocast, deterministic repeats.

Compilation is slow on CPU, so the shapes are tiny and only one test runs the real (inductor)
code generator; the others trace with dynamo and check the graph with cheaper backends.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from dif_attention import (AttributeEmbedding, ConcatFusion, DecoupledAttention, DecoupledEncoder, DIFError,
                           GateFusion, aap_loss, padding_mask, total_loss)
from dif_attention.models import ATTRIBUTE_MODELS, MODELS, build_model
from precision import assert_within

B, N, DIM, HEADS, ATTR = 2, 5, 16, 2, 8


def inputs(n=N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, DIM, generator=g, dtype=dtype)
    attrs = {"cat": torch.randn(B, n, ATTR, generator=g, dtype=dtype)}
    pos = torch.randn(n, DIM, generator=g, dtype=dtype)
    ids = torch.randint(1, 9, (B, n), generator=g)
    ids[0, : n // 2] = 0  # a left-padded row: fully masked query rows under the causal mask
    return x, attrs, pos, padding_mask(ids)


def fusion(name, n=N):
    return {"concat-L": ConcatFusion(max_len=n), "gate-L": GateFusion(max_len=n)}.get(name, name)


def graph_breaks(fn, *args, **kwargs):
    dynamo.reset()
    explained = dynamo.explain(fn)(*args, **kwargs)
    return explained.graph_break_count, [str(r.reason).splitlines()[0] for r in explained.break_reasons]


@pytest.mark.parametrize("name", ["add", "concat", "gate", "concat-L", "gate-L"])
def test_attention_has_no_graph_breaks(name):
    torch.manual_seed(0)
    m = DecoupledAttention(DIM, HEADS, attr_dims={"cat": ATTR}, fusion=fusion(name), attn_dropout=0.1).train()
    x, attrs, pos, mask = inputs()
    count, reasons = graph_breaks(m, x, attrs=attrs, pos=pos, mask=mask, is_causal=True)
    assert count == 0, reasons


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_has_no_graph_breaks(norm_first):
    torch.manual_seed(0)
    m = DecoupledEncoder(1 + norm_first, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate", norm_first=norm_first,
                         hidden_dropout=0.1)
    x, attrs, pos, mask = inputs()
    count, reasons = graph_breaks(m, x, attrs=attrs, pos=pos, mask=mask, is_causal=True)
    assert count == 0, reasons


def test_embedding_and_predictor_have_no_graph_breaks():
    """Value-range checks (host syncs) run only in eager mode; compiled code has none."""
    emb = AttributeEmbedding({"cat": 7}, ATTR, item_tables={"cat": torch.randint(0, 7, (12, 3))})
    ids = torch.randint(0, 12, (B, N))
    count, reasons = graph_breaks(lambda i: emb(items=i)["cat"].sum(), ids)
    assert count == 0, reasons
    with pytest.raises(DIFError, match="item ids in"):  # eager mode still refuses an out-of-range id
        emb(items=ids + 12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_have_no_graph_breaks(name):
    torch.manual_seed(0)
    kw = dict(num_items=20, dim=DIM, layers=1, heads=HEADS, max_len=N)
    if name in ATTRIBUTE_MODELS:
        kw.update(item_tables={"cat": torch.randint(0, 5, (21, 2))}, num_classes={"cat": 5})
    if name.startswith("DIF"):
        kw.update(attr_dim=ATTR)
    model = build_model(name, **kw)
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    count, reasons = graph_breaks(model, ids)
    assert count == 0, reasons


def test_training_step_with_the_aap_loss_has_no_graph_breaks():
    """Item loss + lambda * AAP loss over the supervised rows, as a training step computes it."""
    torch.manual_seed(0)
    model = build_model("DIFSASRec", num_items=20, item_tables={"cat": torch.randint(0, 5, (21, 2))},
                        num_classes={"cat": 5}, dim=DIM, layers=1, heads=HEADS, max_len=N, attr_dim=ATTR)
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6]])

    def step(ids, targets):
        h = model(ids)
        logits = model.attribute_logits(h)
        valid = targets != 0
        parts = aap_loss(logits, {"cat": model.item_tables["cat"][targets]}, valid=valid)
        item = torch.nn.functional.cross_entropy(model.item_scores(h).flatten(0, 1), targets.flatten(),
                                                 ignore_index=0)
        return total_loss(item, parts, lamb=10.0)

    count, reasons = graph_breaks(step, ids, targets)
    assert count == 0, reasons
    eager = step(ids, targets)
    assert torch.isfinite(eager)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_dynamic_length_compiles_once():
    """One graph serves every sequence length (the default fusions are length-agnostic)."""
    torch.manual_seed(0)
    m = DecoupledEncoder(1, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate").eval()
    counter = CountingBackend()
    dynamo.reset()
    compiled = torch.compile(m, backend=counter, fullgraph=True, dynamic=True)
    for n in (4, 6, 9):
        x, attrs, pos, mask = inputs(n=n)
        torch.testing.assert_close(compiled(x, attrs=attrs, pos=pos, mask=mask, is_causal=True),
                                   m(x, attrs=attrs, pos=pos, mask=mask, is_causal=True))
    assert counter.graphs == 1


def test_compiled_training_step_matches_eager():
    """fullgraph=True through autograd (aot_eager: the AOT-autograd joint graph, no codegen)."""
    torch.manual_seed(0)
    m = DecoupledEncoder(1, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate").train()
    mc = copy.deepcopy(m)
    dynamo.reset()
    compiled = torch.compile(mc, backend="aot_eager", fullgraph=True)
    x, attrs, pos, mask = inputs()
    for fn in (m, compiled):
        fn(x, attrs=attrs, pos=pos, mask=mask, is_causal=True).square().mean().backward()
    for (name_, p), pc in zip(m.named_parameters(), mc.parameters()):
        torch.testing.assert_close(pc.grad, p.grad, msg=lambda s: f"{name_}: {s}")


def test_inductor_fullgraph_matches_eager():
    """The default backend generates code for a whole layer (one graph) and agrees with eager. (The
    graph capture of every fusion is checked above; code generation is slow on CPU, so one small layer.)"""
    torch.manual_seed(0)
    m = DecoupledAttention(DIM, HEADS, attr_dims={"cat": ATTR}, fusion="concat").eval()
    dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    x, attrs, pos, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, attrs=attrs, pos=pos, mask=mask, is_causal=True),
                                   m(x, attrs=attrs, pos=pos, mask=mask, is_causal=True), atol=1e-5, rtol=1e-4)


class TinyDIFModel(nn.Module):
    """An inference model as users write one: item/position/attribute tables + the encoder, ids in."""

    def __init__(self, num_items=20, num_cats=6, max_len=8):
        super().__init__()
        self.items = nn.Embedding(num_items, DIM, padding_idx=0)
        self.pos = nn.Embedding(max_len, DIM)
        self.attrs = AttributeEmbedding({"cat": num_cats}, ATTR,
                                        item_tables={"cat": torch.randint(0, num_cats, (num_items, 2))})
        self.encoder = DecoupledEncoder(2, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate")

    def forward(self, ids):
        h = self.encoder(self.items(ids), attrs=self.attrs(items=ids), pos=self.pos.weight[: ids.shape[1]],
                         mask=padding_mask(ids), is_causal=True)
        return h[:, -1] @ self.items.weight.T  # (b, num_items) next-item scores


def test_export_inference_model_with_dynamic_length():
    torch.manual_seed(0)
    model = TinyDIFModel().eval()
    ids = torch.randint(0, 20, (B, 6))
    n = torch.export.Dim("n", min=2, max=8)
    exported = torch.export.export(model, (ids,), dynamic_shapes=({1: n},))
    buf = io.BytesIO()
    torch.export.save(exported, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    with torch.no_grad():
        for length in (3, 6, 8):
            probe = torch.randint(0, 20, (B, length))
            torch.testing.assert_close(loaded(probe), model(probe))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_within_tolerance(dtype):
    """Under autocast the fast path is within the rule of precision.py against an fp64 run of the same
    weights: at most 2x the error of the oracle backend under the same autocast."""
    torch.manual_seed(0)
    m = DecoupledEncoder(2, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate").eval()
    x, attrs, pos, mask = inputs()
    kw = dict(pos=pos, mask=mask, is_causal=True)
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double(), attrs={"cat": attrs["cat"].double()}, pos=pos.double(),
                                        mask=mask, is_causal=True)
        outs = {}
        for backend in ("torch", "sdpa"):
            for layer in m.layers:
                layer.attn.backend = backend
            with torch.autocast("cpu", dtype=dtype):
                outs[backend] = m(x.to(dtype), attrs=attrs, **kw)  # low-precision x is fine under autocast
    assert_within("encoder output", outs["sdpa"], outs["torch"], ref, dtype)
    assert 0 < (outs["torch"].double() - ref).abs().max() < 0.1  # autocast really ran at low precision


def test_deterministic_repeats_are_bit_identical():
    """With deterministic algorithms and a fixed seed, two training steps (dropout on) are identical."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(123)
            m = DecoupledEncoder(2, DIM, HEADS, attr_dims={"cat": ATTR}, fusion="gate", hidden_dropout=0.2,
                                 attn_dropout=0.2).train()
            x, attrs, pos, mask = inputs()
            out = m(x, attrs=attrs, pos=pos, mask=mask, is_causal=True)
            out.square().mean().backward()
            results.append([out.detach()] + [p.grad for p in m.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    finally:
        torch.use_deterministic_algorithms(previous)
