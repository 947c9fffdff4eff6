"""Readers (RecBole atomic, S3-Rec), k-core, stable chronological leave-one-out, training samples."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError, k_core, load_atomic, load_dataset, load_s3rec, read_atomic, read_s3rec


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_atomic_types(tmp_path):
    f = write(tmp_path / "x.item", "item_id:token\tclass:token_seq\tprice:float\temb:float_seq\n"
              "7\tA B\t1.5\t0.1 0.2\n8\t\t\t\n")
    cols = read_atomic(f)
    assert cols["item_id"] == ["7", "8"]
    assert cols["class"] == [["A", "B"], []]
    assert cols["price"][0] == 1.5 and np.isnan(cols["price"][1])
    assert cols["emb"] == [[0.1, 0.2], []]


@pytest.mark.parametrize("text, where", [
    ("item_id\tclass:token_seq\n1\tA\n", ":1:"),                        # header without a type
    ("item_id:token\tclass:tokens\n1\tA\n", ":1:"),                     # unknown type
    ("item_id:token\tp:float\n1\t2\n2\tabc\n", ":3:"),                  # bad float on line 3
    ("item_id:token\tp:float\n1\t2\n2\t3\t4\n", ":3:"),                 # wrong field count
    ("", ":1:"),                                                        # empty file
])
def test_atomic_errors_name_file_and_line(tmp_path, text, where):
    f = write(tmp_path / "bad.inter", text)
    with pytest.raises(DataError) as e:
        read_atomic(f)
    assert "bad.inter" in str(e.value) and where in str(e.value)


def test_atomic_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.inter"):
        read_atomic(tmp_path / "nope.inter")


def test_s3rec_reader_and_errors(tmp_path):
    t = write(tmp_path / "toy.txt", "1 10 11 12\n2 11 12\n")
    j = write(tmp_path / "toy_item2attributes.json", json.dumps({"10": [1, 2], "11": [2]}))
    users, attrs = read_s3rec(t, j)
    assert users == {"1": ["10", "11", "12"], "2": ["11", "12"]}
    assert attrs == {"10": ["1", "2"], "11": ["2"]}
    write(tmp_path / "bad.txt", "1 10 11\n2\n")
    with pytest.raises(DataError, match=r"bad\.txt:2:"):
        read_s3rec(tmp_path / "bad.txt")
    write(tmp_path / "bad.json", '{"10": [1,\n')
    with pytest.raises(DataError, match=r"bad\.json:2:"):
        read_s3rec(t, tmp_path / "bad.json")


def test_k_core_is_iterative():
    # item "z" has 2 users; removing it drops user "c" below 3, which drops "y" below 3 ...
    users = {"a": ["x", "y", "w"], "b": ["x", "y", "w"], "c": ["x", "z", "w"], "d": ["x", "z", "w"]}
    # y and z have 2 users each; without them every user has 2 < 3 items, so the 3-core is empty
    assert k_core(users, 3) == {}
    assert k_core(users, 2) == users
    users = {u: ["x", "y", "w"] for u in "abc"}
    assert k_core(users, 3) == users


def test_stable_chronological_split(tmp_path):
    # user 1: items 10 (t=5), 11 (t=1), 12 (t=9), 13 (t=9): tie at t=9 keeps file order 12 then 13
    write(tmp_path / "toy.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
          "1\t10\t5\n1\t12\t9\n1\t11\t1\n1\t13\t9\n1\t14\t3\n")
    write(tmp_path / "toy.item", "item_id:token\tclass:token_seq\n10\tA B\n11\tB\n12\tC\n")
    ds = load_atomic(tmp_path, "toy", k=0)
    raw = {v: k for k, v in {"11": 1, "14": 2, "10": 3, "12": 4, "13": 5}.items()}  # first-appearance ids
    assert [raw[i] for i in ds.sequences[0]] == ["11", "14", "10", "12", "13"]
    hist, tgt = ds.split("test", max_len=3)
    assert raw[int(tgt[0])] == "13" and [raw[int(i)] for i in hist[0]] == ["14", "10", "12"]
    hist, tgt = ds.split("valid", max_len=5)
    assert raw[int(tgt[0])] == "12" and hist[0].tolist()[3:] == [0, 0]
    # attribute table: item 10 has A, B; item 14 none; class vocabulary counts padding
    assert ds.num_classes["class"] == 4
    assert ds.tables["class"].shape == (6, 2)
    assert ds.tables["class"][ds.sequences[0][2]].tolist() != [0, 0]
    assert ds.tables["class"][ds.sequences[0][1]].tolist() == [0, 0]


def test_prefix_and_window_samples_cover_the_same_transitions(tmp_path):
    write(tmp_path / "u.txt", "1 1 2 3 4 5 6 7 8\n2 3 4 5 6\n")
    ds = load_s3rec(tmp_path / "u.txt", k=0)
    hist, tgt = ds.prefix_samples(max_len=3)
    assert len(tgt) == (8 - 3) + (4 - 3)
    assert hist[0].tolist() == [1, 0, 0] and tgt[0] == 2
    assert hist[4].tolist() == [3, 4, 5] and tgt[4] == 6        # at most max_len most recent items
    x, y = ds.window_samples(max_len=3)
    pairs_w = sorted((int(a[i]), int(b[i])) for a, b in zip(x, y) for i in range(3) if b[i])
    pairs_p = sorted((int(h[(h != 0).sum() - 1]), int(t)) for h, t in zip(hist, tgt))
    assert pairs_w == pairs_p                                   # every training transition exactly once
    w = ds.train_windows(max_len=4)
    assert sorted(int(i) for i in w.ravel() if i) == sorted([1, 2, 3, 4, 5, 6, 3, 4])


def test_load_dataset_paths(tmp_path):
    write(tmp_path / "d.txt", "1 1 2 3\n")
    assert load_dataset(tmp_path / "d.txt", k=0).num_items == 3
    assert load_dataset(tmp_path, k=0).num_items == 3
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(tmp_path / "d.csv")


@pytest.mark.skipif(not Path(__file__).resolve().parents[2].joinpath("shared/data/amazon/Beauty.txt").exists(),
                    reason="shared Amazon data not present")
def test_beauty_matches_paper_counts():
    ds = load_dataset("beauty")
    assert (len(ds.sequences), ds.num_items, sum(map(len, ds.sequences))) == (22363, 12101, 198502)


@pytest.mark.skipif(not __import__("os").environ.get("DIF_NETWORK_TESTS"),
                    reason="downloads the recbole wheel; set DIF_NETWORK_TESTS=1 to run")
def test_ml100k_download(tmp_path, monkeypatch):
    import socket
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        pytest.skip("offline")
    monkeypatch.setenv("DIF_DATA_CACHE", str(tmp_path))
    ds = load_dataset("ml-100k")
    assert (len(ds.sequences), ds.num_items) == (943, 1349)
    assert torch.is_tensor(ds.tables["class"])
