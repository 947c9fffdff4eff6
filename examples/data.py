"""Data for the examples: readers, the ML-100K download, the paper's protocol.

Two file formats:

* **RecBole atomic files** -- ``<name>.inter`` (and optionally ``<name>.item``): tab-separated, a header
  of ``field:type`` with type in ``token``, ``token_seq`` (space-separated tokens), ``float``, ``float_seq``.
* **S3-Rec files** -- ``<name>.txt`` (``user item item ...`` one user per line, in time order) and
  ``<name>_item2attributes.json`` (``{"item": [attribute, ...]}``). Their one attribute field mixes each
  item's brand and categories; :func:`split_brand` separates them (attributes ``brand`` and ``categories``),
  so a run can use the categories alone, as the DIF-SR paper does.

Protocol (DIF-SR / RecBole): iterative 5-core filter, each history sorted by timestamp with a *stable*
sort (ties keep file order), chronological leave-one-out (last item = test target, second-to-last =
validation target), one training sample per prefix (at most ``max_len`` items) or -- the cheaper
option -- every position of a window trained at once (causal models). Users with fewer than
:data:`MIN_LENGTH` (3) interactions, possible only with ``k < 3``, are dropped with a note.

Everything a reader cannot use raises :class:`DataError` naming the file (and line): bytes that are not
UTF-8, bad headers, bad values, a timestamp that is empty or not a number, a dataset with no users.

Ids after loading: items ``1..num_items`` (0 = padding); each attribute's tokens ``1..V-1`` (0 = padding),
so ``num_classes[a] = V`` counts the padding token, as RecBole does.

Shapes (einops style): ``tables[a]`` is ``(num_items + 1, k)`` long -- row ``i`` holds item ``i``'s tokens.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "read_atomic", "read_s3rec", "read_text", "fetch_ml100k", "k_core",
           "load_dataset", "from_sequences", "split_brand", "S3REC_FIELDS", "MIN_LENGTH", "REPO_ROOT", "AMAZON"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_AMAZON = REPO_ROOT.parent / "shared" / "data" / "amazon"
AMAZON = {"beauty": "Beauty", "sports": "Sports_and_Outdoors"}
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
ML100K_WHEEL = "recbole==1.2.1"
ML100K_MEMBERS = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")
#: the attributes of an S3-Rec dataset: its one field as written (``attribute``), or that field split in two
S3REC_FIELDS = ("attribute", "brand", "categories")
#: the shortest history leave-one-out can split: one item to condition on, a validation and a test target
MIN_LENGTH = 3


class DataError(ValueError):
    """A data file is malformed or missing; the message names the file (and line)."""


# ---------------------------------------------------------------------------------------------- readers
def read_text(path: "str | Path") -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark is dropped). :class:`DataError` names the file
    (and the line of the first byte that is not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                        "convert the file to UTF-8") from None


def _parse_value(kind: str, text: str, where: str):
    if kind == "token":
        return text
    if kind == "token_seq":
        return text.split()
    try:
        if kind == "float":
            return float(text) if text != "" else float("nan")
        return [float(t) for t in text.split()]
    except ValueError:
        raise DataError(f"{where}: expected a {kind} value, got {text!r}") from None


def _read_atomic(path: Path, text: str | None = None) -> tuple[dict[str, list], dict[str, str], list[int]]:
    """``(columns, kinds, lines)``: the columns of :func:`read_atomic`, each field's type, and the 1-based
    line of every row."""
    if text is None:
        text = read_text(path)
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}:1: empty file, expected a header of field:type columns")
    kinds: dict[str, str] = {}
    for col in lines[0].split("\t"):
        name, sep, kind = col.strip().rpartition(":")
        if not sep or not name or kind not in ATOMIC_TYPES:
            raise DataError(f"{path}:1: bad header column {col!r}, expected field:type with type in {ATOMIC_TYPES}")
        if name in kinds:
            raise DataError(f"{path}:1: column {name!r} appears twice in the header")
        kinds[name] = kind
    columns: dict[str, list] = {n: [] for n in kinds}
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(kinds):
            raise DataError(f"{path}:{lineno}: expected {len(kinds)} tab-separated fields, got {len(parts)}")
        for (name, kind), part in zip(kinds.items(), parts):
            columns[name].append(_parse_value(kind, part, f"{path}:{lineno}: field {name!r}"))
        rows.append(lineno)
    return columns, kinds, rows


def read_atomic(path: "str | Path", *, text: str | None = None) -> dict[str, list]:
    """Read one RecBole atomic file into columns ``{field: [values]}`` (``token`` -> str,
    ``token_seq`` -> list of str, ``float`` -> float (an empty field -> NaN), ``float_seq`` -> list of float).

    Raises :class:`DataError` naming the file and the 1-based line for a bad header (a column named twice
    included), a bad row, or bytes that are not UTF-8. ``text`` reads from a string instead of the file
    (``path`` is then only used in messages).
    """
    return _read_atomic(Path(path), text)[0]


def _token(value) -> bool:
    """An attribute token of the JSON file: a string or a number (not a bool, list or object)."""
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def read_s3rec(txt: "str | Path", attributes: "str | Path | None" = None):
    """Read ``<name>.txt`` (and ``<name>_item2attributes.json``): returns ``(users, item_tokens)``,
    ``users`` a dict user -> list of item tokens in file (= time) order, ``item_tokens`` a dict
    item token -> list of attribute tokens (all strings). Errors name the file and line (the item for a
    bad attribute list)."""
    txt = Path(txt)
    users: dict[str, list[str]] = {}
    for lineno, line in enumerate(read_text(txt).splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{txt}:{lineno}: expected 'user item item ...', got {line!r}")
        if parts[0] in users:
            raise DataError(f"{txt}:{lineno}: user {parts[0]!r} appears twice")
        users[parts[0]] = parts[1:]
    item_tokens: dict[str, list[str]] = {}
    if attributes is not None:
        attributes = Path(attributes)
        try:
            raw = json.loads(read_text(attributes))
        except json.JSONDecodeError as e:
            raise DataError(f"{attributes}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{attributes}:1: expected an object {{item: [attributes]}}")
        for item, toks in raw.items():
            if not isinstance(toks, list) or not all(_token(t) for t in toks):
                raise DataError(f"{attributes}: item {item!r}: expected a flat list of attribute tokens (strings "
                                f"or numbers), got {toks!r}")
            item_tokens[str(item)] = [str(t) for t in toks]
    return users, item_tokens


def split_brand(item_tokens: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """Split an S3-Rec Amazon attribute field into ``{"brand": ..., "categories": ...}``.

    S3-Rec's preprocessing (``data/data_process.py`` of the S3-Rec repository) writes each item's list as
    its brand, when it has one, followed by the tokens of its category paths, all in one id space. A brand
    therefore only ever stands first in a list, and a category also stands after a brand somewhere: a token
    seen first and never later is read as the item's brand. Every item keeps its categories; an item
    without a brand token gets an empty ``brand`` list (padding)."""
    later = {t for toks in item_tokens.values() for t in toks[1:]}
    brand: dict[str, list[str]] = {}
    categories: dict[str, list[str]] = {}
    for item, toks in item_tokens.items():
        has_brand = bool(toks) and toks[0] not in later
        brand[item] = toks[:1] if has_brand else []
        categories[item] = toks[1:] if has_brand else list(toks)
    return {"brand": brand, "categories": categories}


# ---------------------------------------------------------------------------------------------- ML-100K
def cache_dir() -> Path:
    return Path(os.environ.get("DIF_DATA_CACHE", Path.home() / ".cache" / "dif-attention"))


def fetch_ml100k(root: "str | Path | None" = None) -> Path:
    """MovieLens-100K atomic files, extracted from the ``recbole==1.2.1`` wheel (fetched once with
    ``pip download --no-deps``; the files are cached, never committed: the licence forbids
    redistribution). Returns the folder holding ``ml-100k.inter`` and ``ml-100k.item``."""
    folder = Path(root) if root is not None else cache_dir() / "ml-100k"
    if all((folder / Path(m).name).exists() for m in ML100K_MEMBERS):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        print(f"downloading {ML100K_WHEEL} (2 MB, only for its MovieLens-100K files) into {folder}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", ML100K_WHEEL, "-d", str(folder)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob("recbole-1.2.1-*.whl"))
        if res.returncode != 0 or not wheels:
            raise DataError(f"could not download {ML100K_WHEEL} with {' '.join(cmd)}:\n{res.stderr.strip()}\n"
                            "Put the wheel (or ml-100k.inter/.item) into that folder, or pass --data PATH.")
    with zipfile.ZipFile(wheels[-1]) as z:
        for member in ML100K_MEMBERS:
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
                tmp.write(z.read(member))
            os.replace(tmp.name, folder / Path(member).name)
    return folder


# ---------------------------------------------------------------------------------------------- protocol
def k_core(users: dict, k: int = 5) -> dict:
    """Iterative k-core: drop users and items with fewer than ``k`` interactions until stable."""
    users = {u: list(s) for u, s in users.items()}
    while True:
        counts: dict = {}
        for s in users.values():
            for i in s:
                counts[i] = counts.get(i, 0) + 1
        bad_items = {i for i, c in counts.items() if c < k}
        new = {u: [i for i in s if i not in bad_items] for u, s in users.items()}
        new = {u: s for u, s in new.items() if len(s) >= k}
        if not bad_items and len(new) == len(users):
            return new
        users = new


@dataclass
class Dataset:
    """Chronological histories with item ids ``1..num_items`` and attribute tables.

    ``sequences[u]``: list of item ids of user ``u`` (time order); ``tables[a]``: ``(num_items + 1, k)``;
    ``num_classes[a]``: vocabulary size of attribute ``a`` including padding 0.
    """
    name: str
    sequences: list[list[int]]
    num_items: int
    tables: dict[str, torch.Tensor] = field(default_factory=dict)
    num_classes: dict[str, int] = field(default_factory=dict)
    notes: str = ""
    source: str = ""  # the file the histories came from (for messages)
    attribute_files: dict[str, str] = field(default_factory=dict)  # attribute -> the file it came from

    def require_attributes(self, model: str) -> None:
        """Raise :class:`DataError` unless every attribute names at least one item of the data: ``model``
        (an attribute model) needs them. A file naming none of the items would train on padding alone."""
        if not self.tables:
            raise DataError(f"{self.source or self.name}: {model} needs item attributes and this dataset has none "
                            "(give an .item file with token/token_seq fields, or <name>_item2attributes.json "
                            "next to the .txt)")
        for a, table in self.tables.items():
            if not bool(table.any()):
                raise DataError(f"{self.attribute_files.get(a, self.source or self.name)}: attribute {a!r} names "
                                f"none of the {self.num_items} items of the data ({model} needs item attributes)")

    @property
    def info(self) -> dict:
        """What :func:`dif_attention.models.build_model` needs."""
        return {"num_items": self.num_items, "tables": self.tables, "num_classes": self.num_classes}

    def stats(self) -> str:
        n = sum(len(s) for s in self.sequences)
        attrs = ", ".join(f"{a}: {v - 1} tokens" for a, v in self.num_classes.items()) or "no attributes"
        return (f"{self.name}: {len(self.sequences)} users, {self.num_items} items, {n} interactions "
                f"(avg length {n / max(len(self.sequences), 1):.1f}); {attrs}")

    # ---- leave-one-out
    def split(self, part: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation samples: ``part`` in {"valid", "test"}. Returns (history ids ``(u, max_len)`` right-padded,
        target ``(u,)``). Validation: history ``s[:-2]``, target ``s[-2]``; test: ``s[:-1]`` -> ``s[-1]``."""
        if part not in ("valid", "test"):
            raise ValueError(f"part: expected 'valid' or 'test', got {part!r}")
        check_max_len(max_len)
        cut = {"valid": 2, "test": 1}[part]
        hist = [s[:len(s) - cut] for s in self.sequences]
        targets = np.array([s[len(s) - cut] for s in self.sequences], dtype=np.int64)
        return pad(hist, max_len), targets

    def prefix_samples(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One training sample per prefix of ``s[:-2]``: history (at most ``max_len`` most recent items,
        right-padded) -> next item. The RecBole / DIF-SR scheme."""
        check_max_len(max_len)
        hist, targets = [], []
        for s in self.sequences:
            train = s[:-2]
            for t in range(1, len(train)):
                hist.append(train[max(0, t - max_len):t])
                targets.append(train[t])
        return pad(hist, max_len), np.array(targets, dtype=np.int64)

    def train_windows(self, max_len: int) -> np.ndarray:
        """``s[:-2]`` cut from the end into non-overlapping windows of at most ``max_len`` items, right-padded
        ``(w, max_len)`` -- the training sequences of a masked (BERT4Rec) model trained on all positions."""
        check_max_len(max_len)
        out = []
        for s in self.sequences:
            train = s[:-2]
            for end in range(len(train), 0, -max_len):
                out.append(train[max(0, end - max_len):end])
        return pad(out, max_len)

    def window_samples(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """All-positions training (the original SASRec scheme): ``s[:-2]`` cut from the end into windows
        of ``max_len + 1`` items overlapping by one; input = window[:-1], targets = window[1:], both
        right-padded ``(w, max_len)`` (target 0 = no loss). Every training transition appears exactly once."""
        check_max_len(max_len)
        inputs, targets = [], []
        for s in self.sequences:
            train = s[:-2]
            end = len(train)
            while end > 1:
                start = max(0, end - max_len - 1)
                w = train[start:end]
                inputs.append(w[:-1])
                targets.append(w[1:])
                end = start + 1
        return pad(inputs, max_len), pad(targets, max_len)


def check_max_len(max_len) -> int:
    """``max_len`` (a window or history length) must be an int >= 1."""
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len: expected an int >= 1, got {max_len!r}")
    return int(max_len)


def pad(seqs: list[list[int]], max_len: int) -> np.ndarray:
    """Right-pad (keep the ``max_len`` most recent items): ``(len(seqs), max_len)`` int64."""
    check_max_len(max_len)
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        out[r, :len(s)] = s
    return out


def from_sequences(name: str, users: dict, item_tokens: dict[str, dict] | None = None, *, k: int = 5,
                   notes: str = "", source: str | None = None) -> Dataset:
    """Build a :class:`Dataset` from ``users`` (user -> item tokens in time order) and ``item_tokens``
    (attribute -> {item token: [attribute tokens]}): k-core filter (``k=0`` skips it), users shorter than
    :data:`MIN_LENGTH` dropped (leave-one-out needs a history, a validation and a test item; the dataset's
    ``notes`` say how many), then items re-indexed by first appearance and attribute tokens by first
    appearance (both starting at 1). ``source`` (default ``name``) names the data in messages: a
    :class:`DataError` if no user is left."""
    source = source or name
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    found = (f"{len(users)} users, {len({i for s in users.values() for i in s})} items, "
             f"{sum(map(len, users.values()))} interactions")
    if not users:
        raise DataError(f"{source}: no users (found no interaction in it)")
    if k:
        users = k_core(users, k)
        if not users:
            raise DataError(f"{source}: no user is left after the {k}-core filter (found {found}; every user and "
                            f"item needs at least {k} interactions)")
    short = [u for u, s in users.items() if len(s) < MIN_LENGTH]
    if short:
        users = {u: s for u, s in users.items() if len(s) >= MIN_LENGTH}
        if not users:
            raise DataError(f"{source}: no user has the {MIN_LENGTH} interactions leave-one-out needs (a history, a "
                            f"validation and a test item; found {found})")
        dropped = (f"dropped {len(short)} users with fewer than {MIN_LENGTH} interactions (leave-one-out needs a "
                   "history, a validation and a test item)")
        notes = f"{notes}; {dropped}" if notes else dropped
    item_id: dict = {}
    sequences = []
    for s in users.values():
        sequences.append([item_id.setdefault(i, len(item_id) + 1) for i in s])
    num_items = len(item_id)
    tables, num_classes = {}, {}
    for a, mapping in (item_tokens or {}).items():
        tok_id: dict = {}
        rows = {}
        for item, toks in mapping.items():
            if item in item_id:
                ids = []
                for t in toks:
                    tid = tok_id.setdefault(t, len(tok_id) + 1)
                    if tid not in ids:
                        ids.append(tid)
                rows[item_id[item]] = ids
        k_max = max((len(v) for v in rows.values()), default=1) or 1
        table = torch.zeros(num_items + 1, k_max, dtype=torch.long)
        for i, ids in rows.items():
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        tables[a], num_classes[a] = table, len(tok_id) + 1
    return Dataset(name, sequences, num_items, tables, num_classes, notes, source)


def _timestamps(inter: dict, kinds: dict, lines: list[int], path: Path) -> list[float] | None:
    """The ``timestamp`` column as finite numbers (a ``token`` column is parsed as numbers: sorting it as text
    would put "10" before "9"); ``None`` without the column."""
    if "timestamp" not in inter:
        return None
    if kinds["timestamp"] not in ("float", "token"):
        raise DataError(f"{path}:1: column 'timestamp' must be timestamp:float (or a numeric timestamp:token), "
                        f"got timestamp:{kinds['timestamp']}")
    out = []
    for value, line in zip(inter["timestamp"], lines):
        try:
            t = float(value)
        except ValueError:
            raise DataError(f"{path}:{line}: timestamp {value!r} is not a number (histories are sorted by "
                            "it)") from None
        if not math.isfinite(t):
            seen = "is empty" if value == "" or (isinstance(value, float) and math.isnan(value)) else f"is {value!r}"
            raise DataError(f"{path}:{line}: timestamp {seen}: expected a finite number (histories are sorted by it)")
        out.append(t)
    return out


def _id_column(cols: dict, kinds: dict, field_name: str, path: Path) -> None:
    if field_name not in cols:
        raise DataError(f"{path}:1: no {field_name} column (have {sorted(cols)})")
    if kinds[field_name] != "token":
        raise DataError(f"{path}:1: column {field_name!r} must be {field_name}:token, got "
                        f"{field_name}:{kinds[field_name]}")


def load_atomic(folder: "str | Path", name: str | None = None, *, k: int = 5,
                attributes: list[str] | None = None) -> Dataset:
    """A RecBole atomic dataset ``folder/<name>.inter`` (+ ``.item``). Histories are sorted by the
    ``timestamp`` column (float, or a numeric token) with a stable sort (ties keep file order, as RecBole
    1.2.1); an empty or non-numeric timestamp is refused. Attributes: the ``.item`` token / token_seq fields
    named in ``attributes`` (default: every token_seq field). Errors name the file and line."""
    folder = Path(folder)
    name = name or folder.name
    inter_path = folder / f"{name}.inter"
    inter, kinds, lines = _read_atomic(inter_path)
    for needed in ("user_id", "item_id"):
        _id_column(inter, kinds, needed, inter_path)
    if not lines:
        raise DataError(f"{inter_path}: no users (found a header and no interaction)")
    times = _timestamps(inter, kinds, lines, inter_path)
    order = range(len(inter["user_id"]))
    if times is not None:
        order = sorted(order, key=lambda r: times[r])  # Python's sort is stable
    users: dict = {}
    for r in order:
        users.setdefault(inter["user_id"][r], []).append(inter["item_id"][r])
    item_tokens, files = {}, {}
    item_file = folder / f"{name}.item"
    if item_file.exists():
        cols, item_kinds, item_lines = _read_atomic(item_file)
        _id_column(cols, item_kinds, "item_id", item_file)
        first: dict = {}
        for item, line in zip(cols["item_id"], item_lines):
            if first.setdefault(item, line) != line:
                raise DataError(f"{item_file}:{line}: item {item!r} appears twice (first on line {first[item]})")
        wanted = attributes or [f for f, t in item_kinds.items() if t == "token_seq"]
        for a in wanted:
            if a not in cols or item_kinds[a] not in ("token", "token_seq"):
                raise DataError(f"{item_file}:1: no token/token_seq field {a!r} (have {sorted(cols)})")
            vals = cols[a]
            item_tokens[a] = {i: (v if isinstance(v, list) else [v]) for i, v in zip(cols["item_id"], vals)}
            files[a] = str(item_file)
    note = "histories sorted by timestamp with a stable sort (ties keep file order)" if times is not None else ""
    ds = from_sequences(name, users, item_tokens, k=k, notes=note, source=str(inter_path))
    ds.attribute_files = files
    return ds


def load_s3rec(txt: "str | Path", attributes: "str | Path | None" = None, *, k: int = 5,
               fields: list[str] | None = None) -> Dataset:
    """An S3-Rec dataset; ``attributes`` defaults to ``<name>_item2attributes.json`` next to ``txt``.
    ``fields`` (among :data:`S3REC_FIELDS`; default ``["attribute"]``): the file's one field as written,
    and / or its ``brand`` and ``categories`` (:func:`split_brand`)."""
    txt = Path(txt)
    fields = list(fields or ["attribute"])
    unknown = [f for f in fields if f not in S3REC_FIELDS]
    if unknown or len(set(fields)) < len(fields):
        raise DataError(f"{txt}: attributes {fields}: expected distinct names among {', '.join(S3REC_FIELDS)} "
                        "(an S3-Rec file has one attribute field, 'attribute', which splits into 'brand' and "
                        "'categories')")
    if attributes is None:
        cand = txt.with_name(f"{txt.stem}_item2attributes.json")
        attributes = cand if cand.exists() else None
    users, item_tokens = read_s3rec(txt, attributes)
    by_field = {"attribute": item_tokens, **split_brand(item_tokens)} if item_tokens else {}
    ds = from_sequences(txt.stem, users, {f: by_field[f] for f in fields if by_field}, k=k,
                        notes="S3-Rec format (file order = time order)", source=str(txt))
    ds.attribute_files = {f: str(attributes) for f in ds.tables}
    return ds


def load_dataset(name_or_path: "str | Path" = "ml-100k", *, data: "str | Path | None" = None, k: int = 5,
                 attributes: list[str] | None = None) -> Dataset:
    """``"ml-100k"`` (downloaded once, genres as attribute ``class``), ``"beauty"``, ``"sports"``
    (S3-Rec files from ``data`` or ``../shared/data/amazon``), or a path: a folder of atomic files,
    an ``.inter`` file, or an S3-Rec ``.txt`` file."""
    key = str(name_or_path).lower()
    if key in ("ml-100k", "ml100k", "movielens"):
        folder = Path(data) if data is not None else fetch_ml100k()
        return load_atomic(folder, "ml-100k", k=k, attributes=attributes or ["class"])
    if key in AMAZON:
        folder = Path(data) if data is not None else SHARED_AMAZON
        ds = load_s3rec(folder / f"{AMAZON[key]}.txt", k=k, fields=attributes)
        ds.name = key
        return ds
    path = Path(name_or_path)
    if data is not None:
        raise DataError(f"{path}: data={str(data)!r} names the folder of ml-100k, beauty or sports; a dataset given "
                        "as a path takes none (give the path alone)")
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if inters:
            return load_atomic(path, inters[0].stem, k=k, attributes=attributes)
        txts = sorted(path.glob("*.txt"))
        if txts:
            return load_s3rec(txts[0], k=k, fields=attributes)
        raise DataError(f"{path}: no .inter or .txt file in this folder")
    if path.suffix == ".inter":
        return load_atomic(path.parent, path.stem, k=k, attributes=attributes)
    if path.suffix == ".txt":
        return load_s3rec(path, k=k, fields=attributes)
    raise DataError(f"{path}: unknown dataset; use ml-100k, beauty, sports, a folder, an .inter or a .txt file")
