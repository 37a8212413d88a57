"""The LOSO fold runner: run each planned fold as a fresh seeded fit, skip finished ones, aggregate.

Data flow::

    run_loso(cli_args, LosoOptions)
        plan_loso -> LosoPlan (folds, run_dir, fingerprint) -> run.json                   (plan.py)
        for each fold k not yet finished (no fold_<kk>_<subject>/predictions.csv):
            run_fold(plan, k): wipe any partial fold dir -> fresh FamNetCLI (--data.fold=k, seeded,
            new model/optimiser/Trainer, default_root_dir = fold dir) + LOSOCallback(fold dir) +
            per-fold logger -> trainer.fit
        aggregate_run -> loso_summary.json + confusion.png -> print_summary          (aggregate.py)
    run_worker(run_dir, k)   <- ``famnet-pl worker RUN_DIR --fold k``: LosoPlan.load(run.json) -> run_fold

Resumability: a fold is done exactly when its ``predictions.csv`` exists (written last and
atomically by LOSOCallback). An unfinished fold continues from its epoch-boundary resume checkpoint
(``checkpoints/resume-<config hash>.ckpt``: weights, optimiser, loops, the test predictions recorded
so far and every random stream), or starts over when it has none; either way the resumed run's
summary equals an uninterrupted run's. A SLURM requeue is the same case: the array task reruns its
fold's worker command, which finds the checkpoint (Lightning's mid-epoch ``hpc_ckpt`` is ignored:
resuming mid-epoch would not reproduce the uninterrupted run).

Fold-parallel (``jobs > 1``): the plan and the preprocessing cache are made here once, then each
pending fold runs as its own worker process (``jobs`` at a time, each pinned to ``threads``, default
``cores // jobs``, CPU threads; or ``jobs_per_gpu`` per GPU of ``gpus``), logging to
``logs/fold_<kk>.log``. A fold that crashes is reported with its log and exit code and does not stop
the others; rerun it alone with ``--folds k``. The summary is aggregated here from the prediction
files and equals a sequential run's with the same ``threads`` per fold (tested: the thread count
changes float summation order, which 20 epochs of training turn into different predictions).

DDP inside a fold (``--trainer.devices N``): each fold runs in its own worker process, whose command
line Lightning re-runs for the other ranks; only rank 0 writes. Test predictions are split across
ranks without padding and gathered once per sample (LOSOCallback).

Headline = last epoch of a fixed epoch budget; nothing looks at the test subject to choose an epoch.
W&B: one run per fold (``group`` = ``<exp>/<dataset>``), offline unless ``wandb="online"``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from famnet_pl.config import build_cli
from famnet_pl.loso.aggregate import aggregate_run, print_summary
from famnet_pl.loso.callback import LOSOCallback, NonFiniteError
from famnet_pl.loso.options import DEFAULT_WANDB_PROJECT, LosoOptions
from famnet_pl.loso.plan import LosoPlan, config_fingerprint, plan_loso, rank, select_folds
from famnet_pl.loso.progress import EpochProgress
from famnet_pl.loso.rundir import (
    FAILED,
    HPC_CHECKPOINTS,
    RUN_JSON,
    corrupt_checkpoint,
    fold_log,
    resume_checkpoint,
)
from famnet_pl.loso.stacked import run_stacked
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json

log = logging.getLogger(__name__)

# Known-harmless noise that would repeat once per fold (../shared/notes/stack.md, section 5).
_NOISE = (r".*LeafSpec.*", r".*Total length of .* across ranks is zero.*",
          r".*does not have many workers.*", r".*anonymous setting has no effect.*",
          # A machine with the SLURM client installed, running outside a SLURM job (a login node).
          r".*The `srun` command is available on your system but is not used.*")


def quiet() -> None:
    """Per-fold Lightning banners (GPU available, litlogger tip) to WARNING; drop known noise."""
    import warnings

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _make_logger(mode: str, fold_dir: Path, group: str, name: str, *, resumed: bool = False):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    if mode == "off":
        # A resumed fold logs into resumed_<n>/: CSVLogger would overwrite the first part's metrics.csv.
        version = f"resumed_{len(list(fold_dir.glob('resumed_*'))) + 1}" if resumed else ""
        return CSVLogger(save_dir=fold_dir, name="", version=version)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(project=os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT), group=group, name=name,
                       job_type="loso-fold", save_dir=str(fold_dir), offline=mode != "online")


def _finish_logger(logger) -> None:
    """Close a fold's W&B run so the next fold does not reuse it (WandbLogger reuses wandb.run)."""
    if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
        logger.experiment.finish()


