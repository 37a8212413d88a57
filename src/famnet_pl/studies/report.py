"""``famnet-pl report RUN_DIR...``: a paper-ready table of finished runs, in Markdown and LaTeX.

Data flow::

    RUN_DIR (a LOSO run: fold_*/ prediction files)          -> one row
    RUN_DIR (a seed study: seeds.json, studies/seeds.py)    -> one row, mean ± std over its seeds,
                                                               and a row for its ensemble/ if any
        every number recomputed from the prediction files (loso/aggregate.load_predictions)
        composites: one indented row per dataset
    -> <out>/report.md, <out>/report.tex (booktabs), <out>/confusion.png (one panel per row)

Columns: pooled UF1/UAR at the last epoch (the headline), at the validation-selected epoch, the
pooled inner-validation UF1 (what selection read), and the oracle epoch, labelled "not a result".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from famnet_pl.loso.aggregate import draw_confusion, summarize_run
from famnet_pl.loso.rundir import PREDICTIONS
from famnet_pl.studies.seeds import ENSEMBLE_DIR, SEEDS_JSON, ensemble_summary, format_mean_std, mean_std
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_bytes, atomic_write_text

# (header, summary key); the oracle is labelled as what it is.
COLUMNS = (("UF1", "loso/uf1"), ("UAR", "loso/uar"), ("UF1 val-sel.", "loso_valsel/uf1"),
           ("UAR val-sel.", "loso_valsel/uar"), ("UF1 inner val", "loso_val/uf1"),
           ("UF1 oracle (not a result)", "loso_oracle/uf1"), ("UAR oracle (not a result)", "loso_oracle/uar"))


def _run_summary(run_dir: Path) -> dict:
    summary = summarize_run(run_dir)
    if summary is None:
        raise BadInput(f"{run_dir}: no finished fold (no fold_*/{PREDICTIONS}); give a LOSO run directory "
                       "(runs/<exp>/<dataset>) or a seed study (runs/<exp>/seeds/<dataset>)")
    return summary


def _datasets(summary: dict) -> list[str]:
    return sorted({k.split("/")[1] for k in summary if k.startswith("loso/") and k.count("/") == 2})


def _cells(summaries: list[dict], prefix: str = "") -> list[str]:
    """One cell per column: the value, or mean ± std over several summaries (seeds)."""
    cells = []
    for _, key in COLUMNS:
        head, _, metric = key.partition("/")
        name = f"{head}/{prefix}{metric}"
        values = [s.get(name) for s in summaries]
        if all(v is None for v in values):
            cells.append("–")
        elif len(values) == 1:
            cells.append(f"{values[0]:.3f}")
        else:
            cells.append(format_mean_std(mean_std(values)))
    return cells


def report_rows(targets: list[Path], names: list[str] | None = None) -> list[dict]:
    """``[{"name", "cells", "datasets": [(dataset, cells)], "confusion", "class_names", "n"}]`` per
    row of the report."""
    rows = []
    for i, target in enumerate(targets):
        name = names[i] if names and i < len(names) else str(target)
        study_file = target / SEEDS_JSON
        if study_file.is_file():
            runs = [Path(d) for d in json.loads(study_file.read_text())["runs"].values()]
            members = [(f"{name} ({len(runs)} seeds)", [_run_summary(d) for d in runs])]
            if (target / ENSEMBLE_DIR).is_dir():
                members.append((f"{name} (seed ensemble)", [ensemble_summary(runs)]))
        else:
            members = [(name, [_run_summary(target)])]
        for label, summaries in members:
            first = summaries[0]
            rows.append({"name": label, "cells": _cells(summaries),
                         "datasets": [(d, _cells(summaries, f"{d}/")) for d in _datasets(first)],
                         "class_names": first["class_names"], "n": len(summaries),
                         "confusion": [[sum(s["confusion"][i][j] for s in summaries)
                                        for j in range(len(first["class_names"]))]
                                       for i in range(len(first["class_names"]))],
                         "folds": first["n_folds"], "samples": first["n_samples"]})
    return rows


def format_markdown(rows: list[dict]) -> str:
    """The report as a Markdown table."""
    header = ["run", "folds", "samples", *[h for h, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], str(r["folds"]), str(r["samples"]), *r["cells"]]) + " |")
        lines += ["| " + " | ".join([f"&nbsp;&nbsp;{d}", "", "", *cells]) + " |"
                  for d, cells in r["datasets"]]
    return "\n".join([*lines, "", _NOTE])


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace(
        "&", r"\&").replace("#", r"\#").replace("±", r"$\pm$").replace("–", "--")


def format_latex(rows: list[dict]) -> str:
    """The report as a LaTeX (booktabs) table."""
    header = ["run", "folds", "samples", *[h for h, _ in COLUMNS]]
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join(_tex(c) for c in [r["name"], str(r["folds"]), str(r["samples"]), *r["cells"]])
                     + r" \\")
        lines += [" & ".join([r"\quad " + _tex(d), "", "", *[_tex(c) for c in cells]]) + r" \\"
                  for d, cells in r["datasets"]]
    lines += [r"\bottomrule", r"\end{tabular}", "% " + _NOTE]
    return "\n".join(lines)


_NOTE = ("Pooled over all LOSO folds (MEGC). UF1/UAR: last epoch of a fixed budget (the headline); "
         "val-sel.: the epoch chosen on inner validation (training subjects only), its test predictions; "
         "inner val: the validation score selection read; oracle: the best test epoch per fold, "
         "test-subject selection, for comparison with papers that report it only. Seeds: mean ± sample std.")


def confusion_grid_png(rows: list[dict]) -> bytes:
    """One confusion-matrix panel per report row (seed studies: counts summed over seeds)."""
    from famnet_pl.utils.plot import figure_png, pyplot

    plt = pyplot()
    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    size = 1.0 * len(rows[0]["class_names"]) + 2
    fig, axes = plt.subplots(nrows, cols, figsize=(size * cols, size * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        draw_confusion(ax, [n[:8] for n in r["class_names"]], r["confusion"],
                       r["name"] + (f" (sum of {r['n']})" if r["n"] > 1 else ""), fontsize=7)
    return figure_png(fig, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """``famnet-pl report RUN_DIR... [--out DIR] [--names a,b]``."""
    parser = argparse.ArgumentParser(prog="famnet-pl report", description="a paper-ready table (Markdown and "
                                     "LaTeX) and a confusion-matrix grid of finished LOSO runs or seed "
                                     "studies; every number recomputed from the prediction files")
    parser.add_argument("runs", nargs="+", help="runs/<exp>/<dataset> or runs/<exp>/seeds/<dataset>")
    parser.add_argument("--out", default="runs/report",
                        help="folder for report.md, report.tex, confusion.png")
    parser.add_argument("--names", default=None, help="comma-separated row names (default: the paths)")
    opts = parser.parse_args(argv)
    rows = report_rows([Path(r) for r in opts.runs], opts.names.split(",") if opts.names else None)
    out = Path(opts.out)
    markdown = format_markdown(rows)
    atomic_write_text(out / "report.md", markdown + "\n")
    atomic_write_text(out / "report.tex", format_latex(rows) + "\n")
    atomic_write_bytes(out / "confusion.png", confusion_grid_png(rows))
    print(markdown + f"\n\nwrote {out / 'report.md'}, {out / 'report.tex'}, {out / 'confusion.png'}")
    return 0
