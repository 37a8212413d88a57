"""``famnet-pl train-final``: one model trained on every subject of a protocol, as a model directory.

Data flow::

    config args (as famnet-pl loso) [+ --from-run RUN_DIR: its validation-selected epoch]
        -> build_cli(args, --data.fold=-1)        (no test group: every subject trains; the config's
                                                   inner-validation subjects stay out when it has any,
                                                   for what the model chooses there: the fusion weight)
        -> trainer.fit                             (no LOSO callback, no test subject)
        -> runs/<exp>/<dataset>/final/            model.ckpt, preprocess.json (deploy/bundle.py),
                                                   model_card.json, model_card.md, config.yaml

The epoch budget is the config's ``trainer.max_epochs``, or with ``--from-run`` the epoch a finished
LOSO run's inner validation chose: the best pooled inner-validation UF1 over all folds (no test
subject is read; the final model has none), trained on the run's schedule (``model.schedule_epochs``
= the run's ``max_epochs``) and stopped there.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

import yaml

from famnet_pl.config import build_cli
from famnet_pl.deploy.bundle import MODEL_CARD_JSON, MODEL_CARD_MD, write_bundle
from famnet_pl.loso.plan import git_state
from famnet_pl.loso.rundir import FINAL, FOLD_CONFIG, SUMMARY, read_plan
from famnet_pl.loso.runner import _set_threads
from famnet_pl.metrics import best_epoch
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json, atomic_write_text, replace_dir

INTENDED_USE = ("Research on micro-expression recognition: scoring new clips coded like the training "
                "data (onset, apex and offset known, or estimated with --spot), and checking a model on "
                "another dataset. Not for decisions about people: micro-expression labels are not a lie "
                "or emotion detector, and a model's probabilities are not calibrated for individuals.")


def from_run(run_dir: str | Path) -> dict:
    """What a finished LOSO run fixes for a final model: the validation-selected epoch (0-based), the
    run's schedule length, its protocol and its pooled results."""
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY
    if not summary_path.is_file():
        raise BadInput(f"--from-run {run_dir}: no {SUMMARY}; give a finished famnet-pl loso run "
                       "(runs/<exp>/<dataset>)")
    configs = sorted(run_dir.glob(f"fold_*/{FOLD_CONFIG}"))
    try:
        summary = json.loads(summary_path.read_text())
        by_epoch = {int(e): float(v) for e, v in (summary.get("val_uf1_by_epoch") or {}).items()}
        config = yaml.safe_load(configs[0].read_text()) if configs else None
        max_epochs = int(config["trainer"]["max_epochs"]) if config else None
    except (ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as exc:
        raise BadInput(f"--from-run {run_dir}: {SUMMARY} or a fold's config.yaml does not read "
                       f"({type(exc).__name__}); rerun famnet-pl aggregate {run_dir}, or give another "
                       "run") from None
    if not summary.get("complete") or not by_epoch or not max_epochs:
        raise BadInput(f"--from-run {run_dir}: the run is incomplete or has no inner-validation "
                       "predictions (data.val_subjects=0); finish it, or run it with --data.val_subjects=1")
    epoch = best_epoch(by_epoch)
    return {"run_dir": str(run_dir), "epoch": epoch, "schedule_epochs": max_epochs, "config": config,
            "protocol": summary.get("protocol"), "val_uf1": by_epoch[epoch],
            "loso": {k: summary[k] for k in ("loso/uf1", "loso/uar", "loso_valsel/uf1", "loso_valsel/uar",
                                             "loso_val/uf1") if k in summary},
            "folds": summary.get("n_folds"), "command": read_plan(run_dir).get("command")}


def train_final(cli_args: list[str], *, exp: str = "final", runs_dir: str = "runs",
                run: str | Path | None = None, threads: int | None = None) -> Path:
    """Train on every subject and write the model directory; returns its path. No logger (the
    model card is the record) and no checkpoints but the final one. ``threads``: CPU threads
    (default: all cores), set as the LOSO runner sets them."""
    _set_threads(threads)
    source = from_run(run) if run else None
    extra = ["--data.fold=-1", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    if source:
        extra += [f"--trainer.max_epochs={source['epoch'] + 1}",
                  f"--model.schedule_epochs={source['schedule_epochs']}"]
    cli = build_cli([*cli_args, *extra], save_config_callback=None)  # config.yaml goes into final/
    dm, module, trainer = cli.datamodule, cli.model, cli.trainer
    config = yaml.safe_load(cli.parser.dump(cli.config))
    if source:
        changed = _config_changes(source["config"], config)
        if changed:
            keys = ", ".join(changed[:6])
            raise BadInput(f"--from-run {run}: this config differs from the run's in {keys}; "
                           "its epoch and LOSO result belong to the run's config: give the same dataset, "
                           "model and options as the run")
    out = Path(runs_dir) / exp / dm.run_name / FINAL
    staging = out.with_name(f"{FINAL}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.fit(module, datamodule=dm)
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:  # DDP: rank 0 writes the directory
        return out
    card = model_card(cli, source)
    write_bundle(staging, module, dm)
    atomic_write_text(staging / "config.yaml", cli.parser.dump(cli.config))
    atomic_write_json(staging / MODEL_CARD_JSON, card)
    atomic_write_text(staging / MODEL_CARD_MD, card_markdown(card))
    replace_dir(staging, out)  # the complete directory, in one step
    return out


#: Config keys a final model may change from its LOSO run (the epoch budget, what it writes, where).
_FREE = ("seed_everything", "trainer.", "data.init_args.fold", "data.init_args.cache_dir",
         "data.init_args.preprocess_workers", "data.init_args.num_workers", "model.schedule_epochs")


def _config_changes(run: dict, final: dict) -> list[str]:
    """Dotted keys whose values differ between two dumped configs, but for :data:`_FREE` ones."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    a, b = flat(run), flat(final)
    return sorted(k for k in a.keys() | b.keys()
                  if a.get(k) != b.get(k) and not any(k == f or k.startswith(f) for f in _FREE))


def _versions() -> dict:
    import lightning
    import timm
    import torch
    import torchvision

    try:
        version = importlib.metadata.version("famnet_pl")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": lightning.__version__,
            "timm": timm.__version__, "torchvision": torchvision.__version__,
            "famnet_pl": version}


def model_card(cli, source: dict | None) -> dict:
    """The model card's facts (``model_card.json``; :func:`card_markdown` renders them)."""
    dm, module, trainer = cli.datamodule, cli.model, cli.trainer
    hp = module.hparams
    subject = dm.manifest["subject"]
    train_subjects, val_subjects = dm.split["train"], dm.split["val"]
    config = cli.config.clone()
    return {
        "model": {"name": hp.model, "net": dict(hp.net or {}),
                  "parameters": sum(p.numel() for p in module.parameters()),
                  "loss_weights": asdict(module.criterion.weights), "late_weight_from": hp.late_weight_from,
                  "trains_au": bool(module.trains_au)},
        "data": {"protocol": dm.protocol.name, "classes": list(dm.class_names), "au_vocab": list(dm.au_vocab),
                 "samples": len(dm.manifest), "subjects": int(subject.nunique()),
                 "training_samples": len(dm.train_set), "training_subjects": len(train_subjects),
                 "validation_samples": len(dm.val_set) if dm.val_set is not None else 0,
                 "validation_subjects": val_subjects,
                 "class_counts": {c: int((dm.manifest["label"] == i).sum())
                                  for i, c in enumerate(dm.class_names)}},
        "training": {"epochs": trainer.current_epoch,
                     "schedule_epochs": hp.schedule_epochs or trainer.max_epochs,
                     "epochs_from": "the LOSO run's validation-selected epoch" if source else "the config",
                     "seed": config.get("seed_everything"), "optimizer": hp.optimizer, "lr": hp.lr},
        "loso": ({"run": source["run_dir"], "folds": source["folds"], **source["loso"],
                  "selection": "loso/*: last epoch of each fold (the run's headline); loso_valsel/*: each "
                               "fold's epoch chosen on inner validation without its test subject; this "
                               f"model's epoch {source['epoch']}: the best pooled inner-validation UF1 "
                               f"({source['val_uf1']:.3f}) over all folds"} if source else None),
        "config": json.loads(json.dumps(config.as_dict(), default=str)),
        "versions": _versions(), "git": git_state(),
        "intended_use": INTENDED_USE,
        "limits": [
            f"Trained on {len(train_subjects)} subjects of {dm.protocol.name}; expect lower scores on other "
            "cameras, frame rates, lighting and populations (cross-dataset MER drops sharply).",
            "Inputs must be made as preprocess.json says (famnet-pl predict does it): a face crop, frames "
            "registered to the onset, the coded onset/apex/offset.",
            "The LOSO figures describe the training protocol's subjects, not this model on new data.",
        ],
    }


def card_markdown(card: dict) -> str:
    """``model_card.md``: the card for people."""
    m, d, t, loso = card["model"], card["data"], card["training"], card["loso"]
    lines = [f"# Model card: {m['name']} on {d['protocol']}", "",
             "## Model",
             f"- `{m['name']}`, {m['parameters']:,} parameters; options `{json.dumps(m['net'])}`",
             f"- loss weights `{json.dumps(m['loss_weights'])}`; AU head trained: {m['trains_au']}", "",
             "## Data and protocol",
             f"- protocol `{d['protocol']}`: {d['samples']} samples, {d['subjects']} subjects, classes "
             f"{', '.join(d['classes'])} ({', '.join(f'{c} {n}' for c, n in d['class_counts'].items())})",
             f"- trained on {d['training_samples']} samples of {d['training_subjects']} subjects; "
             + (f"{d['validation_samples']} samples of {', '.join(d['validation_subjects'])} held out for "
                "inner validation (the fusion weight is chosen there)" if d["validation_subjects"]
                else "no subject held out"),
             f"- {t['epochs']} epochs ({t['epochs_from']}), schedule of {t['schedule_epochs']}, "
             f"seed {t['seed']}", "",
             "## LOSO result of the run it came from"]
    if loso:
        nan = float("nan")
        lines += [f"- run `{loso['run']}`, {loso['folds']} folds: UF1 {loso.get('loso/uf1', nan):.3f}, "
                  f"UAR {loso.get('loso/uar', float('nan')):.3f} (last epoch); validation-selected UF1 "
                  f"{loso.get('loso_valsel/uf1', nan):.3f}", f"- selection: {loso['selection']}"]
    else:
        lines += ["- none given (`--from-run RUN_DIR` records one)"]
    lines += ["", "## Intended use", card["intended_use"], "",
              "## Limits", *[f"- {x}" for x in card["limits"]],
              "", "## Versions",
              f"- {', '.join(f'{k} {v}' for k, v in card['versions'].items())}; git "
              f"{card['git']['sha'][:12] or 'unknown'}{' (dirty)' if card['git']['dirty'] else ''}", ""]
    return "\n".join(lines)
