"""Validation-only hyper-parameter search (Optuna): DIF-SASRec and its baselines under one budget and one rule.

Usage (``pip install -e ".[tune]"``)::

    python examples/tune.py                                   # SASRec, SASRecF, DIFSASRec on ML-100K, 20 trials each
    python examples/tune.py --models DIFSASRec --trials 50 --minutes 120 --epochs 50
    python examples/tune.py --dataset beauty --paper --trials 30   # searched settings vary around the paper's
    python examples/tune.py --final false                     # search only; the test split is not read

Every model of ``--models`` gets its own study with the same budget (``--trials`` finished trials and/or
``--minutes`` of this invocation), the same sampler (TPE, seeded), the same pruner and the same objective: the
best validation NDCG@10 of the trial. Trials train on :func:`validation_only` views of the data, so no test
item is read during the search; afterwards the chosen configuration is trained once more (per ``--seeds``) on
the real data and tested, and only that run's test metrics are reported.

The search space is :data:`SPACE`, written once: a model searches the settings it uses (the attribute width,
fusion and input fusion only where the model takes them, the AAP weight ``lamb`` only for models with AAP),
plus one on/off switch per attribute where the dataset has several. Every flag of ``examples/sasrec.py`` sets
the fixed base that the searched settings override.

Outputs under ``--out`` (default ``runs/<dataset>/tune/``): ``study.db`` (the SQLite storage: rerun the same
command to resume, up to the same ``--trials``), and per model ``best.json`` (``{"model", "train",
"model_settings", "attributes"}``, read back by :func:`load_config`), ``trials.md`` (one row per trial),
``history.png``, ``importance.png``, ``curves.png`` (validation NDCG@10 per epoch), ``curves.csv`` (the same
values: ``trial,state,epoch,value``; what the pruner compared) and ``final.json``.

Pruning: bad trials stop early when ``train.run`` takes an ``on_eval(epoch, metrics)`` callback (called after
each validation; an exception raised in it ends the run). Without it each trial trains to its end and its
per-epoch validation curve is recorded afterwards (no pruning).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from cli import boolean, load_data, parser, results_file, settings_from_args, table, user_errors
from data import DataError, Dataset
from dif_attention.models import MODELS, hyper_parameters
from train import MODEL_FLAGS, RunError, TrainConfig, atomic_write_text, preflight, run

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

__all__ = ["SPACE", "search_space", "suggest", "base_params", "shared_params", "read_history", "default_prune_after",
           "search", "write_outputs", "trials_table", "curves_csv", "best_config", "read_config", "load_config",
           "with_attributes", "validation_only", "ValidationOnly", "final_runs", "main"]

MODELS_DEFAULT = ["SASRec", "SASRecF", "DIFSASRec"]
OBJECTIVE = "NDCG@10"
#: Optuna parameter name of an attribute's on/off switch: ``use_<attribute>``
SWITCH = "use_"
#: settings that change where and how a run reports, not its math: a resumed study may change them
PRESENTATION = ("out_dir", "tag", "progress", "log", "save", "checkpoint_every", "resume", "resume_override")


# ---------------------------------------------------------------------------------------------- search space
# A draw is ``draw(trial, name, base) -> value``; its ``accepts(value, base)`` says whether a fixed value lies in
# the space (the base configuration is enqueued as a study's first trial only with the values that do), its
# ``choices(base)`` lists the values of a categorical setting (None for a number).
def _choice(*values):
    """A categorical setting over ``values``."""
    def draw(trial, name, base):
        return trial.suggest_categorical(name, list(values))
    draw.accepts = lambda value, base: value in values
    draw.choices = lambda base: values
    return draw


def _uniform(low: float, high: float, *, step: float | None = None, log: bool = False):
    """A float setting in ``[low, high]`` (on a grid of ``step``, or log-uniform)."""
    def draw(trial, name, base):
        value = trial.suggest_float(name, low, high, step=step, log=log)
        return round(value, 10) if step else value  # the grid without float noise (0.30000000000000004)

    def accepts(value, base):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            return False
        return step is None or abs((value - low) / step - round((value - low) / step)) < 1e-6
    draw.accepts = accepts
    draw.choices = lambda base: None  # a number, not a list
    return draw


def _head_counts(base: dict) -> list[int]:
    dim = base.get("dim", MODEL_FLAGS["dim"][0])
    return [h for h in (1, 2, 4, 8) if dim % h == 0]


def _heads(trial, name, base):
    """Heads among 1, 2, 4, 8 that divide the model width ``dim`` of the base settings."""
    return trial.suggest_categorical(name, _head_counts(base))


_heads.accepts = lambda value, base: value in _head_counts(base)
_heads.choices = _head_counts


def _every(model_name: str, base: dict) -> bool:
    return True


def _takes(keyword: str):
    """Used by the models whose constructor takes ``keyword``."""
    return lambda model_name, base: keyword in hyper_parameters(MODELS[model_name])


def _with_aap(model_name: str, base: dict) -> bool:
    """Used by the models trained with AAP: the DIF models, and SASRecF with ``aap=True`` in the base settings."""
    cls = MODELS[model_name]
    return bool(cls.has_aap or ("aap" in hyper_parameters(cls) and base.get("aap")))


#: The search space, written once: name -> (``"train"`` (a :class:`TrainConfig` field) or ``"model"`` (a model
#: keyword), how a trial draws it, which models use it). A model searches exactly the settings it uses, so the
#: baselines are searched over their share of the same space. Attribute widths are multiples of 8, so of every
#: head count drawn (``attr_dim % heads == 0``).
SPACE = {
    "lr": ("train", _uniform(1e-4, 1e-2, log=True), _every),
    "layers": ("model", _choice(1, 2, 3, 4), _every),
    "heads": ("model", _heads, _every),
    "hidden_dropout": ("model", _uniform(0.0, 0.6, step=0.1), _every),
    "attn_dropout": ("model", _uniform(0.0, 0.6, step=0.1), _every),
    "attr_dim": ("model", _choice(8, 16, 32, 64), _takes("attr_dim")),
    "fusion": ("model", _choice("add", "concat", "gate"), _takes("fusion")),
    "lamb": ("train", _choice(0.0, 0.1, 1.0, 5.0, 10.0, 20.0), _with_aap),
    "input_fusion": ("model", _choice(False, True), _takes("input_fusion")),
}


def _attribute(name: str) -> str | None:
    """The attribute a ``use_<attribute>`` switch turns on or off; None for a setting of :data:`SPACE`."""
    return name[len(SWITCH):] if name.startswith(SWITCH) and name not in SPACE else None


def search_space(model_name: str, dataset, settings: dict | None = None) -> list[str]:
    """The names ``model_name`` searches on ``dataset`` (base model ``settings``): its settings of :data:`SPACE`,
    then ``use_<attribute>`` for each attribute when the model takes attributes and the dataset has several."""
    settings = dict(settings or {})
    names = [name for name, (_, _, used) in SPACE.items() if used(model_name, settings)]
    if "item_tables" in hyper_parameters(MODELS[model_name]) and len(dataset.tables) > 1:
        names += [SWITCH + a for a in dataset.tables]
    return names


def suggest(trial, model_name: str, dataset, cfg: TrainConfig, settings: dict | None = None):
    """Draw one configuration: ``(TrainConfig, model settings, attributes)`` -- the base ``cfg`` / ``settings``
    with the searched values in; ``attributes`` the names switched on (None: the dataset's, unsearched)."""
    settings = dict(settings or {})
    train, model, attributes = {}, {}, None
    for name in search_space(model_name, dataset, settings):
        if _attribute(name) is not None:
            if trial.suggest_categorical(name, [True, False]):
                attributes = (attributes or []) + [_attribute(name)]
            elif attributes is None:
                attributes = []
            continue
        part, draw, _ = SPACE[name]
        (train if part == "train" else model)[name] = draw(trial, name, settings)
    return dataclasses.replace(cfg, **train), {**settings, **model}, attributes


def base_params(model_name: str, dataset, cfg: TrainConfig, settings: dict | None = None) -> dict:
    """The fixed base configuration as Optuna parameters: ``{name: value}`` for each searched name whose base
    value lies in the space (every attribute switched on). Names left out are drawn by the sampler."""
    settings = dict(settings or {})
    params = {}
    for name in search_space(model_name, dataset, settings):
        if _attribute(name) is not None:
            params[name] = True
            continue
        part, draw, _ = SPACE[name]
        value = getattr(cfg, name) if part == "train" else settings.get(name, MODEL_FLAGS[name][0])
        if draw.accepts(value, settings):
            params[name] = value
    return params


def shared_params(model_name: str, dataset, cfg: TrainConfig, settings: dict | None, config: dict) -> dict:
    """A trial of ``model_name`` started from another search's choice: ``config`` (:func:`read_config`'s dict,
    of any model) gives every setting that both its model and ``model_name`` search (the learning rate, layers,
    heads, dropouts, attribute switches, ...); the settings only ``model_name`` searches keep the base's values
    (:func:`base_params`). A value off this model's grid (e.g. more heads than its width takes) is the base's."""
    params = base_params(model_name, dataset, cfg, settings)
    theirs = set(search_space(config["model"], dataset, config["model_settings"]))
    for name in search_space(model_name, dataset, settings):
        if name not in theirs:
            continue
        if _attribute(name) is not None:
            if config.get("attributes") is not None:
                params[name] = _attribute(name) in config["attributes"]
            continue
        part, draw, _ = SPACE[name]
        value = config["train" if part == "train" else "model_settings"].get(name)
        if value is not None and draw.accepts(value, settings):
            params[name] = value
    return params


def read_history(folder: "str | Path") -> list[dict]:
    """The finished trials of an earlier search, from the outputs :func:`write_outputs` left in ``folder``:
    ``trials.md`` (one row per trial) and, where present, ``curves.csv`` (each trial's validation NDCG@10 per
    epoch). One dict per complete or pruned row, in the table's order: ``{"model", "params": {name: text},
    "state", "value", "epochs", "seconds", "curve": [(epoch, value)], "attributes", "source"}`` (``model`` from the
    header, so ``--history`` gives each folder to its model); ``attributes`` is what the
    command in the header passed to ``--attributes`` (None: the dataset's), for rows that have no switches.
    The values stay text until :func:`search` reads them against the searched model's space. A malformed file
    raises :class:`RunError` naming the file and line."""
    folder = Path(folder)
    path = folder / "trials.md"
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise RunError(f"{path}: cannot read the trials of an earlier search ({err.strerror or err})") from None
    attributes, model = None, None
    for line in lines:
        if line.startswith("# Search: "):
            model = line[len("# Search: "):].split(",")[0].strip()
        if line.startswith("Command: `"):
            words = line[len("Command: `"):].rstrip("`").split()
            if "--attributes" in words[:-1]:
                attributes = [a for a in words[words.index("--attributes") + 1].split(",") if a]
    curves: dict[int, list] = {}
    csv = folder / "curves.csv"
    if csv.exists():
        for n, line in enumerate(csv.read_text().splitlines()[1:], start=2):
            try:
                trial, _, epoch, value = line.split(",")
                curves.setdefault(int(trial), []).append((int(epoch), float(value)))
            except ValueError:
                raise RunError(f"{csv}, line {n}: expected trial,state,epoch,value, got {line!r}") from None
    records = []
    for n, line in enumerate(lines, start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 6 or not cells[0].strip("*").isdigit():
            continue
        number, state, value, epochs, seconds, settings = cells
        if state not in ("complete", "pruned"):
            continue
        try:
            params = dict(item.split("=", 1) for item in settings.split(", ")) if settings else {}
            record = {"model": model, "params": params, "state": state, "value": float(value) if value else None,
                      "epochs": int(epochs), "seconds": float(seconds), "attributes": attributes,
                      "curve": sorted(curves.get(int(number.strip("*")), [])), "source": f"{path}, line {n}"}
        except ValueError:
            raise RunError(f"{path}, line {n}: expected | trial | state | value | epochs | seconds | "
                           f"name=value, ... |, got {line!r}") from None
        if state == "complete" and record["value"] is None:
            raise RunError(f"{path}, line {n}: a complete trial without a value")
        records.append(record)
    if not records:
        raise RunError(f"{path}: no complete or pruned trial in it (expected the trials.md of a search)")
    return records


def _history_params(record: dict, model_name: str, dataset, settings: dict) -> dict:
    """``record``'s settings (:func:`read_history`) as values of ``model_name``'s space; a switch the row lacks
    is on where the row's ``--attributes`` named the attribute (all on without them)."""
    names = search_space(model_name, dataset, settings)
    unknown = sorted(set(record["params"]) - set(names))
    if unknown:
        raise RunError(f"{record['source']}: {', '.join(unknown)} not searched for {model_name} (it searches "
                       f"{', '.join(names)})")
    params = {}
    for name in names:
        text = record["params"].get(name)
        if _attribute(name) is not None and text is None:
            params[name] = record["attributes"] is None or _attribute(name) in record["attributes"]
            continue
        if text is None:
            raise RunError(f"{record['source']}: no value for {name}, which {model_name} searches")
        choices = (True, False) if _attribute(name) is not None else SPACE[name][1].choices(settings)
        if choices is not None:
            match = [c for c in choices if _short(c) == text or str(c) == text]
            if not match:
                raise RunError(f"{record['source']}: {name}={text} is not one of {', '.join(map(str, choices))}")
            params[name] = match[0]
        else:
            try:
                params[name] = float(text)
            except ValueError:
                raise RunError(f"{record['source']}: {name}={text}: expected a number") from None
    return params


# ---------------------------------------------------------------------------------------------- data views
def with_attributes(dataset, names=None):
    """A copy of ``dataset`` holding only the attributes ``names`` (None: ``dataset`` itself)."""
    if names is None:
        return dataset
    unknown = [a for a in names if a not in dataset.tables]
    if unknown:
        raise DataError(f"{dataset.source or dataset.name}: no attribute {', '.join(map(repr, unknown))} (it has "
                        f"{', '.join(dataset.tables) or 'none'})")
    keep = list(names)
    return dataclasses.replace(dataset, tables={a: dataset.tables[a] for a in keep},
                               num_classes={a: dataset.num_classes[a] for a in keep},
                               attribute_files={a: f for a, f in dataset.attribute_files.items() if a in keep})


class ValidationOnly(Dataset):
    """A dataset whose test targets are out of reach: ``split("test")`` gives the validation split. Training
    reads ``s[:-2]`` and validation ``s[:-2] -> s[-2]`` as usual, so a run on it is the same run, and its final
    "test" evaluation (``train.run`` always makes one) measures validation again: no test item is read."""

    def split(self, part: str, max_len: int):
        return super().split("valid", max_len)


def validation_only(dataset) -> ValidationOnly:
    """``dataset`` as a :class:`ValidationOnly` view (the same histories and attribute tables, not copied)."""
    return ValidationOnly(**{f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset) if f.init})


# ---------------------------------------------------------------------------------------------- the search
def _optuna():
    try:
        import optuna
    except ImportError:
        raise RunError("the search needs optuna: pip install -e \".[tune]\" (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _storage(optuna, url: str):
    """Optuna storage at ``url``; ``sqlite:///PATH`` gets its folder. Heartbeats mark a trial whose process was
    killed (not one stopped by Ctrl-C, which Optuna marks itself) as failed when the study resumes."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are marked experimental
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)


def _counted(trial) -> bool:
    """A trial that spends budget: it trained and finished (complete, or pruned by the pruner)."""
    return trial.state.name in ("COMPLETE", "PRUNED") and not trial.user_attrs.get("skipped")


def _study_key(dataset, model_name: str, cfg: TrainConfig, settings: dict) -> dict:
    """What a resumed study must share with the one it continues: data, model and every unsearched setting."""
    searched = set(search_space(model_name, dataset, settings))
    return {"dataset": dataset.name, "model": model_name,
            "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PRESENTATION and k not in searched},
            "model_settings": {k: v for k, v in settings.items() if k not in searched}}


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _params(trial) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())


def _best_seen(trial) -> float | None:
    """The trial's value, or for a pruned trial its best validation NDCG@10 before it stopped."""
    if trial.value is not None:
        return trial.value
    return max(trial.intermediate_values.values()) if trial.intermediate_values else None


def default_prune_after(epochs: int) -> int:
    """The first epoch at which the median pruner may stop a trial: half of ``epochs`` (at least 1). A draw
    with a low learning rate or more layers starts slowly and would be cut early by a study whose other trials
    start fast."""
    return max(1, epochs // 2)


def search(dataset, model_name: str, cfg: TrainConfig, settings: dict | None = None, *, trials: int = 20,
           minutes: float = 0.0, storage: str = "sqlite:///tune.db", study_name: str | None = None, pruner=None,
           prune_after: int | None = None, seed: int = 0, runner=run, progress: bool = True,
           start_from_base: bool = True, enqueue=(), history=()):
    """Search ``model_name``'s settings on ``dataset`` and return the Optuna study.

    Each trial draws a configuration (:func:`suggest`), trains it with ``runner`` (``train.run``'s signature)
    on :func:`validation_only` data, quietly and without checkpoints, and scores the best validation NDCG@10.
    The study lives in ``storage`` as ``study_name`` (default ``<dataset>-<model>``) and resumes when it exists
    (its fixed settings must match). Budget: ``trials`` counted trials in the study (0 = no limit) and
    ``minutes`` of this call (0 = no limit; a running trial finishes). ``pruner``: an Optuna pruner (default
    ``MedianPruner(n_startup_trials=5, n_warmup_steps=prune_after)``, steps are epochs; ``prune_after``
    defaults to half of ``cfg.epochs``, so a slow starter is not stopped on its first epochs); it acts when
    ``runner`` takes ``on_eval``. A trial whose switches turn every attribute off is recorded as pruned at once,
    without training, and not counted. ``start_from_base``: a new study's first trial is the fixed base
    configuration (:func:`base_params`), so the chosen one is never worse on validation than the base.
    ``enqueue``: configurations chosen by other searches (:func:`read_config` dicts, e.g. a tuned SASRec's
    ``best.json``); each is queued as a trial of this study with the settings the two models share
    (:func:`shared_params`), once per study however often the command is rerun. ``history``: trials of earlier
    searches of this model under the same fixed settings (:func:`read_history` records, e.g. from a search whose
    ``study.db`` is gone): a new study starts with them as finished trials (values, curves, settings), in place
    of the base, so the sampler goes on where they stopped; a study that has trials already takes none.
    """
    optuna = _optuna()
    settings = dict(settings or {})
    if not trials and not minutes:
        raise RunError("the search needs a budget: trials > 0 or minutes > 0")
    study_name = study_name or f"{dataset.name}-{model_name}"
    if pruner is None:
        warmup = default_prune_after(cfg.epochs) if prune_after is None else prune_after
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    store = _storage(optuna, storage)
    started = (len(optuna.load_study(study_name=study_name, storage=store).trials)
               if study_name in optuna.get_all_study_names(store) else 0)
    # a resumed study draws afresh (not the first trials' random start-up again)
    study = optuna.create_study(storage=store, study_name=study_name, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed + started), pruner=pruner)
    key = _study_key(dataset, model_name, cfg, settings)
    saved = study.user_attrs.get("key")
    if saved is None:
        study.set_user_attr("key", key)
    elif json.loads(json.dumps(key)) != saved:
        diff = sorted(k for part in ("train", "model_settings") for k in set(saved[part]) | set(key[part])
                      if saved[part].get(k) != key[part].get(k))
        other = [k for k in ("dataset", "model") if saved[k] != key[k]]
        raise RunError(f"{storage}: study {study_name!r} was run with other fixed settings "
                       f"({', '.join(other + diff)}); give them as before, or a new --out / --storage")
    hooked = "on_eval" in inspect.signature(runner).parameters
    rebuilt = bool(history) and not study.trials
    if rebuilt:
        _add_history(optuna, study, history, model_name, dataset, cfg, settings)
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))  # as if resumed
    elif start_from_base and not study.trials:
        study.enqueue_trial(base_params(model_name, dataset, cfg, settings))
    for config in enqueue:
        study.enqueue_trial(shared_params(model_name, dataset, cfg, settings, config), skip_if_exists=True)

    def objective(trial):
        cfg_t, settings_t, attributes = _draw(trial, model_name, dataset, cfg, settings)
        if attributes == []:
            trial.set_user_attr("skipped", "every attribute switched off")
            raise optuna.TrialPruned("every attribute switched off")
        data = validation_only(with_attributes(dataset, attributes))
        quiet = dataclasses.replace(cfg_t, save=False, log=False, progress=False, resume=False)

        def on_eval(epoch: int, metrics: dict) -> None:
            trial.report(metrics[OBJECTIVE], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {OBJECTIVE} {metrics[OBJECTIVE]:.4f} at epoch {epoch}")

        if hooked:
            result = runner(data, model_name, quiet, settings_t, on_eval=on_eval)
        else:
            result = runner(data, model_name, quiet, settings_t)
            for record in result["history"]:  # the curve, recorded afterwards (nothing to prune any more)
                if "valid" in record:
                    trial.report(record["valid"][OBJECTIVE], record["epoch"])
        trial.set_user_attr("epochs", result["epochs"])
        trial.set_user_attr("best_epoch", result["best_epoch"])
        return result["best_valid_ndcg10"]

    done = sum(map(_counted, study.trials))
    todo = max(trials - done, 0) if trials else None
    bar = None
    if progress and tqdm is not None and todo != 0:
        bar = tqdm(total=trials or None, initial=done, desc=f"tune {model_name}", unit="trial", leave=False)
    say = bar.write if bar is not None else print

    def finished(study, trial):
        if _counted(trial) and bar is not None:
            bar.update(1)
        value = _best_seen(trial)
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:  # no complete trial yet
            best = "no complete trial yet"
        epoch = max(trial.intermediate_values, default=0)
        say(f"[{model_name}] trial {trial.number} {trial.state.name.lower()}"
            + (f" at epoch {epoch}" if trial.state.name == "PRUNED" and epoch else "")
            + (f" valid {OBJECTIVE} {value:.4f}" if value is not None else "")
            + (f" ({trial.user_attrs['skipped']})" if trial.user_attrs.get("skipped") else "")
            + f", {seconds:.0f}s; {best}; {_params(trial)}")
        if trials and sum(map(_counted, study.trials)) >= trials:
            study.stop()

    if todo != 0:
        if rebuilt:
            say(f"[{model_name}] study {study_name!r} starts from {done} finished trials of earlier searches "
                f"(--history), of {trials or 'unlimited'}")
        elif done:
            say(f"[{model_name}] resuming study {study_name!r}: {done} of {trials or 'unlimited'} trials done")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stale-trial checks, Optuna < 4
            study.optimize(objective, timeout=minutes * 60 if minutes else None, callbacks=[finished])
    if bar is not None:
        bar.close()
    return study


def _draw(trial, model_name: str, dataset, cfg: TrainConfig, settings: dict):
    """:func:`suggest` for ``trial``, and its configuration kept on the trial (``config``, what :func:`best_config`
    gives back)."""
    cfg_t, settings_t, attributes = suggest(trial, model_name, dataset, cfg, settings)
    trial.set_user_attr("config", {"model": model_name, "train": dataclasses.asdict(cfg_t),
                                   "model_settings": settings_t, "attributes": attributes})
    return cfg_t, settings_t, attributes


def _add_history(optuna, study, history, model_name: str, dataset, cfg: TrainConfig, settings: dict) -> None:
    """Record each of ``history`` (:func:`read_history`) in ``study`` as a finished trial: its settings drawn
    through :func:`suggest` (so the distributions and the ``config`` are those of a trial run here), its curve
    reported epoch by epoch, then told complete with its value or pruned."""
    params = [_history_params(r, model_name, dataset, settings) for r in history]  # every row checked first
    for record, values in zip(history, params):
        study.enqueue_trial(values)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # heartbeats are meant for optimize(); nothing runs here
            trial = study.ask()
        attributes = _draw(trial, model_name, dataset, cfg, settings)[2]
        trial.set_user_attr("history", record["source"])
        trial.set_user_attr("epochs", record["epochs"])
        trial.set_user_attr("seconds", record["seconds"])
        if attributes == []:
            trial.set_user_attr("skipped", "every attribute switched off")
        for epoch, value in record["curve"]:
            trial.report(value, epoch)
        if record["state"] == "complete":
            study.tell(trial, record["value"])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)


