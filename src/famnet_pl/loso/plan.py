"""The plan of a LOSO run: its folds, its directory and its fingerprint, made once and recorded.

Data flow::

    plan_loso(cli_args, options)
        build_cli(cli_args) -> DataModule.subjects() = folds (sorted namespaced subjects)
        run_dir = <runs_dir>/<exp>/<DataModule.run_name>
        config_fingerprint = hash(resolved config minus fold/dir/logger, options.fingerprint(),
                                  validated manifest content)
        refuse if a finished fold of run_dir has another fingerprint
        LosoPlan.record() -> run_dir/run.json
    LosoPlan.load(run_dir)   <- fold workers, SLURM tasks, DDP ranks: the recorded plan, not a new one

The planning process (``famnet-pl loso``, the SLURM submitter) is the only one that resolves the
config into a plan; everything it starts reads ``run.json``, so a fold can never run under a
different fold list or fingerprint than the run it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from famnet_pl.config import build_cli, data_args
from famnet_pl.loso.options import LosoOptions
from famnet_pl.loso.rundir import METRICS, RUN_JSON, finished_folds, fold_dir, is_finished, read_plan
from famnet_pl.utils.errors import BadInput
from famnet_pl.utils.io import atomic_write_json, csv_bytes

# What a fold writes and checkpoints; changing it changes every run's hash, so no fold resumes from
# a checkpoint of the older format (2: inner-validation predictions recorded every evaluated epoch).
FOLD_FORMAT = "fold files 2"


def rank() -> int:
    """This process's global rank from the launcher's environment (0 outside DDP)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def config_fingerprint(cli, options: LosoOptions | None = None) -> str:
    """Hash of the resolved config, minus what differs between folds of one run (fold index,
    fold directory, logger), of the runner options that change a fold's files, and of the validated
    manifest's content (every sample's label, frames, AUs: an edited sheet, changed official lists
    or drops change it): a resumed run may only reuse folds trained with the same config on the
    same annotations."""
    cfg = cli.config.clone()
    data_args(cfg).fold, cfg.trainer.default_root_dir, cfg.trainer.logger = 0, None, None
    digest = hashlib.sha256(cli.parser.dump(cfg, skip_check=True).encode())
    digest.update(FOLD_FORMAT.encode())
    if options is not None:
        digest.update(json.dumps(options.fingerprint(), sort_keys=True).encode())
    digest.update(csv_bytes(cli.datamodule.load_manifest()))
    return digest.hexdigest()[:16]


def _check_finished_folds(run_dir: Path, config_hash: str) -> None:
    for done in finished_folds(run_dir):
        theirs = json.loads((done / METRICS).read_text()).get("config_hash")
        if theirs != config_hash:
            raise BadInput(
                f"{done}: finished with a different config or different annotations (sheet content, "
                f"official lists, drops; hash {theirs} vs {config_hash} now); its results cannot be reused: "
                "pick another EXP= (--exp) or delete that run directory")


def select_folds(folds: tuple[str, ...] | list[str] | None, subjects: list[str]) -> list[int]:
    """Fold indices for ``--folds`` (indices or subject ids, bare or namespaced; None: all)."""
    if not folds:
        return list(range(len(subjects)))
    chosen = []
    for f in folds:
        if f.isdigit():
            if int(f) >= len(subjects):
                raise BadInput(f"--folds: fold {f} out of range: this protocol has folds "
                               f"0..{len(subjects) - 1}")
            chosen.append(int(f))
        else:
            matches = [k for k, s in enumerate(subjects) if s == f or s.split("/")[-1] == f]
            if not matches:
                raise BadInput(f"--folds: no subject {f!r}; subjects: {', '.join(subjects)}")
            chosen.extend(matches)
    return sorted(set(chosen))


