"""W&B sweeps over the loss weights (famnet_pl/sweep.py): the spec files, the agent's command, and an
offline sweep of 4 trials on tiny synthetic data (leaderboard = the runs' own summaries, W&B runs
separate and grouped, resumable, failed trials kept)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from famnet_pl.studies import sweep
from tests.conftest import REPO, relabel, tiny_args

SPECS = REPO / "experiments" / "sweeps"
WEIGHTS = ("w2d", "w3d", "wfuse", "wau")


def _wandb_records(path: Path):
    """Records of an offline ``run-<id>.wandb`` file (leveldb-log framing of wandb's protobuf
    Record; wandb is pinned in setup.cfg: ../shared/notes/slurm_wandb.md, 2a)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):            # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
        elif kind == 2:               # FIRST
            buf = data[pos - length:pos]


def _wandb_run(run_dir: Path) -> tuple[str, str, str, list[dict]]:
    """(run id, group, job type, history rows) of the single offline W&B run under ``run_dir/wandb``."""
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run, history = None, []
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            # keys with "/" are stored split, in nested_key
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.append({k: v for k, v in row.items() if not k.startswith("_")})
    return run.run_id, run.run_group, run.job_type, history


# ------------------------------------------------------------------------------------- fast, no LOSO


@pytest.mark.parametrize("name", ["loss_weights_bayes", "loss_weights_grid"])
def test_spec_validates_and_the_agent_command_reaches_the_fold_hparams(name, tiny_synth, tmp_path):
    spec = sweep.load_spec(SPECS / f"{name}.yaml")
    assert spec["metric"] == {"name": "loso_val/uf1", "goal": "maximize"}
    assert set(spec["parameters"]) == {f"model.loss_weights.{w}" for w in WEIGHTS}
    sweep.check_param_names(spec, SPECS / f"{name}.yaml")  # real LightningCLI keys
    proposals = []
    while len(proposals) < 10 and (params := sweep.propose(spec, [dict(trial=f"t{len(proposals)}", params=p,
                                                                       status="finished",
                                                                       metrics={"loso_val/uf1": 0.5})
                                                                  for p in proposals], seed=0)) is not None:
        assert all(type(v) in (int, float) and v >= 0 for v in params.values()), params   # no numpy scalars
        proposals.append(params)
    if spec["method"] == "grid":  # small, and every point exactly once
        assert len(proposals) == 8 and len({tuple(sorted(p.items())) for p in proposals}) == 8
    else:
        assert len(proposals) == 10 and all(0.5 <= p["model.loss_weights.wfuse"] <= 2.0 for p in proposals)

    # Exactly what `wandb agent` runs: /usr/bin/env python -m famnet_pl.cli sweep trial ... --name=value
    params = proposals[-1]
    command = sweep.expand_command(spec, params)
    assert command[:6] == ["/usr/bin/env", "python", "-m", "famnet_pl.cli", "sweep", "trial"]
    assert command[-4:] == [f"--{k}={v}" for k, v in params.items()]
    opts, loso_args = sweep._trial_parser().parse_known_args(command[6:])
    assert opts.trial is None and opts.wandb == "auto"
    # The fold's CLI, as run_fold builds it from the trial's LOSO arguments.
    from famnet_pl.config import build_cli

    cli = build_cli([*loso_args, *tiny_args(tiny_synth, tmp_path / "cache"), "--data.fold=0",
                     f"--trainer.default_root_dir={tmp_path}"])
    expected = {w: params[f"model.loss_weights.{w}"] for w in WEIGHTS}
    assert {w: cli.model.hparams.loss_weights[w] for w in WEIGHTS} == expected         # logged hparams
    assert {w: getattr(cli.model.criterion.weights, w) for w in WEIGHTS} == expected  # what the loss uses


