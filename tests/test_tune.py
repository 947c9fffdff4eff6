"""The validation-only search (examples/tune.py) on the tiny synthetic walk: outputs, the JSON round trip,
resuming, pruning through an ``on_eval`` callback, the per-family search spaces, the test split kept out."""
import json
import random

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

import tune  # noqa: E402
from data import from_sequences  # noqa: E402
from example_helpers import synthetic, write_s3rec  # noqa: E402
from train import RunError, TrainConfig, run  # noqa: E402

SMALL = ["--epochs", "2", "--dim", "16", "--max-len", "12", "--batch-size", "16", "--threads", "1",
         "--progress", "false", "--log", "false"]
PNG = b"\x89PNG\r\n\x1a\n"


def two_attributes():
    """The walk with two attributes per item (residue mod 4 and mod 3)."""
    rng = random.Random(0)
    seqs = {}
    for u in range(30):
        start, length = rng.randrange(20), rng.randrange(6, 12)
        seqs[str(u)] = [str((start + t) % 20 + 1) for t in range(length)]
    attrs = {"mod4": {str(i): [f"a{i % 4}"] for i in range(1, 21)},
             "mod3": {str(i): [f"b{i % 3}"] for i in range(1, 21)}}
    return from_sequences("two", seqs, attrs, k=0)


def test_search_writes_outputs_round_trips_and_resumes(tmp_path, capsys):
    txt = write_s3rec(tmp_path)
    out = tmp_path / "tune"
    common = ["--dataset", str(txt), "--models", "DIFSASRec", "--out", str(out), "--out-dir", str(tmp_path / "runs"),
              *SMALL]
    res = tune.main(common + ["--trials", "2"])["DIFSASRec"]
    study, paths = res["study"], res["paths"]
    printed = capsys.readouterr().out
    assert printed.count("[DIFSASRec] trial ") == 2  # one line per finished trial
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    # best.json gives back what the best trial trained with
    best = study.best_trial
    train, settings = tune.load_config(paths["config"])
    config = best.user_attrs["config"]
    assert (train, settings) == (config["train"], config["model_settings"])
    assert json.loads(paths["config"].read_text())["model"] == "DIFSASRec"
    cfg = TrainConfig(**train)
    assert cfg.lr == best.params["lr"] and cfg.lamb == best.params["lamb"]
    assert {k: settings[k] for k in ("layers", "heads", "attr_dim", "fusion", "hidden_dropout", "attn_dropout")} == \
        {k: best.params[k] for k in ("layers", "heads", "attr_dim", "fusion", "hidden_dropout", "attn_dropout")}
    assert settings["dim"] == 16 and cfg.epochs == 2  # the fixed base is kept

    # the table and the plots
    rows = [ln for ln in paths["trials"].read_text().splitlines() if ln.startswith("| ") and "state" not in ln]
    assert len(rows) == 2 and all("complete" in r for r in rows) and f"| **{best.number}** |" in "\n".join(rows)
    for name in ("history", "importance", "curves"):
        assert paths[name].read_bytes()[:8] == PNG
    # curves.csv: one row per trained epoch of each trial, the values the pruner saw
    rows = paths["curves_csv"].read_text().splitlines()
    assert rows[0] == "trial,state,epoch,value"
    assert [r.split(",")[:3] for r in rows[1:]] == [[str(t.number), "complete", str(e)] for t in study.trials
                                                    for e in sorted(t.intermediate_values)]
    assert len(rows) == 1 + 2 * 2  # 2 trials x 2 epochs
    assert float(rows[-1].split(",")[3]) == pytest.approx(study.trials[1].intermediate_values[2], rel=1e-5)
    # the final run: the chosen configuration, tested once, on the real data
    final = json.loads((out / "DIFSASRec" / "final.json").read_text())
    assert final["best_trial"] == best.number and len(final["results"]) == 1
    assert final["results"][0]["model_config"]["fusion"] == settings["fusion"]
    assert (out / "tune-results.md").read_text().count("| DIFSASRec |") == 1

    # rerun with a larger budget: the study resumes from the SQLite file and adds one trial
    again = tune.main(common + ["--trials", "3", "--final", "false"])["DIFSASRec"]["study"]
    assert [t.number for t in again.trials] == [0, 1, 2]
    assert again.trials[0].params == study.trials[0].params
    with pytest.raises(SystemExit):  # other fixed settings: refused, not mixed into the study
        tune.main(common[:-len(SMALL)] + [*SMALL[2:], "--epochs", "3", "--trials", "4", "--final", "false"])
    assert "other fixed settings (epochs)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the objective is validation NDCG@10: another selection rule is refused
        tune.main(common + ["--valid-metric", "Recall@20", "--final", "false"])
    assert "--valid-metric: the search selects by validation NDCG@10" in capsys.readouterr().err