@dataclass
class LosoPlan:
    """A planned LOSO run: its arguments and options, where it writes, its folds and fingerprint.

    ``datamodule`` (the planning CLI's, for preprocessing) exists only in the process that made the
    plan; a plan loaded from ``run.json`` has none.
    """

    cli_args: list[str]
    options: LosoOptions
    run_dir: Path
    subjects: list[str]
    config_hash: str
    protocol: str
    datamodule: object = field(default=None, repr=False)
    devices: int = 1

    def fold_dir(self, k: int) -> Path:
        """Folder of fold ``k``."""
        return fold_dir(self.run_dir, k, self.subjects[k])

    def record(self, dropped: list[dict] | None = None) -> None:
        """Write ``run.json`` (the plan, the args, the git state, and once preprocessing has run the
        samples it left out); rank 0 only."""
        if rank() != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_dir / RUN_JSON, {
            "exp": self.options.exp, "protocol": self.protocol, "args": self.cli_args, "argv": sys.argv,
            "command": ["famnet-pl", "loso", *self.options.to_argv(), *self.cli_args],
            "options": self.options.to_dict(), "config_hash": self.config_hash, "n_folds": len(self.subjects),
            "oracle_by": self.options.oracle_by, "folds": {k: s for k, s in enumerate(self.subjects)},
            "git": git_state(), **({"dropped": dropped} if dropped is not None else {}),
        })

    @classmethod
    def load(cls, run_dir: str | Path) -> LosoPlan:
        """The plan recorded in ``run_dir/run.json`` (what a fold worker runs)."""
        record = read_plan(run_dir)
        if not record.get("options"):
            raise BadInput(f"{Path(run_dir) / RUN_JSON}: no recorded plan (missing, or written by an older "
                           "version); start the run again with famnet-pl loso (finished folds are kept)")
        folds = record["folds"]
        return cls(cli_args=list(record["args"]), options=LosoOptions.from_record(record["options"]),
                   run_dir=Path(run_dir), subjects=[folds[str(k)] for k in range(len(folds))],
                   config_hash=record["config_hash"], protocol=record["protocol"])

    def pending(self, folds: tuple[str, ...] | list[str] | None = None) -> list[int]:
        """Selected folds (indices or subject ids; default all) without a ``predictions.csv``."""
        return [k for k in select_folds(folds, self.subjects) if not is_finished(self.fold_dir(k))]


def recorded_run(runs_dir: str | Path, exp: str, cli_args: list[str]) -> Path | None:
    """The run directory under ``<runs_dir>/<exp>/`` whose ``run.json`` records exactly
    ``cli_args`` (where :func:`plan_loso` put that run), or None."""
    for path in sorted((Path(runs_dir) / exp).glob(f"*/{RUN_JSON}")):
        if json.loads(path.read_text()).get("args") == list(cli_args):
            return path.parent
    return None


def plan_loso(cli_args: list[str], options: LosoOptions | None = None, *, record: bool = True,
              **overrides) -> LosoPlan:
    """Resolve the config, list the folds, refuse to mix with folds finished under another config,
    and (``record``) write ``run.json``. Shared by the local runner and the SLURM submitters.
    ``overrides``: fields of ``options`` to change (``plan_loso(args, exp="x")``)."""
    options = replace(options or LosoOptions(), **overrides)
    plan_cli = build_cli([*cli_args, "--trainer.logger=false"])
    dm = plan_cli.datamodule
    subjects = dm.subjects()
    run_dir = Path(options.runs_dir) / options.exp / dm.run_name
    config_hash = config_fingerprint(plan_cli, options)
    _check_finished_folds(run_dir, config_hash)
    devices = plan_cli.trainer.num_devices * plan_cli.trainer.num_nodes
    plan = LosoPlan(cli_args=list(cli_args), options=options, run_dir=run_dir, subjects=subjects,
                    config_hash=config_hash, protocol=dm.protocol.name, datamodule=dm, devices=devices)
    if record:
        plan.record()
    return plan