def test_bad_specs_fail_with_one_line_naming_the_file(tmp_path, capsys):
    good = yaml.safe_load((SPECS / "loss_weights_grid.yaml").read_text())
    cases = {
        "metric": ({**good, "metric": {"name": "val/uf1", "goal": "maximize"}},
                   "not a pooled inner-validation metric"),
        "test": ({**good, "metric": {"name": "loso/uf1", "goal": "maximize"}},
                 "selects on the test subjects"),
        "oracle": ({**good, "metric": {"name": "loso_oracle/uf1", "goal": "maximize"}},
                   "not a pooled inner-validation metric"),
        "noval": ({**good, "command": [*good["command"][:-1], "--data.val_subjects=0", "${args}"]},
                  "no inner validation"),
        "noargs": ({**good, "command": [c for c in good["command"] if c != "${args}"]}, "${args}"),
        "schema": ({**good, "metric": {"name": "loso_val/uf1", "goal": "maximise"}},
                   "not a valid W&B sweep spec"),
        "typo": ({**good, "parameters": {**good["parameters"], "model.loss_weights.wax": {"values": [1.0]}}},
                 "unknown parameter model.loss_weights.wax"),
    }
    for case, (spec, message) in cases.items():
        path = tmp_path / f"{case}.yaml"
        path.write_text(yaml.safe_dump(spec))
        assert sweep.main(["check", str(path)]) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and message in err, (case, err)
    assert sweep.main(["check", str(tmp_path / "missing.yaml")]) == 2
    assert "no such sweep spec" in capsys.readouterr().err


def test_fold_env_keeps_where_to_log_but_not_which_run():
    agent = {"WANDB_RUN_ID": "abc", "WANDB_SWEEP_ID": "s1", "WANDB_SWEEP_PARAM_PATH": "/x.yaml",
             "WANDB_RESUME": "allow", "WANDB_RUN_GROUP": "g", "WANDB_NAME": "n", "WANDB_DIR": "/w",
             "WANDB_SERVICE": "tok", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_API_KEY": "k",
             "WANDB_MODE": "online", "PATH": "/bin"}
    assert sweep.fold_env(agent) == {"WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_API_KEY": "k",
                                     "WANDB_MODE": "online", "PATH": "/bin"}


# ------------------------------------------------------------------------------- offline sweep, end to end


