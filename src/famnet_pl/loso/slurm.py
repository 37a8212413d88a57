"""LOSO on SLURM: a job array with one fold per task, then a dependent aggregation job.

Data flow (both launchers)::

    submitting process (login node, shared filesystem with the compute nodes):
        plan_loso -> <run>/run.json; pending folds = those without predictions.csv
        refuse if jobs of this run's previous submission (<run>/slurm_jobs.txt) are still queued
    [preprocessing, from run.json] -> the preprocessing cache (data.cache_dir), filled once
    job array, task = one pending fold (throttled: %P at once):
        worker_command(run_dir, k): famnet_pl.cli worker <run> --fold k  (reads run.json)
        -> <run>/fold_<kk>_<subject>/ (resumes from checkpoints/resume-<hash>.ckpt after a requeue)
    aggregation job (--dependency=afterany:<array>: runs whatever the folds' fate):
        aggregate_run -> <run>/loso_summary.json + confusion.png (the same files as a local run),
        the table, and each missing fold named with its task state and log

1. Shell (``experiments/slurm/submit.sh``, backs ``make loso-slurm``): ``python -m famnet_pl.cli
   slurm plan <famnet-pl loso options>`` prints the plan as shell variables; the script submits an
   optional preprocessing job (``slurm prepare RUN_DIR``), ``loso_array.sbatch`` and
   ``aggregate.sbatch`` (``slurm aggregate RUN_DIR``, exit 1 when a fold is missing). Requeue:
   Lightning's own, on ``--signal=USR1@90`` (it requeues the task; the rerun resumes from the fold's
   checkpoint).
2. Python (``famnet-pl loso --launcher slurm``, :func:`submit_loso`): plan and preprocessing in the
   submitting process, then submitit ``map_array`` of :class:`FoldJob` over the pending folds and
   an :class:`AggregateJob` depending on the array. submitit owns requeueing (``FoldJob.checkpoint``
   on its USR2 signal), so Lightning's auto-requeue is off in those jobs (``config._submitit_plugins``).
   ``--wait`` waits on result files and ``squeue``, not on submitit's ``sacct`` polling, which
   never returns for a cancelled job on clusters without accounting.

Every task is idempotent: a finished fold is skipped, an interrupted one continues from its
epoch-boundary checkpoint and ends byte-identical to an uninterrupted run (loso/runner.py), so a
requeue, a resubmission or a crash costs at most the epoch in progress.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famnet_pl.loso.aggregate import aggregate_run, print_summary
from famnet_pl.loso.options import LosoOptions
from famnet_pl.loso.rundir import JOBS_FILE, LOGS, SUMMARY, read_plan
from famnet_pl.utils.errors import BadInput

# Kept light: ``aggregate`` starts fast; torch and Lightning load (lazily, from loso.plan and
# loso.runner) only where a config is planned or a fold runs.

FOLD_PLACEHOLDER = "@FOLD@"   # loso_array.sbatch puts $SLURM_ARRAY_TASK_ID here
ARRAY_LOG = "fold_%2a-%A.log"  # sbatch --output pattern in <run>/logs: fold_03-1234.log
FOLD_TIME_MIN = 240           # submitit's own default is 5 minutes
FOLD_CPUS = 4


def array_log(log_dir: Path, fold: int, array_job: str) -> Path:
    """The log of fold ``fold`` in array ``array_job`` of the shell path (:data:`ARRAY_LOG`)."""
    return log_dir / ARRAY_LOG.replace("%2a", f"{fold:02d}").replace("%A", str(array_job))


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of the fold tasks; None leaves the cluster's (or the sbatch template's) default."""

    partition: str | None = None
    time_min: int | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    parallelism: int | None = None
    folder: str | None = None

    @classmethod
    def from_args(cls, opts: argparse.Namespace) -> SlurmOptions:
        """From ``famnet-pl loso``'s ``--slurm-*`` options (options.loso_parser)."""
        return cls(partition=opts.slurm_partition, time_min=opts.slurm_time,
                   gpus_per_task=opts.slurm_gpus_per_task, cpus_per_task=opts.slurm_cpus_per_task,
                   parallelism=opts.slurm_parallelism, folder=opts.slurm_folder)

    def sbatch_flags(self, *, threads: int | None) -> list[str]:
        """sbatch options of the fold array (shell path): only those given, so the template's
        ``#SBATCH`` lines stay the defaults."""
        cpus = self.cpus_per_task or threads
        return [*([f"--partition={self.partition}"] if self.partition else []),
                *([f"--time={self.time_min}"] if self.time_min else []),
                *([f"--gpus-per-task={self.gpus_per_task}"] if self.gpus_per_task else []),
                *([f"--cpus-per-task={cpus}"] if cpus else [])]