def worker_command(run_dir: str | Path, fold: int | str, *, threads: int | None = None) -> list[str]:
    """The command of a process that runs (or resumes) fold ``fold`` of the run planned in
    ``run_dir`` (its ``run.json``): fold-parallel children, SLURM array tasks (``fold="@FOLD@"``,
    replaced by the task id) and, through Lightning re-running it, DDP ranks."""
    return [sys.executable, "-m", "famnet_pl.cli", "worker", str(run_dir), "--fold", str(fold),
            *(["--threads", str(threads)] if threads else [])]


def _run_parallel(plan: LosoPlan, pending: list[int]) -> list[tuple[int, int, Path]]:
    """Run ``pending`` folds as worker processes, ``jobs`` (or ``jobs_per_gpu`` per GPU) at a time;
    returns the failed ones as ``(fold, exit code, log file)``."""
    import time

    options = plan.options
    slots = [gpu for gpu in options.gpus for _ in range(options.jobs_per_gpu)] if options.gpus \
        else [None] * options.jobs
    threads = options.threads or max(1, (os.cpu_count() or 1) // len(slots))
    queue, running, failed = list(pending), {}, []
    bar = tqdm(total=len(pending), desc=f"folds ({len(slots)} at a time)", dynamic_ncols=True)
    while queue or running:
        for slot in [s for s in range(len(slots)) if s not in running]:
            if not queue:
                break
            k = queue.pop(0)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if slots[slot] is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slots[slot])
            log_file = fold_log(plan.run_dir, k)
            log_file.parent.mkdir(exist_ok=True)
            with open(log_file, "a") as out:  # appended: a resumed fold keeps its earlier log
                process = subprocess.Popen(worker_command(plan.run_dir, k, threads=threads), stdout=out,
                                           stderr=subprocess.STDOUT, env=env)
            running[slot] = (k, process, log_file)
        time.sleep(0.2)
        for slot, (k, process, log_file) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            bar.update(1)
            if process.returncode != 0:
                failed.append((k, process.returncode, log_file))
                bar.write(f"fold {k} ({plan.subjects[k]}) failed with exit code {process.returncode}: "
                          f"{log_file}")
    bar.close()
    return sorted(failed)


