"""Ready sequential recommenders on the library's layers, importable from the wheel.

    from dif_attention.models import DIFSASRec, build_model, save_model, load_model

    model = build_model("DIFSASRec", num_items=12101, item_tables={"category": table}, num_classes={"category": 637},
                        dim=256, layers=4, heads=8, attr_dim=64)
    h = model(ids)                               # (b, n, dim), ids right-padded (0 = padding)
    scores = model.item_scores(h[:, -1])         # (b, num_items + 1)
    model2 = build_model(**model.config())       # the same architecture, from a plain dict
    save_model(model, "dif.pt"); model3 = load_model("dif.pt")   # torch.load(weights_only=True) inside
    items, scores = model3.recommend(histories, k=10)             # serving: see dif_attention.models.serving

Models: ``SASRec``, ``SASRecF`` (early fusion), ``NOVA``, ``DIFSASRec``, ``BERT4Rec``, ``DIFBERT4Rec``. Those
with attributes take ``item_tables`` (attribute -> ``(num_items + 1, k)`` long token table, 0 = padding,
see :func:`dif_attention.item_attribute_table`) and ``num_classes`` (attribute -> V, padding included).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import DIFError, fail
from .base import SequenceModel, hyper_parameters, init_weights
from .bert4rec import BERT4Rec, DIFBERT4Rec
from .loss import full_softmax_cross_entropy
from .sasrec import NOVA, SASRec, SASRecF, DIFSASRec
from .serving import Recommender, ServingState, export_recommender

__all__ = ["SASRec", "SASRecF", "NOVA", "DIFSASRec", "BERT4Rec", "DIFBERT4Rec", "MODELS", "ATTRIBUTE_MODELS",
           "SequenceModel", "build_model", "save_model", "load_model", "hyper_parameters", "init_weights",
           "full_softmax_cross_entropy", "ServingState", "Recommender", "export_recommender"]

MODELS = {"SASRec": SASRec, "SASRecF": SASRecF, "NOVA": NOVA, "DIFSASRec": DIFSASRec,
          "BERT4Rec": BERT4Rec, "DIFBERT4Rec": DIFBERT4Rec}
ATTRIBUTE_MODELS = tuple(name for name, cls in MODELS.items() if "item_tables" in hyper_parameters(cls))
_FORMAT = "dif-attention-model"


def build_model(name: str, *, num_items: int, item_tables: dict | None = None, num_classes: dict | None = None,
                strict: bool = True, **hyper_params) -> SequenceModel:
    """A model by name: ``build_model("DIFSASRec", num_items=..., item_tables=..., num_classes=..., dim=64, ...)``.

    ``strict=False`` drops the keywords the model does not take (``fusion`` for SASRec, the attribute tables
    for models without attributes), so one configuration serves every model of a comparison; the default
    rejects them with a ``DIFError``.
    """
    if name not in MODELS:
        fail("name", f"one of {sorted(MODELS)}", repr(name))
    cls = MODELS[name]
    accepted = hyper_parameters(cls)
    kwargs = dict(hyper_params, num_items=num_items)
    if item_tables is not None or name in ATTRIBUTE_MODELS:
        kwargs.update(item_tables=item_tables, num_classes=num_classes)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and strict:
        fail("hyper_params", f"arguments of {name} ({', '.join(accepted)}; strict=False drops others)",
             f"unknown {unknown}")
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def _on_cpu(obj):
    """``obj`` (a tensor, or a dict of them) with every tensor on the CPU: a saved model loads on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    return obj


def save_model(model: SequenceModel, path: "str | os.PathLike") -> Path:
    """Write ``model``'s config and weights to ``path`` (via a temporary file, then renamed: a kill during
    the write never leaves a truncated file), every tensor on the CPU whatever the model's device.
    :func:`load_model` reads it back."""
    if not isinstance(model, SequenceModel):
        fail("model", "a dif_attention.models model", type(model).__name__)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name + ".", suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    try:
        torch.save({"format": _FORMAT, "version": 1, "config": _on_cpu(model.config()),
                    "state_dict": _on_cpu(model.state_dict())}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_model(path: "str | os.PathLike", *, map_location: "str | torch.device | None" = None,
               item_tables: dict | None = None) -> SequenceModel:
    """A model written by :func:`save_model`, in eval mode (``torch.load(weights_only=True)``: a checkpoint
    cannot run code). A truncated, foreign or corrupted file raises ``DIFError`` naming it.

    ``item_tables`` (attribute models only): attribute -> ``(num_items + 1, k)`` token table replacing the saved
    one -- the same items and vocabularies, other assignments (a catalogue update, or a check of how much the
    model relies on its attributes); the model's own checks name a table that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise DIFError(f"{path}: no such model file")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # empty or truncated file, pickle with code, not a torch file
        first = (str(err).strip().splitlines() or [""])[0]
        detail = type(err).__name__
        if first and "weights_only" not in first:  # torch's advice to load unsafely does not fix a damaged file
            detail += f": {first}"
        raise DIFError(f"{path}: not a readable model file (damaged, truncated or not a checkpoint; {detail})") \
            from None
    if not isinstance(ck, dict) or ck.get("format") != _FORMAT or "config" not in ck or "state_dict" not in ck:
        raise DIFError(f"{path}: not a dif-attention model file (expected one written by save_model)")
    config = dict(ck["config"])
    if item_tables is not None:
        if "item_tables" not in config:
            fail("item_tables", "None for a model without attributes", f"tables for {config.get('name')}")
        config["item_tables"] = item_tables
    model = build_model(config.pop("name"), **config)
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        raise DIFError(f"{path}: the weights do not fit the saved config ({str(err).splitlines()[0]})") from None
    return model.eval()