class PruneSecondTrial(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report, never trial 0."""

    def prune(self, study, trial):
        return trial.number == 1


def test_pruning_through_on_eval_and_no_test_item_read(tmp_path):
    seen = []

    def runner(dataset, model_name, cfg, settings, *, on_eval):
        """``train.run`` with the per-evaluation callback (here replayed from the finished run's history)."""
        hist = dataset.split("test", 12)
        seen.append(isinstance(dataset, tune.ValidationOnly) and all(
            np.array_equal(a, b) for a, b in zip(hist, dataset.split("valid", 12))))
        result = run(dataset, model_name, cfg, settings)
        for record in result["history"]:
            on_eval(record["epoch"], record["valid"])
        return result

    cfg = TrainConfig(epochs=3, batch_size=16, progress=False, log=False)
    study = tune.search(synthetic(), "SASRec", cfg, {"dim": 16, "max_len": 12}, trials=2,
                        storage=f"sqlite:///{tmp_path / 's.db'}", pruner=PruneSecondTrial(), runner=runner,
                        progress=False)
    first, second = study.trials
    assert first.state.name == "COMPLETE" and sorted(first.intermediate_values) == [1, 2, 3]
    assert first.value == max(first.intermediate_values.values())
    assert second.state.name == "PRUNED" and list(second.intermediate_values) == [1]
    assert seen == [True, True]
    assert "| 1 | pruned |" in tune.trials_table(study)


def test_search_spaces_per_family_and_attribute_switches():
    ds = two_attributes()
    shared = ["lr", "layers", "heads", "hidden_dropout", "attn_dropout"]
    assert tune.search_space("SASRec", ds) == shared
    assert tune.search_space("SASRecF", ds) == shared + ["use_mod4", "use_mod3"]
    assert tune.search_space("SASRecF", ds, {"aap": True}) == shared + ["lamb", "use_mod4", "use_mod3"]
    dif = shared + ["attr_dim", "fusion", "lamb", "input_fusion"]
    assert tune.search_space("DIFSASRec", ds) == dif + ["use_mod4", "use_mod3"]
    assert tune.search_space("DIFSASRec", synthetic()) == dif  # one attribute

    params = {"lr": 1e-3, "layers": 1, "heads": 2, "hidden_dropout": 0.2, "attn_dropout": 0.1, "attr_dim": 8,
              "fusion": "add", "lamb": 0.0, "input_fusion": True, "use_mod4": False, "use_mod3": True}
    cfg, settings, attributes = tune.suggest(optuna.trial.FixedTrial(params), "DIFSASRec", ds, TrainConfig(),
                                             {"dim": 16})
    assert (cfg.lr, cfg.lamb, settings["fusion"], settings["dim"], attributes) == (1e-3, 0.0, "add", 16, ["mod3"])
    assert settings["input_fusion"] is True
    one = tune.with_attributes(ds, attributes)
    assert list(one.tables) == list(one.num_classes) == ["mod3"] and list(ds.tables) == ["mod4", "mod3"]
    *_, none = tune.suggest(optuna.trial.FixedTrial({**params, "use_mod3": False}), "DIFSASRec", ds, TrainConfig())
    assert none == []


def test_load_config_refuses_unknown_settings(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"model": "SASRec", "train": {"lr": 1e-3, "learning_rate": 1}, "model_settings": {}}))
    with pytest.raises(RunError, match="unknown settings learning_rate"):
        tune.load_config(path)
    path.write_text(json.dumps({"model": "SASRec", "train": {"lr": 1e-3}, "model_settings": {"dim": 32}}))
    assert tune.load_config(path) == ({"lr": 1e-3}, {"dim": 32})


