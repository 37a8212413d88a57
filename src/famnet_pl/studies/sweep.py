"""W&B sweeps over LOSO hyperparameters (the multi-task loss weights first): one trial = one full LOSO run.

The sweep metric is the pooled *inner-validation* score ``loso_val/uf1`` (training subjects held out
in every fold, ``data.val_subjects``): choosing trials on the pooled test score ``loso/uf1`` would
be test-subject selection one level up, so a spec may not name it. The score exists only once every
fold has finished, so a trial runs a whole protocol and logs ``loso_val/*`` and the test scores
(``loso/*``) once at the end; the test scores are for reading once, for the chosen trial.

``sweep best`` reports that honestly (:func:`nested_selection`): subject k is an inner-validation
subject of other folds, so ``loso_val`` of a trial also depends on subject k's labels; for fold k the
trial is chosen on the validation predictions without subject k's, and fold k's test predictions
are taken from that trial; pooled, that is the sweep's test score.

Data flow::

    experiments/sweeps/<name>.yaml  (W&B sweep spec: method, metric loso_val/*, parameters, command)
      online:  wandb sweep SPEC -> sweep id;  wandb agent entity/project/id
               the agent sets WANDB_RUN_ID / WANDB_SWEEP_ID / ... and runs the spec's `command`
               with ${args} = --model.loss_weights.w2d=0.7 ...
      offline: famnet-pl sweep offline SPEC --count N
               sweeps.next_run(spec, trials so far) -> parameters -> the same `command`, expanded by
               W&B's own agent code -> <out>/sweep.json (state) + leaderboard.csv/.md after each trial
        |
        v
    python -m famnet_pl.cli sweep trial --config ... --model.loss_weights.w2d=0.7 ...
        wandb.init                          (joins the agent's run: its id comes from the environment)
        child: famnet-pl loso --exp <prefix>/<sweep>/<trial> ... (hyperparameters in argv only)
               environment without the run-identity WANDB_* variables, so each fold is a W&B run
               of its own (group <exp>/<dataset>) instead of overwriting the trial's run
        <runs>/<exp>/<dataset>/loso_summary.json
        -> run.log(loso/*) once, run summary trial/run_dir, <runs>/<exp>/trial.json

Why a child process: the agent's WANDB_RUN_ID is inherited by every ``wandb.init`` in its process
tree and overrides its arguments (../shared/notes/ops.md, section 2), and a fresh process per LOSO
leaves no ``wandb.run`` or seed state behind. Why argv: ``wandb.config`` exists only in the process
that called ``wandb.init``; fold processes, DDP ranks and SLURM array tasks re-parse argv.

``wandb agent`` and ``wandb sweep`` need the W&B server (there is no offline agent); the offline
driver replaces the server with the open-source ``sweeps`` engine and logs every run offline
(upload later with ``wandb sync``). Both run the same spec file and the same ``trial`` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from famnet_pl.loso.options import DEFAULT_WANDB_PROJECT
from famnet_pl.loso.rundir import RUN_JSON, SUMMARY

TRIAL_JSON = "trial.json"  # in a trial's experiment folder, beside its LOSO run directory
# Metrics copied from loso_summary.json into the trial run and the leaderboard.
_METRIC_PREFIXES = ("loso/", "loso_oracle/", "loso_perfold/", "loso_val/", "loso_valsel/",
                    "loso_valsel_perfold/")
# Leaderboard columns after the (validation) ranking metric: the test scores, read once.
TEST_METRICS = ("loso/uf1", "loso/uar", "loso_valsel/uf1", "loso_oracle/uf1")
_METHODS = ("grid", "random", "bayes")  # what both the W&B server and the local engine run

# W&B variables a fold process may keep: where and how to log, never *which run*. Everything else
# named WANDB_* (RUN_ID, SWEEP_ID, SWEEP_PARAM_PATH, RESUME, RUN_GROUP, NAME, TAGS, DIR, SERVICE,
# ...) would make the fold's wandb.init join or configure the trial's run.
_WANDB_KEEP = frozenset({
    "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_ORGANIZATION", "WANDB_MODE", "WANDB_BASE_URL",
    "WANDB_APP_URL", "WANDB_SILENT", "WANDB_QUIET", "WANDB_DEBUG", "WANDB_CORE_DEBUG", "WANDB_CONSOLE",
    "WANDB_HTTP_TIMEOUT", "WANDB_INIT_TIMEOUT", "WANDB_FILE_PUSHER_TIMEOUT", "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_CREDENTIALS_FILE", "WANDB_DISABLE_CODE", "WANDB_DISABLE_GIT", "WANDB_SAVE_CODE",
    "WANDB_IGNORE_GLOBS", "WANDB_ERROR_REPORTING", "WANDB_INSECURE_DISABLE_SSL", "WANDB_USERNAME",
    "WANDB_USER_EMAIL", "WANDB_HOST",
})


class SweepError(Exception):
    """Bad sweep input (spec, arguments, sweep state): one line naming the file and the fix."""


# ----------------------------------------------------------------------------------------- spec


def _import_sweeps():
    """The ``sweeps`` engine, without its pydantic-v1 config warning (fatal under ``-W error``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*Valid config keys have changed in V2.*")
        import sweeps

    return sweeps


def load_spec(path: str | Path) -> dict:
    """Read and check a W&B sweep spec: schema (``sweeps`` engine), method, a ``loso_val/*`` metric
    and a ``command`` that passes the parameters through ``${args}``."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep spec; pick one of experiments/sweeps/*.yaml")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep spec is a YAML mapping (method, metric, parameters, command)")
    violations = _import_sweeps().schema_violations_from_proposed_config(spec)
    if violations:
        raise SweepError(f"{path}: not a valid W&B sweep spec: {'; '.join(violations)}")
    if spec.get("method") not in _METHODS:
        raise SweepError(f"{path}: method {spec.get('method')!r}; use one of {', '.join(_METHODS)}")
    metric = (spec.get("metric") or {}).get("name", "")
    # Pooled inner validation only: loso/* and loso_valsel/* are test scores (ranking trials on them
    # is test-subject selection), loso_oracle/* even picks epochs on the test subject, and anything
    # logged per fold or per epoch does not exist in the trial's run.
    if not metric.startswith("loso_val/"):
        raise SweepError(f"{path}: metric {metric!r} is not a pooled inner-validation metric; use "
                         "metric.name loso_val/uf1 (or loso_val/uar): ranking trials on a test score "
                         "(loso/*) selects on the test subjects, and a trial logs only loso_summary.json's "
                         "values")
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepError(f"{path}: `command:` must be a list containing ${{args}} (e.g. [${{env}}, "
                         "${interpreter}, -m, famnet_pl.cli, sweep, trial, --config, ..., ${args}]): "
                         "hyperparameters reach the fold processes through argv only")
    if "trial" not in command:
        raise SweepError(f"{path}: `command:` does not run `famnet_pl.cli sweep trial`; without it the folds "
                         "would log into the agent's run")
    for name in spec["parameters"]:
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", name):
            raise SweepError(f"{path}: parameter {name!r} is not a config key (dotted like "
                             "model.loss_weights.w2d)")
    return spec


def expand_command(spec: Mapping, params: Mapping[str, Any], *, interpreter: str = "python",
                   extra: Sequence[str] = ()) -> list[str]:
    """The command W&B's agent runs for ``params``, built by the agent's own code: ``${env}`` ->
    ``/usr/bin/env``, ``${interpreter}`` -> ``interpreter`` (the agent uses ``python`` from PATH),
    ``${program}`` -> the spec's program, ``${args}`` -> ``--name=value`` per parameter.

    ``extra`` (fixed LOSO arguments of an offline sweep) go just before the swept flags, so a later
    ``--config`` among them cannot override a swept value (LightningCLI: later wins)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    sweep_vars = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars["args"] = [*extra, *sweep_vars["args"]]
    sweep_vars.update(interpreter=[interpreter], program=[str(spec.get("program", ""))], env=["/usr/bin/env"])
    command = []
    for chunk in create_sweep_command(list(spec["command"])):  # it edits the list in place: a copy
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            command += sweep_vars.get(chunk[2:-1]) or []  # as wandb_agent.Agent._command_run does
        else:
            command.append(chunk)
    return command


def _config_args(tokens: Sequence[str]) -> list[str]:
    """The ``--config FILE`` pairs and ``--a.b=v`` overrides among ``tokens`` (what LightningCLI reads)."""
    out, it = [], iter(tokens)
    for token in it:
        if token == "--config":
            out += [token, next(it, "")]
        elif token.startswith("--config=") or re.match(r"--[A-Za-z_][\w]*\.[\w.]+=", token):
            out.append(token)
    return out


def check_param_names(spec: Mapping, spec_path: str | Path, extra: Sequence[str] = ()) -> None:
    """Every swept parameter must be a key of the resolved LightningCLI config of the spec's command
    (a misspelt name would otherwise fail every trial, or silently sweep nothing)."""
    from famnet_pl.config import FamNetCLI, build_cli, config_key, data_args

    class _ParseOnly(FamNetCLI):
        """Parse and validate the config; build no model, data or trainer."""

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    args = _config_args([*spec["command"], *extra])
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # no "Seed set to 0"
    try:
        # exit_on_error=False: an exception, not a usage page
        cli = build_cli(args, cli_class=_ParseOnly, parser_kwargs={"exit_on_error": False})
    except argparse.ArgumentError as exc:
        why = " ".join(str(exc).split())  # jsonargparse's message spans lines
        raise SweepError(f"{spec_path}: LightningCLI rejects the command's config arguments ({why}); fix "
                         "`command:` or the extra LOSO arguments") from None
    unknown = [name for name in spec["parameters"] if config_key(cli.config, name) not in cli.config]
    if unknown:
        raise SweepError(f"{spec_path}: unknown parameter {', '.join(unknown)}: not a config key of "
                         f"{' '.join(args)}; use names like model.loss_weights.w2d "
                         "(famnet-pl fit --print_config)")
    if not data_args(cli.config).val_subjects:
        raise SweepError(f"{spec_path}: the command's data has no inner validation (data.val_subjects=0), so "
                         f"there is no {spec['metric']['name']} to rank trials by; add --data.val_subjects=1 "
                         "(or more, or a fraction) to `command:`")


def _plain(value: Any) -> Any:
    """Engine values as JSON/CLI-safe Python scalars (numpy float64 -> float)."""
    return value.item() if hasattr(value, "item") else value


def propose(spec: Mapping, trials: Sequence[Mapping], *, seed: int) -> dict[str, Any] | None:
    """Next parameters from the ``sweeps`` engine given the trials so far (None: grid exhausted).

    Seeded per proposal index, so a resumed sweep proposes what an uninterrupted one would."""
    sweeps = _import_sweeps()
    states = {"finished": sweeps.RunState.finished, "failed": sweeps.RunState.failed,
              "running": sweeps.RunState.running}
    runs = [sweeps.SweepRun(name=t["trial"], config={k: {"value": v} for k, v in t["params"].items()},
                            state=states[t["status"]],
                            # camelCase alias: the field name is silently dropped under pydantic 2
                            summaryMetrics=dict(t.get("metrics") or {}))
            for t in trials]
    mixed = seed * 1_000_003 + len(trials)
    random.seed(mixed)                 # random search samples with `random`
    import numpy as np

    np.random.seed(mixed % 2**32)      # bayes uses numpy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn ConvergenceWarnings from the GP on few points
        suggestion = sweeps.next_run(dict(spec), runs, validate=False)
    if suggestion is None:
        return None
    return {k: _plain(v["value"]) for k, v in suggestion.config.items()}


# ---------------------------------------------------------------------------------------- trial


def fold_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the W&B variables that name or configure a run (keeps project, entity,
    API key, mode and directories): folds started from it create runs of their own."""
    return {k: v for k, v in environ.items() if not k.startswith("WANDB_") or k in _WANDB_KEEP}


def _overrides(args: Sequence[str]) -> dict[str, Any]:
    """``--a.b=v`` arguments as ``{"a.b": v}`` (YAML-typed, as LightningCLI reads them)."""
    out = {}
    for token in args:
        match = re.fullmatch(r"--([A-Za-z_][\w]*\.[\w.]+)=(.*)", token, flags=re.S)
        if match:
            try:
                out[match[1]] = yaml.safe_load(match[2])
            except yaml.YAMLError:
                out[match[1]] = match[2]
    return out


def _agent_params(overrides: Mapping[str, Any]) -> dict[str, Any] | None:
    """The swept values, when an agent named them in WANDB_SWEEP_PARAM_PATH (``wandb_version: 1`` +
    ``{name: {value: v}}``, written by the agent for ``wandb.init``)."""
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not Path(path).is_file():
        return None
    names = yaml.safe_load(Path(path).read_text()) or {}
    return {name: overrides.get(name) for name in names
            if name != "wandb_version" and not name.startswith("_")}


def _wandb_mode(choice: str) -> str:
    """``auto``: WANDB_MODE if set, else online under an agent (WANDB_SWEEP_ID) and offline otherwise."""
    if choice != "auto":
        return choice
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("disabled", "off"):
        return "off"
    if env in ("offline", "dryrun", "online"):
        return "offline" if env == "dryrun" else env
    return "online" if os.environ.get("WANDB_SWEEP_ID") else "offline"


def _trial_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="famnet-pl sweep trial", allow_abbrev=False,
        description="one sweep trial = one full LOSO run in a child process; every other argument "
                    "(--config, --a.b=v, --jobs, --threads ...) goes to famnet-pl loso")
    parser.add_argument("--runs-dir", default="runs", help="root of all runs (famnet-pl loso --runs-dir)")
    parser.add_argument("--exp-prefix", default="sweeps", help="experiment = <prefix>/<sweep>/<trial>")
    parser.add_argument("--sweep", default=None,
                        help="default: $WANDB_SWEEP_ID (under an agent), else 'manual'")
    parser.add_argument("--trial", default=None,
                        help="default: $WANDB_RUN_ID (under an agent), else a hash of the LOSO arguments")
    parser.add_argument("--wandb", choices=["auto", "online", "offline", "off"], default="auto",
                        help="auto: $WANDB_MODE if set, else online under an agent, offline otherwise")
    return parser


def _safe_name(value: str, what: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise SweepError(f"--{what} {value!r}: must be one folder name (no '/', not '.' or '..')")
    return value


def _find_run_dir(exp_dir: Path) -> Path | None:
    """The LOSO run directory the child created under ``exp_dir`` (its ``run.json``, newest)."""
    found = sorted(exp_dir.glob(f"*/{RUN_JSON}"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def _summary_metrics(summary: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items()
            if k.startswith(_METRIC_PREFIXES) and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def run_trial(argv: Sequence[str]) -> int:
    """Run one trial (see module docstring); returns 0 when its LOSO finished with every fold."""
    from famnet_pl.utils.io import atomic_write_json

    opts, loso_args = _trial_parser().parse_known_args(list(argv))
    for token in loso_args:
        if token.split("=")[0] in ("--exp", "--folds", "--seeds"):
            raise SweepError(f"trial: {token.split('=')[0]} is not allowed: a trial is one whole LOSO run "
                             "whose experiment is <--exp-prefix>/<--sweep>/<--trial>")
    agent = "WANDB_SWEEP_ID" in os.environ
    sweep = _safe_name(opts.sweep or os.environ.get("WANDB_SWEEP_ID") or "manual", "sweep")
    # Outside an agent a trial is named by its arguments: rerunning it resumes the same LOSO run.
    trial = _safe_name(opts.trial or os.environ.get("WANDB_RUN_ID")
                       or "t-" + hashlib.sha1(json.dumps(loso_args).encode()).hexdigest()[:8], "trial")
    exp = "/".join(p for p in (opts.exp_prefix.strip("/"), sweep, trial) if p)
    exp_dir = Path(opts.runs_dir) / exp
    exp_dir.mkdir(parents=True, exist_ok=True)
    mode = _wandb_mode(opts.wandb)
    overrides = _overrides(loso_args)
    command = [sys.executable, "-m", "famnet_pl.cli", "loso", "--exp", exp, "--runs-dir", opts.runs_dir,
               "--wandb", mode, "--no-progress", *loso_args]
    record: dict[str, Any] = {
        "sweep": sweep, "trial": trial, "exp": exp, "exp_dir": str(exp_dir), "run_dir": None,
        "status": "running", "returncode": None, "overrides": overrides, "params": _agent_params(overrides),
        "loso_args": loso_args,
        "command": command, "metrics": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wandb": {"mode": mode, "project": os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT),
                  "group": exp},
    }
    atomic_write_json(exp_dir / TRIAL_JSON, record)

    run = None
    if mode != "off":
        import wandb

        # Under an agent this joins the agent's run (WANDB_RUN_ID); its name stays the server's.
        run = wandb.init(project=record["wandb"]["project"], group=exp, job_type="sweep-trial",
                         name=None if agent else trial, dir=str(exp_dir), mode=mode,
                         config={"trial/exp": exp, "trial/exp_dir": str(exp_dir),
                                 "trial/loso_args": loso_args})
        # The agent already put the swept values into the config (and locks them); offline, the
        # overrides are the only record of them.
        run.config.update({k: v for k, v in overrides.items() if k not in run.config})
        record["wandb"].update(run_id=run.id, dir=str(Path(run.dir).parent))
        atomic_write_json(exp_dir / TRIAL_JSON, record)

    start = time.monotonic()
    child = subprocess.Popen(command, env=fold_env(os.environ), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)

    def forward(signum, _frame):  # the agent stops a trial with SIGTERM: stop its LOSO too
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for line in child.stdout:  # through sys.stdout: W&B's console capture sees the folds' output
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)

    run_dir = _find_run_dir(exp_dir)
    summary_file = run_dir / SUMMARY if run_dir else None
    summary = json.loads(summary_file.read_text()) if summary_file and summary_file.is_file() else {}
    finished = returncode == 0 and bool(summary.get("complete"))
    metrics = _summary_metrics(summary) if finished else {}
    record.update(run_dir=str(run_dir) if run_dir else None, returncode=returncode, metrics=metrics,
                  status="finished" if finished else "failed", seconds=round(time.monotonic() - start, 1),
                  ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if run_dir:
        record["wandb"]["fold_group"] = f"{exp}/{run_dir.name}"
    if run is not None:
        if metrics:
            run.log(metrics)  # once: the sweep's metric is the pooled score of the whole trial
        run.summary.update({"trial/run_dir": record["run_dir"], "trial/status": record["status"],
                            "trial/fold_group": record["wandb"].get("fold_group")})
    atomic_write_json(exp_dir / TRIAL_JSON, record)
    if run is not None:
        run.finish(exit_code=0 if finished else 1)
    if not finished:
        why = (f"famnet-pl loso exited with {returncode}" if returncode
               else f"{summary_file or exp_dir}: no complete {SUMMARY}")
        print(f"trial {trial} FAILED: {why}; its output is above, its record in {exp_dir / TRIAL_JSON}",
              file=sys.stderr, flush=True)
    return 0 if finished else (returncode or 1)


# ------------------------------------------------------------------------------ offline driver


def _sweep_layout(out: Path) -> tuple[str, str, str]:
    """(runs_dir, exp_prefix, sweep) that put trial T's LOSO experiment at ``<out>/T``; the W&B groups
    read ``<out's parent name>/<out name>/<T>/<dataset>`` (sweeps/<stem>/trial_000/synth by default)."""
    return str(out.parent.parent), out.parent.name, out.name


def _run_id() -> str:
    """A fresh W&B-style run id (8 of [a-z0-9]), new for every attempt: two offline runs with one id
    would be merged by `wandb sync`."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_state(out: Path) -> dict | None:
    path = out / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _leaderboard(state: Mapping, out: Path) -> None:
    """``leaderboard.csv`` (exact numbers from each run's loso_summary.json) and ``leaderboard.md``."""
    import pandas as pd

    from famnet_pl.utils.io import atomic_write_text

    metric, goal = state["spec"]["metric"]["name"], state["spec"]["metric"].get("goal", "maximize")
    columns = list(dict.fromkeys([metric, *TEST_METRICS]))
    names = list(state["spec"]["parameters"])
    rows = []
    for t in state["trials"]:
        row = {"trial": t["trial"], "status": t["status"], **{n: t["params"].get(n) for n in names}}
        summary = {}
        summary_file = Path(t["run_dir"]) / SUMMARY if t.get("run_dir") else None
        if t["status"] == "finished" and summary_file and summary_file.is_file():
            # The run's own summary is the source of truth (offline W&B writes no summary file).
            summary = json.loads(summary_file.read_text())
        row.update({c: summary.get(c) for c in columns})
        row.update(seconds=t.get("seconds"), run_dir=t.get("run_dir"))
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["trial", "status", *names, *columns, "seconds", "run_dir"])
    done = frame[metric].notna()
    ranked = frame[done].sort_values(metric, ascending=goal == "minimize", kind="stable")
    frame = pd.concat([ranked, frame[~done]])
    frame.insert(0, "rank", [*range(1, int(done.sum()) + 1), *[None] * int((~done).sum())])
    frame["rank"] = frame["rank"].astype("Int64")
    atomic_write_text(out / "leaderboard.csv", frame.to_csv(index=False))  # repr floats: exact

    short = {n: n.rsplit(".", 1)[-1] for n in names}
    if len(set(short.values())) < len(short):
        short = {n: n for n in names}
    header = ["rank", "trial", "status", *short.values(),
              *[c if c == metric else f"{c} (test, read once)" for c in columns], "run dir"]

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
            return ""
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [f"# Sweep `{out.name}`: {state['spec']['method']}, {goal} {metric}", "",
             f"Spec `{state['spec_file']}`, {len(frame)} trials ({int(done.sum())} finished). "
             f"Ranked by `{metric}`, pooled inner validation (training subjects held out in every "
             "fold): no test label chose the order. The test columns (`loso/*` last epoch, "
             "`loso_valsel/*` at the validation-chosen epoch, the oracle: not a result) are there to "
             "be read once, for the top row: that is the honest result of the sweep "
             "(`famnet-pl sweep best`). Reading them for every row and picking the best is "
             "test-subject selection again.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in frame.to_dict("records"):
        values = [r["rank"], r["trial"], r["status"], *[r[n] for n in names], *[r[c] for c in columns],
                  r["run_dir"]]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")


def run_offline(spec_path: str | Path, *, count: int | None = None, seed: int = 0,
                out: str | Path | None = None, extra: Sequence[str] = (), retry_failed: bool = False,
                check: bool = True) -> int:
    """Run (or continue) an offline sweep of ``count`` trials in total; see the module docstring.

    Args:
        spec_path: W&B sweep spec (the one ``wandb sweep`` would get).
        count: trials in the whole sweep (a rerun with the same count only finishes what is missing);
            None: a grid's every point (required for random and bayes).
        seed: seeds the engine's proposals (per trial index).
        out: sweep folder (default ``runs/sweeps/<spec stem>``): state, leaderboards, one folder per trial.
        extra: LOSO arguments added to every trial (tiny sizes, ``--data.data_root=...``, ``--jobs 2``).
        retry_failed: rerun trials that failed, with their parameters.
        check: check the parameter names against the LightningCLI config first.

    Returns:
        0 when every trial finished, 1 when one failed (the leaderboard marks it).
    """
    from famnet_pl.utils.io import atomic_write_json

    spec = load_spec(spec_path)
    clash = sorted(set(_overrides(extra)) & set(spec["parameters"]))
    if clash:
        raise SweepError(f"{spec_path}: extra LOSO argument sets swept parameter {', '.join(clash)}; drop it "
                         "from the extra arguments or from the spec")
    if count is None and spec["method"] != "grid":
        raise SweepError(f"{spec_path}: a {spec['method']} sweep never ends by itself; "
                         "give --count N (COUNT=N)")
    count = math.inf if count is None else count
    if check:
        check_param_names(spec, spec_path, extra)
    out = Path(os.path.abspath(out or Path("runs") / "sweeps" / Path(spec_path).stem))
    if not out.name:
        raise SweepError(f"--out {out}: give the sweep a folder of its own")
    state = _read_state(out)
    if state is None:
        state = {"spec_file": str(spec_path), "spec": spec, "extra": list(extra), "seed": seed, "trials": []}
    elif (state["spec"], state["extra"], state["seed"]) != (spec, list(extra), seed):
        raise SweepError(f"{out / 'sweep.json'}: this sweep was started with another spec, extra LOSO "
                         "arguments or seed; continue it with the same ones, or pick another --out")
    state["spec"] = spec  # equal, but in the file's order (sweep.json has sorted keys): leaderboard columns
    runs_dir, prefix, sweep = _sweep_layout(out)

    def save() -> None:
        atomic_write_json(out / "sweep.json", state)
        _leaderboard(state, out)

    def run_one(t: dict) -> None:
        # The driver plays the agent: it picks the trial's run id and passes it in WANDB_RUN_ID, so
        # the trial joins that run exactly as under `wandb agent`, and its folds must not.
        t.update(status="running", wandb_run_id=_run_id(), run_dir=None, metrics={})
        save()
        command = [*expand_command(spec, t["params"], interpreter=sys.executable, extra=extra),
                   "--runs-dir", runs_dir, "--exp-prefix", prefix, "--sweep", sweep, "--trial", t["trial"],
                   "--wandb", "offline"]
        env = {**fold_env(os.environ), "WANDB_MODE": "offline", "WANDB_RUN_ID": t["wandb_run_id"]}
        log_file = out / t["trial"] / "trial.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        params = ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.4g}" if isinstance(v, float)
                           else f"{k.rsplit('.', 1)[-1]}={v}"
                           for k, v in t["params"].items())
        print(f"{t['trial']}: {params} ...", end="", flush=True)
        start = time.monotonic()
        with open(log_file, "a") as log:  # appended: a resumed trial keeps its earlier output
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        record_file = out / t["trial"] / TRIAL_JSON
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        metric = spec["metric"]["name"]
        # A trial without the metric (e.g. its inner validation was empty) cannot be ranked: failed.
        ok = returncode == 0 and record.get("status") == "finished" and metric in record.get("metrics", {})
        t.update(status="finished" if ok else "failed", returncode=returncode, run_dir=record.get("run_dir"),
                 metrics=record.get("metrics", {}) if ok else {}, seconds=round(time.monotonic() - start, 1))
        save()
        why = f"no {metric} in its summary" if returncode == 0 else f"exit code {returncode}"
        print(f" {metric} {t['metrics'][metric]:.4f} ({t['seconds']:.0f} s)" if ok
              else f" FAILED ({why}): see {log_file}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    print(f"offline sweep {spec_path} ({spec['method']}, {spec['metric'].get('goal', 'maximize')} "
          f"{spec['metric']['name']}): {'every grid point' if count == math.inf else f'{count} trials'} "
          f"-> {out}",
          flush=True)
    # First what a killed driver left running (its LOSO resumes finished folds), then retries.
    for t in state["trials"]:
        if t["status"] == "running" or (retry_failed and t["status"] == "failed"):
            run_one(t)
    save()
    while len(state["trials"]) < count:
        params = propose(spec, state["trials"], seed=seed)
        if params is None:
            print(f"grid exhausted after {len(state['trials'])} trials", flush=True)
            break
        t = {"trial": f"trial_{len(state['trials']):03d}", "params": params, "status": "running"}
        state["trials"].append(t)
        run_one(t)

    failed = [t["trial"] for t in state["trials"] if t["status"] == "failed"]
    print(f"\nleaderboard: {out / 'leaderboard.md'} (and .csv)")
    if any(t["status"] == "finished" for t in state["trials"]):
        print(format_best(state["spec"], state["trials"]))
    print("W&B runs were logged offline (one per trial, one per fold). Upload them from a machine "
          "with network:\n"
          f"  wandb sync {out}/*/wandb/offline-run-* {out}/*/*/fold_*/wandb/offline-run-*")
    if failed:
        print(f"failed trials: {', '.join(failed)} (logs: {out}/<trial>/trial.log); rerun them with the same "
              "command plus --retry-failed", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ CLI


def _split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _offline(argv: Sequence[str]) -> int:
    own, extra = _split_extra(argv)
    parser = argparse.ArgumentParser(prog="famnet-pl sweep offline", allow_abbrev=False,
                                     description="run a W&B sweep spec without network: local sweeps engine, "
                                                 "W&B offline; resumable")
    parser.add_argument("spec", help="experiments/sweeps/<name>.yaml")
    parser.add_argument("--count", type=int, default=None,
                        help="trials in the whole sweep (default for a grid: all its points)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the proposals")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<spec stem>)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="rerun failed trials with their parameters")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the parameter-name check (saves an import)")
    opts = parser.parse_args(own)
    return run_offline(opts.spec, count=opts.count, seed=opts.seed, out=opts.out, extra=extra,
                       retry_failed=opts.retry_failed, check=not opts.no_check)


def _check(argv: Sequence[str]) -> int:
    own, extra = _split_extra(argv)
    parser = argparse.ArgumentParser(prog="famnet-pl sweep check", allow_abbrev=False,
                                     description="validate a sweep spec and print the command the agent "
                                                 "would run")
    parser.add_argument("spec")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(own)
    spec = load_spec(opts.spec)
    check_param_names(spec, opts.spec, extra)
    params = propose(spec, [], seed=opts.seed)
    print(f"{opts.spec}: ok ({spec['method']}, {spec['metric'].get('goal', 'maximize')} "
          f"{spec['metric']['name']}, {len(spec['parameters'])} parameters)")
    print("the agent would run, e.g.: " + " ".join(expand_command(spec, params, extra=extra)))
    return 0


def best_trial(spec: Mapping, trials: Sequence[Mapping]) -> Mapping | None:
    """The finished trial with the best value of the spec's (inner-validation) metric; ties go to
    the earlier trial. Only that metric is read: the test scores play no part."""
    metric, goal = spec["metric"]["name"], spec["metric"].get("goal", "maximize")
    finished = [t for t in trials if t["status"] == "finished" and metric in (t.get("metrics") or {})]
    if not finished:
        return None
    sign = 1 if goal == "maximize" else -1
    return max(finished, key=lambda t: (sign * t["metrics"][metric], -trials.index(t)))


def nested_selection(spec: Mapping, trials: Sequence[Mapping]) -> dict | None:
    """The sweep's honest test score: for each fold k, the finished trial whose pooled
    inner-validation score (the spec's metric, at the headline epoch) is best *without the samples of
    fold k's test subject* (ties: the earlier trial), and fold k's test predictions from that trial;
    pooled over the folds. ``{"per_fold": {fold: trial}, "loso/uf1", "loso/uar", "loso/acc"}``, or
    None when no finished trial has inner-validation predictions."""
    import pandas as pd

    from famnet_pl.loso.aggregate import load_predictions
    from famnet_pl.metrics import at_epochs, held_out_groups, pooled_metrics

    score_key = spec["metric"]["name"].split("/", 1)[1]
    sign = 1 if spec["metric"].get("goal", "maximize") == "maximize" else -1
    runs = {}
    for t in trials:
        if t["status"] == "finished" and t.get("run_dir"):
            predictions = load_predictions(t["run_dir"])
            if predictions is not None and predictions.val_epochs is not None:
                runs[t["trial"]] = predictions
    if not runs:
        return None
    first = next(iter(runs.values()))
    held_out, column = held_out_groups(first.last)
    num_classes = len(first.metas[0]["class_names"])
    # Each trial's inner-validation predictions at its headline epochs, selected once.
    headline_val = {name: at_epochs(p.val_epochs, p.last.groupby("fold")["epoch"].first().to_dict())
                    for name, p in runs.items()}
    per_fold, picked = {}, []
    for fold, group in held_out.items():
        def score(name: str) -> float:
            val = headline_val[name][headline_val[name][column] != group]
            return sign * pooled_metrics(val["y_true"], val["y_pred"], num_classes, warn=False)[score_key]

        best = max(runs, key=lambda name: (score(name), -list(runs).index(name)))
        per_fold[fold] = best
        picked.append(runs[best].last[runs[best].last["fold"] == fold])
    pooled = pd.concat(picked, ignore_index=True)
    m = pooled_metrics(pooled["y_true"], pooled["y_pred"], num_classes)
    return {"per_fold": per_fold, "loso/uf1": m["uf1"], "loso/uar": m["uar"], "loso/acc": m["acc"]}


def format_best(spec: Mapping, trials: Sequence[Mapping]) -> str:
    """The trial chosen on all validation data (the configuration to use), and the sweep's test
    score, read once: nested (:func:`nested_selection`), and the chosen trial's own."""
    best = best_trial(spec, trials)
    metric = spec["metric"]["name"]
    if best is None:
        return f"no finished trial with {metric}"
    m = best["metrics"]

    def score(key: str) -> str:
        return f"{m[key]:.4f}" if key in m else "n/a"

    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (best.get("params") or {}).items())
    lines = [f"chosen on {metric}: {best['trial']} ({params}) {metric} {score(metric)}"]
    nested = nested_selection(spec, trials)
    if nested is not None:
        chosen = sorted(set(nested["per_fold"].values()))
        lines.append(f"the sweep's test score, read once (nested: each fold's trial chosen without its test "
                     f"subject; trials {', '.join(chosen)}): UF1 {nested['loso/uf1']:.4f} UAR "
                     f"{nested['loso/uar']:.4f}")
    lines += [f"{best['trial']}'s own test score: UF1 {score('loso/uf1')} UAR {score('loso/uar')} "
              f"(last epoch); UF1 {score('loso_valsel/uf1')} UAR {score('loso_valsel/uar')} "
              "(validation-selected epochs); its choice also saw the test subjects' labels through the "
              "other folds' validation, so report the nested score", f"run: {best.get('run_dir')}"]
    return "\n".join(lines)


