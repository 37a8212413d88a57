"""The LOSO fold runner: plan folds, run each as a fresh seeded fit, skip finished ones, aggregate.

Data flow::

    cli args --build_cli--> DataModule.subjects() = fold plan (sorted namespaced subjects)
    for each fold k not yet finished (no fold_<kk>_<subject>/predictions.csv):
        wipe any partial fold dir -> fresh FamNetCLI (--data.fold=k, seeded, new model/optimiser/
        Trainer, default_root_dir = fold dir) + LOSOCallback + per-fold logger -> trainer.fit
    aggregate_run -> runs/<exp>/<dataset>/loso_summary.json + confusion.png -> printed table

Resumability: a fold is done exactly when its ``predictions.csv`` exists (written last and
atomically by LOSOCallback). An unfinished fold continues from its epoch-boundary resume checkpoint
(``checkpoints/resume-<config hash>.ckpt``: weights, optimiser, loops, the test predictions recorded
so far and every random stream), or starts over when it has none; either way the resumed run's
summary equals an uninterrupted run's. A SLURM requeue is the same case: the array task reruns its
fold's worker command, which finds the checkpoint (Lightning's mid-epoch ``hpc_ckpt`` is ignored:
resuming mid-epoch would not reproduce the uninterrupted run).

Fold-parallel (``jobs > 1``): the plan and the preprocessing cache are made here once, then each
pending fold runs as its own ``famnet-pl loso --folds k`` process (``jobs`` at a time, each pinned
to ``threads``, default ``cores // jobs``, CPU threads; or ``jobs_per_gpu`` per GPU of ``gpus``), logging to ``logs/fold_<kk>.log``. A
fold that crashes is reported with its log and exit code and does not stop the others; rerun it
alone with ``--folds k``. The summary is aggregated here from the prediction files and equals a
sequential run's with the same ``threads`` per fold (tested: the thread count changes float
summation order, which 20 epochs of training turn into different predictions).

DDP inside a fold (``--trainer.devices N``): each fold runs in its own process, whose command line
Lightning re-runs for the other ranks; only rank 0 writes. Test predictions are split across ranks
without padding and gathered once per sample (LOSOCallback).

Headline = last epoch of a fixed epoch budget; nothing looks at the test subject to choose an epoch.
W&B: one run per fold (``group`` = ``<exp>/<dataset>``), offline unless ``wandb="online"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from famnet_pl.aggregate import FAILED_NAME, aggregate_run, finished_folds, format_summary
from famnet_pl.callbacks.loso import LOSOCallback, NonFiniteError, fold_dir_name, resume_checkpoint
from famnet_pl.callbacks.progress import EpochProgress
from famnet_pl.config import build_cli
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json, csv_bytes

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
    return WandbLogger(project=os.environ.get("WANDB_PROJECT", "famnet_pl"), group=group, name=name,
                       job_type="loso-fold", save_dir=str(fold_dir), offline=mode != "online")


def _finish_logger(logger) -> None:
    """Close a fold's W&B run so the next fold does not reuse it (WandbLogger reuses wandb.run)."""
    if type(logger).__name__ == "WandbLogger" and logger._experiment is not None:
        logger.experiment.finish()


def _git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def config_fingerprint(cli) -> str:
    """Hash of the resolved config, minus what differs between folds of one run (fold index,
    fold directory, logger), and of the validated manifest's content (every sample's label, frames,
    AUs: an edited sheet, changed official lists or drops change it): a resumed run may only reuse
    folds trained with the same config on the same annotations."""
    cfg = cli.config.clone()
    cfg.data.fold, cfg.trainer.default_root_dir, cfg.trainer.logger = 0, None, None
    digest = hashlib.sha256(cli.parser.dump(cfg, skip_check=True).encode())
    digest.update(csv_bytes(cli.datamodule.load_manifest()))
    return digest.hexdigest()[:16]


def _check_finished_folds(run_dir: Path, config_hash: str) -> None:
    for fold_dir in finished_folds(run_dir):
        theirs = json.loads((fold_dir / "metrics.json").read_text()).get("config_hash")
        if theirs != config_hash:
            raise BadInput(
                f"{fold_dir}: finished with a different config or different annotations (sheet content, "
                f"official lists, drops; hash {theirs} vs {config_hash} now); its results cannot be reused: "
                "pick another EXP= (--exp) or delete that run directory")