def test_entry_points_read_the_best_config_back(tmp_path):
    """``sasrec.py --config best.json`` trains with the searched settings (flags given still win)."""
    import sasrec
    txt = write_s3rec(tmp_path)
    out = tmp_path / "tune"
    res = tune.main(["--dataset", str(txt), "--models", "DIFSASRec", "--out", str(out), "--out-dir",
                     str(tmp_path / "runs"), "--trials", "1", "--final", "false", *SMALL])["DIFSASRec"]
    train, settings = tune.load_config(res["paths"]["config"])
    runs = sasrec.main(["--dataset", str(txt), "--models", "DIFSASRec", "--config", str(res["paths"]["config"]),
                        "--epochs", "1", "--out-dir", str(tmp_path / "runs2"), "--progress", "false", "--log", "false",
                        "--results", str(tmp_path / "s")])
    used = runs[0]
    assert used["config"]["lr"] == train["lr"] and used["config"]["lamb"] == train["lamb"]
    assert used["config"]["epochs"] == 1  # the flag wins over the file
    assert {k: used["model_config"][k] for k in ("layers", "heads", "attr_dim", "fusion")} == \
        {k: settings[k] for k in ("layers", "heads", "attr_dim", "fusion")}


def test_first_trial_is_the_fixed_base_and_off_grid_values_are_drawn(tmp_path):
    ds = two_attributes()
    cfg = TrainConfig(lr=2e-3, lamb=3.0)  # lamb 3 is not among the searched values
    base = tune.base_params("DIFSASRec", ds, cfg, {"dim": 16, "heads": 4, "hidden_dropout": 0.2})
    assert base == {"lr": 2e-3, "layers": 2, "heads": 4, "hidden_dropout": 0.2, "attn_dropout": 0.5,
                    "attr_dim": 64, "fusion": "gate", "input_fusion": False, "use_mod4": True, "use_mod3": True}
    assert "heads" not in tune.base_params("SASRec", ds, cfg, {"dim": 6, "heads": 6})  # 6 does not divide into 1/2/4/8

    calls = []

    def runner(dataset, model_name, cfg, settings):
        calls.append((cfg.lr, cfg.lamb, settings["heads"], settings["hidden_dropout"]))
        return {"best_valid_ndcg10": 0.1 * len(calls), "history": [], "epochs": 1, "best_epoch": 1}

    small = TrainConfig(lr=2e-3, lamb=10.0, epochs=1)
    for start, name in ((True, "a"), (False, "b")):
        calls.clear()
        tune.search(ds, "DIFSASRec", small, {"dim": 16, "hidden_dropout": 0.2}, trials=2, runner=runner,
                    storage=f"sqlite:///{tmp_path / (name + '.db')}", progress=False, start_from_base=start)
        assert (calls[0] == (2e-3, 10.0, 2, 0.2)) is start


def test_a_config_choosing_split_s3rec_fields_loads_them_by_name(tmp_path):
    """A search over ``--attributes brand,categories`` may keep one of the two: ``--config`` alone loads it."""
    import ablation
    import sasrec
    txt = tmp_path / "toy.txt"
    txt.write_text("".join(f"{u} " + " ".join(str((u + t) % 12 + 1) for t in range(8)) + "\n" for u in range(1, 25)))
    # brand first where an item has one (items 1, 2, 4, 5, ...), then its categories
    (tmp_path / "toy_item2attributes.json").write_text(json.dumps(
        {str(i): ([100 + i % 3] if i % 3 else []) + [i % 4 + 1] for i in range(1, 13)}))
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"model": "SASRecF", "train": {"lr": 1e-3}, "model_settings": {"dim": 8},
                                "attributes": ["categories"]}))
    flags = ["--dataset", str(txt), "--models", "SASRecF", "--config", str(best), "--epochs", "1", "--max-len", "8",
             "--save", "false", "--progress", "false", "--log", "false", "--results", str(tmp_path / "s")]
    assert sasrec.main(flags)[0]["attributes"] == {"categories": 4}
    # a flag given wins over the file, as for every other setting
    assert sasrec.main(flags + ["--attributes", "brand,categories"])[0]["attributes"] == {"brand": 2, "categories": 4}
    assert sasrec.main(flags + ["--attributes", "brand"])[0]["attributes"] == {"brand": 2}
    # the other entry points read the file's attributes too
    ablation.main(["--dataset", str(txt), "--variants", "full", "--config", str(best), "--epochs", "1", "--max-len",
                   "8", "--save", "false", "--progress", "false", "--log", "false", "--results", str(tmp_path / "a")])
    assert [r["attributes"] for r in json.loads((tmp_path / "a.json").read_text())] == [{"categories": 4}]