def quiet() -> None:
    """Planning happens in the submitting process (a login node): the runner's noise filters."""
    from famnet_pl.loso.runner import quiet as runner_quiet

    runner_quiet()


def _refuse_ddp(plan) -> None:
    """One fold per single-task array job: DDP inside a fold (``--trainer.devices N``) would need
    ``--ntasks-per-node=N`` per task, which neither path sets up yet."""
    if plan.devices > 1:
        raise BadInput(f"{plan.devices} devices per fold (--trainer.devices/num_nodes): the SLURM paths run "
                       "one single-device task per fold; drop --trainer.devices (run folds in parallel "
                       "instead) or use DDP locally (make loso ARGS=--trainer.devices=N)")


def require_slurm() -> None:
    """One clear line instead of a FileNotFoundError deep inside submitit or a shell script."""
    missing = [exe for exe in ("sbatch", "squeue", "scontrol") if shutil.which(exe) is None]
    if missing:
        raise BadInput(f"{', '.join(missing)} not found: install the SLURM client (Debian: apt "
                       "install slurm-client) and its config, or submit from a cluster login node")


def queued_jobs(run_dir: Path) -> list[str]:
    """Jobs of this run's previous submission still pending or running: submitting its folds again
    now would start a second process on the same fold directory."""
    recorded = (run_dir / JOBS_FILE).read_text().split() if (run_dir / JOBS_FILE).is_file() else []
    if not recorded:
        return []
    out = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%F %i"], capture_output=True, text=True,
                         timeout=60).stdout
    live = {word for line in out.splitlines() for word in line.split()}  # array ids and task ids
    return [job for job in recorded if job in live]


def _refuse_if_queued(run_dir: Path) -> None:
    if jobs := queued_jobs(run_dir):
        raise BadInput(f"{run_dir}: jobs {', '.join(jobs)} of an earlier submission are "
                       f"still queued or running (squeue -j {','.join(jobs)}); wait for them or scancel "
                       "them, then submit again")


