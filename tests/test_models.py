"""dif_attention.models: the ready models' contract, the config round trip, saving and loading."""
import pytest
import torch

from dif_attention import DIFError
from dif_attention.models import (ATTRIBUTE_MODELS, MODELS, build_model, hyper_parameters, load_model,
                                  save_model)
from example_helpers import synthetic

SMALL = dict(dim=16, heads=2, layers=2, attr_dim=8, max_len=12)


def make(name, **kw):
    ds = synthetic()
    return build_model(name, num_items=ds.num_items, item_tables=ds.tables, num_classes=ds.num_classes,
                       strict=False, **{**SMALL, **kw})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_contract(name):
    ds = synthetic()
    m = make(name).eval()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    h = m(ids)
    h2, maps = m(ids, return_scores=True)
    assert h.shape == (2, 4, 16) and torch.allclose(h, h2, atol=1e-5)
    assert len(maps) == 2 and all(mp["fused"].shape == (2, 2, 4, 4) for mp in maps)
    assert m.item_scores(h).shape == (2, 4, ds.num_items + 1)
    if name.startswith("DIF"):
        assert {"item", "position", "residue"} <= set(maps[0])
        assert m.attribute_logits(h)["residue"].shape == (2, 4, ds.num_classes["residue"])


def test_causal_models_do_not_see_the_future():
    for name in ("SASRec", "SASRecF", "NOVA", "DIFSASRec"):
        m = make(name).eval()
        a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 9, 10]])
        assert torch.allclose(m(a)[:, :2], m(b)[:, :2], atol=1e-5), name


def test_dif_bert_mask_has_padding_attributes():
    m = make("DIFBERT4Rec", layers=1)
    tokens = m.attr_emb.lookup(torch.tensor([[m.mask_id, 1]]))["residue"]
    assert tokens[0, 0].abs().sum() == 0 and tokens[0, 1].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_round_trip_rebuilds_the_same_model(name):
    torch.manual_seed(0)
    m = make(name, hidden_dropout=0.3, ff_dim=24)
    cfg = m.config()
    assert cfg["name"] == name and cfg["hidden_dropout"] == 0.3 and cfg["ff_dim"] == 24
    assert set(cfg) == {"name", *hyper_parameters(type(m))}
    twin = build_model(**cfg)
    assert twin.state_dict().keys() == m.state_dict().keys()
    twin.load_state_dict(m.state_dict())
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    torch.testing.assert_close(twin.eval()(ids), m.eval()(ids))


@pytest.mark.parametrize("name", ["SASRec", "DIFSASRec", "DIFBERT4Rec"])
def test_save_and_load_with_weights_only(tmp_path, name):
    m = make(name).eval()
    path = save_model(m, tmp_path / "m.pt")
    ck = torch.load(path, weights_only=True)  # plain tensors and dicts: no code in the file
    assert ck["config"]["name"] == name
    loaded = load_model(path)
    ids = torch.tensor([[1, 2, 3, 0]])
    torch.testing.assert_close(loaded(ids), m(ids))
    assert not loaded.training


@pytest.mark.parametrize("name", ["SASRecF", "DIFSASRec", "DIFBERT4Rec"])
def test_load_model_with_other_item_tables(tmp_path, name):
    """``item_tables=`` replaces the saved item -> attribute tables (same items, same vocabulary): the same tables
    give the same model, other assignments another one; a table of the wrong size is named."""
    m = make(name, attr_init_std=1.0).eval()  # (DIF's attribute scores start small: N(0, 1) tables show them)
    path = save_model(m, tmp_path / "m.pt")
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    table = m.item_tables["residue"]
    torch.testing.assert_close(load_model(path, item_tables={"residue": table.clone()})(ids), m(ids))
    moved = torch.cat([table[:1], table[1:].roll(1, 0)])  # item i gets item i-1's residue
    assert (load_model(path, item_tables={"residue": moved})(ids) - m(ids)).abs().max() > 1e-6
    with pytest.raises(DIFError, match=r"^item_tables\['residue'\]: expected 31 rows"):
        load_model(path, item_tables={"residue": table[:5]})
    with pytest.raises(DIFError, match=r"^item_tables\['residue'\]: expected token ids in \[0, 5\)"):
        load_model(path, item_tables={"residue": table + 10})
    plain = save_model(make("SASRec"), tmp_path / "plain.pt")
    with pytest.raises(DIFError, match=r"^item_tables: expected None for a model without attributes"):
        load_model(plain, item_tables={"residue": table})


def test_build_model_errors():
    ds = synthetic()
    with pytest.raises(DIFError, match=r"^name: expected one of"):
        build_model("GRU4Rec", num_items=5)
    with pytest.raises(DIFError, match=r"^hyper_params: expected arguments of SASRec .*unknown \['fusion'\]"):
        build_model("SASRec", num_items=ds.num_items, fusion="gate")
    assert type(build_model("SASRec", num_items=ds.num_items, fusion="gate", strict=False)).__name__ == "SASRec"
    for name in ATTRIBUTE_MODELS:
        with pytest.raises(DIFError, match=r"^item_tables: expected a non-empty mapping"):
            build_model(name, num_items=ds.num_items)
    with pytest.raises(DIFError, match=r"^fusion: expected one of \('add', 'concat', 'gate'\)"):
        make("DIFSASRec", fusion="gate_exact")
    with pytest.raises(DIFError, match=r"^item_tables\['residue'\]: expected 31 rows"):
        build_model("DIFSASRec", num_items=ds.num_items, item_tables={"residue": ds.tables["residue"][:5]},
                    num_classes=ds.num_classes)
    with pytest.raises(DIFError, match=r"^hidden_dropout: expected a probability in \[0, 1\), got 1.5"):
        make("SASRec", hidden_dropout=1.5)