# ---------------------------------------------------------------------------------------------- outputs
def best_config(study) -> dict:
    """The best trial's configuration: ``{"model", "train", "model_settings", "attributes"}`` (what it trained
    with, the search's quiet overrides aside). A study without a complete trial raises :class:`RunError`."""
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        raise RunError(f"study {study.study_name!r}: no trial completed (every one pruned or failed)")
    return study.best_trial.user_attrs["config"]


def trials_table(study) -> str:
    """Markdown, one row per trial: number (the best in bold), state, validation NDCG@10 (for a pruned trial
    its best before it stopped), epochs trained, seconds, the drawn settings."""
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in study.trials) else None
    lines = [f"| trial | state | valid {OBJECTIVE} | epochs | seconds | settings |", "|---|---|---|---|---|---|"]
    for t in study.trials:
        value = _best_seen(t)
        epochs = t.user_attrs.get("epochs", max(t.intermediate_values, default=0))
        seconds = t.user_attrs.get("seconds", t.duration.total_seconds() if t.duration else 0.0)
        number = f"**{t.number}**" if t.number == best else str(t.number)
        lines.append(f"| {number} | {t.state.name.lower()} | {'' if value is None else f'{value:.4f}'} | {epochs} "
                     f"| {seconds:.1f} | {_params(t)} |")
    return "\n".join(lines)


