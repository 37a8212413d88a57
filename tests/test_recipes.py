"""Real-data recipes on fabricated trees: a view is built, cached and batched only when the model reads
it; the size knob (``SIZE=cpu|gpu|auto``, famnet_pl.recipes) picks the view sizes and the model's
per-size config; a Cropped release needs no face-detector flag; class-balanced training."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from famnet_pl.config import build_cli, data_args
from famnet_pl.data.fabricate import fabricate
from famnet_pl.recipes import configs, detect_size, model_config
from tests.conftest import REPO

EXPERIMENTS = REPO / "experiments"


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    """A fabricated CASME II Cropped release (3 subjects, every emotion once)."""
    return fabricate("casme2", tmp_path_factory.mktemp("c2") / "casme2", layout="cropped")


def _cli(root, cache, model, *extra, size="cpu"):
    files = configs("casme2", model, size, EXPERIMENTS)
    small = ["--data.image_size=24", "--data.clip_len=4", "--data.clip_size=16", "--data.flow_size=48",
             "--data.flow_algorithm=farneback", "--data.val_subjects=1", "--trainer.logger=false"]
    return build_cli([*(a for f in files for a in ("--config", str(f))), f"--data.data_root={root}",
                      f"--data.cache_dir={cache}", *small, *extra])


def _pack_files(cache) -> set[str]:
    (pack,) = (cache / "packs").iterdir()
    return {p.stem for p in pack.glob("*.npy")}


@pytest.mark.parametrize("model, extra, cached, batch_views", [
    ("ststnet", [], {"flow"}, {"x2d"}),
    ("famnet", ["--model.model=amnet3d_r18"], {"clip"}, {"x3d"}),
    ("famnet", ["--model.model=amnet2d_r18"], {"flow"}, {"x2d"}),
    ("famnet", [], {"flow", "clip"}, {"x2d", "x3d"}),
    ("famnet_paper", [], {"apex", "clip"}, {"x2d", "x3d"}),
])
def test_only_the_views_the_model_reads_are_built_cached_and_batched(cropped, tmp_path, model, extra, cached,
                                                                     batch_views):
    cli = _cli(cropped, tmp_path / "cache", model, *extra)
    dm = cli.datamodule
    assert dm.inputs == cli.model.inputs == tuple(sorted(batch_views))
    dm.setup("fit")
    assert set(dm.prepared.arrays) == cached == _pack_files(tmp_path / "cache")
    views = dm.views
    assert views.need_clip == ("x3d" in batch_views) and views.need_flow == ("flow" in cached)
    raw = next(iter(dm.train_dataloader()))
    assert set(raw) & {"onset", "apex", "flow", "clip"} == cached
    batch = dm.on_after_batch_transfer(raw)
    assert set(batch) & {"x2d", "x3d"} == batch_views
    assert torch.isfinite(cli.model.training_step(batch, 0))
    test = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())))   # the flip TTA copies too
    assert {k for k in test if k.endswith("_flip")} <= {f"{k}_flip" for k in batch_views}


def test_a_cropped_release_needs_no_face_detector_flag(cropped, tmp_path):
    """casme2.yaml's face_detector=auto crops nothing on the Cropped layout and runs MTCNN on the raw one."""
    cli = _cli(cropped, tmp_path / "cache", "ststnet")
    assert data_args(cli.config).face_detector == "auto" and cli.datamodule.views.face_detector == "none"
    raw = fabricate("casme2", tmp_path / "raw")
    assert _cli(raw, tmp_path / "cache", "ststnet").datamodule.views.face_detector == "mtcnn"
    explicit = _cli(cropped, tmp_path / "cache", "ststnet", "--data.face_detector=center")
    assert explicit.datamodule.views.face_detector == "center"


def test_size_picks_the_view_sizes_and_the_models_per_size_config():
    cpu, gpu = (configs("casme2", "famnet", size, EXPERIMENTS) for size in ("cpu", "gpu"))
    assert [str(p.relative_to(EXPERIMENTS)) for p in cpu] == [
        "base.yaml", "size/cpu.yaml", "data/casme2.yaml", "model/famnet_cpu.yaml",
        "tuned/casme2/famnet_cpu.yaml"]
    assert [p.name for p in gpu] == ["base.yaml", "gpu.yaml", "casme2.yaml", "famnet.yaml"]
    assert model_config("ststnet", "gpu", EXPERIMENTS).name == "ststnet.yaml"        # one recipe for both
    assert model_config("famnet_cpu", "gpu", EXPERIMENTS).name == "famnet_cpu.yaml"  # an explicit file stays


def test_a_tuned_file_applies_to_its_dataset_and_model_recipe_only(tmp_path):
    import shutil

    experiments = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, experiments)
    tuned = experiments / "tuned" / "samm" / "famnet_cpu.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("model:\n  weight_decay: 0.05\n")
    assert configs("samm", "famnet", "cpu", experiments)[-1] == tuned             # last: it wins
    assert configs("samm", "famnet_cpu", "gpu", experiments)[-1] == tuned         # the recipe, any size
    assert tuned not in configs("samm", "famnet", "gpu", experiments)             # famnet.yaml: not tuned
    assert tuned not in configs("samm", "ststnet", "cpu", experiments)
    assert tuned not in configs("synth", "famnet_cpu", "cpu", experiments)       # another dataset


