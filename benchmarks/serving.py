"""Serving speed: full recompute vs incremental steps, SASRec vs DIF-SASRec (CPU; CUDA too where available).

    python benchmarks/serving.py                               # n = 50 and 200, one user's step, 256 users
    python benchmarks/serving.py --n 200 --repeats 20 --json serving.json

For each device, window length n (``max_len = n``) and model, a history of ``n - repeats - 2`` items grows by
one item per timed step, so every step happens while the window still has room (no slide):

  step latency (one user, b = 1)
    full         model.next_scores(grown history)           every position of the window, every step
    incremental  model.step(state, item)                    the new position only (cached keys and values)
  recommend throughput (``--users`` users at once, users per second)
    full         model.recommend(grown histories, k=10)
    incremental  model.step(state, items) + model.top_k(scores, k=10, exclude=grown histories)

The two modes of a step are timed back to back on the same grown histories, ``--repeats`` steps each; the
tables give medians and the ratios measured in this run: full / incremental (the speed-up of the cache) and
DIF-SASRec / SASRec (the cost of DIF's extra sources in an incremental step). Models are at their init
(speed does not depend on the weights): ``--num-items`` items, hidden ``--dim``, ``--layers`` layers, ``--heads``
heads; DIF-SASRec with two attributes of width ``--attr-dim`` and gate fusion (its default). fp32, eval mode.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dif_attention import item_attribute_table
from dif_attention.models import build_model

MODELS = ("SASRec", "DIFSASRec")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(devices: list[str]) -> str:
    text = (f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"python {platform.python_version()}")
    if "cuda" in devices:
        text += f"; GPU {torch.cuda.get_device_name(0)}"
    return text


def make_model(name: str, args, n: int, device: str):
    torch.manual_seed(0)
    kw = dict(num_items=args.num_items, dim=args.dim, layers=args.layers, heads=args.heads, max_len=n,
              hidden_dropout=0.0, attn_dropout=0.0)
    if name == "DIFSASRec":
        g = torch.Generator().manual_seed(0)
        tables = {a: item_attribute_table({i: [int(torch.randint(1, v, (), generator=g))]
                                           for i in range(1, args.num_items + 1)}, num_items=args.num_items + 1)
                  for a, v in (("category", 200), ("brand", 2000))}
        kw.update(item_tables=tables, num_classes={"category": 200, "brand": 2000}, attr_dim=args.attr_dim)
    return build_model(name, **kw).to(device).eval()


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def measure(model, n: int, batch: int, steps: int, device: str, recommend: bool, k: int = 10) -> dict:
    """Median seconds of a full-recompute and an incremental step over ``steps`` growing steps."""
    g = torch.Generator().manual_seed(1)
    start = max(1, n - steps - 2)
    hist = torch.randint(1, model.num_items + 1, (batch, start), generator=g).to(device)
    items = torch.randint(1, model.num_items + 1, (steps + 1, batch), generator=g).to(device)
    grown = torch.cat([hist, items.T], 1)
    times = {"full": [], "incremental": []}
    with torch.no_grad():
        state = model.start(hist)
        for t in range(steps + 1):  # step 0 warms both paths up
            h = grown[:, :start + t + 1]
            if recommend:
                full, _ = timed(lambda: model.recommend(h, k=k), device)

                def incremental():
                    scores, new_state = model.step(state, items[t])
                    return model.top_k(scores, k=k, exclude=h), new_state
            else:
                full, _ = timed(lambda: model.next_scores(h), device)

                def incremental():
                    return model.step(state, items[t])
            inc, (_, state) = timed(incremental, device)
            if t:
                times["full"].append(full)
                times["incremental"].append(inc)
    assert int(state.lengths.max()) < n or steps == 0, "the window slid: the step would not be incremental"
    return {mode: statistics.median(v) for mode, v in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[50, 200], help="window lengths (max_len)")
    p.add_argument("--users", type=int, default=256, help="users of the recommend throughput (default 256)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (the median is shown)")
    p.add_argument("--num-items", type=int, default=12101, help="items (default 12101, Amazon Beauty's count)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--attr-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and CUDA as well where available")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.n) < args.repeats + 3:
        p.error(f"--n: expected lengths >= repeats + 3 = {args.repeats + 3} (the window must grow through "
                f"the timed steps), got {min(args.n)}")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    command = "python benchmarks/serving.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                " " + " ".join(sys.argv[1:] if argv is None else argv))
    info = machine(devices)
    settings = (f"{args.num_items} items, dim {args.dim}, {args.layers} layers, {args.heads} heads; DIF-SASRec: 2 "
                f"attributes of width {args.attr_dim}, gate fusion; fp32; median of {args.repeats} growing steps")
    rows = []
    for device in devices:
        for n in args.n:
            for name in MODELS:
                model = make_model(name, args, n, device)
                step = measure(model, n, 1, args.repeats, device, recommend=False)
                rec = measure(model, n, args.users, args.repeats, device, recommend=True)
                rows.append({"device": device, "n": n, "model": name,
                             "step_ms": {m: s * 1e3 for m, s in step.items()},
                             "step_speedup": step["full"] / step["incremental"],
                             "recommend_users_per_s": {m: args.users / s for m, s in rec.items()},
                             "recommend_speedup": rec["full"] / rec["incremental"]})
    ratios = []
    for device in devices:
        for n in args.n:
            by = {r["model"]: r for r in rows if r["device"] == device and r["n"] == n}
            ratios.append({"device": device, "n": n,
                           "dif_over_sasrec_incremental_step": by["DIFSASRec"]["step_ms"]["incremental"]
                           / by["SASRec"]["step_ms"]["incremental"],
                           "dif_over_sasrec_full_step": by["DIFSASRec"]["step_ms"]["full"]
                           / by["SASRec"]["step_ms"]["full"]})
    lines = [f"command: `{command}`", f"machine: {info}", f"settings: {settings}", "",
             "| device | n | model | step full (ms) | step incremental (ms) | x faster | recommend full (users/s) | "
             "recommend incremental (users/s) | x faster |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['n']} | {r['model']} | {r['step_ms']['full']:.2f} | "
                     f"{r['step_ms']['incremental']:.2f} | {r['step_speedup']:.2f} | "
                     f"{r['recommend_users_per_s']['full']:.0f} | {r['recommend_users_per_s']['incremental']:.0f} | "
                     f"{r['recommend_speedup']:.2f} |")
    lines += ["", "| device | n | DIF-SASRec / SASRec, incremental step | DIF-SASRec / SASRec, full step |",
              "|---|---|---|---|"]
    for r in ratios:
        lines.append(f"| {r['device']} | {r['n']} | {r['dif_over_sasrec_incremental_step']:.2f} | "
                     f"{r['dif_over_sasrec_full_step']:.2f} |")
    print("\n".join(lines))
    result = {"command": command, "machine": info, "settings": settings, "rows": rows, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
