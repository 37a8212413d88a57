"""The LightningCLI behind every command, and the options of the LOSO runner.

``FamNetCLI`` is a LightningCLI over (:class:`FAMNetLitModule`, :class:`MERDataModule`) whose
model sizes that follow from the data (classes, AUs, 2D channels) are linked from the DataModule,
so a YAML states them once; :func:`build_cli` builds one for a list of arguments without running it.
:func:`loso_parser` holds the options of ``famnet-pl loso`` (also read by the SLURM paths).

This module knows nothing about launching: the runner (``loso.py``), the SLURM paths and the
sweeps import it, and ``cli.py`` dispatches commands on top of all of them, so imports run one
way (cli -> runners -> config -> models and data).
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from famnet_pl.data.datamodule import MERDataModule  # noqa: E402
from famnet_pl.data.protocols import get_protocol  # noqa: E402
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
