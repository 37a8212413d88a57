"""Every experiment YAML parses, and every model config trains one CPU step on tiny data."""

from pathlib import Path

import pytest
import yaml

from famnet_pl.cli import main
from famnet_pl.config import build_cli
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
    tiny = [a for a in tiny_args(tiny_synth, tmp_path / "cache")
            if famnet or not a.startswith("--model.net.")]
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
    assert main(["manifest", "casme2_5cls", "--annotation", str(sheet),
                 "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not-a-sheet.xlsx" in err[0] and "error" in err[0]


# --- one DataModule per dataset: chosen by the data config or --data ------------------------------

BASE, CPU_MODEL = REPO / "experiments" / "base.yaml", REPO / "experiments" / "model" / "famnet_cpu.yaml"
DATAMODULE_OF = {"casme2": "CASME2DataModule", "samm": "SAMMDataModule", "mmew": "MMEWDataModule",
                 "casme3": "CASME3DataModule", "smic": "SMICDataModule", "megc2019": "MEGC2019DataModule",
                 "megc2019_flow": "MEGC2019DataModule", "synth": "SynthDataModule",
                 "synth_casme2": "SynthDataModule",
                 "famnet": "MERDataModule", "famnet_lodo": "MERDataModule"}   # composites: any protocol


@pytest.mark.parametrize("data", DATA_CONFIGS, ids=lambda p: p.stem)
def test_data_config_picks_its_datamodule(data):
    from famnet_pl.data import datamodule

    own = yaml.safe_load(data.read_text())["data"]
    assert own["class_path"] == f"famnet_pl.data.datamodule.{DATAMODULE_OF[data.stem]}"
    cls = getattr(datamodule, DATAMODULE_OF[data.stem])
    if cls is not datamodule.MERDataModule and data.stem != "megc2019_flow":
        assert cls().hparams.protocol == own["init_args"]["protocol"]   # the class's default: the config's
    cli = build_cli(["--config", str(BASE), "--config", str(data), "--config", str(CPU_MODEL),
                     "--trainer.logger=false"])
    assert type(cli.datamodule) is cls
    assert cli.datamodule.hparams.clip_mode == "flow"          # the model config's data: {clip_mode: flow}
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes  # data -> model links
    assert cli.model.hparams.in_channels_2d == cli.datamodule.in_channels_2d


def test_synth_config_gives_the_datamodule_of_its_plain_form(tmp_path):
    """experiments/data/synth.yaml (class_path SynthDataModule) and the same options without a class_path
    (an old config: MERDataModule) give the same hyperparameters, links and overrides."""
    from famnet_pl.config import config_key, data_args

    synth = REPO / "experiments" / "data" / "synth.yaml"
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"data": yaml.safe_load(synth.read_text())["data"]["init_args"]}))
    overrides = ["--data.fold=3", "--data.val_subjects=1", f"--data.data_root={tmp_path}",
                 "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    clis = [build_cli(["--config", str(BASE), "--config", str(c), "--config", str(CPU_MODEL), *overrides])
            for c in (synth, plain)]
    assert [type(c.datamodule).__name__ for c in clis] == ["SynthDataModule", "MERDataModule"]
    # SynthDataModule adds the set's size (demo: what an old config generates, too)
    new, old = ({k: v for k, v in c.datamodule.hparams.items() if k not in ("_class_path", "size")}
                for c in clis)
    assert clis[0].datamodule.hparams["size"] == "demo"
    assert new == old and new["fold"] == 3 and new["val_subjects"] == 1 and new["data_root"] == str(tmp_path)
    assert dict(clis[0].model.hparams) == dict(clis[1].model.hparams)
    config = clis[0].config
    assert data_args(config).fold == 3 and config_key(config, "data.seed") == "data.init_args.seed"
    assert (config_key(config, "model.loss_weights.w2d") in config
            and config_key(config, "data.fold") in config)
    cfg = config.clone()                                       # the runner's fingerprint: fold-independent
    data_args(cfg).fold = 0
    fold0 = build_cli(["--config", str(BASE), "--config", str(synth), "--config", str(CPU_MODEL),
                       *[o for o in overrides if not o.startswith("--data.fold")]])
    assert clis[0].parser.dump(cfg, skip_check=True) == fold0.parser.dump(fold0.config, skip_check=True)


def test_data_option_selects_a_datamodule_on_a_fabricated_tree(tmp_path):
    from famnet_pl.data.fabricate import fabricate

    root = fabricate("casme2", tmp_path / "casme2")
    common = [f"--data.data_root={root}", "--data.face_detector=none", f"--data.cache_dir={tmp_path}/cache",
              "--trainer.logger=false"]
    cli = build_cli(["--config", str(BASE), "--data", "CASME2DataModule", *common,
                     "--config", str(CPU_MODEL)])
    dm = cli.datamodule
    assert type(dm).__name__ == "CASME2DataModule" and dm.protocol.name == "casme2_5cls"
    assert cli.model.hparams.num_classes == 5 and dm.hparams.clip_mode == "flow"
    old = build_cli(["--config", str(BASE), "--data.protocol=casme2_5cls", *common])   # no class_path
    assert type(old.datamodule).__name__ == "MERDataModule"
    assert dm.subjects() == old.datamodule.subjects() == ["casme2/sub01", "casme2/sub02", "casme2/sub03"]


def test_protocol_of_another_dataset_is_one_line_and_exit_2(capsys):
    args = ["fit", "--data", "CASME2DataModule", "--data.protocol=samm_5cls", "--trainer.logger=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CASME2DataModule: protocol 'samm_5cls' is not one of casme2_5cls" in err[0]
    assert "use SAMMDataModule" in err[0]