def worker_argv(cli_args: list[str], *, fold: str, exp: str, runs_dir: str, wandb: str, eval_every: int,
                oracle_by: str, threads: int | None = None, resume_every: int = 1) -> list[str]:
    """Arguments after ``python`` of a process that runs (or resumes) one fold of a planned run:
    the fold-parallel children, SLURM array tasks (``fold="$SLURM_ARRAY_TASK_ID"``) and DDP ranks."""
    return ["-m", "famnet_pl.cli", "loso", "--worker", "--no-progress", "--exp", exp, "--runs-dir", runs_dir,
            "--folds", fold, "--wandb", wandb, "--eval-every", str(eval_every), "--oracle-by", oracle_by,
            "--resume-every", str(resume_every), *(["--threads", str(threads)] if threads else []), *cli_args]


def _run_parallel(plan: LosoPlan, pending: list[int], *, wandb: str, eval_every: int, jobs: int,
                  gpus: list[str] | None, jobs_per_gpu: int, threads: int | None,
                  resume_every: int = 1) -> list[tuple[int, int, Path]]:
    """Run ``pending`` folds as separate processes, ``jobs`` at a time; returns the failed ones as
    ``(fold, exit code, log file)``."""
    import time

    slots = [gpu for gpu in gpus for _ in range(jobs_per_gpu)] if gpus else [None] * jobs
    threads = threads or max(1, (os.cpu_count() or 1) // len(slots))
    logs = plan.run_dir / "logs"
    logs.mkdir(exist_ok=True)
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
            log_file = logs / f"fold_{k:02d}.log"
            command = [sys.executable, *worker_argv(plan.cli_args, fold=str(k), exp=plan.exp, runs_dir=plan.runs_dir,
                                                    wandb=wandb, eval_every=eval_every, oracle_by=plan.oracle_by,
                                                    threads=threads, resume_every=resume_every)]
            with open(log_file, "a") as out:  # appended: a resumed fold keeps its earlier log
                running[slot] = (k, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env),
                                 log_file)
        time.sleep(0.2)
        for slot, (k, process, log_file) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            bar.update(1)
            if process.returncode != 0:
                failed.append((k, process.returncode, log_file))
                bar.write(f"fold {k} ({plan.subjects[k]}) failed with exit code {process.returncode}: {log_file}")
    bar.close()
    return sorted(failed)


def _select(folds: list[str] | None, subjects: list[str]) -> list[int]:
    if not folds:
        return list(range(len(subjects)))
    chosen = []
    for f in folds:
        if f.isdigit():
            if int(f) >= len(subjects):
                raise BadInput(f"--folds: fold {f} out of range: this protocol has folds 0..{len(subjects) - 1}")
            chosen.append(int(f))
        else:
            matches = [k for k, s in enumerate(subjects) if s == f or s.split("/")[-1] == f]
            if not matches:
                raise BadInput(f"--folds: no subject {f!r}; subjects: {', '.join(subjects)}")
            chosen.extend(matches)
    return sorted(set(chosen))


@dataclass
class LosoPlan:
    """A planned LOSO run: where it writes, its folds, and how to start a process for one of them."""

    cli_args: list[str]
    exp: str
    runs_dir: str
    oracle_by: str
    run_dir: Path
    subjects: list[str]
    config_hash: str
    protocol: str
    datamodule: object = field(repr=False)
    devices: int = 1

    def record(self, dropped: list[dict] | None = None) -> None:
        """Write ``run.json`` (the plan, the args, the git state, and once preprocessing has run the
        samples it left out); rank 0 only."""
        if rank() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / "run.json", {
            "exp": self.exp, "protocol": self.protocol, "args": self.cli_args, "argv": sys.argv,
            "config_hash": self.config_hash, "n_folds": len(self.subjects), "oracle_by": self.oracle_by,
            "folds": {k: s for k, s in enumerate(self.subjects)}, "git": _git_state(),
            **({"dropped": dropped} if dropped is not None else {}),
        })

    def pending(self, folds: list[str] | None = None) -> list[int]:
        """Selected folds (indices or subject ids; default all) without a ``predictions.csv``."""
        return [k for k in _select(folds, self.subjects)
                if not (self.run_dir / fold_dir_name(k, self.subjects[k]) / "predictions.csv").is_file()]