def test_bad_ids_are_named():
    m = make("DIFSASRec").eval()
    for ids, match in ((torch.tensor([[1.0, 2.0]]), r"^ids: expected an integer tensor"),
                       (torch.tensor([[True, False]]), r"^ids: expected an integer tensor"),
                       (torch.tensor([1, 2]), r"^ids: expected a 2-d tensor"),
                       (torch.tensor([[1, 99]]), r"^ids: expected item ids in \[0, 30\]"),
                       (torch.zeros(1, 13, dtype=torch.long), r"^ids: expected at most max_len=12")):
        with pytest.raises(DIFError, match=match):
            m(ids)


def test_exact_fusion_is_length_bound():
    m = make("DIFSASRec", exact_fusion=True)
    assert m.length_bound and not make("DIFSASRec").length_bound
    with pytest.raises(DIFError, match="max_len=12"):
        m(torch.tensor([[1, 2, 3]]))
    assert m(torch.tensor([[1, 2, 3] + [0] * 9])).shape == (1, 12, 16)


def test_load_model_refuses_bad_files(tmp_path):
    good = save_model(make("SASRec"), tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path, match in ((tmp_path / "missing.pt", "no such model file"), (truncated, "not a readable model file"),
                        (foreign, "not a dif-attention model file")):
        with pytest.raises(DIFError, match=str(path).replace(".", r"\.") + ": " + match):
            load_model(path)


@pytest.mark.parametrize("content", [b"", b"x"])
def test_load_model_names_an_empty_or_damaged_file(tmp_path, content):
    path = tmp_path / "damaged.pt"
    path.write_bytes(content)
    with pytest.raises(DIFError, match=str(path).replace(".", r"\.") + ": not a readable model file") as info:
        load_model(path)
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("name, keyword", [("SASRecF", "aap"), ("SASRecF", "trainable_attributes"),
                                           ("NOVA", "trainable_attributes"), ("DIFSASRec", "exact_fusion"),
                                           ("DIFSASRec", "input_fusion"), ("DIFSASRec", "trainable_attributes"),
                                           ("DIFBERT4Rec", "exact_fusion"), ("DIFBERT4Rec", "input_fusion"),
                                           ("DIFBERT4Rec", "trainable_attributes")])
def test_boolean_keywords_take_only_true_or_false(name, keyword):
    for value in ("no", "false", 0, None):
        with pytest.raises(DIFError, match=rf"^{keyword}: expected True or False, got {value!r}$"):
            make(name, **{keyword: value})


def test_item_scores_checks_h():
    m = make("DIFSASRec")
    for h, match in ((torch.randn(2, 7), r"^h: expected last dim 16 \(= dim\), got shape \(2, 7\)"),
                     (torch.ones(2, 16, dtype=torch.long),
                      r"^h: expected a floating-point tensor, got dtype torch\.int64"),
                     (torch.randn(2, 16, dtype=torch.float64), r"^h: expected dtype torch.float32")):
        with pytest.raises(DIFError, match=match):
            m.item_scores(h)


def test_input_fusion_puts_the_attributes_into_the_item_stream():
    """DIF's item stream has no attribute content (only the scores do); with input_fusion=True it has: two items
    that differ only in their attributes get different inputs, and the model stays a DIF model."""
    ds = synthetic()
    tables = {"residue": ds.tables["residue"].clone()}
    plain = build_model("DIFSASRec", num_items=ds.num_items, item_tables=tables, num_classes=ds.num_classes,
                        **SMALL).eval()
    fused = build_model("DIFSASRec", num_items=ds.num_items, item_tables=tables, num_classes=ds.num_classes,
                        input_fusion=True, **SMALL).eval()
    assert fused.config()["input_fusion"] and not plain.config()["input_fusion"]
    ids = torch.tensor([[1, 2, 3]])
    x_plain, side = plain.inputs(ids)
    x_fused, _ = fused.inputs(ids)
    swapped = {"residue": tables["residue"].clone()}
    swapped["residue"][1] = tables["residue"][2]  # item 1 takes item 2's attributes
    fused.attr_emb.register_buffer("items_residue", swapped["residue"], persistent=False)
    plain.attr_emb.register_buffer("items_residue", swapped["residue"], persistent=False)
    assert not torch.allclose(fused.inputs(ids)[0][0, 0], x_fused[0, 0])  # the item stream moved
    torch.testing.assert_close(plain.inputs(ids)[0], x_plain)  # DIF's item stream ignores attributes
    assert set(side) == {"attrs", "pos"}
