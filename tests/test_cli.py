"""The entry points check every flag before any work: a bad value ends the program with exit status 2 and
one line on stderr naming the flag, the value and what is allowed; data files and checkpoints that cannot be
used end it with status 1 and one line naming the file. No traceback either way."""
from __future__ import annotations

import json

import pytest

import ablation
import bert4rec
import breakdown
import cli
import report
import sasrec
from example_helpers import write_s3rec

MISSING = "no-such-dataset.txt"  # a flag error must come first: the dataset is never looked at

# (entry point, flags, substrings of the one-line message)
FLAG_CASES = [
    (sasrec, ["--batch-size", "0"], ["--batch-size", "an int >= 1", "got 0"]),
    (sasrec, ["--batch-size", "a"], ["--batch-size", "invalid int value: 'a'"]),
    (sasrec, ["--eval-batch-size", "-5"], ["--eval-batch-size", ">= 1", "-5"]),
    (sasrec, ["--eval-every", "0"], ["--eval-every", ">= 1", "got 0"]),
    (sasrec, ["--epochs", "0"], ["--epochs", ">= 1", "got 0"]),
    (sasrec, ["--patience", "-1"], ["--patience", ">= 0", "got -1"]),
    (sasrec, ["--seeds", "a"], ["--seeds", "comma-separated ints >= 0", "'a'"]),
    (sasrec, ["--seeds", "0,0"], ["--seeds", "distinct", "'0,0'"]),
    (sasrec, ["--seeds", "-1"], ["--seeds", "'-1'"]),
    (sasrec, ["--lr", "-1"], ["--lr", "a finite number > 0", "-1.0"]),
    (sasrec, ["--lr", "nan"], ["--lr", "finite", "nan"]),
    (sasrec, ["--weight-decay", "-0.1"], ["--weight-decay", ">= 0", "-0.1"]),
    (sasrec, ["--lamb", "-1"], ["--lamb", ">= 0", "-1.0"]),
    (sasrec, ["--warmup", "-1"], ["--warmup", ">= 0", "-1"]),
    (sasrec, ["--dropout", "1.5"], ["--hidden-dropout/--dropout", "[0, 1)", "1.5"]),
    (sasrec, ["--hidden-dropout", "1.5"], ["--hidden-dropout/--dropout", "[0, 1)", "1.5"]),
    (sasrec, ["--attn-dropout", "1"], ["--attn-dropout", "[0, 1)", "1.0"]),
    (sasrec, ["--attn-dropout", "-0.1"], ["--attn-dropout", "[0, 1)", "-0.1"]),
    (sasrec, ["--max-len", "-3"], ["--max-len", ">= 1", "-3"]),
    (sasrec, ["--max-len", "0"], ["--max-len", ">= 1", "got 0"]),
    (sasrec, ["--dim", "0"], ["--dim", ">= 1", "got 0"]),
    (sasrec, ["--layers", "0"], ["--layers", ">= 1", "got 0"]),
    (sasrec, ["--heads", "0"], ["--heads", ">= 1", "got 0"]),
    (sasrec, ["--dim", "15", "--heads", "2"], ["--dim", "a multiple of heads=2", "15"]),
    (sasrec, ["--attr-dim", "0"], ["--attr-dim", ">= 1", "got 0"]),
    (sasrec, ["--attr-dim", "9", "--heads", "2"], ["--attr-dim", "a multiple of heads=2", "9"]),
    (sasrec, ["--ff-dim", "0"], ["--ff-dim", ">= 1", "got 0"]),
    (sasrec, ["--attr-init-std", "-1"], ["--attr-init-std", ">= 0", "-1.0"]),
    (sasrec, ["--fusion", "nope"], ["--fusion", "invalid choice: 'nope'", "'add', 'concat', 'gate'"]),
    (sasrec, ["--pooling", "median"], ["--pooling", "'median'", "'sum', 'mean', 'max'"]),
    (sasrec, ["--backend", "cuda"], ["--backend", "'cuda'", "'sdpa'"]),
    (sasrec, ["--train-mode", "some"], ["--train-mode", "'some'", "'all', 'prefix'"]),
    (sasrec, ["--precision", "fp16"], ["--precision", "'fp16'", "'fp32', 'bf16'"]),
    (sasrec, ["--device", "gpu"], ["--device", "'auto', 'cpu', 'cuda' or 'cuda:N'", "'gpu'"]),
    (sasrec, ["--device", "cuda:x"], ["--device", "'cuda:N'", "'cuda:x'"]),
    (sasrec, ["--optimizer", "rmsprop"], ["--optimizer", "'rmsprop'", "'adam', 'sgd'"]),
    (sasrec, ["--aap-init", "random"], ["--aap-init", "'random'", "'prior', 'zero'"]),
    (sasrec, ["--models", "SASRec,Foo"], ["--models", "unknown 'Foo'", "DIFSASRec"]),
    (sasrec, ["--models", ""], ["--models", "at least one", "got none"]),
    (sasrec, ["--threads", "-1"], ["--threads", "an int >= 0", "'-1'"]),
    (sasrec, ["--resume", "maybe"], ["--resume", "true or false", "'maybe'"]),
    (sasrec, ["--checkpoint-every", "-1"], ["--checkpoint-every", ">= 0", "-1"]),
    (sasrec, ["--max-train-seconds", "-1"], ["--max-train-seconds", ">= 0", "-1.0"]),
    (sasrec, ["--mask-ratio", "1.5"], ["--mask-ratio", "[0, 1]", "1.5"]),
    (sasrec, ["--out-dir", ""], ["--out-dir", "a folder name", "''"]),
    (bert4rec, ["--ft-ratio", "-0.5"], ["--ft-ratio", "[0, 1]", "-0.5"]),
    (bert4rec, ["--batch-size", "0"], ["--batch-size", ">= 1", "got 0"]),
    (ablation, ["--variants", "full,nope"], ["--variants", "unknown 'nope'", "wo_aap"]),
    (ablation, ["--variants", ""], ["--variants", "at least one", "got none"]),
    (ablation, ["--epochs", "0"], ["--epochs", ">= 1", "got 0"]),
    (ablation, ["--dropout", "2"], ["--hidden-dropout/--dropout", "[0, 1)", "2.0"]),
]