def rank() -> int:
    """This process's global rank from the launcher's environment (0 outside DDP)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def plan_loso(cli_args: list[str], *, exp: str = "famnet", runs_dir: str = "runs", oracle_by: str = "acc",
              record: bool = True) -> LosoPlan:
    """Resolve the config, list the folds, refuse to mix with folds finished under another config,
    and (``record``) write ``run.json``. Shared by the local runner, SLURM submission and workers."""
    plan_cli = build_cli([*cli_args, "--trainer.logger=false"])
    dm = plan_cli.datamodule
    subjects = dm.subjects()
    run_dir = Path(runs_dir) / exp / dm.run_name
    config_hash = config_fingerprint(plan_cli)
    _check_finished_folds(run_dir, config_hash)
    devices = plan_cli.trainer.num_devices * plan_cli.trainer.num_nodes
    plan = LosoPlan(cli_args=list(cli_args), exp=exp, runs_dir=runs_dir, oracle_by=oracle_by, run_dir=run_dir,
                    subjects=subjects, config_hash=config_hash, protocol=dm.protocol.name, datamodule=dm,
                    devices=devices)
    if record:
        plan.record()
    return plan


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


def run_fold(plan: LosoPlan, k: int, *, wandb: str = "offline", eval_every: int = 1, progress: bool = False,
             resume_every: int = 1) -> None:
    """Train fold ``k`` (or continue it from its resume checkpoint) and write its predictions."""
    fold_dir = plan.run_dir / fold_dir_name(k, plan.subjects[k])
    resume = resume_checkpoint(fold_dir, plan.config_hash)
    if resume.is_file() and rank() == 0:
        _set_aside_if_unreadable(resume, plan.run_dir / f"{fold_dir.name}-{resume.name}.corrupt",
                                 f"fold {k} ({plan.subjects[k]})")
    ckpt_path = str(resume) if resume.is_file() else None
    # Lightning's mid-epoch SLURM checkpoints are never resumed from; with ckpt_path=None under SLURM
    # it would pick one up on its own, so every rank removes them first (all ranks then agree).
    for hpc in fold_dir.glob("hpc_ckpt_*.ckpt"):
        hpc.unlink(missing_ok=True)
    if ckpt_path is None and rank() == 0:
        shutil.rmtree(fold_dir, ignore_errors=True)  # a partial fold without a resume point starts over
    elif ckpt_path:
        log.warning("fold %d (%s): resuming from %s", k, plan.subjects[k], resume)
    logger = _make_logger(wandb, fold_dir, group=f"{plan.exp}/{plan.datamodule.run_name}", name=fold_dir.name,
                          resumed=ckpt_path is not None)
    callbacks = [LOSOCallback(str(plan.run_dir), n_folds=len(plan.subjects), eval_every=eval_every,
                              oracle_by=plan.oracle_by, config_hash=plan.config_hash, resume_every=resume_every)]
    if progress:
        callbacks.append(EpochProgress(desc=f"fold {k:02d} epochs"))
    cli = build_cli([*plan.cli_args, f"--data.fold={k}", f"--trainer.default_root_dir={fold_dir}"],
                    extra_callbacks=callbacks, logger=logger)
    checkpoint = cli.trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath is None:
        checkpoint.dirpath = str(fold_dir / "checkpoints")  # not under the logger's own folders
    try:
        # Our epoch-boundary checkpoint, never Lightning's mid-epoch SLURM one: a resumed fold ends
        # exactly as an uninterrupted one would.
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=False)
    except NonFiniteError as exc:
        if rank() == 0:  # no predictions; rerunning the fold starts it over (same config, same NaN)
            resume.unlink(missing_ok=True)
            atomic_write_json(fold_dir / FAILED_NAME, {"fold": k, "subject": plan.subjects[k], "error": str(exc)})
        raise
    finally:
        _finish_logger(logger)
    if cli.trainer.interrupted:
        raise KeyboardInterrupt


def run_loso(cli_args: list[str], *, exp: str = "famnet", runs_dir: str = "runs",
             folds: list[str] | None = None, wandb: str = "offline", eval_every: int = 1,
             oracle_by: str = "acc", progress: bool = True, jobs: int = 1, gpus: list[str] | None = None,
             jobs_per_gpu: int = 1, threads: int | None = None, worker: bool = False,
             resume_every: int = 1) -> dict | None:
    """Run (or resume) a LOSO experiment and return its summary.

    Args:
        cli_args: LightningCLI arguments (``--config`` files and ``--a.b=v`` overrides).
        exp: experiment name; results go to ``<runs_dir>/<exp>/<dataset>/``.
        runs_dir: root of all runs.
        folds: fold indices or subject ids to run (default all); the summary covers every
            finished fold and lists the missing ones.
        wandb: ``off`` (CSV logs), ``offline`` or ``online``.
        eval_every: record test-subject predictions every N epochs (oracle comparison only).
        oracle_by: oracle criterion (``acc`` or ``uf1``).
        progress: show progress bars over folds and epochs.
        jobs: folds run at the same time, each in its own process (1: in this process).
        gpus: GPU ids for fold processes; ``jobs_per_gpu`` folds run on each at once.
        jobs_per_gpu: fold processes sharing one GPU (with ``gpus``).
        threads: CPU threads per fold (default: all cores, or ``cores // jobs`` per fold process).
            Training results depend on it in the last float digits, so compare runs at equal
            ``threads``: ``jobs=2`` equals ``jobs=1, threads=1`` on a 2-core machine.
        worker: this process runs folds of a run planned elsewhere (a fold-parallel parent, a SLURM
            array task, a DDP rank): no run.json, no summary print.
        resume_every: a fold saves its resume checkpoint every N epochs (0: never); a killed or
            requeued fold continues from it.

    Returns:
        The pooled summary (also in ``loso_summary.json``), or None when no fold finished.
    """
    quiet()
    if threads:
        import torch

        torch.set_num_threads(threads)
    plan = plan_loso(cli_args, exp=exp, runs_dir=runs_dir, oracle_by=oracle_by, record=not worker)
    if not worker:
        print(f"LOSO {plan.protocol}: {len(plan.subjects)} folds -> {plan.run_dir}", flush=True)
    todo, pending = _select(folds, plan.subjects), plan.pending(folds)
    # DDP inside a fold (--trainer.devices N): Lightning starts the other ranks by re-running this
    # command line, so each fold gets a process of its own whose argv names that one fold.
    ddp_parent = plan.devices > 1 and not worker and not _external_launcher()
    if pending and not worker and rank() == 0:
        # One preprocessing pass here (not one per fold process), and the samples it left out are
        # part of the run's record.
        plan.record(dropped=plan.datamodule.dropped())
    if (jobs > 1 or gpus or ddp_parent) and pending:
        failed = _run_parallel(plan, pending, wandb=wandb, eval_every=eval_every, jobs=jobs, gpus=gpus,
                               jobs_per_gpu=jobs_per_gpu, threads=threads, resume_every=resume_every)
        summary = aggregate_run(plan.run_dir, expected_folds=len(plan.subjects), oracle_by=oracle_by)
        if summary is not None:
            print("\n" + format_summary(summary), flush=True)
        for k, code, log_file in failed:
            print(f"fold {k} ({plan.subjects[k]}) FAILED (exit code {code}): see {log_file}; rerun it alone with "
                  f"FOLDS={k}", file=sys.stderr, flush=True)
        return None if failed else summary
    bar = tqdm(todo, desc="folds", position=0, disable=not progress or rank() != 0, dynamic_ncols=True)
    failed = []
    for k in bar:
        bar.set_postfix_str(f"{plan.subjects[k]}")
        if k not in pending:
            log.info("fold %d (%s) already finished: skipped", k, plan.subjects[k])
            continue
        try:
            run_fold(plan, k, wandb=wandb, eval_every=eval_every, progress=progress and rank() == 0,
                     resume_every=resume_every)
        except NonFiniteError as exc:  # this fold only: the others still run, the exit code says it
            failed.append(k)
            bar.write(f"famnet-pl loso: error: {exc}", file=sys.stderr)
    bar.close()
    if rank() != 0:
        return None
    summary = aggregate_run(plan.run_dir, expected_folds=len(plan.subjects), oracle_by=oracle_by)
    if summary is not None and not worker:
        print("\n" + format_summary(summary), flush=True)
        print(f"\nsummary: {plan.run_dir / 'loso_summary.json'}; confusion matrix: {plan.run_dir / 'confusion.png'}")
    return None if failed else summary
