"""Command line: ``famnet-pl CMD``, CMD in loso, fit, aggregate, report, manifest, synth, fabricate,
preprocess, show, sweep, ablation, train-final, predict, export.

Argument parsing and dispatch only; the work happens below this module, which nothing imports::

    cli -> studies (sweep, ablation) -> loso (options, plan, runner, final, slurm, aggregate)
        -> deploy (model directories, predict, export) -> config -> models, data
        -> losses, metrics, utils

Every process the framework starts re-enters through ``python -m famnet_pl.cli CMD``: fold workers
(``worker RUN_DIR --fold k``, which read the plan from ``run.json``), SLURM jobs (``slurm
plan|prepare|aggregate``), sweep trials (``sweep trial``) and their LOSO runs. Configs stack,
later files win::

    famnet-pl loso --config experiments/base.yaml --config experiments/data/synth.yaml \\
                   --config experiments/model/famnet_cpu.yaml --exp demo [--trainer.max_epochs=5 ...]

Every ``--a.b=v`` the runner does not know is passed on to LightningCLI, which is also how W&B
sweeps pass their parameters (``--model.loss_weights.wau=0.3``).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from famnet_pl.data.protocols import ALIASES, PROTOCOLS  # noqa: E402

log = logging.getLogger(__name__)


def _loso(argv: list[str]) -> int:
    from famnet_pl.loso.options import LosoOptions, loso_parser

    parser = loso_parser()
    opts, cli_args = parser.parse_known_args(argv)
    options = LosoOptions.from_args(opts)
    if opts.ensemble and not opts.seeds:
        parser.error("--ensemble needs --seeds (e.g. --seeds 0,1,2)")
    if opts.seeds and opts.folds:
        parser.error("--seeds compares complete runs: drop --folds (or run the folds per seed with "
                     "--seed_everything=s --data.seed=s)")
    if opts.seeds:
        if opts.launcher == "slurm":
            parser.error("--seeds runs here; on SLURM submit one run per seed "
                         "(--seed_everything=s --data.seed=s)")
        from famnet_pl.studies.seeds import run_seeds

        study = run_seeds(cli_args, options, [int(s) for s in opts.seeds.split(",")], ensemble=opts.ensemble)
        return 0 if study is not None else 1
    if opts.launcher == "slurm":
        if opts.jobs != 1 or opts.gpus:
            parser.error("--launcher slurm runs one fold per SLURM task: drop --jobs/--gpus")
        from famnet_pl.loso.slurm import SlurmOptions, submit_loso

        return submit_loso(cli_args, options, slurm=SlurmOptions.from_args(opts), wait=opts.wait)
    from famnet_pl.loso.plan import rank
    from famnet_pl.loso.runner import run_loso

    summary = run_loso(cli_args, options)
    # A deliberate subset (--folds) that finished is a success; the table says INCOMPLETE. DDP ranks
    # other than 0 report nothing and exit 0 (a non-zero exit would make Lightning kill rank 0).
    return 0 if summary is not None or rank() != 0 else 1


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="famnet-pl worker", description="run (or resume) one fold of a "
                                     "planned LOSO run, as recorded in its run.json (started by famnet-pl "
                                     "loso --jobs N, SLURM array tasks and DDP ranks)")
    parser.add_argument("run_dir", help="runs/<exp>/<dataset> with its run.json")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the run's --threads)")
    opts = parser.parse_args(argv)
    from famnet_pl.loso.runner import run_worker

    return run_worker(opts.run_dir, opts.fold, threads=opts.threads)


def _train_final(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="famnet-pl train-final",
                                     description="train one model on every subject of a protocol and write a "
                                                 "model directory (runs/<exp>/<dataset>/final); unknown "
                                                 "--a.b=v options go to LightningCLI, as for famnet-pl loso")
    parser.add_argument("--exp", default="final", help="experiment name: runs/<exp>/<dataset>/final")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--from-run", default=None, metavar="RUN_DIR",
                        help="a finished LOSO run: train to its validation-selected epoch and record "
                             "its result")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    opts, cli_args = parser.parse_known_args(argv)
    from famnet_pl.loso.final import train_final

    out = train_final(cli_args, exp=opts.exp, runs_dir=opts.runs_dir, run=opts.from_run, threads=opts.threads)
    print(f"wrote {out}: model.ckpt, preprocess.json, model_card.md, model_card.json")
    return 0


def _predict(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="famnet-pl predict",
                                     description="apply a model directory to new clips with its training "
                                                 "preprocessing; JSON (one object per clip) or CSV")
    parser.add_argument("model_dir", help="a model directory (train-final's runs/<exp>/<dataset>/final, or a "
                                          "fold folder of famnet-pl loso --keep-models)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", metavar="DIR", help="a folder of one clip's frames (img46.jpg, ...)")
    source.add_argument("--video", metavar="FILE", help="one clip as a video file (decord)")
    source.add_argument("--manifest", metavar="CSV", help="many clips: columns clip, onset, apex, offset"
                                                          "[, first_frame, id]; paths relative to the CSV")
    for name in ("onset", "apex", "offset"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{name} frame number (coding sheet)")
    parser.add_argument("--first-frame", type=int, default=0,
                        help="--video: the frame number of its first picture (default 0)")
    parser.add_argument("--spot", action="store_true",
                        help="onset/apex unknown: the clip's first/last frames and its motion peak")
    parser.add_argument("--out", default=None, help="FILE.json or FILE.csv (default: JSON on stdout)")
    parser.add_argument("--batch-size", type=int, default=16)
    opts = parser.parse_args(argv)
    from famnet_pl.deploy.predict import ClipSpec, predict_clips, read_clip_manifest, results_table
    from famnet_pl.utils.errors import BadInput
    from famnet_pl.utils.io import atomic_write_csv, atomic_write_json

    if opts.out and Path(opts.out).is_dir():
        raise BadInput(f"--out {opts.out}: a folder; give a file name ending in .json or .csv")

    if opts.manifest:
        specs = read_clip_manifest(opts.manifest, spot=opts.spot)
    else:
        specs = [ClipSpec(Path(opts.frames or opts.video), opts.onset, opts.apex, opts.offset, spot=opts.spot,
                          first_frame=opts.first_frame)]
    results = predict_clips(opts.model_dir, specs, batch_size=opts.batch_size)
    if opts.out and opts.out.endswith(".csv"):
        atomic_write_csv(opts.out, results_table(results))
    elif opts.out:
        atomic_write_json(opts.out, results)
    else:
        print(json.dumps(results, indent=2))
    if opts.out:
        counts = {}
        for r in results:
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
        print(f"wrote {opts.out}: {len(results)} clip(s); predicted "
              + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="famnet-pl export",
                                     description="export a model directory's network (ONNX or TorchScript), "
                                                 "checked against the eager model, with preprocess.json "
                                                 "beside it")
    parser.add_argument("model_dir")
    parser.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    parser.add_argument("--out", default=None, help="folder to write (default: MODEL_DIR/export_<format>)")
    opts = parser.parse_args(argv)
    from famnet_pl.deploy.export import ExportError, export_model

    try:
        path, error = export_model(opts.model_dir, opts.format, out=opts.out)
    except ExportError as exc:
        print(f"famnet-pl export: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {Path(path).parent / 'preprocess.json'}; max |exported - eager| = {error:.2e}")
    return 0


def _fit(argv: list[str]) -> int:
    from famnet_pl.config import build_cli

    cli = build_cli(argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return 0


def _aggregate(argv: list[str]) -> int:
    from famnet_pl.loso.aggregate import aggregate_run, print_summary
    from famnet_pl.loso.rundir import read_plan

    parser = argparse.ArgumentParser(prog="famnet-pl aggregate")
    parser.add_argument("run_dir", help="runs/<exp>/<dataset>")
    parser.add_argument("--oracle-by", choices=["acc", "uf1"], default=None,
                        help="default: the criterion the run used (run.json)")
    opts = parser.parse_args(argv)
    plan = read_plan(opts.run_dir)
    summary = aggregate_run(opts.run_dir, expected_folds=plan.get("n_folds"),
                            oracle_by=opts.oracle_by or plan.get("oracle_by", "acc"))
    print_summary(summary, opts.run_dir)
    return 0 if summary is not None else 1


def _manifest(argv: list[str]) -> int:
    from famnet_pl.data.manifest import build_manifest, pinned_sheets
    from famnet_pl.utils.io import atomic_write_csv

    parser = argparse.ArgumentParser(prog="famnet-pl manifest",
                                     description="build, validate and write a protocol's manifest, and print "
                                                 "the validation report")
    names = ", ".join(sorted([*PROTOCOLS, *ALIASES]))
    parser.add_argument("protocol", help=f"a dataset (all its samples) or a protocol: {names}")
    parser.add_argument("--annotation", default=None, help="sheet (default: the pinned sheet in --root)")
    parser.add_argument("--annotations", default=None, type=json.loads,
                        help='composites: JSON {"casme2": FILE, "samm": FILE, "list": FILE}')
    parser.add_argument("--sheets-dir", default=None,
                        help="folder searched (recursively) for the protocol's pinned sheets and official "
                             "list, e.g. ../shared/annotations; no files on disk are checked")
    parser.add_argument("--root", default=None, help="data root: files on disk are checked when given")
    parser.add_argument("--layout", default="auto", help="on-disk layout (raw, cropped; default: detect)")
    parser.add_argument("--apex-fix", default="midpoint", choices=["midpoint", "flow_peak", "drop"])
    parser.add_argument("--onset-eq-apex", default="keep", choices=["keep", "fix", "drop"])
    parser.add_argument("--missing-frames", default="error", choices=["error", "drop"])
    parser.add_argument("--out", required=True, help="CSV to write, e.g. data_manifests/samm_5cls.csv")
    opts = parser.parse_args(argv)
    annotations = {**pinned_sheets(opts.protocol, Path(opts.sheets_dir)), **(opts.annotations or {})} \
        if opts.sheets_dir else opts.annotations
    manifest, report = build_manifest(protocol=opts.protocol, root=opts.root, annotation=opts.annotation,
                                      annotations=annotations, layout=opts.layout, apex_fix=opts.apex_fix,
                                      onset_eq_apex=opts.onset_eq_apex, missing_frames=opts.missing_frames)
    # Portable: paths are relative to the data root; the sheets are named by their SHA-256.
    atomic_write_csv(opts.out, manifest.assign(sheet_sha256=report.sheet_sha256))
    print(report.format())
    print(f"wrote {opts.out}: {len(manifest)} samples, {manifest['subject'].nunique()} subjects")
    return 0


def _data_module(dataset: str, experiments: str, data_root: str | None, extra: list[str]):
    """The DataModule of ``experiments/data/<dataset>.yaml`` (or a config path) with overrides."""
    exp = Path(experiments)
    config = Path(dataset) if dataset.endswith(".yaml") else exp / "data" / f"{dataset}.yaml"
    args = ["--config", str(exp / "base.yaml"), "--config", str(config),
            *([f"--data.data_root={data_root}"] if data_root else []), *extra]
    from famnet_pl.config import build_cli

    return build_cli(args).datamodule


def _show(argv: list[str]) -> int:
    from famnet_pl.data.manifest import ManifestError
    from famnet_pl.data.show import render
    from famnet_pl.utils.io import atomic_write_bytes

    parser = argparse.ArgumentParser(prog="famnet-pl show", description="write a PNG of one sample's "
                                     "preprocessing (onset, apex, flow, strain, clip)")
    parser.add_argument("sample", help="sample id, e.g. samm/006/006_1_2 (a unique prefix is enough)")
    parser.add_argument("dataset", nargs="?", default="synth", help="experiments/data/<dataset>.yaml")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None, help="PNG to write (default: <sample id with _>.png)")
    parser.add_argument("--experiments", default="experiments")
    opts, rest = parser.parse_known_args(argv)
    dm = _data_module(opts.dataset, opts.experiments, opts.data_root, rest)
    manifest = dm.load_manifest()
    hits = manifest[manifest["sample_id"].str.startswith(opts.sample)]
    if len(hits) != 1:
        raise ManifestError(f"{len(hits)} samples match {opts.sample!r} in {dm.protocol.name} (e.g. "
                            f"{manifest['sample_id'].iloc[:3].tolist()}); give a unique sample id")
    row = dict(next(hits.itertuples(index=False))._asdict())
    if row["flow_image"]:
        raise ManifestError(f"{row['sample_id']}: precomputed flow images have no frames to show")
    out = Path(opts.out or f"{row['sample_id'].replace('/', '_')}.png")
    atomic_write_bytes(out, render(row, dm.hparams.data_root, dm.views))
    print(f"wrote {out}")
    return 0


def _preprocess(argv: list[str]) -> int:
    import time

    parser = argparse.ArgumentParser(prog="famnet-pl preprocess",
                                     description="fill the preprocessing cache of a dataset config "
                                                 "(resumable; unknown --data.x=v options go to the config)")
    parser.add_argument("dataset", help="experiments/data/<dataset>.yaml, or a path to a data config")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the config's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable sample")
    parser.add_argument("--experiments", default="experiments", help="folder of base.yaml and data/*.yaml")
    opts, rest = parser.parse_known_args(argv)
    dm = _data_module(opts.dataset, opts.experiments, opts.data_root,
                      [f"--data.preprocess_workers={opts.workers}",
                       f"--data.strict={str(opts.strict).lower()}", *rest])
    dm.load_manifest()  # sheet and frame checks are not part of the preprocessing time
    start = time.perf_counter()
    prepared = dm.prepare()
    seconds = time.perf_counter() - start
    n = len(prepared.ok)
    print(f"preprocessed {n} samples of {dm.protocol.name} in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} "
          f"samples/s, {opts.workers} workers): {prepared.built} built, {prepared.cached} from the cache, "
          f"{len(prepared.failures)} left out, no face found in {len(prepared.no_face)}")
    for sample, error in prepared.failures.items():
        print(f"  left out {sample}: {error}")
    if prepared.no_face:
        print(f"  no face found (fallback crop): {', '.join(prepared.no_face[:20])}")
    return 0


def _fabricate(argv: list[str]) -> int:
    from famnet_pl.data import fabricate

    return fabricate.main(argv)


def _sweep(argv: list[str]) -> int:
    from famnet_pl.studies.sweep import main as sweep_main

    return sweep_main(argv)


def _ablation(argv: list[str]) -> int:
    from famnet_pl.studies.ablation import main as ablation_main

    return ablation_main(argv)


def _report(argv: list[str]) -> int:
    from famnet_pl.studies.report import main as report_main

    return report_main(argv)


def _slurm(argv: list[str]) -> int:
    from famnet_pl.loso.slurm import main as slurm_main

    return slurm_main(argv)


def _synth(argv: list[str]) -> int:
    from famnet_pl.data import synthetic

    return synthetic.main(argv)


COMMANDS = {"loso": _loso, "fit": _fit, "aggregate": _aggregate, "manifest": _manifest, "synth": _synth,
            "fabricate": _fabricate, "preprocess": _preprocess, "show": _show, "sweep": _sweep,
            "ablation": _ablation, "report": _report, "train-final": _train_final, "predict": _predict,
            "export": _export}
# Started by the framework itself (fold processes, SLURM jobs), not listed in the usage line.
INTERNAL = {"worker": _worker, "slurm": _slurm}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``famnet-pl``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in {**COMMANDS, **INTERNAL}:
        print(f"usage: famnet-pl {{{','.join(COMMANDS)}}} [options]  (famnet-pl CMD --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from famnet_pl.data.annotations import SheetError
    from famnet_pl.data.au import AUParseError
    from famnet_pl.data.frames import FrameError
    from famnet_pl.data.manifest import ManifestError
    from famnet_pl.data.protocols import ProtocolError
    from famnet_pl.loso.aggregate import PredictionsError
    from famnet_pl.models.components.resnet import PretrainedWeightsError
    from famnet_pl.models.registry import ModelOptionError, UnknownModelError
    from famnet_pl.utils.errors import BadInput
    from famnet_pl.utils.io import DiskFullError

    try:
        return {**COMMANDS, **INTERNAL}[argv[0]](argv[1:])
    except (SheetError, ManifestError, FrameError, AUParseError, ProtocolError, PretrainedWeightsError,
            PredictionsError, UnknownModelError, ModelOptionError) as exc:
        # Bad input (or weights to fetch): one line naming the file/row and the fix, not a traceback.
        print(f"famnet-pl {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except BadInput as exc:  # bad arguments or state (a SystemExit with code 2)
        print(f"famnet-pl {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        message = exc.strerror if isinstance(exc, DiskFullError) else f"no space left on device ({exc})"
        print(f"famnet-pl {argv[0]}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
