"""A tiny synthetic dataset for the example tests: every user walks a cycle of items, so the next item
is predictable from the last one, and each item's attribute is its residue mod 4."""
import random

from data import from_sequences


def synthetic(users: int = 40, items: int = 30, seed: int = 0):
    rng = random.Random(seed)
    seqs = {}
    for u in range(users):
        start, length = rng.randrange(items), rng.randrange(6, 16)
        seqs[str(u)] = [str((start + t) % items + 1) for t in range(length)]
    attrs = {str(i): [f"r{i % 4}"] for i in range(1, items + 1)}
    return from_sequences("synthetic", seqs, {"residue": attrs}, k=0)


def write_s3rec(folder, users: int = 40, items: int = 30, seed: int = 0):
    """The same walk as S3-Rec files ``folder/toy.txt`` + ``toy_item2attributes.json``."""
    import json
    rng = random.Random(seed)
    lines = []
    for u in range(users):
        start, length = rng.randrange(items), rng.randrange(6, 16)
        lines.append(" ".join([str(u + 1)] + [str((start + t) % items + 1) for t in range(length)]))
    (folder / "toy.txt").write_text("\n".join(lines) + "\n")
    (folder / "toy_item2attributes.json").write_text(json.dumps({str(i): [i % 4 + 1] for i in range(1, items + 1)}))
    return folder / "toy.txt"