def _external_launcher() -> bool:
    """Ranks are started by SLURM (srun) or torchrun, not by Lightning from this process."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def _set_aside_if_unreadable(checkpoint: Path, corrupt: Path, fold: str) -> None:
    """A resume checkpoint that does not load (cut short by a full disk or a crash on another
    filesystem) is renamed ``*.corrupt`` beside the fold (which then starts over), not retried forever."""
    import torch

    try:
        torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # torch's zip reader, unpickling and EOF errors alike
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        os.replace(checkpoint, corrupt)
        log.warning("%s: resume checkpoint %s does not load (%s: %s); set aside as %s, the fold starts over",
                    fold, checkpoint, type(exc).__name__, detail, corrupt)


def run_fold(plan: LosoPlan, k: int, *, progress: bool = False) -> None:
    """Train fold ``k`` (or continue it from its resume checkpoint) and write its predictions."""
    options, fold_dir = plan.options, plan.fold_dir(k)
    resume = resume_checkpoint(fold_dir, plan.config_hash)
    if resume.is_file() and rank() == 0:
        _set_aside_if_unreadable(resume, corrupt_checkpoint(plan.run_dir, fold_dir, resume),
                                 f"fold {k} ({plan.subjects[k]})")
    ckpt_path = str(resume) if resume.is_file() else None
    # Lightning's mid-epoch SLURM checkpoints are never resumed from; with ckpt_path=None under SLURM
    # it would pick one up on its own, so every rank removes them first (all ranks then agree).
    for hpc in fold_dir.glob(HPC_CHECKPOINTS):
        hpc.unlink(missing_ok=True)
    if ckpt_path is None and rank() == 0:
        shutil.rmtree(fold_dir, ignore_errors=True)  # a partial fold without a resume point starts over
    elif ckpt_path:
        log.warning("fold %d (%s): resuming from %s", k, plan.subjects[k], resume)
    logger = _make_logger(options.wandb, fold_dir, group=f"{options.exp}/{plan.run_dir.name}",
                          name=fold_dir.name, resumed=ckpt_path is not None)
    callbacks = [LOSOCallback(fold_dir, k, n_folds=len(plan.subjects), eval_every=options.eval_every,
                              oracle_by=options.oracle_by, config_hash=plan.config_hash,
                              resume_every=options.resume_every, keep_model=options.keep_models)]
    if progress:
        callbacks.append(EpochProgress(desc=f"fold {k:02d} epochs"))
    cli = build_cli([*plan.cli_args, f"--data.fold={k}", f"--trainer.default_root_dir={fold_dir}"],
                    extra_callbacks=callbacks, logger=logger)
    # A worker builds its fold from run.json's arguments, whose config files and sheets are read
    # as they are now: a fold never trains under another config than the one its run was planned with.
    now = config_fingerprint(cli, options)
    if now != plan.config_hash:
        _finish_logger(logger)
        raise BadInput(f"fold {k} ({plan.subjects[k]}): the config files or annotations changed since the "
                       f"run was planned (hash {plan.config_hash} in {plan.run_dir / RUN_JSON}, {now} now); "
                       "restore them, or start the run under another EXP= (--exp)")
    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath is None:
        checkpoint.dirpath = str(resume.parent)  # not under the logger's own folders
    try:
        # Our epoch-boundary checkpoint, never Lightning's mid-epoch SLURM one: a resumed fold ends
        # exactly as an uninterrupted one would.
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=False)
    except NonFiniteError as exc:
        if rank() == 0:  # no predictions; rerunning the fold starts it over (same config, same NaN)
            resume.unlink(missing_ok=True)
            atomic_write_json(fold_dir / FAILED, {"fold": k, "subject": plan.subjects[k], "error": str(exc)})
        raise
    finally:
        _finish_logger(logger)
    if cli.trainer.interrupted:
        raise KeyboardInterrupt


def warn_if_busy() -> float | None:
    """Warn when the machine's 1-minute load already exceeds its cores (another job is running:
    every process here gets less than its share, and timings are not comparable); the load."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    cores = os.cpu_count() or 1
    if load > cores:
        log.warning("the machine's load (%.1f) already exceeds its %d cores: this run shares them with other "
                    "jobs, so it runs slower and its timings are not comparable (see `uptime`; --threads "
                    "sets this run's threads per fold)", load, cores)
    return load


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_worker(run_dir: str | Path, fold: int, *, threads: int | None = None) -> int:
    """Run one fold of the run planned in ``run_dir`` (``famnet-pl worker``): the plan comes from
    ``run.json``, never from a new planning pass. Returns the exit status (1: the fold failed on a
    non-finite loss or output; 0 on DDP ranks other than 0, which report nothing)."""
    quiet()
    plan = LosoPlan.load(run_dir)
    _set_threads(threads or plan.options.threads)
    (k,) = select_folds([str(fold)], plan.subjects)
    if k not in plan.pending([str(k)]):  # a requeued or resubmitted task of a finished fold
        log.info("fold %d (%s) already finished: skipped", k, plan.subjects[k])
        return 0
    try:
        run_fold(plan, k)
    except NonFiniteError as exc:
        print(f"famnet-pl worker: error: {exc}", file=sys.stderr, flush=True)
        return 1 if rank() == 0 else 0
    return 0


