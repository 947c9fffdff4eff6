"""Serving: cached attention and encoders, the models' next_scores / recommend / start / step, and export."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dif_attention import (DecoupledAttention, DecoupledEncoder, DIFError, EarlyFusionAttention,
                           KVCache, item_attribute_table)
from dif_attention.models import MODELS, Recommender, ServingState, build_model, export_recommender

V, MAX_LEN = 40, 6
CAUSAL = ["SASRec", "SASRecF", "NOVA", "DIFSASRec"]


def make(name, seed=0, **kw):
    """A small model in eval mode with weights moved well away from the init (so scores differ clearly)."""
    torch.manual_seed(seed)
    table = item_attribute_table({i: [i % 5 + 1, i % 3 + 6] for i in range(1, V + 1)}, num_items=V + 1)
    settings = dict(num_items=V, dim=16, heads=2, layers=2, max_len=MAX_LEN, attr_dim=8, hidden_dropout=0.0,
                    attn_dropout=0.0, item_tables={"c": table}, num_classes={"c": 9}, **kw)
    model = build_model(name, strict=False, **settings)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def ragged(seed=0):
    """Right-padded histories of lengths 1, 3, MAX_LEN - 1, MAX_LEN and MAX_LEN + 3 (beyond the window)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, MAX_LEN - 1, MAX_LEN, MAX_LEN + 3]
    h = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for r, n in enumerate(lengths):
        h[r, :n] = torch.randint(1, V + 1, (n,), generator=g)
    return h


def padded(rows):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


# ---------------------------------------------------------------------------------------------- cached layers
@pytest.mark.parametrize("fusion", ["add", "concat", "gate"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_with_cache_equals_the_full_computation(fusion, norm_first):
    torch.manual_seed(0)
    b, n, dim = 3, 11, 16
    enc = DecoupledEncoder(2, dim, 2, attr_dims={"c": 8}, fusion=fusion, norm_first=norm_first).eval()
    x, a, pos = torch.randn(b, n, dim), torch.randn(b, n, 8), torch.randn(n, dim)
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, 2] = False  # a padded slot in the middle: slots are keys, not positions
    full = enc(x, attrs={"c": a}, pos=pos, mask=keep[:, None, None, :], is_causal=True)
    cache, outs = [KVCache()] * 2, []
    for lo, hi in [(0, 4), (4, 5), (5, 9), (9, 11)]:  # a prefill, one position, a block, the rest
        out, cache = enc(x[:, lo:hi], attrs={"c": a[:, lo:hi]}, pos=pos[lo:hi], mask=keep[:, None, None, :hi],
                         is_causal=True, cache=cache)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].length == n and cache[0].keys[1].shape == (1, 2, n, 8)  # the position stream stays shared


def test_early_fusion_attention_with_cache():
    torch.manual_seed(0)
    attn = EarlyFusionAttention(16, 2, attr_dims={"c": 16}).eval()
    x, a, pos = torch.randn(2, 7, 16), torch.randn(2, 7, 16), torch.randn(7, 16)
    full = attn(x, attrs={"c": a}, pos=pos, is_causal=True)
    out1, cache = attn(x[:, :6], attrs={"c": a[:, :6]}, pos=pos[:6], is_causal=True, cache=KVCache())
    out2, cache = attn(x[:, 6:], attrs={"c": a[:, 6:]}, pos=pos[6:], is_causal=True, cache=cache)
    torch.testing.assert_close(torch.cat([out1, out2], 1), full, atol=1e-5, rtol=1e-5)


def test_per_row_positions_grow_a_shared_position_stream_per_row():
    torch.manual_seed(0)
    attn = DecoupledAttention(16, 2).eval()
    x, pos = torch.randn(2, 5, 16), torch.randn(5, 16)
    _, cache = attn(x[:, :4], pos=pos[:4], cache=KVCache())
    rows_pos = torch.stack([pos[4], pos[3]])[:, None]  # (b, 1, dim): each row its own position
    out, grown = attn(x[:, 4:], pos=rows_pos, cache=cache)
    assert grown.keys[1].shape == (2, 2, 5, 8) and out.shape == (2, 1, 16)
    want = attn(torch.cat([x[:1, :4], x[:1, 4:]], 1), pos=pos)[:, 4:]
    torch.testing.assert_close(out[:1], want, atol=1e-5, rtol=1e-5)


