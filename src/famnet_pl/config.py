"""The LightningCLI behind every command.

``FamNetCLI`` is a LightningCLI over (:class:`MERLitModule`, :class:`MERDataModule` or a
per-dataset subclass such as ``CASME2DataModule``) whose model sizes that follow from the data
(classes, AUs, 2D channels) are linked from the DataModule, so a YAML states them once;
:func:`build_cli` builds one for a list of arguments without running it, and :func:`data_args` /
:func:`config_key` find the data options in its parsed config.

This module knows nothing about launching: the runner layer (``loso/``) and the studies
(``studies/``) import it, and ``cli.py`` dispatches commands on top of all of them, so imports run
one way (cli -> studies -> loso -> deploy -> config -> models and data).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from jsonargparse import Namespace  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from famnet_pl.data.datamodule import MERDataModule  # noqa: E402
from famnet_pl.data.protocols import ProtocolError, get_protocol  # noqa: E402
from famnet_pl.models.module import MERLitModule  # noqa: E402
from famnet_pl.utils.checkpoint_io import AtomicCheckpointIO  # noqa: E402

log = logging.getLogger(__name__)

# The fold runner drives LightningCLI through `args=` by design (one CLI per fold).
warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")


class FamNetCLI(LightningCLI):
    """LightningCLI with data->model links, model->data views, and room for callbacks/loggers the
    runner owns.

    The data section is in subclass mode: its class is MERDataModule or one of the per-dataset
    DataModules (``data: {class_path: famnet_pl.data.datamodule.CASME2DataModule, init_args: {...}}``
    in a config, ``--data CASME2DataModule`` on the command line); a section without class_path is
    MERDataModule's, and data options given later (``--data.fold=3``, a model config's
    ``data: {input_2d: pair}``) apply to the class chosen. Read the options with :func:`data_args`.

    Args:
        extra_callbacks: callbacks appended to those of the config (the LOSO runner's).
        logger: logger replacing the config's (the runner's per-fold W&B/CSV logger).
        subclass_mode_data: False: the data section is the given DataModule class's arguments only.
        *args, **kwargs: passed to LightningCLI.
    """

    def __init__(self, *args, extra_callbacks: Sequence = (), logger=None, subclass_mode_data: bool = True,
                 **kwargs) -> None:
        self._extra_callbacks, self._logger = list(extra_callbacks), logger
        super().__init__(*args, subclass_mode_data=subclass_mode_data, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for name in ("num_classes", "num_aus", "in_channels_2d"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Data without frame sequences (precomputed flow images) has no 3D view: FAMNet runs its
        2D branch alone, and says so; a 3D-only model cannot run there."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        protocol = get_protocol(data_args(config).protocol)
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

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but a DataModule refusing its arguments (a ProtocolError: unknown protocol,
        one of another dataset, a view the data cannot give) surfaces as itself, one line, not inside
        jsonargparse's report on every type the data section could have been (subclass mode); then the
        DataModule learns which views the model reads (``MERLitModule.inputs``), and builds only those."""
        try:
            super().instantiate_classes()
        except ValueError as exc:
            cause = exc.__cause__
            while cause is not None and not isinstance(cause, ProtocolError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        # The DataModule builds, caches and batches only the views the network reads.
        self.datamodule.use_inputs(self.model.inputs)

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


def data_args(config: Namespace) -> Namespace:
    """The DataModule's init arguments in a parsed FamNetCLI config, whichever its form:
    ``config.data.init_args`` (a class_path chosen: ``--data CASME2DataModule``, the data YAMLs) or
    ``config.data`` (a parser without subclass mode). The namespace is the config's own: setting a
    field on it sets it in ``config``."""
    data = config.data
    return data.init_args if "init_args" in data else data


def config_key(config: Namespace, name: str) -> str:
    """Where the option ``name`` (``data.val_subjects``, ``model.lr``: what ``--name=v`` sets) sits in
    a parsed config: a DataModule option is under ``data.init_args`` when the data has a class_path."""
    head, _, rest = name.partition(".")
    if head != "data" or not rest or "init_args" not in config.data:
        return name
    spec_key = rest.split(".")[0] in ("class_path", "init_args", "dict_kwargs")
    return name if spec_key else f"data.init_args.{rest}"


def _as_list(plugins) -> list:
    return [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]


def _submitit_plugins(configured) -> list | None:
    """Under submitit (``SUBMITIT_EXECUTOR=slurm``, set by its sbatch script), submitit owns
    requeueing: on its signal it calls ``checkpoint()`` and requeues the job itself (loso/slurm.py).
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


def build_cli(args: list[str], *, cli_class: type[FamNetCLI] = FamNetCLI, **kwargs) -> FamNetCLI:
    """A FamNetCLI (or ``cli_class``, a subclass) for ``args`` that parses and instantiates but does
    not run anything."""
    return cli_class(MERLitModule, MERDataModule, args=args, run=False, seed_everything_default=0,
                     save_config_kwargs={"overwrite": True}, **kwargs)
