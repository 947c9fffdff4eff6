"""Ablations of DIF-SASRec: the paper's Table 4 (w/o DIF, w/o AAP), its fusion comparison (Fig. 6), and
frozen vs trained attribute tables (the reference implementation froze them by accident).

Usage::

    python examples/ablation.py                              # all variants, ML-100K, 1 seed
    python examples/ablation.py --dataset beauty --seeds 0,1,2
    python examples/ablation.py --variants full,wo_aap,wo_dif
    python examples/ablation.py --list                       # what each variant is

Every variant is the run of one model with a few settings changed (all other flags as in ``sasrec.py``);
runs go to ``runs/<dataset>/<model>-<variant>/seed<k>/``; the table goes to ``runs/<dataset>/ablation-results``.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from cli import (TRAIN_FIELDS, load_data, machine, name_list, parser, results_file, setting_message, settings_from_args,
                 table, user_errors)
from train import SettingError, atomic_write_text, check_settings, dist_info, preflight, run

VARIANTS = {
    # name: (model, changed settings, what it is)
    "full": ("DIFSASRec", {}, "DIF-SASRec as configured (default gate fusion, AAP weight --lamb)"),
    "wo_aap": ("DIFSASRec", {"lamb": 0.0}, "Table 4 'w/o AAP': decoupled attention, no attribute predictors"),
    "wo_dif": ("SASRecF", {"aap": True}, "Table 4 'w/o DIF': early fusion (SASRecF) + attribute predictors"),
    "fusion_add": ("DIFSASRec", {"fusion": "add"}, "Fig. 6: sum fusion"),
    "fusion_concat": ("DIFSASRec", {"fusion": "concat"}, "Fig. 6: concat fusion (length-agnostic)"),
    "fusion_gate": ("DIFSASRec", {"fusion": "gate"}, "Fig. 6: gate fusion (length-agnostic)"),
    "fusion_gate_exact": ("DIFSASRec", {"fusion": "gate", "exact_fusion": True, "train_mode": "prefix"},
                          "Fig. 6: paper-exact gate (tied to max_len, reads the whole score row), trained one "
                          "sample per prefix: the only scheme where it sees no later item"),
    "frozen_tables": ("DIFSASRec", {"trainable_attributes": False, "attr_init_std": 1.0},
                      "attribute tables frozen at N(0, 1), as the reference code effectively ran"),
    "aap_zero_init": ("DIFSASRec", {"aap_init": "zero"},
                      "AAP heads start with zero biases (the reference's init) instead of the label prior"),
    "sasrecf_frozen": ("SASRecF", {"trainable_attributes": False, "attr_init_std": 1.0},
                       "baseline SASRecF with its attribute tables frozen at N(0, 1): the RecBole bug the "
                       "paper's SASRecF baseline ran with"),
}


def main(argv=None):
    p = parser(__doc__.splitlines()[0], [])
    p.add_argument("--variants", type=name_list(list(VARIANTS)), default=",".join(VARIANTS),
                   help="comma-separated variants")
    p.add_argument("--list", action="store_true", help="describe the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for k, (m, ch, what) in VARIANTS.items():
            print(f"{k:18s} {m:10s} {ch}  {what}")
        return []
    names, seeds = args.variants, args.seeds
    if not names:
        p.error(f"--variants: expected at least one of {', '.join(VARIANTS)}, got none")
    cfg, model_config = settings_from_args(p, args, models=[])
    runs = []  # (seed, variant, model, training config, model settings)
    for seed in seeds:
        for v in names:
            model, changes, _ = VARIANTS[v]
            train_changes = {k: x for k, x in changes.items() if k in TRAIN_FIELDS}
            c = dataclasses.replace(cfg, seed=seed, tag=v, **train_changes)
            settings = {**model_config, **{k: x for k, x in changes.items() if k not in TRAIN_FIELDS}}
            try:
                check_settings(c, settings, [model])
            except SettingError as err:
                p.error(setting_message(err))
            runs.append((v, model, c, settings))
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors(p):
        rank, world = dist_info()
        dataset = load_data(args)
        for _, model, c, settings in runs:
            preflight(dataset, model, c, settings)
        t0 = time.perf_counter()
        results = []
        for v, model, c, settings in runs:
            r = run(dataset, model, c, settings)
            r["variant"] = v
            results.append(r)
    if rank != 0:
        return results
    md = table(results, names, key="variant")
    legend = "\n".join(f"- `{v}`: {VARIANTS[v][2]}" for v in names)
    text = (f"{dataset.stats()}\n\n{md}\n\n{legend}\n\nCommand: `python {' '.join(sys.argv)}`  \n"
            f"Wall time: {time.perf_counter() - t0:.0f} s on {machine()}, {world} process(es).\n")
    print("\n" + text)
    base = Path(args.results) if args.results else Path(cfg.out_dir) / dataset.name / "ablation-results"
    base.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_file(base, ".md"), text)
    atomic_write_text(results_file(base, ".json"), json.dumps([{k: v for k, v in r.items() if k != "history"}
                                                             for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