def _trials_of(target: Path) -> tuple[dict, list[dict]]:
    """(spec, trials) of an offline sweep folder (sweep.json) or of a folder of trials (trial.json
    each, e.g. runs/sweeps/<W&B sweep id> of an online sweep, with the spec file given)."""
    state = _read_state(target)
    if state is not None:
        return state["spec"], state["trials"]
    records = [json.loads(p.read_text()) for p in sorted(target.glob(f"*/{TRIAL_JSON}"))]
    if not records:
        raise SweepError(f"{target}: neither a sweep.json nor trials (*/{TRIAL_JSON}) here; give the "
                         "offline sweep's folder (--out) or runs/sweeps/<sweep id>")
    return {}, records


def _best(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="famnet-pl sweep best", allow_abbrev=False,
                                     description="the trial the sweep's validation metric chooses, and its "
                                                 "test score read once")
    parser.add_argument("spec", help="experiments/sweeps/<name>.yaml")
    parser.add_argument("--out", default=None, help="the sweep's folder (default runs/sweeps/<spec stem>; an "
                        "online sweep: runs/sweeps/<sweep id>)")
    opts = parser.parse_args(list(argv))
    spec = load_spec(opts.spec)
    folder = Path(opts.out or Path("runs") / "sweeps" / Path(opts.spec).stem)
    recorded, trials = _trials_of(folder)
    if recorded and recorded.get("metric") != spec["metric"]:
        raise SweepError(f"{folder / 'sweep.json'}: this sweep ranked on {recorded['metric']['name']}, "
                         f"{opts.spec} names {spec['metric']['name']}; give the spec the sweep ran")
    for t in trials:  # the runs' own summaries are the source of truth
        summary_file = Path(t["run_dir"]) / SUMMARY if t.get("run_dir") else None
        if t["status"] == "finished" and summary_file and summary_file.is_file():
            t["metrics"] = _summary_metrics(json.loads(summary_file.read_text()))
    print(format_best(spec, trials))
    return 0 if best_trial(spec, trials) is not None else 1


COMMANDS = {"trial": run_trial, "offline": _offline, "check": _check, "best": _best}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``famnet-pl sweep {trial,offline,check,best}`` (``python -m famnet_pl.cli sweep``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: famnet-pl sweep {trial,offline,check,best} ...  (famnet-pl sweep CMD --help)\n"
              "  trial   ARGS             one trial = one LOSO run (the command in a sweep spec)\n"
              "  offline SPEC [--count N] sweep without network (local engine, W&B offline) [-- LOSO args]\n"
              "  check   SPEC             validate a spec, print the agent's command [-- LOSO args]\n"
              "  best    SPEC [--out DIR] the trial chosen on the spec's validation metric, its test score",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except SweepError as exc:
        print(f"famnet-pl sweep {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
