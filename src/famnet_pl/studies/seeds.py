"""Seeds and seed ensembles: the same LOSO run under several seeds, mean ± std, and the ensemble.

Data flow::

    famnet-pl loso --seeds 0,1,2 [--ensemble mean] <loso options and config>
        for seed s: run_loso(args + --seed_everything=s --data.seed=s, exp=<exp>/seed<s>)
                    -> runs/<exp>/seed<s>/<dataset>/ (a complete LOSO run of its own, resumable)
        seed_study(run dirs) -> runs/<exp>/seeds/<dataset>/seeds.json   per-seed pooled scores,
                                                                        mean ± std (sample std, n-1)
        ensemble (mean):     -> runs/<exp>/seeds/<dataset>/ensemble/loso_summary.json, confusion.png

One seed's pooled UF1 says little (three seeds of one STSTNet run on MEGC2019 gave 0.705, 0.706 and
0.730), so a comparison needs the spread. The ensemble averages each test sample's class
probabilities over the seeds and pools the argmax: at the last epoch (``loso/*``) and at each
seed's own validation-selected epoch (``loso_valsel/*``). Honest: every member saw only its fold's
training subjects, and every selection used only its own inner validation. There is no ensemble
``loso_val/*``: each seed draws its own inner-validation subjects, so a sample one member validates
on may be another member's training sample.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from famnet_pl.loso.aggregate import load_predictions, summarize_run, write_summary
from famnet_pl.loso.options import LosoOptions
from famnet_pl.metrics import at_epochs, pooled_keys, summarize
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json

SEEDS_JSON = "seeds.json"
ENSEMBLE_DIR = "ensemble"
# Pooled scores compared across seeds (and per dataset in composites, when present).
SEED_METRICS = ("loso/uf1", "loso/uar", "loso_valsel/uf1", "loso_valsel/uar", "loso_val/uf1", "loso_val/uar",
                "loso_oracle/uf1", "loso_oracle/uar")


def seed_args(cli_args: list[str], seed: int) -> list[str]:
    """The LOSO arguments of one seed: the global seed and the data seed (augmentation stream and
    the inner-validation draw)."""
    return [*cli_args, f"--seed_everything={seed}", f"--data.seed={seed}"]


def mean_std(values: list[float | None]) -> dict:
    """``{"mean", "std", "values"}`` over seeds (sample std, n-1; None with one value)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": statistics.mean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else None, "values": list(values)}


def format_mean_std(stats: dict | None) -> str:
    """``0.812 ± 0.031`` (one seed: ``0.812``; nothing: ``n/a``)."""
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.3f}" if stats["std"] is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _averaged(frames: list[pd.DataFrame], class_names: list[str]) -> pd.DataFrame:
    """Per sample (and fold), the mean over ``frames`` of the class and AU probabilities; the
    prediction is the argmax of the mean."""
    keys = ["fold", "sample_id"]
    first = frames[0].drop(columns=["epoch"]).sort_values(keys, kind="stable").reset_index(drop=True)
    if any(len(f) != len(first) or sorted(f["sample_id"]) != sorted(first["sample_id"]) for f in frames):
        raise BadInput("seed ensemble: the runs' test predictions cover different samples; ensemble runs of "
                       "one config and dataset only (the same folds, every fold finished)")
    mean_cols = [c for c in first.columns
                 if c.startswith("prob_") or (c.startswith("au") and c.endswith("_prob"))]
    stacked = np.stack([f.sort_values(keys, kind="stable")[mean_cols].to_numpy(dtype=float) for f in frames])
    first[mean_cols] = stacked.mean(0)
    first["y_pred"] = first[[f"prob_{n}" for n in class_names]].to_numpy().argmax(1)
    return first


