"""The runner layer's contracts: LosoOptions round-trips, run.json is the plan a worker runs, and the
runner options that change a fold's files are in the fingerprint."""

import json

import pandas as pd
import pytest

from famnet_pl.loso.options import LosoOptions, loso_parser
from famnet_pl.loso.plan import LosoPlan, plan_loso
from famnet_pl.loso.rundir import PREDICTIONS, RUN_JSON, fold_dir_name, is_finished
from tests.conftest import tiny_args


@pytest.mark.parametrize("options", [
    LosoOptions(),
    LosoOptions(exp="a/b", runs_dir="/r", folds=("0", "sub02"), wandb="off", eval_every=0, oracle_by="uf1",
                jobs=2, gpus=("0", "1"), jobs_per_gpu=2, threads=1, resume_every=0, progress=False),
])
def test_options_round_trip_through_argv_and_run_json(options):
    opts, rest = loso_parser().parse_known_args([*options.to_argv(), "--model.lr=0.1"])
    assert LosoOptions.from_args(opts) == options and rest == ["--model.lr=0.1"]
    assert LosoOptions.from_record(json.loads(json.dumps(options.to_dict()))) == options


def test_a_worker_runs_the_recorded_plan_not_a_new_one(two_subjects, tmp_path):
    from famnet_pl.cli import main

    args, runs = tiny_args(two_subjects, tmp_path / "cache"), tmp_path / "runs"
    plan = plan_loso([*args, "--trainer.max_epochs=1"], exp="w", runs_dir=str(runs), wandb="off")
    loaded = LosoPlan.load(plan.run_dir)
    assert (loaded.cli_args, loaded.options, loaded.subjects, loaded.config_hash) == \
        (plan.cli_args, plan.options, plan.subjects, plan.config_hash)
    # The worker takes everything from run.json: the 1-epoch budget recorded there, not a re-plan.
    assert main(["worker", str(plan.run_dir), "--fold", "1", "--threads", "1"]) == 0
    fold = plan.run_dir / fold_dir_name(1, plan.subjects[1])
    assert set(pd.read_csv(fold / PREDICTIONS)["epoch"]) == {0}
    assert json.loads((fold / "metrics.json").read_text())["config_hash"] == plan.config_hash
    assert not is_finished(plan.run_dir / fold_dir_name(0, plan.subjects[0]))
    # A requeued task of a finished fold does nothing.
    before = (fold / PREDICTIONS).stat().st_mtime_ns
    assert main(["worker", str(plan.run_dir), "--fold", "1"]) == 0
    assert (fold / PREDICTIONS).stat().st_mtime_ns == before


def test_a_worker_without_a_recorded_plan_is_one_line(tmp_path, capsys):
    from famnet_pl.cli import main

    assert main(["worker", str(tmp_path), "--fold", "0"]) == 2
    assert f"{tmp_path / RUN_JSON}: no recorded plan" in capsys.readouterr().err


def test_eval_every_is_in_the_fingerprint_and_threads_are_not(two_subjects, tmp_path):
    args = tiny_args(two_subjects, tmp_path / "cache")
    base = plan_loso(args, record=False).config_hash
    assert plan_loso(args, eval_every=2, record=False).config_hash != base
    assert plan_loso(args, threads=1, jobs=2, oracle_by="uf1", record=False).config_hash == base


def test_a_worker_refuses_a_config_changed_since_planning(two_subjects, tmp_path, capsys):
    from famnet_pl.cli import main

    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  lr: 0.001\n")
    args = [*tiny_args(two_subjects, tmp_path / "cache"), "--config", str(extra)]
    plan = plan_loso(args, exp="changed", runs_dir=str(tmp_path / "runs"), wandb="off")
    extra.write_text("model:\n  lr: 0.1\n")               # edited while the fold was queued
    assert main(["worker", str(plan.run_dir), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "the config files or annotations changed since the run was planned" in err
    assert not is_finished(plan.run_dir / fold_dir_name(0, plan.subjects[0]))
