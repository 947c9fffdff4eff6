"""Data for the examples: readers, the ML-100K download, the paper's protocol.

Two file formats:

* **RecBole atomic files** -- ``<name>.inter`` (and optionally ``<name>.item``): tab-separated, a header
  of ``field:type`` with type in ``token``, ``token_seq`` (space-separated tokens), ``float``, ``float_seq``.
* **S3-Rec files** -- ``<name>.txt`` (``user item item ...`` one user per line, in time order) and
  ``<name>_item2attributes.json`` (``{"item": [attribute, ...]}``).

Protocol (DIF-SR / RecBole): iterative 5-core filter, each history sorted by timestamp with a *stable*
sort (ties keep file order), chronological leave-one-out (last item = test target, second-to-last =
validation target), one training sample per prefix (at most ``max_len`` items) or -- the cheaper
option -- every position of a window trained at once (causal models).

Ids after loading: items ``1..num_items`` (0 = padding); each attribute's tokens ``1..V-1`` (0 = padding),
so ``num_classes[a] = V`` counts the padding token, as RecBole does.

Shapes (einops style): ``tables[a]`` is ``(num_items + 1, k)`` long -- row ``i`` holds item ``i``'s tokens.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "Dataset", "read_atomic", "read_s3rec", "fetch_ml100k", "k_core", "load_dataset",
           "from_sequences", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_AMAZON = REPO_ROOT.parent / "shared" / "data" / "amazon"
AMAZON = {"beauty": "Beauty", "sports": "Sports_and_Outdoors"}
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
ML100K_WHEEL = "recbole==1.2.1"
ML100K_MEMBERS = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")


class DataError(ValueError):
    """A data file is malformed or missing; the message names the file (and line)."""


# ---------------------------------------------------------------------------------------------- readers
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


def read_atomic(path: "str | Path", *, text: str | None = None) -> dict[str, list]:
    """Read one RecBole atomic file into columns ``{field: [values]}`` (``token`` -> str,
    ``token_seq`` -> list of str, ``float`` -> float, ``float_seq`` -> list of float).

    Raises :class:`DataError` naming the file and the 1-based line for a bad header or row.
    ``text`` reads from a string instead of the file (``path`` is then only used in messages).
    """
    path = Path(path)
    if text is None:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}:1: empty file, expected a header of field:type columns")
    names, kinds = [], []
    for col in lines[0].split("\t"):
        name, sep, kind = col.strip().rpartition(":")
        if not sep or not name or kind not in ATOMIC_TYPES:
            raise DataError(f"{path}:1: bad header column {col!r}, expected field:type with type in {ATOMIC_TYPES}")
        names.append(name)
        kinds.append(kind)
    columns: dict[str, list] = {n: [] for n in names}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            raise DataError(f"{path}:{lineno}: expected {len(names)} tab-separated fields, got {len(parts)}")
        for name, kind, part in zip(names, kinds, parts):
            columns[name].append(_parse_value(kind, part, f"{path}:{lineno}: field {name!r}"))
    return columns


def read_s3rec(txt: "str | Path", attributes: "str | Path | None" = None):
    """Read ``<name>.txt`` (and ``<name>_item2attributes.json``): returns ``(users, item_tokens)``,
    ``users`` a dict user -> list of item tokens in file (= time) order, ``item_tokens`` a dict
    item token -> list of attribute tokens (all strings). Errors name the file and line."""
    txt = Path(txt)
    if not txt.exists():
        raise DataError(f"{txt}: file not found")
    users: dict[str, list[str]] = {}
    for lineno, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
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
        if not attributes.exists():
            raise DataError(f"{attributes}: file not found")
        try:
            raw = json.loads(attributes.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{attributes}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{attributes}:1: expected an object {{item: [attributes]}}")
        for item, toks in raw.items():
            if not isinstance(toks, list):
                raise DataError(f"{attributes}: item {item!r}: expected a list of attributes, got {toks!r}")
            item_tokens[str(item)] = [str(t) for t in toks]
    return users, item_tokens


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

    @property
    def info(self) -> dict:
        """What :func:`examples.models.build_model` needs."""
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
        cut = {"valid": 2, "test": 1}[part]
        hist = [s[:len(s) - cut] for s in self.sequences]
        targets = np.array([s[len(s) - cut] for s in self.sequences], dtype=np.int64)
        return pad(hist, max_len), targets

    def prefix_samples(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One training sample per prefix of ``s[:-2]``: history (at most ``max_len`` most recent items,
        right-padded) -> next item. The RecBole / DIF-SR scheme."""
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