def curves_csv(study) -> str:
    """CSV ``trial,state,epoch,value``: each trial's validation NDCG@10 after every epoch it trained (the
    values the pruner compared; a trial switched off without training has no row)."""
    lines = ["trial,state,epoch,value"]
    for t in study.trials:
        lines += [f"{t.number},{t.state.name.lower()},{epoch},{value:.6g}"
                  for epoch, value in sorted(t.intermediate_values.items())]
    return "\n".join(lines) + "\n"


def _plots(study, folder: Path) -> list[Path]:
    """``history.png`` (value per trial, best so far), ``importance.png`` (each setting's importance,
    PED-ANOVA; needs two complete trials), ``curves.png`` (validation NDCG@10 per epoch of each trial)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as views

    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    plots = {"history": views.plot_optimization_history}
    if complete >= 2:  # PED-ANOVA: Optuna's own importance measure, no scikit-learn needed (unlike fANOVA)
        plots["importance"] = lambda s: views.plot_param_importances(s, evaluator=PedAnovaImportanceEvaluator())
    if any(t.intermediate_values for t in study.trials):
        plots["curves"] = views.plot_intermediate_values
    written = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib views are marked experimental
            ax = plot(study)
        ax.figure.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(folder / f"{name}.png")
    return written


def write_outputs(study, folder: "str | Path", *, storage: str = "", command: str = "") -> dict[str, Path]:
    """Write ``best.json`` (:func:`best_config`), ``trials.md`` (:func:`trials_table` under a header),
    ``curves.csv`` (:func:`curves_csv`) and the plots into ``folder``; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = best_config(study)
    best = study.best_trial
    paths = {"config": folder / "best.json", "trials": folder / "trials.md", "curves_csv": folder / "curves.csv"}
    atomic_write_text(paths["config"], json.dumps(config, indent=1) + "\n")
    counts = {}
    for t in study.trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    header = (f"# Search: {config['model']}, study {study.study_name!r}\n\nObjective: best validation {OBJECTIVE} "
              f"of a trial (the test split is never read). Trials: "
              + ", ".join(f"{n} {s}" for s, n in counts.items())
              + f". Best: trial {best.number}, {best.value:.4f}.\n\n"
              + (f"Storage: `{storage}`  \n" if storage else "") + (f"Command: `{command}`\n\n" if command else "\n"))
    atomic_write_text(paths["trials"], header + trials_table(study) + "\n")
    atomic_write_text(paths["curves_csv"], curves_csv(study))
    for path in _plots(study, folder):
        paths[path.stem] = path
    return paths


