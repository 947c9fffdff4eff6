"""Readers (RecBole atomic, S3-Rec), k-core, stable chronological leave-one-out, training samples."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError, k_core, load_atomic, load_dataset, load_s3rec, read_atomic, read_s3rec, split_brand


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


def test_split_brand_reads_a_token_seen_only_first_as_the_brand():
    # S3-Rec writes [brand, category path...]; item "c" has no brand, so its first token is a category
    tokens = {"a": ["B1", "skin", "face"], "b": ["B2", "skin"], "c": ["skin", "face"], "d": ["B1", "hair"],
              "e": []}
    fields = split_brand(tokens)
    assert fields["brand"] == {"a": ["B1"], "b": ["B2"], "c": [], "d": ["B1"], "e": []}
    assert fields["categories"] == {"a": ["skin", "face"], "b": ["skin"], "c": ["skin", "face"], "d": ["hair"],
                                    "e": []}


def test_s3rec_attributes_choose_the_field_or_its_split(tmp_path):
    t = write(tmp_path / "toy.txt", "1 10 11 12\n2 11 12 10\n")
    write(tmp_path / "toy_item2attributes.json", json.dumps({"10": [7, 1, 2], "11": [1], "12": [8, 2]}))
    whole = load_s3rec(t, k=0)
    assert list(whole.tables) == ["attribute"] and whole.num_classes["attribute"] == 5
    split = load_dataset(t, k=0, attributes=["brand", "categories"])
    assert split.num_classes == {"brand": 3, "categories": 3}
    # items are numbered by first appearance: 10 -> 1, 11 -> 2, 12 -> 3; item 11 has no brand
    assert split.tables["brand"][1:, 0].tolist() == [1, 0, 2]
    assert split.tables["categories"][1:].tolist() == [[1, 2], [1, 0], [2, 0]]
    assert list(load_dataset(tmp_path, k=0, attributes=["categories"]).tables) == ["categories"]
    for bad in (["genre"], ["brand", "brand"]):
        with pytest.raises(DataError, match=r"toy\.txt: attributes .*expected distinct names among attribute, "
                                            "brand, categories"):
            load_s3rec(t, k=0, fields=bad)


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
    with pytest.raises(DataError, match=r"d.txt: data='elsewhere' names the folder of ml-100k"):
        load_dataset(tmp_path / "d.txt", data="elsewhere", k=0)  # a path dataset has no data folder to read


@pytest.mark.skipif(not Path(__file__).resolve().parents[2].joinpath("shared/data/amazon/Beauty.txt").exists(),
                    reason="shared Amazon data not present")
def test_beauty_matches_paper_counts():
    ds = load_dataset("beauty")
    assert (len(ds.sequences), ds.num_items, sum(map(len, ds.sequences))) == (22363, 12101, 198502)
    split = load_dataset("beauty", attributes=["brand", "categories"])
    assert (split.num_classes["brand"] - 1, split.num_classes["categories"] - 1) == (435, 202)
    assert ds.num_classes["attribute"] == split.num_classes["brand"] + split.num_classes["categories"] - 1


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


# ---------------------------------------------------------------------------------------------- bad data
def files(tmp_path, **named: "str | bytes") -> Path:
    """Write ``name_ext=content`` files into ``tmp_path`` (``d_inter`` -> ``d.inter``); returns the folder."""
    for key, content in named.items():
        stem, ext = key.rsplit("_", 1)
        f = tmp_path / f"{stem}.{ext}"
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path


INTER = "user_id:token\titem_id:token\ttimestamp:float\n"
GOOD_ROWS = "".join(f"{u}\t{i}\t{t}\n" for u in (1, 2) for t, i in enumerate((10, 11, 12, 13)))
S3REC = "1 10 11 12 13\n2 10 11 12 13\n"

# name: (files, loader, substrings the DataError message must contain)
BAD_DATA = {
    "inter not UTF-8": ({"d_inter": INTER.encode() + b"1\t10\t1\n1\t\xff11\t2\n"}, "d.inter", ["d.inter:3:", "UTF-8"]),
    "txt not UTF-8": ({"d_txt": b"1 10 11 12\n2 10 \xe9\n"}, "d.txt", ["d.txt:2:", "UTF-8"]),
    "json not UTF-8": ({"d_txt": S3REC, "d_item2attributes_json": b'{"10": ["\xff"]}'}, "d.txt",
                       ["d_item2attributes.json:1:", "UTF-8"]),
    "user_id twice": ({"d_inter": "user_id:token\tuser_id:token\titem_id:token\n1\t1\t10\n"}, "d.inter",
                      ["d.inter:1:", "'user_id' appears twice"]),
    "no item_id": ({"d_inter": "user_id:token\ttimestamp:float\n1\t1\n"}, "d.inter", ["d.inter:1:", "no item_id"]),
    "item_id token_seq": ({"d_inter": "user_id:token\titem_id:token_seq\n1\t10 11\n"}, "d.inter",
                          ["d.inter:1:", "item_id:token", "item_id:token_seq"]),
    "user_id float": ({"d_inter": "user_id:float\titem_id:token\n1\t10\n"}, "d.inter", ["d.inter:1:", "user_id:token"]),
    "item file without item_id": ({"d_inter": INTER + GOOD_ROWS, "d_item": "id:token\tclass:token_seq\n10\tA\n"},
                                  "d.inter", ["d.item:1:", "no item_id"]),
    "item listed twice": ({"d_inter": INTER + GOOD_ROWS, "d_item": "item_id:token\tclass:token_seq\n10\tA\n11\tB\n"
                           "10\tC\n"}, "d.inter", ["d.item:4:", "'10' appears twice", "line 2"]),
    "timestamp token not a number": ({"d_inter": "user_id:token\titem_id:token\ttimestamp:token\n1\t10\t5\n"
                                      "1\t11\tmonday\n"}, "d.inter", ["d.inter:3:", "'monday' is not a number"]),
    "empty float timestamp": ({"d_inter": INTER + "1\t10\t1\n1\t11\t\n"}, "d.inter",
                              ["d.inter:3:", "timestamp is empty"]),
    "infinite timestamp": ({"d_inter": INTER + "1\t10\tinf\n"}, "d.inter", ["d.inter:2:", "finite number"]),
    "timestamp float_seq": ({"d_inter": "user_id:token\titem_id:token\ttimestamp:float_seq\n1\t10\t1 2\n"}, "d.inter",
                            ["d.inter:1:", "timestamp:float_seq"]),
    "nested attribute list": ({"d_txt": S3REC, "d_item2attributes_json": '{"10": ["a", ["b", "c"]], "11": ["a"]}'},
                              "d.txt", ["d_item2attributes.json", "item '10'", "flat list"]),
    "attributes not a list": ({"d_txt": S3REC, "d_item2attributes_json": '{"10": "a"}'}, "d.txt",
                              ["d_item2attributes.json", "item '10'"]),
    "empty txt": ({"d_txt": ""}, "d.txt", ["d.txt", "no users", "no interaction"]),
    "blank txt": ({"d_txt": "\n\n"}, "d.txt", ["d.txt", "no users"]),
    "header-only inter": ({"d_inter": INTER}, "d.inter", ["d.inter", "no users", "a header and no interaction"]),
    "empty inter": ({"d_inter": ""}, "d.inter", ["d.inter:1:", "empty file"]),
    "5-core empties the data": ({"d_txt": S3REC}, "d.txt",
                                ["d.txt", "5-core", "found 2 users, 4 items, 8 interactions"]),
    "every user too short": ({"d_txt": "1 10 11\n2 10\n"}, "d.txt", ["d.txt", "leave-one-out", "found 2 users"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_raises_data_error_naming_file_and_line(tmp_path, case):
    named, target, needles = BAD_DATA[case]
    folder = files(tmp_path, **named)
    k = 5 if "5-core" in case else 0
    with pytest.raises(DataError) as info:
        load_dataset(folder / target, k=k)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, f"{case}: {needle!r} not in {msg!r}"


def test_token_timestamps_sort_as_numbers(tmp_path):
    # user 0 comes first and fixes the ids a=1, b=2, c=3, d=4; user 1's order is then visible in its ids
    folder = files(tmp_path, d_inter="user_id:token\titem_id:token\ttimestamp:token\n"
                   "0\ta\t0\n0\tb\t1\n0\tc\t2\n0\td\t3\n1\ta\t10\n1\tb\t9\n1\tc\t100\n1\td\t2.5\n")
    ds = load_dataset(folder / "d.inter", k=0)
    assert ds.sequences[0] == [1, 2, 3, 4]
    assert ds.sequences[1] == [4, 2, 1, 3]  # d (2.5), b (9), a (10), c (100); as text: a, c, d, b


def test_a_leading_byte_order_mark_is_dropped(tmp_path):
    folder = files(tmp_path, d_inter=b"\xef\xbb\xbf" + (INTER + GOOD_ROWS).encode())
    assert load_dataset(folder / "d.inter", k=0).num_items == 4


def test_users_too_short_for_leave_one_out_are_dropped_with_a_note(tmp_path):
    folder = files(tmp_path, d_txt="1 10 11 12 13\n2 10\n3 10 11\n4 12 13 10\n")
    ds = load_dataset(folder / "d.txt", k=0)
    assert len(ds.sequences) == 2 and min(map(len, ds.sequences)) >= 3
    assert "dropped 2 users with fewer than 3 interactions" in ds.notes
    (_, tgt), (vhist, vtgt) = ds.split("test", 5), ds.split("valid", 5)
    assert (tgt != vtgt).all() and (vhist != 0).any(-1).all()  # every validation history has an item


def test_attributes_naming_no_item_are_refused_for_the_attribute_models(tmp_path):
    folder = files(tmp_path, d_txt="1 10 11 12 13\n2 10 11 12 13\n", d_item2attributes_json='{"99": ["a"]}')
    ds = load_dataset(folder / "d.txt", k=0)
    with pytest.raises(DataError, match=r"d_item2attributes\.json: attribute 'attribute' names none of the 4 items"):
        ds.require_attributes("DIFSASRec")
    (tmp_path / "bare").mkdir()
    bare = load_dataset(files(tmp_path / "bare", d_txt="1 10 11 12\n") / "d.txt", k=0)
    with pytest.raises(DataError, match=r"d\.txt: NOVA needs item attributes and this dataset has none"):
        bare.require_attributes("NOVA")
    from train import TrainConfig, run
    with pytest.raises(DataError, match="names none"):  # refused before any training
        run(ds, "DIFSASRec", TrainConfig(epochs=1, save=False, progress=False, log=False), {"dim": 8, "heads": 1,
                                                                                          "attr_dim": 8})
    # SASRec needs no attributes: the same data trains
    assert run(ds, "SASRec", TrainConfig(epochs=1, save=False, progress=False, log=False),
               {"dim": 8, "heads": 1, "max_len": 4})["epochs"] == 1


@pytest.mark.parametrize("method", ["window_samples", "prefix_samples", "train_windows", "split"])
@pytest.mark.parametrize("max_len", [0, -3])
def test_max_len_below_one_is_refused(tmp_path, method, max_len):
    """window_samples(0) used to loop for ever, filling memory; every sampler refuses it first."""
    import signal

    def too_slow(*_):
        raise TimeoutError(f"{method}({max_len}) did not return")

    ds = load_dataset(files(tmp_path, d_txt="1 1 2 3 4 5\n") / "d.txt", k=0)
    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match=rf"^max_len: expected an int >= 1, got {max_len}$"):
            getattr(ds, method)(*(("valid",) if method == "split" else ()), max_len)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