def pad(seqs: list[list[int]], max_len: int) -> np.ndarray:
    """Right-pad (keep the ``max_len`` most recent items): ``(len(seqs), max_len)`` int64."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        out[r, :len(s)] = s
    return out


def from_sequences(name: str, users: dict, item_tokens: dict[str, dict] | None = None, *, k: int = 5,
                   notes: str = "") -> Dataset:
    """Build a :class:`Dataset` from ``users`` (user -> item tokens in time order) and ``item_tokens``
    (attribute -> {item token: [attribute tokens]}): k-core filter (``k=0`` skips it), then re-index items
    by first appearance and attribute tokens by first appearance (both starting at 1)."""
    if k:
        users = k_core(users, k)
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
    return Dataset(name, sequences, num_items, tables, num_classes, notes)


def load_atomic(folder: "str | Path", name: str | None = None, *, k: int = 5,
                attributes: list[str] | None = None) -> Dataset:
    """A RecBole atomic dataset ``folder/<name>.inter`` (+ ``.item``). Histories are sorted by the
    ``timestamp`` column with a stable sort (ties keep file order, as RecBole 1.2.1). Attributes:
    the ``.item`` token / token_seq fields named in ``attributes`` (default: every token_seq field)."""
    folder = Path(folder)
    name = name or folder.name
    inter = read_atomic(folder / f"{name}.inter")
    for needed in ("user_id", "item_id"):
        if needed not in inter:
            raise DataError(f"{folder / f'{name}.inter'}:1: no {needed} column (have {sorted(inter)})")
    times = inter.get("timestamp")
    order = range(len(inter["user_id"]))
    if times is not None:
        order = sorted(order, key=lambda r: times[r])  # Python's sort is stable
    users: dict = {}
    for r in order:
        users.setdefault(inter["user_id"][r], []).append(inter["item_id"][r])
    item_tokens = {}
    item_file = folder / f"{name}.item"
    if item_file.exists():
        text = item_file.read_text(encoding="utf-8")
        cols = read_atomic(item_file, text=text)
        header = dict(c.rsplit(":", 1) for c in text.splitlines()[0].split("\t"))
        wanted = attributes or [f for f, t in header.items() if t == "token_seq"]
        for a in wanted:
            if a not in cols or header[a] not in ("token", "token_seq"):
                raise DataError(f"{item_file}:1: no token/token_seq field {a!r} (have {sorted(cols)})")
            vals = cols[a]
            item_tokens[a] = {i: (v if isinstance(v, list) else [v]) for i, v in zip(cols["item_id"], vals)}
    note = "histories sorted by timestamp with a stable sort (ties keep file order)" if times is not None else ""
    return from_sequences(name, users, item_tokens, k=k, notes=note)


def load_s3rec(txt: "str | Path", attributes: "str | Path | None" = None, *, k: int = 5) -> Dataset:
    """An S3-Rec dataset; ``attributes`` defaults to ``<name>_item2attributes.json`` next to ``txt``."""
    txt = Path(txt)
    if attributes is None:
        cand = txt.with_name(f"{txt.stem}_item2attributes.json")
        attributes = cand if cand.exists() else None
    users, item_tokens = read_s3rec(txt, attributes)
    return from_sequences(txt.stem, users, {"attribute": item_tokens} if item_tokens else {}, k=k,
                          notes="S3-Rec format (file order = time order)")


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
        ds = load_s3rec(folder / f"{AMAZON[key]}.txt", k=k)
        ds.name = key
        return ds
    path = Path(name_or_path)
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if inters:
            return load_atomic(path, inters[0].stem, k=k, attributes=attributes)
        txts = sorted(path.glob("*.txt"))
        if txts:
            return load_s3rec(txts[0], k=k)
        raise DataError(f"{path}: no .inter or .txt file in this folder")
    if path.suffix == ".inter":
        return load_atomic(path.parent, path.stem, k=k, attributes=attributes)
    if path.suffix == ".txt":
        return load_s3rec(path, k=k)
    raise DataError(f"{path}: unknown dataset; use ml-100k, beauty, sports, a folder, an .inter or a .txt file")