def one_line(capsys, entry, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        entry.main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err
    return exit_.value.code, err


@pytest.mark.parametrize("entry, flags, needles", FLAG_CASES,
                         ids=[f"{e.__name__}:{' '.join(f)}" for e, f, _ in FLAG_CASES])
def test_bad_flag_ends_with_one_line_before_any_work(capsys, monkeypatch, entry, flags, needles):
    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before the flags were checked")

    monkeypatch.setattr(cli, "load_dataset", no_data)  # every entry point loads its data through cli
    code, err = one_line(capsys, entry, ["--dataset", MISSING, *flags])
    assert code == 2
    assert ": error: " in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_every_setting_has_a_rule():
    """A new TrainConfig field or model keyword cannot slip past the checks."""
    import dataclasses

    import train
    assert set(train.TRAIN_RULES) == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert set(train.MODEL_RULES) == set(train.MODEL_FLAGS)


def test_library_callers_get_the_same_checks():
    from train import SettingError, TrainConfig, run
    from example_helpers import synthetic
    ds = synthetic()
    for cfg, model, message in [
        (TrainConfig(batch_size=0), {}, "batch_size: expected an int >= 1, got 0"),
        (TrainConfig(epochs=0), {}, "epochs: expected an int >= 1, got 0"),
        (TrainConfig(patience=-1), {}, "patience: expected an int >= 0, got -1"),
        (TrainConfig(lr=True), {}, "lr: expected a finite number > 0, got True"),
        (TrainConfig(), {"fusion": "nope"}, "fusion: expected one of 'add', 'concat', 'gate', got 'nope'"),
        (TrainConfig(), {"max_len": 0}, "max_len: expected an int >= 1, got 0"),
        (TrainConfig(), {"hidden_dropout": 1.5}, "hidden_dropout: expected a probability in [0, 1), got 1.5"),
        (TrainConfig(), {"dim": 10, "heads": 4}, "dim: expected a multiple of heads=4, got 10"),
        (TrainConfig(), {"dims": 10}, "model: expected settings among dim, "),
    ]:
        with pytest.raises(SettingError) as info:
            run(ds, "DIFSASRec", cfg, model)
        assert str(info.value).startswith(message), str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(SettingError, match=r"^models: expected names among SASRec, .*got 'Foo'"):
        run(ds, "Foo", TrainConfig(), {})


def test_attr_dim_is_only_checked_for_models_that_use_it(tmp_path):
    """SASRec has no attribute width: --attr-dim 9 with 2 heads does not stop a SASRec-only run."""
    txt = write_s3rec(tmp_path)
    res = sasrec.main(["--dataset", str(txt), "--models", "SASRec", "--attr-dim", "9", "--epochs", "1", "--dim", "8",
                       "--max-len", "8", "--layers", "1", "--save", "false", "--progress", "false", "--log", "false",
                       "--results", str(tmp_path / "r")])
    assert res[0]["epochs"] == 1


def test_flags_no_model_of_the_run_takes_are_named_in_a_note(tmp_path, capsys):
    txt = write_s3rec(tmp_path)
    flags = ["--dataset", str(txt), "--epochs", "1", "--dim", "8", "--max-len", "8", "--layers", "1", "--save",
             "false", "--progress", "false", "--log", "false", "--results", str(tmp_path / "r"), "--fusion", "add",
             "--lamb", "5", "--mask-ratio", "0.3"]
    sasrec.main(flags + ["--models", "SASRec"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --fusion, --lamb, --mask-ratio: not used by SASRec"], notes
    sasrec.main(flags + ["--models", "SASRec,DIFSASRec"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: --mask-ratio: not used by SASRec, DIFSASRec"], notes


def test_attributes_flag_picks_the_fields_a_run_uses(tmp_path, capsys):
    """--attributes brand: the toy file's tokens each stand alone, first in their lists, so they are brands."""
    txt = write_s3rec(tmp_path)
    flags = ["--dataset", str(txt), "--models", "SASRecF", "--epochs", "1", "--dim", "8", "--max-len", "8",
             "--layers", "1", "--save", "false", "--progress", "false", "--log", "false",
             "--results", str(tmp_path / "r")]
    res = sasrec.main(flags + ["--attributes", "brand"])
    assert res[0]["attributes"] == {"brand": 4}
    code, err = one_line(capsys, sasrec, flags + ["--attributes", "categories"])
    assert code == 1 and "toy_item2attributes.json" in err and "attribute 'categories' names none" in err, err
    code, err = one_line(capsys, sasrec, flags + ["--attributes", ","])
    assert code == 2 and "--attributes" in err, err


def test_seed_is_the_seeds_flag_and_the_printed_config_names_the_seeds_run(tmp_path, capsys):
    """There is one seed flag, --seeds: --seed 3 runs seed 3 (not a silent seed 0), and the printed
    training line names the seeds that run, not a stale single seed."""
    txt = write_s3rec(tmp_path)
    res = sasrec.main(["--dataset", str(txt), "--models", "SASRec", "--seed", "3", "--epochs", "1", "--dim", "8",
                       "--max-len", "8", "--layers", "1", "--save", "false", "--progress", "false", "--log", "false",
                       "--results", str(tmp_path / "r")])
    assert [r["seed"] for r in res] == [3]
    training = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training: ")]
    assert len(training) == 1 and training[0].endswith(", seeds=3") and "seed=" not in training[0], training


@pytest.mark.parametrize("case", ["missing file", "attributes name no item", "no users", "5-core empties"])
def test_unusable_data_ends_with_one_line_naming_the_file(tmp_path, capsys, case):
    txt = tmp_path / "d.txt"
    if case == "missing file":
        pass
    elif case == "attributes name no item":
        write_s3rec(tmp_path)
        txt = tmp_path / "toy.txt"
        (tmp_path / "toy_item2attributes.json").write_text(json.dumps({"999": ["a"]}))
    elif case == "no users":
        txt.write_text("")
    else:
        txt.write_text("1 10 11 12\n2 10 11 12\n")
    code, err = one_line(capsys, sasrec, ["--dataset", str(txt), "--models", "SASRec,DIFSASRec", "--epochs", "1",
                                          "--out-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r")])
    assert code == 1 and (txt.name in err or "item2attributes.json" in err), err
    assert not (tmp_path / "runs").exists()  # nothing trained (SASRec would have run first)


def test_report_and_breakdown_flags(tmp_path, capsys):
    code, err = one_line(capsys, report, [str(tmp_path), "--seeds", "x"])
    assert code == 2 and "--seeds" in err and "'x'" in err
    code, err = one_line(capsys, report, [str(tmp_path / "nothing")])
    assert code == 1 and "nothing: no such folder" in err
    code, err = one_line(capsys, breakdown, [str(tmp_path), "--models", "SASRec", "--threads", "-2"])
    assert code == 2 and "--threads" in err and "'-2'" in err


def test_results_file_keeps_a_dot_in_the_name(tmp_path):
    from cli import results_file
    assert results_file(tmp_path / "full-lr0.001-seed0", ".md") == tmp_path / "full-lr0.001-seed0.md"
    assert results_file(tmp_path / "full-lr0.001-seed0", ".json") == tmp_path / "full-lr0.001-seed0.json"
    assert results_file(tmp_path / "table.md", ".json") == tmp_path / "table.json"
    assert results_file("plain", ".md").name == "plain.md"


def test_paper_exact_fusion_is_refused_in_all_positions_training(capsys):
    code, err = one_line(capsys, sasrec, ["--exact-fusion", "true", "--models", "DIFSASRec", "--dataset", MISSING])
    assert code == 2
    assert "--exact-fusion" in err and "train_mode='prefix'" in err and "got True" in err
    code, err = one_line(capsys, sasrec, ["--exact-fusion", "true", "--train-mode", "prefix", "--batch-size", "0",
                                          "--dataset", MISSING])
    assert "--batch-size" in err  # prefix mode takes it: the next bad flag is the one reported
    from train import TrainConfig, check_settings
    check_settings(TrainConfig(train_mode="all"), {"exact_fusion": True, "fusion": "add"}, ["DIFSASRec"])
    check_settings(TrainConfig(train_mode="all"), {"exact_fusion": True}, ["DIFBERT4Rec"])  # bidirectional


def test_paper_preset_follows_the_dataset_file_it_names(tmp_path):
    """--paper picks Sports' preset for the Sports file itself too, not only for the name ``sports``."""
    assert [cli.paper_key(d) for d in ("sports", "SPORTS", str(tmp_path / "Sports_and_Outdoors.txt"),
                                       tmp_path / "sports", "Beauty.txt", "ml-100k", "toy.txt")] == \
        ["sports", "sports", "sports", "sports", "beauty", None, None]
    args = cli.parser("toy", ["SASRec"]).parse_args(["--paper", "--dataset", str(tmp_path / "Sports_and_Outdoors.txt")])
    _, model = cli.config_from_args(args)
    assert (model["layers"], model["heads"]) == (3, 8)
    assert cli.paper_config("toy.txt")["layers"] == 4  # any other dataset: Beauty's


def test_triton_backend_without_cuda_ends_with_one_line_before_any_work(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, err = one_line(capsys, sasrec, ["--backend", "triton", "--dataset", MISSING])
    assert code == 2 and "--backend" in err and "CUDA" in err and "TRITON_INTERPRET=1" in err, err


def test_a_cuda_device_the_machine_lacks_ends_with_one_line_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, err = one_line(capsys, sasrec, ["--device", "cuda", "--dataset", MISSING])
    assert code == 2 and "--device" in err and "0 CUDA devices" in err and "'cuda'" in err, err
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    code, err = one_line(capsys, sasrec, ["--device", "cuda:2", "--dataset", MISSING])
    assert code == 2 and "a CUDA device index < 2" in err and "'cuda:2'" in err, err


@pytest.mark.parametrize("setting, cuda, env, expected", [
    ("auto", False, {}, "cpu"), ("cpu", True, {}, "cpu"), ("auto", True, {}, "cuda:0"), ("cuda", True, {}, "cuda:0"),
    ("cuda:1", True, {}, "cuda:1"), ("auto", True, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
    ("auto", False, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu")])
def test_the_training_device_follows_the_setting_and_torchrun(monkeypatch, setting, cuda, env, expected):
    from train import TrainConfig, train_device
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert str(train_device(TrainConfig(device=setting))) == expected


def test_a_run_records_its_device_and_a_device_change_resumes(tmp_path):
    """result.json names the device; moving a run between devices is not a change of its settings."""
    import json
    txt = write_s3rec(tmp_path)
    flags = ["--dataset", str(txt), "--models", "SASRec", "--dim", "8", "--max-len", "8", "--layers", "1",
             "--progress", "false", "--log", "false", "--out-dir", str(tmp_path / "runs"),
             "--results", str(tmp_path / "r")]
    sasrec.main(flags + ["--epochs", "1", "--device", "auto"])
    res = sasrec.main(flags + ["--epochs", "2", "--device", "cpu", "--resume", "true"])
    assert res[0]["epochs"] == 2 and res[0]["overrides"] == []
    saved = json.loads(next((tmp_path / "runs").rglob("result.json")).read_text())
    assert saved["device"] == "cpu" and saved["config"]["device"] == "cpu"


def test_a_diverging_run_stops_with_one_line_instead_of_scoring(tmp_path, capsys):
    """A loss that turns non-finite ends the run (exit 1) naming the run and the step; before, NaN scores
    ranked every target first and the diverged weights were kept as the best checkpoint."""
    txt = write_s3rec(tmp_path)
    code, err = one_line(capsys, sasrec, ["--dataset", str(txt), "--models", "SASRec", "--lr", "1e30", "--epochs",
                                          "2", "--dim", "8", "--max-len", "8", "--layers", "1", "--progress", "false",
                                          "--log", "false", "--out-dir", str(tmp_path / "runs")])
    assert code == 1 and "training diverged" in err and "SASRec" in err and "step " in err, err


def test_a_config_file_is_named_for_its_bad_values_and_excludes_paper(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "SASRec", "train": {"batch_size": 2048.0}, "model_settings": {},
                               "attributes": None}))
    code, err = one_line(capsys, sasrec, ["--config", str(bad), "--dataset", MISSING])
    assert code == 2 and f"{bad}: batch_size: expected an int >= 1, got 2048.0" in err, err
    code, err = one_line(capsys, sasrec, ["--config", str(bad), "--batch-size", "0", "--dataset", MISSING])
    assert code == 2 and "--batch-size: expected an int >= 1, got 0" in err, err  # the flag's own value
    code, err = one_line(capsys, sasrec, ["--config", str(bad), "--paper", "--dataset", MISSING])
    assert code == 2 and "--paper, --config: expected one of the two" in err, err


def test_report_names_settings_in_which_a_rows_seeds_differ(tmp_path, capsys):
    txt = write_s3rec(tmp_path)
    flags = ["--dataset", str(txt), "--models", "SASRec", "--epochs", "1", "--dim", "8", "--max-len", "8",
             "--layers", "1", "--progress", "false", "--log", "false", "--out-dir", str(tmp_path / "runs")]
    sasrec.main(flags + ["--seeds", "0", "--lr", "0.001", "--results", str(tmp_path / "a")])
    sasrec.main(flags + ["--seeds", "1", "--lr", "0.001", "--epochs", "2", "--results", str(tmp_path / "b")])
    capsys.readouterr()
    report.main([str(tmp_path / "runs" / "toy")])
    assert "note:" not in capsys.readouterr().out  # epochs does not change a run's math
    sasrec.main(flags + ["--seeds", "2", "--lr", "0.002", "--results", str(tmp_path / "c")])
    capsys.readouterr()
    report.main([str(tmp_path / "runs" / "toy")])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the seeds of SASRec differ in lr: its row averages different settings"], notes