@pytest.mark.parametrize("prune_after, stopped_at", [(None, 4), (1, 1)])
def test_median_pruner_waits_half_the_epochs_by_default(tmp_path, prune_after, stopped_at):
    """Five trials report 1.0 at every epoch; the sixth reports 0.0 and is stopped at the first epoch the pruner
    may act on: half of 8 epochs by default, or the epoch given."""
    calls = []

    def runner(dataset, model_name, cfg, settings, *, on_eval):
        value = 1.0 if len(calls) < 5 else 0.0
        calls.append(value)
        for epoch in range(1, cfg.epochs + 1):
            on_eval(epoch, {tune.OBJECTIVE: value})
        return {"epochs": cfg.epochs, "best_epoch": 1, "best_valid_ndcg10": value, "history": []}

    cfg = TrainConfig(epochs=8, batch_size=16, progress=False, log=False)
    study = tune.search(synthetic(), "SASRec", cfg, {"dim": 16, "max_len": 12}, trials=6,
                        storage=f"sqlite:///{tmp_path / 's.db'}", prune_after=prune_after, runner=runner,
                        progress=False)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 5 + ["PRUNED"]
    assert sorted(study.trials[-1].intermediate_values) == list(range(1, stopped_at + 1))
    assert tune.default_prune_after(8) == 4 and tune.default_prune_after(1) == 1


def test_a_trial_seeded_from_another_search_takes_the_shared_settings(tmp_path, capsys):
    """``--enqueue``: a tuned SASRecF's choice enters a DIF-SASRec study with the settings both search; DIF's own
    settings stay the base's, a SASRec choice (no attributes) leaves the switches on, and a rerun adds nothing."""
    ds = two_attributes()
    sasrecf = {"model": "SASRecF", "train": {"lr": 4.3e-4, "lamb": 10.0},
               "model_settings": {"layers": 3, "heads": 8, "hidden_dropout": 0.0, "attn_dropout": 0.1,
                                  "attr_dim": 64, "input_fusion": False}, "attributes": ["mod3"]}
    sasrec = {"model": "SASRec", "train": {"lr": 5.6e-4}, "model_settings": {"layers": 2, "heads": 16},
              "attributes": None}
    cfg = TrainConfig(lr=2e-3, lamb=1.0, epochs=1)
    base = {"dim": 16, "attr_dim": 8, "input_fusion": True}
    assert tune.shared_params("DIFSASRec", ds, cfg, base, sasrecf) == {
        "lr": 4.3e-4, "layers": 3, "heads": 8, "hidden_dropout": 0.0, "attn_dropout": 0.1,  # SASRecF's
        "attr_dim": 8, "fusion": "gate", "lamb": 1.0, "input_fusion": True,  # the base's: SASRecF does not search them
        "use_mod4": False, "use_mod3": True}  # SASRecF's switches
    # 16 heads do not divide the width 16 into 1/2/4/8: the base's 2; no attributes in SASRec's choice: both on
    assert tune.shared_params("DIFSASRec", ds, cfg, base, sasrec) == {
        **tune.base_params("DIFSASRec", ds, cfg, base), "lr": 5.6e-4, "layers": 2}
    assert tune.shared_params("SASRec", ds, cfg, {"dim": 16}, sasrecf) == {
        "lr": 4.3e-4, "layers": 3, "heads": 8, "hidden_dropout": 0.0, "attn_dropout": 0.1}

    calls = []

    def runner(dataset, model_name, cfg, settings):
        calls.append((cfg.lr, settings["layers"], settings["attr_dim"], sorted(dataset.tables)))
        return {"best_valid_ndcg10": 0.1, "history": [], "epochs": 1, "best_epoch": 1}

    storage = f"sqlite:///{tmp_path / 's.db'}"
    for trials in (2, 3):  # the second call resumes the study: SASRecF's choice is not queued again
        study = tune.search(ds, "DIFSASRec", cfg, base, trials=trials, runner=runner, storage=storage,
                            progress=False, enqueue=[sasrecf])
    assert calls[:2] == [(2e-3, 2, 8, ["mod3", "mod4"]), (4.3e-4, 3, 8, ["mod3"])]
    assert len(study.trials) == 3 and calls[2][:2] != (4.3e-4, 3)

    # on the command line: a file that is not a best.json is named
    bad = tmp_path / "best.json"
    bad.write_text("[1, 2]")
    txt = write_s3rec(tmp_path)
    with pytest.raises(SystemExit):
        tune.main(["--dataset", str(txt), "--models", "SASRec", "--out", str(tmp_path / "t"), "--enqueue", str(bad),
                   "--trials", "1", *SMALL])
    assert str(bad) in capsys.readouterr().err


