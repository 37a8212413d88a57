"""Every experiment YAML parses, and every model config trains one CPU step on tiny data."""

from pathlib import Path

import pytest
import yaml

from famnet_pl.cli import build_cli, main
from tests.conftest import REPO, tiny_args

DATA_CONFIGS = sorted((REPO / "experiments" / "data").glob("*.yaml"))
MODEL_CONFIGS = sorted((REPO / "experiments" / "model").glob("*.yaml"))


@pytest.mark.parametrize("data", DATA_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_configs_stack_and_parse(data, model, capsys):
    base = REPO / "experiments" / "base.yaml"
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(base), "--config", str(data), "--config", str(model), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "protocol:" in printed and "loss_weights:" in printed


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_every_config_smoke_runs_on_cpu(config, tiny_synth, tmp_path):
    """fast_dev_run on tiny data; sizes and precision shrunk for CPU, everything else as configured."""
    own = yaml.safe_load(config.read_text())["model"]
    famnet = own["model"] in ("famnet_r18", "amnet2d_r18", "amnet3d_r18")
    tiny = [a for a in tiny_args(tiny_synth, tmp_path / "cache") if famnet or not a.startswith("--model.net.")]
    if yaml.safe_load(config.read_text()).get("data", {}).get("val_subjects", 0) > 1:
        tiny.append("--data.val_subjects=1")  # the tiny set has 2 training subjects per fold
    args = ["--config", str(REPO / "experiments" / "base.yaml"), "--config", str(config), *tiny,
            "--trainer.fast_dev_run=1", "--trainer.precision=32", f"--trainer.default_root_dir={tmp_path}"]
    cli = build_cli(args)
    if famnet:
        assert cli.model.hparams.net["width_2d"] == 4
    for key, value in own.get("net", {}).items():                # the config's own options survive
        if not (famnet and key.startswith(("width_", "small_input"))):
            assert cli.model.hparams.net[key] == value
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.state.finished


def test_main_without_command_prints_usage(capsys):
    assert main([]) == 2
    assert "famnet-pl" in capsys.readouterr().err


def test_aggregate_command_on_empty_dir(tmp_path: Path, capsys):
    assert main(["aggregate", str(tmp_path)]) == 1
    assert "no finished fold" in capsys.readouterr().err


def test_bad_sheet_is_one_line_and_exit_2(tmp_path, capsys):
    sheet = tmp_path / "not-a-sheet.xlsx"
    sheet.write_text("hello")
    assert main(["manifest", "casme2_5cls", "--annotation", str(sheet), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not-a-sheet.xlsx" in err[0] and "error" in err[0]
