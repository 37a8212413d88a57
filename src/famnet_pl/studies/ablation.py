"""Ablation table: every variant of ``experiments/ablation.yaml`` as a full LOSO run per seed,
side by side.

Data flow::

    experiments/ablation.yaml (seeds, args for every run, variants = model config + overrides)
      for seed, for variant: run_loso(recipes.configs(dataset, model, size) + overrides
                                      + --seed_everything=s --data.seed=s)
                             -> runs/ablation/<variant>/seed<s>/<dataset run>/loso_summary.json
      -> runs/ablation/<dataset>/results.csv  one row per (variant, seed): pooled metrics, run dir, seconds
      -> runs/ablation/<dataset>/table.md     mean +/- std over seeds (sample std, n-1): last epoch,
                                              validation-selected epoch, inner validation, the seed
                                              ensemble, and the oracle (not a result)

Every number comes from the runs' own ``loso_summary.json`` (pooled over all folds, MEGC
convention); nothing here trains or scores. The honest columns are the last epoch of the fixed
budget; the oracle columns pick each fold's best test epoch and exist only to compare with papers
that report that way. Runs resume: a rerun skips finished folds and finished runs, so an
interrupted table is completed, not redone; runtimes of runs finished earlier are kept from
results.csv.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import yaml

from famnet_pl.loso.options import LosoOptions
from famnet_pl.loso.plan import rank, recorded_run
from famnet_pl.loso.rundir import SUMMARY
from famnet_pl.loso.runner import run_loso
from famnet_pl.recipes import configs, resolve_size
from famnet_pl.studies.seeds import ensemble_summary, format_mean_std, mean_std, seed_args
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_csv, atomic_write_text

METRICS = {"uf1": "loso/uf1", "uar": "loso/uar", "valsel_uf1": "loso_valsel/uf1", "val_uf1": "loso_val/uf1",
           "oracle_uf1": "loso_oracle/uf1", "oracle_uar": "loso_oracle/uar", "valsel_uar": "loso_valsel/uar"}
TABLE = ("uf1", "uar", "valsel_uf1", "val_uf1", "oracle_uf1", "oracle_uar")  # results.csv columns shown


def load_variants(spec: str | Path) -> tuple[list[int], list[dict]]:
    """Seeds and variants of an ablation spec; a clear error for a malformed one."""
    spec = Path(spec)
    data = yaml.safe_load(spec.read_text())
    try:
        common = [str(a) for a in data.get("args", [])]
        seeds = [int(s) for s in data["seeds"]]
        variants = [{"name": str(v["name"]), "model": str(v["model"]), "args": [*common, *v.get("args", [])]}
                    for v in data["variants"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInput(f"{spec}: expected 'seeds: [..]' and 'variants: [{{name, model, args}}]' ({exc!r})")
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names):
        raise BadInput(f"{spec}: variant names must be unique: {names}")
    return seeds, variants


def format_table(results: pd.DataFrame, order: list[str], ensembles: dict[str, float] | None = None) -> str:
    """Markdown table: one row per variant, mean ± std over its seeds; ``ensembles``: the pooled UF1
    of each variant's seed ensemble (studies/seeds.py)."""
    ensembles = ensembles or {}
    lines = ["| variant | UF1 | UAR | UF1 (val-selected) | UF1 (inner val) | UF1 (seed ensemble) "
             "| UF1 (oracle, not a result) | UAR (oracle) | seeds | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        rows = results[results["variant"] == name]
        if rows.empty:
            continue
        cells = [format_mean_std(mean_std(rows[col].tolist())) if col in rows else "n/a" for col in TABLE]
        ensemble = f"{ensembles[name]:.3f}" if name in ensembles else "–"
        cells.insert(4, ensemble)
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {len(rows)} | {rows['seconds'].sum() / 60:.1f} |")
    return "\n".join(lines)


def _ensembles(results: pd.DataFrame) -> dict[str, float]:
    """Pooled UF1 of every variant's seed ensemble (variants with two or more finished seeds)."""
    out = {}
    for name, rows in results.groupby("variant", sort=False):
        dirs = [Path(d) for d in rows["run_dir"] if (Path(d) / SUMMARY).is_file()]
        if len(dirs) > 1:
            out[name] = ensemble_summary(dirs)["loso/uf1"]
    return out


def run_ablation(*, dataset: str, spec: str = "experiments/ablation.yaml", experiments: str = "experiments",
                 size: str = "auto", variants: list[str] | None = None, seeds: list[int] | None = None,
                 options: LosoOptions = LosoOptions(wandb="off"), extra: list[str] = ()) -> pd.DataFrame:
    """Run (or complete) the ablation and write ``results.csv`` and ``table.md``; returns the results.

    Args:
        dataset: ``experiments/data/<dataset>.yaml``.
        spec: the ablation spec (seeds and variants).
        experiments: folder of base.yaml, size/, data/, model/ and tuned/.
        size: the recipe's size (``cpu``, ``gpu``, ``auto``): each run's configs are
            ``recipes.configs(dataset, variant model, size)``.
        variants: run only these variant names (default: all in the spec).
        seeds: override the spec's seeds.
        options: the LOSO options of every run (``runs_dir``: the table goes to
            ``<runs_dir>/ablation/<dataset>/``; ``jobs``, ``threads``; ``wandb`` off by default:
            dozens of runs); ``exp`` is set per run.
        extra: CLI overrides appended to every run (e.g. ``--data.data_root=...``).
    """

    spec_seeds, spec_variants = load_variants(spec)
    seeds, size = seeds or spec_seeds, resolve_size(size)
    unknown = set(variants or []) - {v["name"] for v in spec_variants}
    if unknown:
        raise BadInput(f"{spec}: no variant named {sorted(unknown)}; variants: "
                       f"{[v['name'] for v in spec_variants]}")
    chosen = [v for v in spec_variants if not variants or v["name"] in variants]
    exp_dir, runs_dir = Path(experiments), options.runs_dir
    out = Path(runs_dir) / "ablation" / dataset
    results_csv = out / "results.csv"
    previous = (pd.read_csv(results_csv) if results_csv.is_file()
                else pd.DataFrame(columns=["variant", "seed"]))
    # Rows of variants/seeds not run this time are kept (VARIANTS= / SEEDS= subsets add to the table).
    rows = previous.to_dict("records")
    for seed in seeds:
        for variant in chosen:
            files = configs(dataset, variant["model"], size, exp_dir)
            args = [*(a for path in files for a in ("--config", str(path))), *variant["args"],
                    *seed_args([], seed), *extra]
            print(f"== ablation {dataset}: {variant['name']}, seed {seed}", flush=True)
            run_root = Path(runs_dir) / "ablation" / variant["name"] / f"seed{seed}"
            finished_before = any(json.loads(p.read_text()).get("complete")
                                  for p in run_root.glob(f"*/{SUMMARY}"))
            start = time.perf_counter()
            exp = f"ablation/{variant['name']}/seed{seed}"
            summary = run_loso(args, options, exp=exp)
            seconds = time.perf_counter() - start
            if rank() != 0:  # DDP ranks started by srun/torchrun: rank 0 keeps the table
                continue
            if summary is None or not summary.get("complete"):
                raise BadInput(f"ablation {variant['name']} seed {seed}: the LOSO run did not finish; rerun "
                               "the same command to complete it (finished folds are kept)")
            before = previous[(previous["variant"] == variant["name"]) & (previous["seed"] == seed)]
            if finished_before and len(before):
                seconds = float(before["seconds"].iloc[0])  # only re-checked now: keep the real run's time
            rows = [r for r in rows if (r["variant"], int(r["seed"])) != (variant["name"], seed)]
            rows.append({"variant": variant["name"], "seed": seed, "dataset": dataset,
                         **{col: summary.get(key) for col, key in METRICS.items()},
                         "n_folds": summary["n_folds"], "seconds": round(seconds, 1),
                         "run_dir": str(recorded_run(runs_dir, exp, args))})
            results = pd.DataFrame(rows)
            atomic_write_csv(results_csv, results)
            atomic_write_text(out / "table.md",
                              format_table(results, [v["name"] for v in spec_variants]) + "\n")
    results = pd.DataFrame(rows)
    if rank() != 0:
        return results
    table = format_table(results, [v["name"] for v in spec_variants], _ensembles(results))
    atomic_write_text(out / "table.md", table + "\n")
    print(f"\nablation on {dataset}, seeds {seeds} (mean ± std over seeds; pooled over all LOSO folds)\n")
    print(table)
    print(f"\nresults: {results_csv}; table: {out / 'table.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    """``famnet-pl ablation``: see :func:`run_ablation`."""
    parser = argparse.ArgumentParser(prog="famnet-pl ablation", description="run the ablation variants of a "
                                     "spec under its seeds and print the side-by-side table (unknown --a.b=v "
                                     "options go to every run)")
    parser.add_argument("--dataset", default="synth", help="experiments/data/<dataset>.yaml")
    parser.add_argument("--spec", default="experiments/ablation.yaml")
    parser.add_argument("--experiments", default="experiments")
    parser.add_argument("--size", default="auto", help="recipe size: cpu, gpu or auto (famnet_pl.recipes)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    parser.add_argument("--jobs", type=int, default=1, help="folds in parallel per LOSO run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--wandb", choices=["off", "offline", "online"], default="off")
    parser.add_argument("--no-progress", action="store_true")
    opts, extra = parser.parse_known_args(argv)
    options = LosoOptions(runs_dir=opts.runs_dir, jobs=opts.jobs, threads=opts.threads, wandb=opts.wandb,
                          progress=not opts.no_progress)
    run_ablation(dataset=opts.dataset, spec=opts.spec, experiments=opts.experiments, size=opts.size,
                 variants=opts.variants.split(",") if opts.variants else None,
                 seeds=[int(s) for s in opts.seeds.split(",")] if opts.seeds else None, options=options,
                 extra=extra)
    return 0