def test_offline_sweep_leaderboard_equals_the_runs_and_resumes(tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)                         # the spec's --config paths are relative to the repo
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    # lr 0.03: the tiny model's UF1 then depends on the weights within 2 epochs
    extra = tiny_args(root, tmp_path / "cache", **{"trainer.max_epochs": 2, "model.lr": 0.03})
    out = tmp_path / "sweeps" / "lw"
    spec_file = SPECS / "loss_weights_bayes.yaml"
    argv = ["offline", str(spec_file), "--count", "4", "--seed", "3", "--out", str(out), "--", *extra]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wandb sync {out}/*/wandb/offline-run-*" in printed

    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board["rank"]) == [1, 2, 3, 4] and set(board["status"]) == {"finished"}
    # Ranked on pooled inner validation; the test scores ride along.
    assert list(board["loso_val/uf1"]) == sorted(board["loso_val/uf1"], reverse=True)
    state = json.loads((out / "sweep.json").read_text())
    trials = {t["trial"]: t for t in state["trials"]}
    assert sorted(trials) == ["trial_000", "trial_001", "trial_002", "trial_003"] == sorted(board["trial"])
    assert len({tuple(sorted(t["params"].items())) for t in trials.values()}) == 4
    for row in board.to_dict("records"):
        run_dir = Path(row["run_dir"])
        assert run_dir == out / row["trial"] / "synth"
        summary = json.loads((run_dir / "loso_summary.json").read_text())
        assert summary["complete"] and summary["n_folds"] == 3
        for metric in ("loso_val/uf1", *sweep.TEST_METRICS):   # the leaderboard's numbers are the run's
            assert row[metric] == summary[metric], (row["trial"], metric)
        params = trials[row["trial"]]["params"]
        assert {f"model.loss_weights.{w}": row[f"model.loss_weights.{w}"] for w in WEIGHTS} == params
        folds = sorted(run_dir.glob("fold_*"))
        assert len(folds) == 3
        for fold in folds:  # the swept values reached every fold's resolved config (argv only)
            weights = yaml.safe_load((fold / "config.yaml").read_text())["model"]["loss_weights"]
            assert {f"model.loss_weights.{w}": weights[w] for w in WEIGHTS} == params

        # W&B: the trial joined the run id it was given (as under an agent) and logged the pooled
        # metrics once; every fold is a run of its own, grouped under the trial.
        trial_id, group, job_type, history = _wandb_run(out / row["trial"])
        assert trial_id == trials[row["trial"]]["wandb_run_id"] and job_type == "sweep-trial"
        assert group == f"sweeps/lw/{row['trial']}"
        assert len(history) == 1 and history[0]["loso/uf1"] == summary["loso/uf1"]
        assert history[0]["loso/uar"] == summary["loso/uar"]
        fold_runs = [_wandb_run(fold) for fold in folds]
        assert len({r[0] for r in fold_runs} | {trial_id}) == 4
        assert {(r[1], r[2]) for r in fold_runs} == {(f"sweeps/lw/{row['trial']}/synth", "loso-fold")}
        record = json.loads((out / row["trial"] / "trial.json").read_text())
        assert record["run_dir"] == str(run_dir) and record["metrics"]["loso/uf1"] == summary["loso/uf1"]
    assert "| 1 | " in (out / "leaderboard.md").read_text()

    # Proposals are reproducible from the recorded trials: what a resumed driver feeds the engine.
    ordered = state["trials"]
    for k in range(4):
        assert sweep.propose(state["spec"], ordered[:k], seed=3) == ordered[k]["params"]

    # A driver killed during trial_003: rerunning resumes it (finished folds are kept) and the
    # finished trials are not run again.
    victim = out / "trial_003" / "synth"
    kept = {p: p.stat().st_mtime_ns for p in victim.glob("fold_0[01]*/predictions.csv")}
    (victim / "loso_summary.json").unlink()
    next(victim.glob("fold_02*")).joinpath("predictions.csv").unlink()
    state["trials"][3]["status"] = "running"
    (out / "sweep.json").write_text(json.dumps(state))
    before = {t: (out / t / "trial.json").stat().st_mtime_ns for t in ("trial_000", "trial_001", "trial_002")}
    assert sweep.main(argv) == 0
    again = pd.read_csv(out / "leaderboard.csv")
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), board.drop(columns="seconds"))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert {t: (out / t / "trial.json").stat().st_mtime_ns for t in before} == before

    # `sweep best`: the top row, its test score read once.
    capsys.readouterr()
    assert sweep.main(["best", str(spec_file), "--out", str(out)]) == 0
    chosen = capsys.readouterr().out
    top = board.iloc[0]
    assert f"chosen on loso_val/uf1: {top['trial']}" in chosen and f"UF1 {top['loso/uf1']:.4f}" in chosen

    # Leak test, nested: subject k's labels changed everywhere (its test files and the other folds'
    # validation files) in every trial leave the trial chosen for fold k alone.
    from famnet_pl.loso.aggregate import aggregate_run

    spec, trials = state["spec"], json.loads((out / "sweep.json").read_text())["trials"]
    nested = sweep.nested_selection(spec, trials)
    assert set(nested["per_fold"]) == {0, 1, 2} and 0 <= nested["loso/uf1"] <= 1
    first_run = Path(board["run_dir"][0])
    for fold, subject in enumerate(pd.read_csv(p)["subject"][0]
                                   for p in sorted(first_run.glob("fold_*/predictions.csv"))):
        copies = []
        for t in trials:
            copy = tmp_path / f"leak{fold}" / t["trial"] / "synth"
            shutil.copytree(t["run_dir"], copy)
            relabel(copy, subject)
            copies.append({**t, "run_dir": str(copy)})
        assert sweep.nested_selection(spec, copies)["per_fold"][fold] == nested["per_fold"][fold], subject

    # Leak test: every test subject's labels changed in every trial's prediction files; the runs
    # re-aggregated. The chosen trial and every validation number stay; only test scores move.
    for row in board.to_dict("records"):
        relabel(Path(row["run_dir"]))
        aggregate_run(row["run_dir"], expected_folds=3)
    assert sweep.main(["best", str(spec_file), "--out", str(out)]) == 0
    after = capsys.readouterr().out
    assert after.splitlines()[0] == chosen.splitlines()[0] and after != chosen
    sweep._leaderboard(json.loads((out / "sweep.json").read_text()), out)
    leaked = pd.read_csv(out / "leaderboard.csv")
    assert list(leaked["trial"]) == list(board["trial"])
    assert list(leaked["loso_val/uf1"]) == list(board["loso_val/uf1"])
    assert list(leaked["loso/uf1"]) != list(board["loso/uf1"])