def test_cache_errors():
    attn = DecoupledAttention(16, 2)
    x, pos = torch.randn(2, 3, 16), torch.randn(3, 16)
    with pytest.raises(DIFError, match=r"^cache: expected a KVCache"):
        attn(x, pos=pos, cache={})
    with pytest.raises(DIFError, match=r"^return_scores: expected False with cache="):
        attn(x, pos=pos, cache=KVCache(), return_scores=True)
    _, cache = attn(x, pos=pos, cache=KVCache())
    with pytest.raises(DIFError, match=r"^cache: expected a value of shape \(3, 2, m, 8\)"):
        attn(torch.randn(3, 1, 16), pos=pos[:1], cache=cache)  # another batch size
    with pytest.raises(DIFError, match=r"^cache: expected keys of 3 sources"):
        DecoupledAttention(16, 2, attr_dims={"c": 4})(x[:, :1], attrs={"c": torch.randn(2, 1, 4)}, pos=pos[:1],
                                                       cache=cache)
    enc = DecoupledEncoder(2, 16, 2)
    with pytest.raises(DIFError, match=r"^cache: expected a list of 2 KVCache"):
        enc(x, pos=pos, cache=[KVCache()])
    with pytest.raises(DIFError, match=r"^mask: expected a shape broadcastable to \(2, 2, 1, 4\)"):
        attn(x[:, :1], pos=pos[:1], mask=torch.ones(2, 1, 1, 1, dtype=torch.bool).expand(2, 1, 1, 3), cache=cache)


@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_paper_exact_fusions_refuse_a_cache(fusion):
    attn = DecoupledAttention(16, 2, fusion=fusion, max_len=4)
    x, pos = torch.randn(1, 4, 16), torch.randn(4, 16)
    _, cache = attn(x, pos=pos, cache=KVCache())  # as many queries as keys: fine
    with pytest.raises(DIFError, match=r"^queries: expected as many query rows as keys .*paper-exact"):
        attn(x[:, :1], pos=pos[:1], cache=KVCache(tuple(k[:, :, :3] for k in cache.keys), cache.value[:, :, :3]))


# ---------------------------------------------------------------------------------------------- models
def spy(model):
    """Record (rows, positions) of every encoder call."""
    calls = []
    forward = model.encoder.forward

    def recording(x, **kw):
        calls.append(tuple(x.shape[:2]))
        return forward(x, **kw)

    model.encoder.forward = recording
    return calls


VARIANTS = [(n, {}) for n in sorted(MODELS)] + [("DIFSASRec", {"fusion": "concat"}), ("DIFSASRec", {"fusion": "add"}),
                                                 ("DIFSASRec", {"fusion": "gate", "exact_fusion": True})]


@pytest.mark.parametrize("name,kw", VARIANTS, ids=["-".join([n, *map(str, kw.values())]) for n, kw in VARIANTS])
def test_step_equals_next_scores_of_the_grown_histories(name, kw):
    """Ragged histories over twice max_len steps (every window fills and slides): each step's scores are
    next_scores of the grown histories; incremental models compute one position per row with room and the
    whole window only for rows that slide."""
    model = make(name, **kw)
    hist = ragged()
    rows = [[int(i) for i in r if i] for r in hist]
    state = model.start(hist)
    torch.testing.assert_close(state.scores, model.next_scores(hist), atol=1e-5, rtol=0)
    calls = spy(model)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(2 * MAX_LEN):
        items = torch.randint(1, V + 1, (len(rows),), generator=g)
        full = state.lengths >= MAX_LEN
        calls.clear()
        scores, state = model.step(state, items)
        if model.incremental:
            positions = sorted(calls)
            want = sorted(([(int((~full).sum()), 1)] if (~full).any() else []) +
                          ([(int(full.sum()), MAX_LEN)] if full.any() else []))
            assert positions == want, (positions, want)
        for r, item in zip(rows, items.tolist()):
            r.append(item)
        worst = max(worst, float((scores - model.next_scores(padded(rows))).abs().max()))
    assert worst < 1e-4
    assert model.incremental == (model.causal and not kw.get("exact_fusion", False))
    assert (state.caches is not None) == model.incremental
    assert state.lengths.tolist() == [MAX_LEN] * len(rows)


