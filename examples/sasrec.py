"""SASRec -> DIF-SASRec: SASRec vs SASRecF (early fusion) vs NOVA vs DIF-SASRec on one dataset.

Usage::

    python examples/sasrec.py                       # ML-100K (fetched once), 1 seed, defaults (< 15 min, 2 cores)
    python examples/sasrec.py --seeds 0,1,2         # mean ± std over seeds
    python examples/sasrec.py --dataset beauty      # ../shared/data/amazon/Beauty.txt (+ attributes)
    python examples/sasrec.py --dataset beauty --paper          # the paper's settings (hidden 256, 4 layers, ...)
    python examples/sasrec.py --data my_folder --dataset my_folder   # your own atomic or S3-Rec files
    python examples/sasrec.py --train-mode prefix   # one sample per prefix (RecBole / paper protocol)
    python examples/sasrec.py --resume true         # continue from runs/<dataset>/<model>/seed<k>/last.pt
    torchrun --nproc_per_node=2 examples/sasrec.py  # DistributedDataParallel (gloo on CPU)

Prints the comparison table and writes it as Markdown + JSON under ``runs/<dataset>/``.
``--help`` lists every flag (model size, fusion, lambda, patience, ...).
"""

from cli import compare, parser

MODELS = ["SASRec", "SASRecF", "NOVA", "DIFSASRec"]


def main(argv=None):
    p = parser(__doc__.splitlines()[0], MODELS)
    return compare(p, p.parse_args(argv), "sasrec")


if __name__ == "__main__":
    main()
