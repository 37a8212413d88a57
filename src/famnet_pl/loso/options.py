"""The LOSO runner's own options (everything that is not LightningCLI config), parsed once.

Data flow::

    famnet-pl loso --exp x --jobs 2 ... --config a.yaml --model.lr=1e-3
        loso_parser().parse_known_args -> (Namespace, cli_args)
        LosoOptions.from_args(Namespace) -> run_loso(cli_args, options)  (runner.py)
                                         -> run.json "options" (plan.py) -> workers read it back
        SlurmOptions.from_args(Namespace) (slurm.py; the --slurm-* group)

``LosoOptions`` is the one place these options are named: the runner, the fold workers, the SLURM
paths, the sweeps and the ablation pass the object, not the fields one by one. Of them, only
``eval_every``, ``keep_models`` and ``stack_folds`` change what a fold writes (which epochs
``predictions_epochs.csv`` holds, whether it keeps its model, how it was trained), so they are part
of the run's fingerprint (:meth:`LosoOptions.fingerprint`); the others change where, how fast or
how the pool is read, and a resumed run may change them.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_WANDB_PROJECT = "famnet_pl"  # per-fold W&B runs and sweep trials share it ($WANDB_PROJECT wins)


@dataclass(frozen=True)
class LosoOptions:
    """Options of one LOSO run.

    Args:
        exp: experiment name; results go to ``<runs_dir>/<exp>/<dataset>/``.
        runs_dir: root of all runs.
        folds: fold indices or subject ids to run (None: all); the summary covers every finished
            fold and lists the missing ones.
        wandb: ``off`` (CSV logs), ``offline`` or ``online``: one W&B run per fold.
        eval_every: record inner-validation and test-subject predictions every N epochs (and at the
            last): the epochs validation selection can choose, and the oracle comparison.
        oracle_by: oracle criterion (``acc`` or ``uf1``).
        jobs: folds run at the same time, each in its own process (1: in this process).
        gpus: GPU ids for fold processes; ``jobs_per_gpu`` folds run on each at once.
        jobs_per_gpu: fold processes sharing one GPU (with ``gpus``).
        threads: CPU threads per fold (default: all cores, or ``cores // jobs`` per fold process).
            Training results depend on it in the last float digits, so compare runs at equal
            ``threads``: ``jobs=2`` equals ``jobs=1, threads=1`` on a 2-core machine.
        resume_every: a fold saves its resume checkpoint every N epochs (0: never); a killed or
            requeued fold continues from it.
        progress: progress bars over folds and epochs.
        keep_models: every finished fold keeps its final model as a model directory (``model.ckpt``
            + ``preprocess.json`` in the fold folder: ``famnet-pl predict`` and ``export`` take it).
        stack_folds: train every pending fold's copy of a tiny model at once, in this process, as one
            stacked network, each copy on its own fold's training subjects (loso/stacked.py; STSTNet).
            Each fold's result is its own, but the batches and augmentation draws are not the
            sequential run's, so the scores differ from it as another seed's would.
    """

    exp: str = "famnet"
    runs_dir: str = "runs"
    folds: tuple[str, ...] | None = None
    wandb: str = "offline"
    eval_every: int = 1
    oracle_by: str = "acc"
    jobs: int = 1
    gpus: tuple[str, ...] | None = None
    jobs_per_gpu: int = 1
    threads: int | None = None
    resume_every: int = 1
    progress: bool = True
    keep_models: bool = False
    stack_folds: bool = False

    def __post_init__(self) -> None:
        # Lists from Python callers and JSON (run.json) become tuples: the object stays hashable.
        for name in ("folds", "gpus"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(str(v) for v in value))

    @classmethod
    def from_args(cls, opts: argparse.Namespace) -> LosoOptions:
        """From :func:`loso_parser`'s namespace."""
        return cls(exp=opts.exp, runs_dir=opts.runs_dir, folds=_split(opts.folds), wandb=opts.wandb,
                   eval_every=opts.eval_every, oracle_by=opts.oracle_by, jobs=opts.jobs,
                   gpus=_split(opts.gpus),
                   jobs_per_gpu=opts.jobs_per_gpu, threads=opts.threads, resume_every=opts.resume_every,
                   progress=not opts.no_progress, keep_models=opts.keep_models,
                   stack_folds=opts.stack_folds)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LosoOptions:
        """From ``run.json``'s ``options`` (unknown keys of a newer version are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``run.json``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_argv(self) -> list[str]:
        """The ``famnet-pl loso`` options that give these options back (defaults left out)."""
        default, argv = LosoOptions(), []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if f.name == "progress":
                argv.append("--no-progress")
            elif f.name in ("keep_models", "stack_folds"):
                argv.append(f"--{f.name.replace('_', '-')}")
            else:
                text = ",".join(value) if isinstance(value, tuple) else str(value)
                argv += [f"--{f.name.replace('_', '-')}", text]
        return argv

    def fingerprint(self) -> dict[str, Any]:
        """The options that change what a fold writes (part of the run's config hash)."""
        # keep_models and stack_folds only when on: with them off, a run's hash is what it was before
        # the options existed. stack_folds changes every fold's training (other batches and draws).
        return {"eval_every": self.eval_every, **({"keep_models": True} if self.keep_models else {}),
                **({"stack_folds": True} if self.stack_folds else {})}


def _split(value: str | None) -> tuple[str, ...] | None:
    return tuple(value.split(",")) if value else None


def loso_parser() -> argparse.ArgumentParser:
    """Options of ``famnet-pl loso`` (also read by ``famnet-pl slurm plan``, which backs
    experiments/slurm/submit.sh, so the shell path takes exactly the same options)."""
    parser = argparse.ArgumentParser(prog="famnet-pl loso", description="leave-one-subject-out run; "
                                     "unknown --a.b=v options go to LightningCLI")
    parser.add_argument("--exp", default="famnet", help="experiment name: runs/<exp>/<dataset>/")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--folds", default=None,
                        help="comma-separated fold indices or subjects (default: all)")
    parser.add_argument("--wandb", choices=["off", "offline", "online"], default="offline",
                        help="offline (default) writes wandb/offline-run-* per fold; online uploads")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="record inner-validation and test predictions every N epochs: the epochs "
                        "validation selection can choose (and the oracle comparison)")
    parser.add_argument("--oracle-by", choices=["acc", "uf1"], default="acc")
    parser.add_argument("--jobs", type=int, default=1, help="folds run at once, each in its own process")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids for fold processes")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="fold processes per GPU (with --gpus)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per fold (default: all cores, "
                        "or cores // jobs; on SLURM the task's CPUs); compare runs at equal --threads")
    parser.add_argument("--resume-every", type=int, default=1,
                        help="save each fold's resume checkpoint every N "
                        "epochs (0: never); a killed or requeued fold continues from it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs, batch jobs)")
    parser.add_argument("--keep-models", action="store_true",
                        help="keep every fold's final model (model.ckpt + preprocess.json in its folder) for "
                        "famnet-pl predict / export")
    parser.add_argument("--stack-folds", action="store_true",
                        help="train all pending folds of a tiny model (STSTNet) at once as one stacked "
                        "network in this process, each copy on its own fold's training subjects")
    seeds = parser.add_argument_group("seeds", "the whole LOSO run once per seed (runs/<exp>/seed<s>/), then "
                                      "mean ± std of the pooled scores (famnet_pl.studies.seeds)")
    seeds.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    seeds.add_argument("--ensemble", choices=["mean"], default=None,
                       help="with --seeds: also pool the seeds' averaged class probabilities")
    slurm = parser.add_argument_group("SLURM", "--launcher slurm: a job array of the pending folds (one fold "
                                      "per task) + a dependent aggregation job, through submitit "
                                      "(famnet_pl.loso.slurm); experiments/slurm/submit.sh takes the same "
                                      "options")
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
