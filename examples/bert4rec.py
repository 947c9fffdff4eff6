"""BERT4Rec -> DIF-BERT4Rec: stock BERT4Rec vs DIF-BERT4Rec on one dataset.

Usage::

    python examples/bert4rec.py                     # ML-100K (fetched once), 1 seed, defaults (< 15 min, 2 cores)
    python examples/bert4rec.py --seeds 0,1,2       # mean ± std over seeds
    python examples/bert4rec.py --dataset beauty    # ../shared/data/amazon/Beauty.txt (+ attributes)
    python examples/bert4rec.py --mask-ratio 0.2 --ft-ratio 0.5   # masking (RecBole defaults)
    python examples/bert4rec.py --resume true       # continue from runs/<dataset>/<model>/seed<k>/last.pt
    torchrun --nproc_per_node=2 examples/bert4rec.py

DIF-BERT4Rec gives ``[MASK]`` the padding attributes (the target's attributes never leak) and applies the
attribute predictors at the masked positions. Prints the table; writes Markdown + JSON under ``runs/<dataset>/``.
"""

from cli import compare, parser

MODELS = ["BERT4Rec", "DIFBERT4Rec"]
DEFAULTS = {"hidden_dropout": 0.2, "attn_dropout": 0.2}


def main(argv=None):
    p = parser(__doc__.splitlines()[0], MODELS, DEFAULTS)
    return compare(p, p.parse_args(argv), "bert4rec")


if __name__ == "__main__":
    main()