def ensemble_summary(run_dirs: list[Path]) -> dict:
    """The mean-probability ensemble of complete LOSO runs of one config under different seeds."""
    members = [load_predictions(d) for d in run_dirs]
    if any(m is None for m in members):
        empty = [str(d) for d, m in zip(run_dirs, members) if m is None]
        raise BadInput(f"seed ensemble: no finished fold in {', '.join(empty)}")
    meta = members[0].metas[0]
    names = meta["class_names"]
    summary = summarize(_averaged([m.last for m in members], names), None, class_names=names,
                        au_vocab=meta["au_vocab"])
    chosen = [m.selected_epochs() for m in members]
    if all(chosen):
        at_choice = [at_epochs(m.epochs, c) for m, c in zip(members, chosen)]
        summary.update(pooled_keys(_averaged(at_choice, names), "loso_valsel", len(names)))
        summary["valsel_epochs_per_seed"] = chosen
    summary.update({"protocol": meta["protocol"], "ensemble": "mean", "members": [str(d) for d in run_dirs],
                    "complete": True})
    return summary


def seed_study(run_dirs: dict[int, Path], out_dir: Path, *, ensemble: str | None = None) -> dict:
    """``seeds.json`` (and with ``ensemble``, ``ensemble/``) for finished runs ``{seed: run dir}``:
    every number recomputed from the runs' prediction files."""
    summaries = {s: summarize_run(d) for s, d in run_dirs.items()}
    keys = [k for k in (*SEED_METRICS, *sorted(k for k in summaries[min(summaries)] if k.count("/") == 2))
            if all(k in s for s in summaries.values())]
    study = {"seeds": list(run_dirs), "runs": {str(s): str(d) for s, d in run_dirs.items()},
             "metrics": {k: mean_std([summaries[s][k] for s in run_dirs]) for k in dict.fromkeys(keys)}}
    if ensemble:
        summary = ensemble_summary(list(run_dirs.values()))
        write_summary(out_dir / ENSEMBLE_DIR, summary)
        study["ensemble"] = {k: v for k, v in summary.items()
                             if k.startswith("loso") and isinstance(v, float)}
    atomic_write_json(out_dir / SEEDS_JSON, study)
    return study


def format_study(study: dict) -> str:
    """The mean ± std table of a seed study (and the ensemble's pooled scores)."""
    lines = [f"{len(study['seeds'])} seeds ({', '.join(map(str, study['seeds']))}), pooled over all folds, "
             "mean ± std over seeds:", ""]
    for key, stats in study["metrics"].items():
        lines.append(f"  {key:28s}{format_mean_std(stats):>16s}   " + " ".join(
            "n/a" if v is None else f"{v:.3f}" for v in stats["values"]))
    if "ensemble" in study:
        lines += ["", "seed ensemble (mean probabilities):"]
        lines += [f"  {k:28s}{v:16.3f}" for k, v in study["ensemble"].items()]
    return "\n".join(lines)


def run_seeds(cli_args: list[str], options: LosoOptions, seeds: list[int], *,
              ensemble: str | None = None) -> dict | None:
    """Run (or complete) the LOSO run once per seed, then the seed study; None if a run did not finish
    ({} on DDP ranks other than 0)."""
    from famnet_pl.loso.plan import rank, recorded_run
    from famnet_pl.loso.runner import run_loso

    run_dirs = {}
    for seed in seeds:
        args, opts = seed_args(cli_args, seed), replace(options, exp=f"{options.exp}/seed{seed}")
        print(f"== seed {seed}", flush=True)
        summary = run_loso(args, opts)
        if rank() != 0:  # DDP ranks started by srun/torchrun: every rank runs every seed, rank 0 reports
            continue
        if summary is None or not summary.get("complete"):
            print(f"seed {seed}: the LOSO run did not finish; rerun the same command to complete it "
                  "(finished folds are kept)", flush=True)
            return None
        run_dirs[seed] = recorded_run(opts.runs_dir, opts.exp, args)
    if rank() != 0:
        return {}
    out_dir = Path(options.runs_dir) / options.exp / "seeds" / next(iter(run_dirs.values())).name
    study = seed_study(run_dirs, out_dir, ensemble=ensemble)
    print("\n" + format_study(study) + f"\n\nseed study: {out_dir / SEEDS_JSON}", flush=True)
    return study