def test_models_are_incremental_as_documented():
    assert [n for n in sorted(MODELS) if make(n).incremental] == sorted(CAUSAL)


@pytest.mark.parametrize("name", ["SASRec", "DIFSASRec", "DIFBERT4Rec"])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_recommend_is_the_top_k_of_next_scores(name, exclude_seen):
    model = make(name)
    hist = ragged()
    items, scores = model.recommend(hist, k=7, exclude_seen=exclude_seen)
    assert items.shape == scores.shape == (len(hist), 7)
    want = model.next_scores(hist).clone()
    want[:, 0] = float("-inf")
    for r, row in enumerate(hist):
        if exclude_seen:
            want[r, row[row != 0]] = float("-inf")
        assert 0 not in items[r] and (items[r] <= V).all()  # never padding, never BERT's [MASK] (V + 1)
        if exclude_seen:
            assert not set(items[r].tolist()) & set(row.tolist())
    top = want.topk(7, dim=1)
    torch.testing.assert_close(scores, top.values)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    torch.testing.assert_close(want.gather(1, items), scores)  # the items are the ones scored


def test_long_histories_use_their_last_max_len_items():
    for name in ("SASRec", "DIFSASRec", "BERT4Rec"):
        model = make(name)
        long = torch.arange(1, 3 * MAX_LEN + 1)[None]
        keep = MAX_LEN if model.causal else MAX_LEN - 1
        torch.testing.assert_close(model.next_scores(long), model.next_scores(long[:, -keep:]))


def test_serving_errors_name_the_argument():
    model = make("DIFSASRec")
    good = torch.tensor([[1, 2, 0], [3, 0, 0]])
    cases = [
        (lambda: model.next_scores([[1, 2]]), r"^histories: expected a torch.Tensor, got list"),
        (lambda: model.next_scores(torch.tensor([1, 2])), r"^histories: expected a 2-d tensor .*got shape \(2\)"),
        (lambda: model.next_scores(good.float()), r"^histories: expected an integer tensor .*got dtype torch.float32"),
        (lambda: model.next_scores(good + V), r"^histories: expected item ids in \[0, 40\] .*got ids in"),
        (lambda: model.next_scores(torch.tensor([[1, 0, 2]])), r"^histories: expected right-padded rows .*row 0"),
        (lambda: model.next_scores(torch.tensor([[1], [0]])), r"^histories: expected at least one item .*row 1"),
        (lambda: model.recommend(good, k=0), r"^k: expected an int >= 1, got 0"),
        (lambda: model.recommend(good, k=V + 1), r"^k: expected an int in \[1, 40\] .*got 41"),
        (lambda: model.recommend(torch.arange(1, V)[None], k=2), r"^k: expected at most 1, the items left for row 0"),
        (lambda: model.recommend(good, exclude_seen=1), r"^exclude_seen: expected True or False, got 1"),
        (lambda: Recommender(model, exclude_seen="no"), r"^exclude_seen: expected True or False, got 'no'"),
        (lambda: model.step(object(), torch.tensor([1, 2])), r"^state: expected the ServingState"),
        (lambda: model.step(make("DIFSASRec").start(good), torch.tensor([1, 2])),
         r"^state: expected a state made by this DIFSASRec's start\(\) or step\(\), got a state of another DIFSASRec"),
        (lambda: model.step(model.start(good), torch.tensor([1, 2, 3])),
         r"^state: expected a state of 3 histories .*got a state of 2 histories"),
        (lambda: model.step(model.start(good), torch.tensor([[1], [2]])), r"^items: expected a 1-d integer tensor"),
        (lambda: model.step(model.start(good), torch.tensor([1.0, 2.0])), r"^items: expected a 1-d integer tensor"),
        (lambda: model.step(model.start(good), torch.tensor([0, 2])), r"^items: expected item ids in \[1, 40\]"),
    ]
    for fn, pattern in cases:
        with pytest.raises(DIFError, match=pattern):
            fn()