def test_a_crashed_trial_is_marked_failed_not_lost(tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((SPECS / "loss_weights_grid.yaml").read_text())
    spec["parameters"] = {"model.loss_weights.wau": {"values": ["not-a-number"]}}  # LightningCLI rejects it
    spec_file = tmp_path / "broken.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweeps" / "broken"
    argv = ["offline", str(spec_file), "--count", "2", "--out", str(out), "--",
            *tiny_args(tiny_synth, tmp_path / "cache")]
    assert sweep.main(argv) == 1
    assert "trial_000" in capsys.readouterr().err
    state = json.loads((out / "sweep.json").read_text())
    assert [(t["trial"], t["status"], t["params"]) for t in state["trials"]] == \
        [("trial_000", "failed", {"model.loss_weights.wau": "not-a-number"})]   # grid of 1: exhausted
    assert state["trials"][0]["returncode"] != 0
    assert "model.loss_weights.wau" in (out / "trial_000" / "trial.log").read_text()
    board = pd.read_csv(out / "leaderboard.csv")
    assert board["status"].tolist() == ["failed"] and board["rank"].isna().all()


@pytest.mark.slow
def test_agent_command_runs_like_under_wandb_agent(tiny_synth, tmp_path, monkeypatch):
    """What `wandb agent` does for one run, minus the server: write the sweep parameter file, export
    WANDB_RUN_ID / WANDB_SWEEP_ID / WANDB_SWEEP_PARAM_PATH, run the spec's command as the agent
    expands it (`/usr/bin/env python ...`, python from PATH)."""
    from wandb.sdk.lib.config_util import save_config_file_from_dict

    (tmp_path / "experiments").symlink_to(REPO / "experiments")   # the agent runs where it was started
    monkeypatch.chdir(tmp_path)
    spec = sweep.load_spec(SPECS / "loss_weights_grid.yaml")
    at = spec["command"].index("${args}")                        # tiny sizes, as a derived spec would
    spec["command"][at:at] = tiny_args(tiny_synth, tmp_path / "cache")
    params = sweep.propose(spec, [], seed=0)
    run_id, sweep_id = "agentrun1", "swp0001"
    param_file = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"
    save_config_file_from_dict(str(param_file), {k: {"value": v} for k, v in params.items()})
    # Not this process's wandb-core service: an in-process W&B run of an earlier test leaves it in
    # os.environ, and a trial joining it would have its run written after this test reads it.
    inherited = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env = {**inherited, "WANDB_MODE": "offline", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_ID": sweep_id,
           "WANDB_SWEEP_PARAM_PATH": str(param_file), "WANDB_DIR": str(tmp_path),
           "WANDB_PROJECT": "famnet_pl",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = sweep.expand_command(spec, params)
    assert command[:2] == ["/usr/bin/env", "python"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]

    exp_dir = tmp_path / "runs" / "sweeps" / sweep_id / run_id
    record = json.loads((exp_dir / "trial.json").read_text())
    assert record["status"] == "finished" and record["params"] == params
    summary = json.loads((exp_dir / "synth" / "loso_summary.json").read_text())
    trial_id, group, _, history = _wandb_run(exp_dir)
    assert (trial_id, group) == (run_id, f"sweeps/{sweep_id}/{run_id}")
    assert len(history) == 1 and history[0]["loso/uf1"] == summary["loso/uf1"]
    folds = sorted((exp_dir / "synth").glob("fold_*"))
    fold_runs = [_wandb_run(fold) for fold in folds]
    assert len(folds) == 3 and run_id not in {r[0] for r in fold_runs} and len({r[0] for r in fold_runs}) == 3
    assert {r[1] for r in fold_runs} == {f"sweeps/{sweep_id}/{run_id}/synth"}
    for fold in folds:
        weights = yaml.safe_load((fold / "config.yaml").read_text())["model"]["loss_weights"]
        assert {f"model.loss_weights.{w}": weights[w] for w in WEIGHTS} == params