def test_a_search_goes_on_from_the_trials_md_of_earlier_ones(tmp_path):
    """``--history``: a new study starts with the trials an earlier search wrote to ``trials.md`` / ``curves.csv``
    (settings, values, curves, seconds, the best's config), then draws more; a row whose switches are missing
    takes its command's ``--attributes``; rows of another model, malformed rows and missing files are named."""
    ds = two_attributes()
    cfg = TrainConfig(lr=2e-3, lamb=1.0, epochs=2)
    base = {"dim": 16, "attr_dim": 8}
    calls = []

    def runner(dataset, model_name, cfg, settings):
        calls.append((cfg.lr, settings["layers"]))
        value = 0.1 + cfg.lr + settings["layers"] / 100  # differs per draw
        return {"best_valid_ndcg10": value, "epochs": 2, "best_epoch": 2,
                "history": [{"epoch": 1, "valid": {"NDCG@10": value / 2}}, {"epoch": 2, "valid": {"NDCG@10": value}}]}

    first = tune.search(ds, "DIFSASRec", cfg, base, trials=3, runner=runner, storage=f"sqlite:///{tmp_path / 'a.db'}",
                        progress=False)
    earlier = tmp_path / "earlier"
    tune.write_outputs(first, earlier, command="python examples/tune.py --models DIFSASRec")
    records = tune.read_history(earlier)
    assert [r["state"] for r in records] == ["complete"] * 3 and {r["model"] for r in records} == {"DIFSASRec"}

    calls.clear()
    again = tune.search(ds, "DIFSASRec", cfg, base, trials=5, runner=runner, storage=f"sqlite:///{tmp_path / 'b.db'}",
                        progress=False, history=records)
    assert len(calls) == 2 and len(again.trials) == 5  # three from the file, two drawn afresh
    for old, new in zip(first.trials, again.trials):
        assert new.value == pytest.approx(old.value, rel=1e-3)  # trials.md keeps 4 digits
        assert new.intermediate_values == pytest.approx(old.intermediate_values, rel=1e-5)
        assert {k: v for k, v in new.params.items() if k != "lr"} == {k: v for k, v in old.params.items() if k != "lr"}
        assert new.params["lr"] == pytest.approx(old.params["lr"], rel=1e-3)
    if again.best_trial.number < 3:  # a rebuilt best trial gives the config it trained with
        assert again.best_trial.user_attrs["config"]["model_settings"]["layers"] == first.best_trial.params["layers"]
    table = tune.trials_table(again)
    assert f"| {first.trials[0].duration.total_seconds():.1f} |" in table.splitlines()[2]  # its seconds, not 0
    assert tune.search(ds, "DIFSASRec", cfg, base, trials=5, runner=runner, storage=f"sqlite:///{tmp_path / 'b.db'}",
                       progress=False, history=records).trials.__len__() == 5  # a study with trials takes none

    # a one-attribute run: its rows have no switches; the command's --attributes says which attribute was on
    one = tmp_path / "one"
    one.mkdir()
    (one / "trials.md").write_text(
        "# Search: SASRecF, study 'two-SASRecF'\n\nCommand: `python examples/tune.py --attributes mod3 --models "
        "SASRecF`\n\n| trial | state | valid NDCG@10 | epochs | seconds | settings |\n|---|---|---|---|---|---|\n"
        "| **0** | complete | 0.2500 | 2 | 12.5 | lr=0.0005, layers=3, heads=8, hidden_dropout=0, attn_dropout=0.1 |\n")
    study = tune.search(ds, "SASRecF", cfg, {"dim": 16}, trials=1, runner=runner, progress=False,
                        storage=f"sqlite:///{tmp_path / 'c.db'}", history=tune.read_history(one))
    assert calls[2:] == [] and study.trials[0].params == {
        "lr": 5e-4, "layers": 3, "heads": 8, "hidden_dropout": 0.0, "attn_dropout": 0.1,
        "use_mod4": False, "use_mod3": True}
    assert study.best_trial.user_attrs["config"]["attributes"] == ["mod3"]

    # errors name the file and the line
    with pytest.raises(RunError, match=r"trials\.md, line 9: attr_dim, fusion, input_fusion, lamb not searched"):
        tune.search(ds, "SASRecF", cfg, {"dim": 16}, trials=1, runner=runner, progress=False,
                    storage=f"sqlite:///{tmp_path / 'd.db'}", history=records[:1])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "trials.md").write_text("| 0 | complete | high | 2 | 1.0 | lr=0.001 |\n")
    with pytest.raises(RunError, match=r"bad/trials\.md, line 1: expected \| trial"):
        tune.read_history(bad)
    (bad / "trials.md").write_text("| 0 | complete | 0.2 | 2 | 1.0 | lr=0.001, layers=5, heads=8, hidden_dropout=0, "
                                   "attn_dropout=0 |\n")
    with pytest.raises(RunError, match=r"line 1: layers=5 is not one of 1, 2, 3, 4"):
        tune.search(ds, "SASRec", cfg, {"dim": 16}, trials=1, runner=runner, progress=False,
                    storage=f"sqlite:///{tmp_path / 'e.db'}", history=tune.read_history(bad))
    (bad / "trials.md").write_text("| 0 | complete | 0.2 | 2 | 1.0 | lr=0.001, layers=1, heads=8, hidden_dropout=0, "
                                   "attn_dropout=0, use_mod4=yes, use_mod3=True |\n")
    with pytest.raises(RunError, match=r"line 1: use_mod4=yes is not one of True, False"):
        tune.search(ds, "SASRecF", cfg, {"dim": 16}, trials=1, runner=runner, progress=False,
                    storage=f"sqlite:///{tmp_path / 'f.db'}", history=tune.read_history(bad))
    with pytest.raises(RunError, match=r"nowhere/trials\.md: cannot read"):
        tune.read_history(tmp_path / "nowhere")


def test_history_on_the_command_line_goes_to_its_own_model(tmp_path, capsys):
    """``--history`` folders are matched to the searched models by the model their trials.md names."""
    txt = write_s3rec(tmp_path)
    common = ["--dataset", str(txt), "--out-dir", str(tmp_path / "runs"), "--final", "false", *SMALL]
    tune.main(common + ["--models", "DIFSASRec", "--trials", "1", "--out", str(tmp_path / "first")])
    out = tune.main(common + ["--models", "SASRec,DIFSASRec", "--trials", "2", "--out", str(tmp_path / "second"),
                              "--history", str(tmp_path / "first" / "DIFSASRec")])
    assert "starts from 1 finished trials of earlier searches" in capsys.readouterr().out
    dif, sasrec = out["DIFSASRec"]["study"], out["SASRec"]["study"]
    assert dif.trials[0].user_attrs["history"].endswith("trials.md, line 10")
    assert "history" not in dif.trials[1].user_attrs
    assert not any("history" in t.user_attrs for t in sasrec.trials) and len(sasrec.trials) == 2