def task_states(array_job: str) -> dict[str, str]:
    """``{"<array>_<task>": "FAILED (exit 1:0, 0 restarts)"}`` from ``scontrol show job`` (finished
    jobs stay there for MinJobAge, 300 s by default: enough for the aggregation job that follows);
    empty when SLURM no longer knows the job."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(array_job)], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in out.splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if f.get("ArrayTaskId", "").isdigit():
            states[f"{f['ArrayJobId']}_{f['ArrayTaskId']}"] = (f"{f.get('JobState', '?')} (exit "
                                                                f"{f.get('ExitCode', '?')}, "
                                                                f"{f.get('Restarts', '?')} restarts)")
    return states


def report(run_dir: str | Path, *, submitted: list[int] | None = None, tasks: dict[int, str] | None = None,
           logs: dict[int, list[Path]] | None = None) -> int:
    """Aggregate a run as a local run does (``loso_summary.json``, ``confusion.png``, the printed
    table) and name each missing fold on stderr: subject, SLURM task and state, log files.

    Args:
        run_dir: ``runs/<exp>/<dataset>`` (its ``run.json`` gives the fold count and subjects).
        submitted: the folds this submission ran (None: all folds).
        tasks: fold -> SLURM job id of the task that ran it (``<array>_<task>``), for its state.
        logs: fold -> its log files.

    Returns:
        Exit status: 1 when no fold finished or a submitted fold is missing; 0 otherwise (a
        deliberate subset that finished is a success, as with a local ``--folds`` run; the table
        still says INCOMPLETE).
    """
    run_dir = Path(run_dir)
    plan = read_plan(run_dir)
    n_folds, subjects = plan["n_folds"], plan["folds"]
    summary = aggregate_run(run_dir, expected_folds=n_folds, oracle_by=plan.get("oracle_by", "acc"))
    print_summary(summary, run_dir)
    missing = [k for k in range(n_folds) if summary is None or k not in summary["folds_done"]]
    tasks, logs = tasks or {}, logs or {}
    states: dict[str, str] = {}
    for array in sorted({t.split("_")[0] for t in tasks.values()}):
        states.update(task_states(array))
    failed = [k for k in missing if submitted is None or k in submitted]
    for k in missing:
        task = tasks.get(k)
        where = f"task {task}: {states.get(task, 'state unknown')}" if task else \
            "task unknown" if k in failed else "not submitted (not among --folds)"
        files = ", ".join(str(p) for p in logs.get(k, []) if p.exists()) or "no log"
        print(f"fold {k} ({subjects[str(k)]}) missing: {where}; log: {files}", file=sys.stderr, flush=True)
    if failed:
        print(f"FAILED: folds {failed} did not finish; submit again to run only the missing folds (finished "
              "folds are kept, interrupted ones resume)", file=sys.stderr, flush=True)
    return 1 if failed or summary is None else 0


# --------------------------------------------------------------------------------------------
# Python launcher (submitit)
# --------------------------------------------------------------------------------------------

@dataclass
class FoldJob:
    """One fold in a SLURM task (submitit pickles this object and calls it there).

    ``checkpoint`` is what makes submitit requeue the task on timeout or preemption instead of
    failing it: nothing needs saving at that moment, since the fold's epoch-boundary resume
    checkpoint is already on disk and the rerun (:func:`~famnet_pl.loso.runner.run_worker`, which
    reads the plan from ``run.json``) continues from it.
    """

    run_dir: str
    threads: int
    cwd: str  # config files, data_root and runs_dir may be relative to where the user submitted

    def __call__(self, fold: int) -> int:
        from famnet_pl.loso.runner import run_worker

        os.chdir(self.cwd)
        if run_worker(self.run_dir, fold, threads=self.threads):
            raise RuntimeError(f"fold {fold} of {self.run_dir} failed (see the error above)")
        return fold

    def checkpoint(self, fold: int) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, fold)


@dataclass
class AggregateJob:
    """The dependent aggregation job: writes ``loso_summary.json``, prints the table and the
    missing folds to its log, and fails (a visible FAILED state) when a submitted fold is missing."""

    run_dir: str
    cwd: str
    tasks: dict[int, str]
    logs: dict[int, list[str]]

    def __call__(self) -> None:
        os.chdir(self.cwd)
        if report(self.run_dir, submitted=list(self.tasks), tasks=self.tasks,
                  logs={k: [Path(p) for p in v] for k, v in self.logs.items()}):
            raise RuntimeError(f"LOSO run {self.run_dir}: a fold did not finish (see above)")


def _executor(folder: Path, *, name: str, time_min: int, cpus: int, partition: str | None,
              gpus_per_task: int | None = None, parallelism: int | None = None,
              dependency: str | None = None) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    params: dict[str, Any] = {"name": name, "timeout_min": time_min, "cpus_per_task": cpus,
                              "tasks_per_node": 1, "nodes": 1}
    if partition:
        params["slurm_partition"] = partition
    if gpus_per_task:
        params["slurm_gpus_per_task"] = gpus_per_task
    if parallelism:
        params["slurm_array_parallelism"] = parallelism
    if dependency:
        params["slurm_dependency"] = dependency
    executor.update_parameters(**params)
    return executor


def _wait(jobs: list, *, poll_s: float = 2.0, grace_s: float = 15.0) -> None:
    """Until each job has written its result file or has been out of the queue for ``grace_s``
    without one (cancelled, killed, out of time). Not ``job.wait()``: without SLURM accounting
    submitit learns a job's state only from ``sacct``, so it would wait forever for a job that died
    without a result. The grace covers a result file that shows up just after the job left."""
    gone: dict[str, float] = {}
    while True:
        queued = set(subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i"], capture_output=True,
                                    text=True, timeout=60).stdout.split())
        now, open_jobs = time.time(), []
        for job in jobs:
            if job.paths.result_pickle.exists():
                continue
            if job.job_id in queued:
                gone.pop(job.job_id, None)  # back in the queue (requeued)
                open_jobs.append(job)
            elif now - gone.setdefault(job.job_id, now) < grace_s:
                open_jobs.append(job)
        if not open_jobs:
            return
        time.sleep(poll_s)


def _failure(job) -> str | None:
    """Why a finished fold job has no fold result, in one line (None: it succeeded)."""
    if not job.paths.result_pickle.exists():
        return f"no result (cancelled, killed or out of time); log: {job.paths.stderr}"
    error = job.exception()  # returns at once: the result file exists
    if error is None:
        return None
    last = [line for line in str(error).splitlines() if line.strip()]
    return f"{last[-1] if last else type(error).__name__}; log: {job.paths.stderr}"


def _plan_for_slurm(cli_args: list[str], options: LosoOptions):
    """Plan in the submitting process; run.json is written only once it is clear that no job of an
    earlier submission still uses it."""
    from famnet_pl.loso.plan import plan_loso

    require_slurm()
    quiet()
    plan = plan_loso(cli_args, options, record=False)
    _refuse_if_queued(plan.run_dir)
    _refuse_ddp(plan)
    plan.record()
    return plan


def submit_loso(cli_args: list[str], options: LosoOptions = LosoOptions(), *,
                slurm: SlurmOptions = SlurmOptions(), wait: bool = False) -> int:
    """``famnet-pl loso --launcher slurm``: submit the pending folds of a run as a submitit job
    array plus a dependent aggregation job; with ``wait``, wait and print the summary table.

    The plan (``run.json``) and the preprocessing cache are made here, in the submitting process:
    the jobs read them through the shared filesystem (so the cache dir and the runs dir must be on
    it), and no fold process repeats the preprocessing.

    Returns:
        Exit status: 0 when submitted (with ``wait``: when every submitted fold finished), else 1.
    """
    plan = _plan_for_slurm(cli_args, options)
    run_dir = plan.run_dir
    pending = plan.pending(options.folds)
    print(f"LOSO {plan.protocol}: {len(plan.subjects)} folds -> {run_dir}; pending: {pending or 'none'}",
          flush=True)
    if not pending:
        return report(run_dir, submitted=[])
    plan.datamodule.prepare()  # once, here; the fold tasks find the cache filled
    cpus = slurm.cpus_per_task or options.threads or FOLD_CPUS
    folder = Path(slurm.folder or run_dir / LOGS / "submitit").resolve()
    fold_job = FoldJob(run_dir=str(run_dir), threads=options.threads or cpus, cwd=os.getcwd())
    executor = _executor(folder, name=f"loso-{options.exp}", time_min=slurm.time_min or FOLD_TIME_MIN,
                         cpus=cpus, partition=slurm.partition, gpus_per_task=slurm.gpus_per_task,
                         parallelism=slurm.parallelism)
    jobs = executor.map_array(fold_job, pending)
    array = jobs[0].job_id.split("_")[0]
    aggregate = AggregateJob(run_dir=str(run_dir), cwd=os.getcwd(),
                             tasks={k: j.job_id for k, j in zip(pending, jobs)},
                             logs={k: [str(j.paths.stdout), str(j.paths.stderr)]
                                   for k, j in zip(pending, jobs)})
    agg_job = _executor(folder, name=f"loso-{options.exp}-aggregate", time_min=15, cpus=1,
                        partition=slurm.partition, dependency=f"afterany:{array}").submit(aggregate)
    (run_dir / JOBS_FILE).write_text(f"{array} {agg_job.job_id}\n")
    print(f"submitted: fold array {array} ({len(pending)} tasks), aggregation {agg_job.job_id} "
          f"(after the array); logs in {folder}", flush=True)
    if not wait:
        print(f"follow: squeue -j {array},{agg_job.job_id}; result: {run_dir / SUMMARY} "
              f"(or famnet-pl aggregate {run_dir})", flush=True)
        return 0
    try:
        _wait([*jobs, agg_job])
    except KeyboardInterrupt:
        print(f"\nstopped waiting; the jobs keep running (squeue -j {array},{agg_job.job_id}; scancel "
              "to stop them)", file=sys.stderr)
        return 130
    # Read the folds' files here (the aggregation job wrote the same summary from them).
    summary = aggregate_run(run_dir, expected_folds=len(plan.subjects), oracle_by=options.oracle_by,
                            write=False)
    if summary is not None:
        print_summary(summary, run_dir)
    failed = [(k, why) for k, job in zip(pending, jobs) if (why := _failure(job)) is not None]
    for k, why in failed:
        print(f"fold {k} ({plan.subjects[k]}) FAILED: {why}", file=sys.stderr, flush=True)
    missing = [k for k in pending if summary is None or k not in summary["folds_done"]]
    if missing:
        print(f"FAILED: folds {missing} did not finish; submit again to run only the missing folds (finished "
              "folds are kept, interrupted ones resume)", file=sys.stderr, flush=True)
    return 1 if missing else 0


# --------------------------------------------------------------------------------------------
# Shell launcher helpers: famnet-pl slurm {plan,prepare,aggregate}
# --------------------------------------------------------------------------------------------

def _shell(name: str, value: str | list[str]) -> str:
    if isinstance(value, list):
        return f"{name}=({' '.join(shlex.quote(v) for v in value)})"
    return f"{name}={shlex.quote(value)}"


def plan_shell(argv: list[str]) -> str:
    """What experiments/slurm/submit.sh needs, as shell assignments for ``eval``. ``argv``: the
    options of ``famnet-pl loso`` (``--exp``, ``--folds``, ``--threads``, ``--slurm-*``, ...) and
    the LightningCLI arguments. Writes ``run.json``; refuses while an earlier submission of this run
    is still queued."""
    from famnet_pl.loso.options import loso_parser
    from famnet_pl.loso.runner import worker_command

    parser = loso_parser()
    parser.prog = "experiments/slurm/submit.sh"
    opts, cli_args = parser.parse_known_args(argv)
    if opts.launcher != "local" or opts.wait or opts.slurm_folder or opts.jobs != 1 or opts.gpus:
        parser.error("--launcher/--wait/--slurm-folder/--jobs/--gpus are not for submit.sh (it submits "
                     "sbatch jobs and returns; famnet-pl loso --launcher slurm --wait is the Python way)")
    options = LosoOptions.from_args(opts)
    plan = _plan_for_slurm(cli_args, options)
    run_dir = plan.run_dir.resolve()
    slurm = SlurmOptions.from_args(opts)
    py = sys.executable  # the jobs run the same interpreter (absolute path: no venv activation needed)
    pending = plan.pending(options.folds)
    fold_flags = slurm.sbatch_flags(threads=options.threads)
    job_flags = [f for f in fold_flags if f.startswith("--partition=")]  # preprocessing and aggregation
    return "\n".join([
        _shell("RUN_DIR", str(run_dir)),
        _shell("N_FOLDS", str(len(plan.subjects))),
        _shell("PENDING", ",".join(map(str, pending))),
        _shell("JOB_NAME", f"loso-{options.exp}"),
        _shell("LOG_DIR", str(run_dir / LOGS)),
        _shell("ARRAY_LOG", str(run_dir / LOGS / ARRAY_LOG)),
        _shell("JOBS_FILE", str(run_dir / JOBS_FILE)),
        _shell("PARALLEL", str(slurm.parallelism or "")),
        _shell("FOLD_FLAGS", fold_flags),
        _shell("JOB_FLAGS", job_flags),
        _shell("WORKER", worker_command(run_dir, FOLD_PLACEHOLDER, threads=options.threads)),
        _shell("PREPARE", [py, "-m", "famnet_pl.cli", "slurm", "prepare", str(run_dir)]),
        _shell("AGGREGATE", [py, "-m", "famnet_pl.cli", "slurm", "aggregate", str(run_dir)]),
    ])


def prepare(run_dir: str | Path) -> None:
    """The preprocessing job: fill the cache of the run planned in ``run_dir`` once, before the folds."""
    from famnet_pl.config import build_cli
    from famnet_pl.loso.plan import LosoPlan

    quiet()
    plan = LosoPlan.load(run_dir)
    dm = build_cli([*plan.cli_args, "--trainer.logger=false"]).datamodule
    if not dm.hparams.preprocess_workers and os.environ.get("SLURM_CPUS_PER_TASK", "1") != "1":
        # Use the CPUs this job was given; not a config override, which would change the run's config hash.
        dm.hparams.preprocess_workers = int(os.environ["SLURM_CPUS_PER_TASK"])
    prepared = dm.prepare()
    print(f"preprocessed {plan.protocol}: {len(prepared.ok)} samples ({prepared.built} built, "
          f"{prepared.cached} cached), {len(prepared.failures)} left out", flush=True)


def main(argv: list[str] | None = None) -> int:
    """``famnet-pl slurm {plan,prepare,aggregate} ...`` (called by experiments/slurm/)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = ("plan", "prepare", "aggregate")
    if not argv or argv[0] not in commands:
        print(f"usage: famnet-pl slurm {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    if argv[0] == "plan":
        print(plan_shell(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(prog=f"famnet-pl slurm {argv[0]}")
    parser.add_argument("run_dir", help="the planned run (its run.json)")
    if argv[0] == "prepare":
        prepare(parser.parse_args(argv[1:]).run_dir)
        return 0
    parser.description = "aggregate a run; name the missing folds; exit 1 if any"
    parser.add_argument("--array-job", default=None, help="the fold array of the shell path (task id = fold)")
    parser.add_argument("--folds", default=None, help="comma-separated folds submitted (default: all count)")
    opts = parser.parse_args(argv[1:])
    run_dir = Path(opts.run_dir)
    submitted = None if opts.folds is None else [int(k) for k in opts.folds.split(",") if k]
    tasks = {k: f"{opts.array_job}_{k}" for k in submitted or []} if opts.array_job else {}
    logs = {k: [array_log(run_dir / LOGS, k, opts.array_job)] for k in tasks}
    return report(run_dir, submitted=submitted, tasks=tasks, logs=logs)
