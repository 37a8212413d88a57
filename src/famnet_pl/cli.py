"""Command line: ``famnet-pl {loso,fit,aggregate,manifest,synth,fabricate,preprocess,show,sweep,ablation}``
and the LightningCLI behind them.

``FamNetCLI`` is a LightningCLI over (:class:`FAMNetLitModule`, :class:`MERDataModule`) whose
model sizes that follow from the data (classes, AUs, 2D channels) are linked from the DataModule,
so a YAML states them once. Configs stack, later files win::

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
import warnings
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning.fabric.plugins import CheckpointIO  # noqa: E402

from famnet_pl.data.datamodule import MERDataModule  # noqa: E402
from famnet_pl.data.protocols import ALIASES, PROTOCOLS, get_protocol  # noqa: E402
from famnet_pl.models.module import FAMNetLitModule  # noqa: E402
from famnet_pl.utils.checkpoint_io import AtomicCheckpointIO  # noqa: E402

log = logging.getLogger(__name__)

# The fold runner drives LightningCLI through `args=` by design (one CLI per fold).
warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")


class FamNetCLI(LightningCLI):
    """LightningCLI with data->model links, and room for callbacks/loggers the runner owns.

    Args:
        extra_callbacks: callbacks appended to those of the config (the LOSO runner's).
        logger: logger replacing the config's (the runner's per-fold W&B/CSV logger).
        *args, **kwargs: passed to LightningCLI.
    """

    def __init__(self, *args, extra_callbacks: Sequence = (), logger=None, **kwargs) -> None:
        self._extra_callbacks, self._logger = list(extra_callbacks), logger
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "num_aus", "in_channels_2d"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Data without frame sequences (precomputed flow images) has no 3D view: FAMNet runs its
        2D branch alone, and says so; a 3D-only model cannot run there."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        protocol = get_protocol(config.data.protocol)
        if protocol.has_clips:
            return
        model = config.model.model
        if model == "famnet_r18":
            log.warning("protocol %s has no frame sequences (no 3D view): FAMNet runs its 2D branch alone "
                        "(model amnet2d_r18, same options)", protocol.name)
            config.model.model = "amnet2d_r18"
        elif model == "amnet3d_r18":
            raise ValueError(f"protocol {protocol.name} has no frame sequences, so the 3D-only model {model} "
                             "cannot run on it; use famnet_r18 (2D branch) or amnet2d_r18")

    def instantiate_trainer(self, **kwargs):
        if self._logger is not None:
            kwargs["logger"] = self._logger
        configured = {**self._get(self.config_init, "trainer", default={})}.get("plugins")
        plugins = _submitit_plugins(configured)
        plugins = _as_list(configured if plugins is None else plugins)
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())  # same-folder temp file + rename (utils/checkpoint_io.py)
        kwargs["plugins"] = plugins
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend(self._extra_callbacks)
        return trainer


def _as_list(plugins) -> list:
    return [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]


def _submitit_plugins(configured) -> list | None:
    """Under submitit (``SUBMITIT_EXECUTOR=slurm``, set by its sbatch script), submitit owns
    requeueing: on its signal it calls ``checkpoint()`` and requeues the job itself (famnet_pl.slurm).
    Lightning's SLURM auto-requeue is switched off there so a job is never requeued twice. Plain
    sbatch jobs (experiments/slurm/) keep Lightning's default (auto-requeue on ``--signal=USR1@N``).
    None: leave the trainer's plugins as configured."""
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not SLURMEnvironment.detect():
        return None
    configured = _as_list(configured)
    if any(isinstance(p, ClusterEnvironment) for p in configured):
        return None  # the config chose its own cluster environment
    return [*configured, SLURMEnvironment(auto_requeue=False)]


def build_cli(args: list[str], **kwargs) -> FamNetCLI:
    """A FamNetCLI for ``args`` that parses and instantiates but does not run anything."""
    return FamNetCLI(FAMNetLitModule, MERDataModule, args=args, run=False, seed_everything_default=0,
                     save_config_kwargs={"overwrite": True}, **kwargs)


