"""``famnet-pl loso --stack-folds``: every fold of STSTNet trained at once writes the files a
sequential fold writes, each fold's copy sees only its own training subjects, and configs that
cannot stack stop with one line."""

import json

import pandas as pd
import pytest
import yaml

from famnet_pl.data import fabricate
from famnet_pl.loso import run_loso
from famnet_pl.loso.rundir import (
    FOLD_CONFIG,
    PREDICTIONS,
    PREDICTIONS_EPOCHS,
    VAL_PREDICTIONS_EPOCHS,
    finished_folds,
)
from famnet_pl.utils.errors import BadInput
from tests.conftest import tiny_args


@pytest.fixture(scope="module")
def flow_tree(tmp_path_factory):
    return fabricate.fabricate("megc2019_flow", tmp_path_factory.mktemp("flow") / "megc2019_flow", subjects=2)


def _args(root, cache, *extra):
    return ["--config", "experiments/base.yaml", "--config", "experiments/data/megc2019_flow.yaml",
            "--config", "experiments/model/ststnet.yaml", f"--data.data_root={root}",
            f"--data.cache_dir={cache}", "--data.batch_size=4", "--trainer.max_epochs=3",
            "--data.val_subjects=0",  # the fabricated tree has 2 subjects a dataset
            "--trainer.accelerator=cpu", *extra]


def test_stacked_folds_write_every_fold_and_a_summary(flow_tree, tmp_path):
    args = _args(flow_tree, tmp_path / "cache", "--data.val_subjects=1")
    summary = run_loso(args, exp="st", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False,
                       stack_folds=True)
    run = tmp_path / "runs" / "st" / "megc2019_flow"
    folds = finished_folds(run)
    assert summary["complete"] and len(folds) == 6  # 3 datasets x 2 subjects
    for fold in folds:
        meta = json.loads((fold / "metrics.json").read_text())
        predictions = pd.read_csv(fold / PREDICTIONS)
        assert set(predictions["subject"]) == {meta["subject"]} == set(meta["split"]["test"])
        assert meta["subject"] not in meta["split"]["train"] + meta["split"]["val"]
        assert sorted(pd.read_csv(fold / PREDICTIONS_EPOCHS)["epoch"].unique()) == [0, 1, 2]
        assert set(pd.read_csv(fold / VAL_PREDICTIONS_EPOCHS)["subject"]) == set(meta["split"]["val"])
        config = yaml.safe_load((fold / FOLD_CONFIG).read_text())
        assert config["model"]["model"] == "ststnet" and config["data"]["init_args"]["fold"] == meta["fold"]
    assert "loso/uf1" in summary and "loso_val/uf1" in summary


def test_a_fold_trains_the_same_beside_other_folds_or_alone(flow_tree, tmp_path):
    """Per-fold independence: fold 0's copy gets nothing from the folds stacked beside it."""
    args = _args(flow_tree, tmp_path / "cache")
    run_loso(args, exp="all", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, stack_folds=True)
    run_loso(args, exp="one", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, stack_folds=True,
             folds=["0"])
    (alone,) = finished_folds(tmp_path / "runs" / "one" / "megc2019_flow")
    beside = finished_folds(tmp_path / "runs" / "all" / "megc2019_flow")[0]
    a, b = (pd.read_csv(f / PREDICTIONS_EPOCHS) for f in (alone, beside))
    probs = [c for c in a if c.startswith("prob_")]
    pd.testing.assert_frame_equal(a[probs], b[probs], atol=1e-5, rtol=0)


def test_a_model_without_a_stacked_form_stops_with_one_line(tiny_synth, tmp_path):
    with pytest.raises(BadInput, match="--stack-folds: model famnet_r18 has no stacked form"):
        run_loso(tiny_args(tiny_synth, tmp_path / "cache"), exp="x", runs_dir=str(tmp_path / "runs"),
                 wandb="off", progress=False, stack_folds=True)


@pytest.mark.parametrize("mode", ["augment", "plain", "flip"])
def test_stacked_inputs_are_the_per_batch_views(flow_tree, tmp_path, mode):
    """The stacked folds' one gather from the padded views gives, fold by fold, what the batch path
    gives (views.raw_2d -> transforms.apply_clip / hflip -> the fold's statistics), in the
    channels-last layout StackedSTSTNet takes without a copy."""
    import copy

    import torch

    from famnet_pl.config import build_cli
    from famnet_pl.data.transforms import apply_clip, hflip
    from famnet_pl.data.views import raw_2d
    from famnet_pl.loso import stacked

    cli = build_cli([*_args(flow_tree, tmp_path / "cache"), "--trainer.logger=false", "--data.tta=hflip"])
    folds = stacked._folds(cli.datamodule, [0, 1, 2])
    stack = stacked._Stack(cli, folds, torch.device("cpu"))
    index, _ = stacked._pad([f.train[:4] for f in folds], 4)
    rngs = copy.deepcopy(stack.rngs)
    got = stack.inputs(index, augment=mode == "augment", flip=mode == "flip")
    b, k = index.shape
    assert got.reshape(b, -1, *got.shape[3:]).is_contiguous(memory_format=torch.channels_last)
    x = raw_2d(cli.datamodule.prepare().arrays, "flow")
    for j, f in enumerate(folds):
        rows = x[index[:, j]]
        if mode == "augment":
            rows = apply_clip(rows[:, None], stack.augment.draw_many(rngs[j], b, *rows.shape[1:3]), rgb=None,
                              flow_u=stack.flow_u)[:, 0]
        elif mode == "flip":
            rows = hflip(rows, stack.flow_u)
        expected = ((rows - f.mean) / f.std).permute(0, 3, 1, 2)
        assert torch.equal(got[:, j], expected)