def test_state_is_documented_and_frozen():
    model = make("SASRec")
    state = model.start(torch.tensor([[1, 2, 0], [3, 0, 0]]))
    assert isinstance(state, ServingState) and state.batch == 2 and state.windows.shape == (2, MAX_LEN)
    assert state.lengths.tolist() == [2, 1] and len(state.caches) == 2 and state.slots.shape == (2, 2)
    with pytest.raises(AttributeError):
        state.lengths = None


# ---------------------------------------------------------------------------------------------- export
HISTORIES = [torch.tensor([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8], [9, 0, 0, 0, 0]]), torch.tensor([[3]]),
             torch.randint(1, V + 1, (4, 3 * MAX_LEN), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("name", ["SASRec", "DIFSASRec", "BERT4Rec"])
def test_exported_program_reproduces_eager_top_k(name, tmp_path):
    model = make(name)
    program = export_recommender(model, k=5)
    torch.export.save(program, tmp_path / "rec.pt2")
    loaded = torch.export.load(tmp_path / "rec.pt2").module()
    for hist in HISTORIES:  # batch 1 and more, lengths 1, 5 and beyond max_len
        items, scores = model.recommend(hist, k=5)
        got_items, got_scores = loaded(hist)
        assert torch.equal(got_items, items)
        torch.testing.assert_close(got_scores, scores, atol=1e-5, rtol=1e-5)
    with pytest.raises(DIFError, match=r"^model: expected a model in eval mode"):
        export_recommender(model.train())


def test_exported_program_runs_without_this_package(tmp_path):
    model = make("DIFSASRec")
    torch.export.save(export_recommender(model, k=5), tmp_path / "rec.pt2")
    torch.save(HISTORIES, tmp_path / "histories.pt")
    script = textwrap.dedent("""
        import sys

        class Hidden:  # dif_attention cannot be imported here
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "dif_attention":
                    raise ImportError("dif_attention is hidden")

        sys.meta_path.insert(0, Hidden())
        import torch
        program = torch.export.load("rec.pt2").module()
        histories = torch.load("histories.pt", weights_only=True)
        torch.save([program(h) for h in histories], "out.pt")
        assert not any(m.split(".")[0] == "dif_attention" for m in sys.modules), "dif_attention was imported"
        try:
            import dif_attention  # noqa: F401
        except ImportError:
            print("hidden")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden", proc.stderr[-3000:]
    for hist, (items, scores) in zip(HISTORIES, torch.load(tmp_path / "out.pt", weights_only=True)):
        want_items, want_scores = model.recommend(hist, k=5)
        assert torch.equal(items, want_items)
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    """The optional ``[serve]`` extra: the same path through ``torch.onnx`` gives the same top-k in onnxruntime."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} is in the optional [serve] extra")
    import onnxruntime

    model = make("DIFSASRec")
    example = torch.tensor([[1, 2, 0], [3, 0, 0]])
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    onnx_program = torch.onnx.export(Recommender(model, k=5), (example,), dynamo=True, input_names=["histories"],
                                     output_names=["items", "scores"], dynamic_shapes=(dims,), verbose=False)
    onnx_program.save(str(tmp_path / "rec.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "rec.onnx"), providers=["CPUExecutionProvider"])
    for hist in HISTORIES:
        items, scores = model.recommend(hist, k=5)
        got_items, got_scores = session.run(None, {"histories": hist.numpy()})
        assert (got_items == items.numpy()).all()
        torch.testing.assert_close(torch.from_numpy(got_scores), scores, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- examples/serve.py
def test_serve_example_answers_users_and_typed_histories(tmp_path, capsys):
    from data import load_dataset
    from example_helpers import write_s3rec
    from train import TrainConfig, run
    import serve

    txt = write_s3rec(tmp_path)
    dataset = load_dataset(str(txt))
    cfg = TrainConfig(epochs=1, batch_size=16, out_dir=str(tmp_path / "runs"), progress=False, log=False)
    run(dataset, "DIFSASRec", cfg, dict(dim=16, heads=2, layers=1, attr_dim=8, max_len=8))
    flags = ["--dataset", str(txt), "--model", "DIFSASRec", "--out-dir", str(tmp_path / "runs"), "--k", "5"]
    out = serve.main(flags + ["--users", "0,3", "--history", "5,17,3"])
    assert [r["user"] for r in out] == [0, 3, None]
    model = serve.load_model(tmp_path / "runs" / "toy" / "DIFSASRec" / "seed0" / "best.pt")
    hist, targets = dataset.split("test", 50)
    for r, user in zip(out[:2], (0, 3)):
        history = [int(i) for i in hist[user] if i]
        assert r["history"] == history and r["target"] == int(targets[user]) and len(r["items"]) == 5
        assert not set(r["items"]) & set(history)
        items, scores = model.recommend(torch.tensor([history]), k=5)
        assert r["items"] == items[0].tolist()
    assert out[2]["history"] == [5, 17, 3] and not {5, 17, 3} & set(out[2]["items"])
    printed = capsys.readouterr().out
    assert "| user 3 |" in printed and "| typed | 5, 17, 3 |" in printed
    same = serve.main(["--run", str(tmp_path / "runs" / "toy" / "DIFSASRec" / "seed0"), "--history", "5,17,3",
                       "--k", "5"])
    assert same[0]["items"] == out[2]["items"]
    with pytest.raises(SystemExit):
        serve.main(flags + ["--history", "5,0,3"])  # 0 is padding, not an item
    with pytest.raises(SystemExit):
        serve.main(flags + ["--users", "100000"])
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(SystemExit):  # users of data the model was not trained on: refused, not answered
        serve.main(["--run", str(tmp_path / "runs" / "toy" / "DIFSASRec" / "seed0"), "--dataset",
                    str(write_s3rec(other, items=12)), "--users", "0"])
    err = capsys.readouterr().err
    assert "--dataset: expected the data" in err and "(30 items), got toy (12 items)" in err, err


# ---------------------------------------------------------------------------------------------- benchmarks/serving.py
def test_serving_benchmark_tiny(tmp_path, capsys):
    import json

    import serving

    out = tmp_path / "serving.json"
    result = serving.main(["--n", "6", "9", "--users", "3", "--repeats", "2", "--num-items", "30", "--dim", "16",
                           "--attr-dim", "8", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "command: `python benchmarks/serving.py --n 6 9" in printed and "torch threads" in printed
    assert [(r["n"], r["model"]) for r in result["rows"]] == [(6, "SASRec"), (6, "DIFSASRec"), (9, "SASRec"),
                                                               (9, "DIFSASRec")]
    for r in result["rows"]:
        assert r["step_ms"]["full"] > 0 and r["step_ms"]["incremental"] > 0 and r["recommend_speedup"] > 0
        assert f"| cpu | {r['n']} | {r['model']} | {r['step_ms']['full']:.2f} |" in printed
    assert len(result["ratios"]) == 2 and json.loads(out.read_text())["machine"] == result["machine"]
    with pytest.raises(SystemExit):
        serving.main(["--n", "4", "--repeats", "5"])  # the window would fill during the timed steps