def loso_parser() -> argparse.ArgumentParser:
    """Options of ``famnet-pl loso`` (also read by ``python -m famnet_pl.slurm plan``, which backs
    experiments/slurm/submit.sh, so the shell path takes exactly the same options)."""
    parser = argparse.ArgumentParser(prog="famnet-pl loso", description="leave-one-subject-out run; "
                                     "unknown --a.b=v options go to LightningCLI")
    parser.add_argument("--exp", default="famnet", help="experiment name: runs/<exp>/<dataset>/")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--folds", default=None, help="comma-separated fold indices or subjects (default: all)")
    parser.add_argument("--wandb", choices=["off", "offline", "online"], default="offline",
                        help="offline (default) writes wandb/offline-run-* per fold; online uploads")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="record test-subject predictions every N epochs (oracle comparison only)")
    parser.add_argument("--oracle-by", choices=["acc", "uf1"], default="acc")
    parser.add_argument("--jobs", type=int, default=1, help="folds run at once, each in its own process")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids for fold processes")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="fold processes per GPU (with --gpus)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per fold (default: all cores, "
                        "or cores // jobs; on SLURM the task's CPUs); compare runs at equal --threads")
    parser.add_argument("--resume-every", type=int, default=1, help="save each fold's resume checkpoint every N "
                        "epochs (0: never); a killed or requeued fold continues from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, batch jobs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a fold-parallel child
    slurm = parser.add_argument_group("SLURM", "--launcher slurm: a job array of the pending folds (one fold "
                                      "per task) + a dependent aggregation job, through submitit "
                                      "(famnet_pl.slurm); experiments/slurm/submit.sh takes the same options")
    slurm.add_argument("--launcher", choices=["local", "slurm"], default="local",
                       help="local (default): run here; slurm: submit to SLURM and return (see --wait)")
    slurm.add_argument("--slurm-partition", default=None, metavar="NAME",
                       help="partition (default: the cluster's)")
    slurm.add_argument("--slurm-time", type=int, default=None, metavar="MIN",
                       help="time limit per fold in minutes (default: 240 with --launcher slurm, the "
                       "template's with experiments/slurm/submit.sh); near it the fold is requeued and "
                       "resumes")
    slurm.add_argument("--slurm-gpus-per-task", type=int, default=None, metavar="G", help="GPUs per fold")
    slurm.add_argument("--slurm-cpus-per-task", type=int, default=None, metavar="C",
                       help="CPUs per fold (default: --threads, else 4); --threads defaults to it")
    slurm.add_argument("--slurm-parallelism", type=int, default=None, metavar="P",
                       help="folds running at once (the array throttle %%P; default: no limit)")
    slurm.add_argument("--slurm-folder", default=None, metavar="DIR",
                       help="submitit's job files and logs (default: <run dir>/logs/submitit)")
    slurm.add_argument("--wait", action="store_true",
                       help="wait for the jobs, then print the summary table; exit 1 if a fold is missing")
    return parser


def _loso(argv: list[str]) -> int:
    from famnet_pl.loso import run_loso

    parser = loso_parser()
    opts, cli_args = parser.parse_known_args(argv)
    if opts.launcher == "slurm":
        if opts.worker or opts.jobs != 1 or opts.gpus:
            parser.error("--launcher slurm runs one fold per SLURM task: drop --jobs/--gpus")
        from famnet_pl.slurm import SlurmOptions, submit_loso

        return submit_loso(cli_args, exp=opts.exp, runs_dir=opts.runs_dir,
                           folds=opts.folds.split(",") if opts.folds else None, wandb=opts.wandb,
                           eval_every=opts.eval_every, oracle_by=opts.oracle_by, threads=opts.threads,
                           resume_every=opts.resume_every, slurm=SlurmOptions.from_args(opts), wait=opts.wait)
    summary = run_loso(cli_args, exp=opts.exp, runs_dir=opts.runs_dir,
                       folds=opts.folds.split(",") if opts.folds else None, wandb=opts.wandb,
                       eval_every=opts.eval_every, oracle_by=opts.oracle_by, progress=not opts.no_progress,
                       jobs=opts.jobs, gpus=opts.gpus.split(",") if opts.gpus else None,
                       jobs_per_gpu=opts.jobs_per_gpu, threads=opts.threads, worker=opts.worker,
                       resume_every=opts.resume_every)
    # A deliberate subset (--folds) that finished is a success; the table says INCOMPLETE. DDP ranks
    # other than 0 report nothing and exit 0 (a non-zero exit would make Lightning kill rank 0).
    from famnet_pl.loso import rank

    return 0 if summary is not None or rank() != 0 else 1


def _fit(argv: list[str]) -> int:
    cli = build_cli(argv)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return 0


def _aggregate(argv: list[str]) -> int:
    from famnet_pl.aggregate import aggregate_run, format_summary

    parser = argparse.ArgumentParser(prog="famnet-pl aggregate")
    parser.add_argument("run_dir", help="runs/<exp>/<dataset>")
    parser.add_argument("--oracle-by", choices=["acc", "uf1"], default=None,
                        help="default: the criterion the run used (run.json)")
    opts = parser.parse_args(argv)
    run = Path(opts.run_dir) / "run.json"
    plan = json.loads(run.read_text()) if run.is_file() else {}
    summary = aggregate_run(opts.run_dir, expected_folds=plan.get("n_folds"),
                            oracle_by=opts.oracle_by or plan.get("oracle_by", "acc"))
    if summary is None:
        print(f"{opts.run_dir}: no finished fold (no fold_*/predictions.csv)", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _manifest(argv: list[str]) -> int:
    from famnet_pl.data.manifest import build_manifest
    from famnet_pl.utils.io import atomic_write_csv

    parser = argparse.ArgumentParser(prog="famnet-pl manifest",
                                     description="build, validate and write a protocol's manifest, and print "
                                                 "the validation report")
    parser.add_argument("protocol", help=f"a dataset (all its samples) or a protocol: {', '.join(sorted([*PROTOCOLS, *ALIASES]))}")
    parser.add_argument("--annotation", default=None, help="sheet (default: the pinned sheet in --root)")
    parser.add_argument("--annotations", default=None, type=json.loads,
                        help='composites: JSON {"casme2": FILE, "samm": FILE, "list": FILE}')
    parser.add_argument("--sheets-dir", default=None,
                        help="folder searched (recursively) for the protocol's pinned sheets and official list, "
                             "e.g. ../shared/annotations; no files on disk are checked")
    parser.add_argument("--root", default=None, help="data root: files on disk are checked when given")
    parser.add_argument("--layout", default="auto", help="on-disk layout (raw, cropped; default: detect)")
    parser.add_argument("--apex-fix", default="midpoint", choices=["midpoint", "flow_peak", "drop"])
    parser.add_argument("--onset-eq-apex", default="keep", choices=["keep", "fix", "drop"])
    parser.add_argument("--missing-frames", default="error", choices=["error", "drop"])
    parser.add_argument("--out", required=True, help="CSV to write, e.g. data_manifests/samm_5cls.csv")
    opts = parser.parse_args(argv)
    annotations = {**_pinned_sheets(opts.protocol, Path(opts.sheets_dir)), **(opts.annotations or {})} \
        if opts.sheets_dir else opts.annotations
    manifest, report = build_manifest(protocol=opts.protocol, root=opts.root, annotation=opts.annotation,
                                      annotations=annotations, layout=opts.layout, apex_fix=opts.apex_fix,
                                      onset_eq_apex=opts.onset_eq_apex, missing_frames=opts.missing_frames)
    # Portable: paths are relative to the data root; the sheets are named by their SHA-256.
    atomic_write_csv(opts.out, manifest.assign(sheet_sha256=report.sheet_sha256))
    print(report.format())
    print(f"wrote {opts.out}: {len(manifest)} samples, {manifest['subject'].nunique()} subjects")
    return 0


def _pinned_sheets(protocol: str, folder: Path) -> dict[str, str]:
    """{dataset or "list": path} of a protocol's pinned files found under ``folder``."""
    from famnet_pl.data.manifest import ManifestError

    proto = get_protocol(protocol)
    wanted = {p.dataset: p.sheet for p in proto.parts if p.sheet}
    if proto.sample_list is not None:
        wanted["list"] = proto.sample_list.file
    found = {}
    for key, name in wanted.items():
        hits = sorted(folder.rglob(name)) if folder.is_dir() else []
        if len(hits) != 1:
            raise ManifestError(f"{folder}: {'no' if not hits else len(hits)} files named {name} (the pinned "
                                f"{key} sheet of {protocol}) below it; point --sheets-dir at a folder with "
                                f"exactly one{'' if not hits else ': ' + ', '.join(map(str, hits[:3]))}")
        found[key] = str(hits[0])
    return found


def _data_module(dataset: str, experiments: str, data_root: str | None, extra: list[str]):
    """The DataModule of ``experiments/data/<dataset>.yaml`` (or a config path) with overrides."""
    exp = Path(experiments)
    config = Path(dataset) if dataset.endswith(".yaml") else exp / "data" / f"{dataset}.yaml"
    args = ["--config", str(exp / "base.yaml"), "--config", str(config),
            *([f"--data.data_root={data_root}"] if data_root else []), *extra]
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

    parser = argparse.ArgumentParser(prog="famnet-pl preprocess", description="fill the preprocessing cache of a "
                                     "dataset config (resumable; unknown --data.x=v options go to the config)")
    parser.add_argument("dataset", help="experiments/data/<dataset>.yaml, or a path to a data config")
    parser.add_argument("--data-root", default=None, help="dataset root (default: the config's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable sample")
    parser.add_argument("--experiments", default="experiments", help="folder of base.yaml and data/*.yaml")
    opts, rest = parser.parse_known_args(argv)
    dm = _data_module(opts.dataset, opts.experiments, opts.data_root,
                      [f"--data.preprocess_workers={opts.workers}", f"--data.strict={str(opts.strict).lower()}", *rest])
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
    from famnet_pl.sweep import main as sweep_main

    return sweep_main(argv)


def _ablation(argv: list[str]) -> int:
    from famnet_pl.ablation import main as ablation_main

    return ablation_main(argv)


def _synth(argv: list[str]) -> int:
    from famnet_pl.data import synthetic

    return synthetic.main(argv)


COMMANDS = {"loso": _loso, "fit": _fit, "aggregate": _aggregate, "manifest": _manifest, "synth": _synth,
            "fabricate": _fabricate, "preprocess": _preprocess, "show": _show, "sweep": _sweep, "ablation": _ablation}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``famnet-pl``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: famnet-pl {{{','.join(COMMANDS)}}} [options]  (famnet-pl CMD --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from famnet_pl.data.annotations import SheetError
    from famnet_pl.data.au import AUParseError
    from famnet_pl.data.protocols import ProtocolError
    from famnet_pl.data.frames import FrameError
    from famnet_pl.data.manifest import ManifestError
    from famnet_pl.aggregate import PredictionsError
    from famnet_pl.utils.errors import BadInput
    from famnet_pl.utils.io import DiskFullError
    from famnet_pl.models.components.resnet import PretrainedWeightsError
    from famnet_pl.models.registry import UnknownModelError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (SheetError, ManifestError, FrameError, AUParseError, ProtocolError, PretrainedWeightsError,
            PredictionsError, UnknownModelError) as exc:
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