def test_the_casme2_tuning_repeats_the_model_files_net_but_for_what_it_changes():
    import yaml

    def net(*path):
        return yaml.safe_load(EXPERIMENTS.joinpath(*path).read_text())["model"]["net"]

    assert net("tuned", "casme2", "famnet_cpu.yaml") == {**net("model", "famnet_cpu.yaml"), "width_2d": 8,
                                                         "dropout": 0.3}


@pytest.mark.parametrize("dataset, model, size, expected, epochs", [
    ("casme2", "famnet", "cpu", None, None),          # the CPU size file's sizes and budget
    ("casme2", "famnet", "gpu", (112, 16, 112), 40),  # the GPU model recipe's budget
    ("casme2", "ststnet", "gpu", (28, 16, 112), 20),  # STSTNet's own 28 px wins
    ("synth", "famnet_cpu", "gpu", (48, 8, 32), 20),  # the synthetic demo keeps its sizes and budget
    ("synth", "famnet_cpu", "cpu", (48, 8, 32), 20),
])
def test_size_files_set_real_data_view_sizes_and_budget_only(dataset, model, size, expected, epochs, capsys):
    import yaml

    cli_args = [a for f in configs(dataset, model, size, EXPERIMENTS) for a in ("--config", str(f))]
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*cli_args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    data = printed["data"].get("init_args", printed["data"])
    if expected is None:
        cpu = yaml.safe_load((EXPERIMENTS / "size" / "cpu.yaml").read_text())
        expected = (cpu["data"]["image_size"], cpu["data"]["clip_len"], cpu["data"]["clip_size"])
        epochs = cpu["trainer"]["max_epochs"]
    assert (data["image_size"], data["clip_len"], data["clip_size"]) == expected
    assert printed["trainer"]["max_epochs"] == epochs
    tuned = (dataset, model, size) == ("casme2", "famnet", "cpu")  # tuned/casme2/famnet_cpu.yaml applies
    assert printed["model"]["balance"] == ("classes" if tuned else "none")
    if tuned:
        assert printed["model"]["net"]["width_2d"] == 8 and printed["model"]["net"]["attention"] == "cbam"


def test_recipe_errors_are_one_line_and_exit_2():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "famnet_pl.recipes", *args, "--experiments",
                               str(EXPERIMENTS)], capture_output=True, text=True)

    for args, word in ((("casme2", "nosuch", "cpu"), "MODEL=nosuch"),
                       (("nosuch", "famnet", "cpu"), "DATASET=nosuch"),
                       (("casme2", "famnet", "tpu"), "SIZE=tpu")):
        result = run(*args)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "choose one of" in lines[0]
    ok = run("casme2", "famnet", "cpu")
    assert ok.returncode == 0 and "size/cpu.yaml" in ok.stdout and "model/famnet_cpu.yaml" in ok.stdout
    assert run("casme2", "famnet", "cpu", "--model-name").stdout.strip() == "famnet_cpu"


def test_make_loso_resolves_the_size(tmp_path):
    def line(*make_vars):
        dry = subprocess.run(["make", "-s", "-n", "loso", *make_vars, "STAMP=/dev/null"], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return next(x for x in dry.stdout.replace("\\\n", " ").splitlines() if "famnet-pl loso" in x)

    cpu = line("DATASET=casme2", "MODEL=famnet", "SIZE=cpu")
    assert "size/cpu.yaml" in cpu and "model/famnet_cpu.yaml" in cpu and "--exp famnet_cpu" in cpu
    assert "tuned/casme2/famnet_cpu.yaml" in cpu
    gpu = line("DATASET=casme2", "MODEL=famnet", "SIZE=gpu")
    assert "size/gpu.yaml" in gpu and "model/famnet.yaml" in gpu and "--exp famnet " in gpu
    assert "tuned/" not in gpu


def test_auto_size_is_gpu_only_where_nvidia_smi_lists_one(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    assert detect_size() == "gpu"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert detect_size() == "cpu"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert detect_size() == "cpu"


def test_class_balance_weighs_each_class_equally():
    from types import SimpleNamespace

    from famnet_pl.losses import WeightedMultiTaskLoss
    from famnet_pl.models.module import class_balance

    labels = np.array([4] * 9 + [0] * 3 + [1] * 2 + [3] * 1)              # class 2 has no training sample
    train = SimpleNamespace(labels=np.r_[labels, [2, 2]], indices=np.arange(len(labels)))
    weight = class_balance(train, 5).numpy()
    counts = np.bincount(labels, minlength=5)
    # every class present weighs n / C in all, one without training samples 0
    np.testing.assert_allclose((weight * counts)[counts > 0], len(labels) / 5, rtol=1e-6)
    assert weight[2] == 0
    loss = WeightedMultiTaskLoss()
    loss.class_weight = torch.as_tensor(weight)
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 4, 3, 4, 4])
    _, parts = loss({"emotion_2d": logits, "emotion_fused": logits}, target)
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.as_tensor(weight))
    assert torch.isclose(parts["ce_2d"], expected) and torch.isclose(parts["ce_fused"], expected)
    assert not torch.isclose(expected, torch.nn.functional.cross_entropy(logits, target))
    assert "class_weight" not in loss.state_dict()      # set from each fold's labels, never saved