def read_config(path: "str | Path") -> dict:
    """A ``best.json`` written by :func:`write_outputs`, checked: ``{"model", "train", "model_settings",
    "attributes"}`` with known model, training and model settings (:class:`RunError` naming the file if not)."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: not a readable JSON config ({err})") from None
    if not (isinstance(config, dict) and isinstance(config.get("train"), dict)
            and isinstance(config.get("model_settings"), dict) and "model" in config):
        raise RunError(f"{path}: expected a JSON object with model, train and model_settings")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config["train"]) - fields) + sorted(set(config["model_settings"]) - set(MODEL_FLAGS))
    if unknown:
        raise RunError(f"{path}: unknown settings {', '.join(unknown)}")
    if config["model"] not in MODELS:
        raise RunError(f"{path}: unknown model {config['model']!r} (expected one of {', '.join(MODELS)})")
    return {"attributes": None, **config}


def load_config(path: "str | Path") -> tuple[dict, dict]:
    """``(TrainConfig fields, model settings)`` of a ``best.json``: ``TrainConfig(**train)`` and the model
    settings dict are what the best trial trained with (see :func:`read_config` for the model and attributes)."""
    config = read_config(path)
    return dict(config["train"]), dict(config["model_settings"])


def final_runs(dataset, config: dict, seeds=(0,), *, tag: str = "tuned") -> list[dict]:
    """Train ``config`` (:func:`read_config`'s dict) on the real ``dataset`` once per seed, into run folders
    tagged ``tag``, and test it: the only runs of a search that read the test split."""
    cfg = TrainConfig(**{**config["train"], "tag": config["train"].get("tag") or tag})
    data = with_attributes(dataset, config.get("attributes"))
    return [run(data, config["model"], dataclasses.replace(cfg, seed=s), config["model_settings"]) for s in seeds]


# ---------------------------------------------------------------------------------------------- command line
def main(argv=None) -> dict:
    """Search every model of ``--models``, write the outputs, then train and test each chosen configuration.
    Returns ``{model: {"study", "paths", "results"}}``."""
    p = parser(__doc__.splitlines()[0], MODELS_DEFAULT)
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=20, help="finished trials per model, counted over resumes "
                   "(default 20; 0 = no limit)")
    g.add_argument("--minutes", type=float, default=0.0, help="minutes per model in this call (default 0 = no "
                   "limit; the running trial finishes)")
    g.add_argument("--out", default=None, help="output folder (default runs/<dataset>/tune)")
    g.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<out>/study.db)")
    g.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median: stop a trial whose validation NDCG@10 is below the median of earlier trials at the "
                        "same epoch (needs train.run's on_eval); none: every trial trains to its end")
    g.add_argument("--prune-after", type=int, default=None, help="first epoch at which a trial may be pruned "
                   "(default: half of --epochs)")
    g.add_argument("--start-from-base", type=boolean, default=True, metavar="BOOL",
                   help="a new study's first trial is the fixed base configuration given by the flags (default true)")
    g.add_argument("--enqueue", default="", metavar="FILES",
                   help="comma-separated best.json files of other searches (any model): each is queued as a trial "
                        "with the settings its model and the searched one share, the rest from the flags")
    g.add_argument("--history", default="", metavar="FOLDERS",
                   help="comma-separated output folders of earlier searches under the same fixed settings (their "
                        "trials.md and curves.csv): a new study of their model starts with their trials as finished "
                        "ones, in place of the base")
    g.add_argument("--final", type=boolean, default=True, metavar="BOOL",
                   help="train and test the chosen configuration of each model (default true)")
    args = p.parse_args(argv)
    if args.trials < 0 or args.minutes < 0 or (args.prune_after or 0) < 0:
        p.error("--trials, --minutes and --prune-after: expected numbers >= 0")
    if not args.trials and not args.minutes:
        p.error("--trials / --minutes: expected a budget (trials > 0 or minutes > 0)")
    cfg, settings = settings_from_args(p, args)
    if cfg.valid_metric != OBJECTIVE:
        p.error(f"--valid-metric: the search selects by validation {OBJECTIVE}; expected {OBJECTIVE}, got "
                f"{cfg.valid_metric}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(sys.argv if argv is None else ["examples/tune.py", *argv])
    out = {}
    with user_errors(p):
        optuna = _optuna()
        seeded = [read_config(f) for f in args.enqueue.split(",") if f.strip()]
        past = [r for f in args.history.split(",") if f.strip() for r in read_history(f.strip())]
        dataset = load_data(args)
        for name in args.models:
            preflight(dataset, name, dataclasses.replace(cfg, seed=args.seeds[0]), settings)
        root = Path(args.out) if args.out else Path(cfg.out_dir) / dataset.name / "tune"
        storage = args.storage or f"sqlite:///{root / 'study.db'}"
        pruner = optuna.pruners.NopPruner() if args.pruner == "none" else None
        print(dataset.stats() + (f"; {dataset.notes}" if dataset.notes else ""), flush=True)
        for name in args.models:
            print(f"[{name}] searching {', '.join(search_space(name, dataset, settings))}; storage {storage}",
                  flush=True)
            t0 = time.perf_counter()
            study = search(dataset, name, dataclasses.replace(cfg, seed=args.seeds[0]), settings,
                           trials=args.trials, minutes=args.minutes, storage=storage, pruner=pruner,
                           prune_after=args.prune_after, seed=args.seeds[0], progress=cfg.progress,
                           start_from_base=args.start_from_base, enqueue=seeded,
                           history=[r for r in past if r["model"] in (None, name)])
            paths = write_outputs(study, root / name, storage=storage, command=command)
            best = study.best_trial
            print(f"[{name}] best trial {best.number}: valid {OBJECTIVE} {best.value:.4f} ({_params(best)}); "
                  f"{time.perf_counter() - t0:.0f}s; wrote {', '.join(str(v) for v in paths.values())}", flush=True)
            results = final_runs(dataset, read_config(paths["config"]), args.seeds) if args.final else []
            if results:
                atomic_write_text(root / name / "final.json", json.dumps(
                    {"command": command, "config": str(paths["config"]), "best_trial": best.number,
                     "best_valid_ndcg10": best.value,
                     "results": [{k: v for k, v in r.items() if k != "history"} for r in results]}, indent=1))
            out[name] = {"study": study, "paths": paths, "results": results}
    finals = [r for v in out.values() for r in v["results"]]
    if finals:
        md = table(finals, list(out))
        text = (f"{dataset.stats()}\n\nTest metrics of each model's configuration chosen on validation NDCG@10 "
                f"({args.trials or 'unlimited'} trials" + (f", {args.minutes:g} min" if args.minutes else "")
                + f" per model), seeds {args.seeds}.\n\n{md}\n\nCommand: `{command}`\n")
        print("\n" + text, flush=True)
        base = Path(args.results) if args.results else root / "tune-results"
        base.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_file(base, ".md"), text)
        print(f"wrote {results_file(base, '.md')}", flush=True)
    return out


if __name__ == "__main__":
    main()