def run_loso(cli_args: list[str], options: LosoOptions | None = None, **overrides) -> dict | None:
    """Run (or resume) a LOSO experiment and return its summary.

    Args:
        cli_args: LightningCLI arguments (``--config`` files and ``--a.b=v`` overrides).
        options: the runner's options (:class:`LosoOptions`; default: its defaults).
        **overrides: fields of ``options`` to change, e.g. ``run_loso(args, exp="x", folds=["0"])``.

    Returns:
        The pooled summary (also in ``loso_summary.json``), or None when no fold finished or a
        fold failed.
    """
    options = replace(options or LosoOptions(), **overrides)
    quiet()
    warn_if_busy()
    _set_threads(options.threads)
    plan = plan_loso(cli_args, options)
    print(f"LOSO {plan.protocol}: {len(plan.subjects)} folds -> {plan.run_dir}", flush=True)
    todo, pending = select_folds(options.folds, plan.subjects), plan.pending(options.folds)
    # DDP inside a fold (--trainer.devices N): Lightning starts the other ranks by re-running this
    # command line, so each fold gets a process of its own whose argv names that one fold.
    ddp_parent = plan.devices > 1 and not _external_launcher()
    if pending and rank() == 0:
        # One preprocessing pass here (not one per fold process), and the samples it left out are
        # part of the run's record.
        plan.record(dropped=plan.datamodule.dropped())
    if options.stack_folds and pending:
        if options.jobs > 1 or options.gpus or ddp_parent:
            raise BadInput("--stack-folds trains every pending fold in this one process: drop --jobs, --gpus "
                           "and --trainer.devices")
        failed = run_stacked(plan, pending, progress=options.progress)
        for k in failed:
            print(f"famnet-pl loso: error: fold {k} ({plan.subjects[k]}): non-finite training loss; see "
                  f"{plan.fold_dir(k) / FAILED}", file=sys.stderr, flush=True)
        return _summarise(plan, failed)
    if (options.jobs > 1 or options.gpus or ddp_parent) and pending:
        failed = _run_parallel(plan, pending)
        summary = aggregate_run(plan.run_dir, expected_folds=len(plan.subjects), oracle_by=options.oracle_by)
        print_summary(summary, plan.run_dir, files=False)
        for k, code, log_file in failed:
            print(f"fold {k} ({plan.subjects[k]}) FAILED (exit code {code}): see {log_file}; rerun it alone "
                  f"with FOLDS={k}", file=sys.stderr, flush=True)
        return None if failed else summary
    workers = plan.datamodule.hparams.num_workers
    if not options.threads and workers:  # this process and its DataLoader workers share the cores
        _set_threads(max(1, (os.cpu_count() or 1) // (1 + workers)))
    bar = tqdm(todo, desc="folds", position=0, disable=not options.progress or rank() != 0,
               dynamic_ncols=True)
    failed = []
    for k in bar:
        bar.set_postfix_str(f"{plan.subjects[k]}")
        if k not in pending:
            log.info("fold %d (%s) already finished: skipped", k, plan.subjects[k])
            continue
        try:
            run_fold(plan, k, progress=options.progress and rank() == 0)
        except NonFiniteError as exc:  # this fold only: the others still run, the exit code says it
            failed.append(k)
            bar.write(f"famnet-pl loso: error: {exc}", file=sys.stderr)
    bar.close()
    return _summarise(plan, failed) if rank() == 0 else None


def _summarise(plan: LosoPlan, failed: list[int]) -> dict | None:
    """Aggregate the run, print its summary; None when a fold failed (or none finished)."""
    summary = aggregate_run(plan.run_dir, expected_folds=len(plan.subjects), oracle_by=plan.options.oracle_by)
    if summary is not None:
        print_summary(summary, plan.run_dir)
    return None if failed else summary
