"""Using a trained model: train-final writes a model directory; predict applies the training
preprocessing to a frame folder, a video or a clip list and agrees with LOSO's own predictions;
export to TorchScript and ONNX matches the eager model; bad input stops with one line."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from famnet_pl.cli import main
from famnet_pl.data.frames import FrameSource
from famnet_pl.data.manifest import build_manifest
from famnet_pl.deploy.bundle import MODEL_CARD_JSON, MODEL_CARD_MD, MODEL_CKPT, PREPROCESS_JSON
from famnet_pl.deploy.export import MatrixAvgPool, export_model
from famnet_pl.deploy.predict import ClipSpec, frame_pattern, predict_clips
from famnet_pl.loso.final import train_final
from famnet_pl.loso.runner import run_loso
from tests.conftest import tiny_args


@pytest.fixture(scope="module")
def final_dir(tiny_synth, tmp_path_factory):
    runs = tmp_path_factory.mktemp("final_runs")
    args = tiny_args(tiny_synth, runs / "cache", **{"data.tta": "hflip", "data.val_subjects": 1})
    return train_final(args, exp="final", runs_dir=str(runs))


@pytest.fixture(scope="module")
def manifest(tiny_synth):
    return build_manifest(protocol="synth_4cls", root=str(tiny_synth))[0]


def _spec(root, row, **kw) -> ClipSpec:
    return ClipSpec(root / row["frame_dir"], int(row["onset"]), int(row["apex"]), int(row["offset"]), **kw)


def test_train_final_writes_a_model_directory_with_its_card(final_dir, manifest):
    assert final_dir.name == "final" and not final_dir.with_name("final.tmp").exists()
    for name in (MODEL_CKPT, PREPROCESS_JSON, MODEL_CARD_MD, MODEL_CARD_JSON, "config.yaml"):
        assert (final_dir / name).is_file(), name
    card = json.loads((final_dir / MODEL_CARD_JSON).read_text())
    data = card["data"]
    # No test subject: the 3 subjects are 2 training + 1 inner-validation (the fusion weight).
    assert data["subjects"] == 3 and data["training_subjects"] == 2 and len(data["validation_subjects"]) == 1
    assert data["training_samples"] + data["validation_samples"] == len(manifest)
    assert card["training"]["epochs"] == 2 and card["loso"] is None
    assert card["versions"]["torch"] == torch.__version__
    pre = json.loads((final_dir / PREPROCESS_JSON).read_text())
    assert pre["tta"] == "hflip" and pre["views"]["flow_algorithm"] == "farneback"
    assert len(pre["stats"]["mean_2d"]) == 3 and pre["classes"][0] == "happiness"


def test_predict_frames_gives_probabilities_summing_to_one(final_dir, tiny_synth, manifest, tmp_path):
    row = manifest.iloc[0]
    out = tmp_path / "p.json"
    assert main(["predict", str(final_dir), "--frames", str(tiny_synth / row["frame_dir"]),
                 "--onset", str(row["onset"]), "--apex", str(row["apex"]), "--offset", str(row["offset"]),
                 "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    probs = result["probabilities"]
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert result["predicted"] == max(probs, key=probs.get)
    assert set(result["au_probabilities"]) == {f"AU{a}" for a in json.loads(
        (final_dir / PREPROCESS_JSON).read_text())["au_vocab"]}
    assert result["frames_used"]["flow"] == [row["onset"], row["apex"]]


def test_frame_pattern_reads_numbered_and_padded_names(tmp_path):
    for name in ("img7.jpg", "img8.jpg", "img10.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert frame_pattern(tmp_path) == ("img{k}.jpg", [7, 8, 10])
    padded = tmp_path / "padded"
    padded.mkdir()
    for k in (1, 2, 3):
        (padded / f"{k:05d}.png").write_bytes(b"")
    assert frame_pattern(padded) == ("{k:05d}.png", [1, 2, 3])


def test_a_video_gives_the_same_answer_as_its_frames(final_dir, tiny_synth, manifest, tmp_path):
    """The clip written as an mp4 (frames onset..offset; --first-frame = onset): the same label, and
    probabilities within 0.02, the effect of the documented mp4 tolerance of the arrays
    (tests/test_data_preprocess.py: mean 4 grey levels, 0.35 px of flow)."""
    row = manifest.iloc[1]
    source = FrameSource(tiny_synth / row["frame_dir"], row["frame_pattern"])
    frames = source.read_many(list(range(int(row["onset"]), int(row["offset"]) + 1)))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    a, b = predict_clips(final_dir, [_spec(tiny_synth, row),
                                     ClipSpec(video, int(row["onset"]), int(row["apex"]), int(row["offset"]),
                                              first_frame=int(row["onset"]))])
    assert a["predicted"] == b["predicted"]
    assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 0.02


def test_spot_estimates_onset_and_apex_and_says_so(final_dir, tiny_synth, manifest):
    row = manifest.iloc[2]
    (result,) = predict_clips(final_dir, [ClipSpec(tiny_synth / row["frame_dir"], spot=True)])
    numbers = frame_pattern(tiny_synth / row["frame_dir"])[1]
    assert result["onset"] == numbers[0] and result["offset"] == numbers[-1]
    assert result["onset"] < result["apex"] <= result["offset"]
    assert any("--spot" in w for w in result["warnings"])


def test_predict_agrees_with_the_loso_fold_it_came_from(two_subjects, tmp_path):
    """One code path: a kept fold model predicting its test subject's clips from their frame folders
    (a clip list) gives that fold's predictions.csv back, flip TTA included."""
    args = tiny_args(two_subjects, tmp_path / "cache", **{"data.tta": "hflip"})
    run_loso(args, exp="keep", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False, folds=["0"],
             keep_models=True)
    fold = next((tmp_path / "runs" / "keep" / "synth").glob("fold_00_*"))
    expected = pd.read_csv(fold / "predictions.csv")
    manifest = build_manifest(protocol="synth_4cls", root=str(two_subjects))[0].set_index("sample_id")
    rows = manifest.loc[expected["sample_id"]]
    clips = tmp_path / "clips.csv"
    table = rows[["onset", "apex", "offset"]].reset_index(drop=True)
    table.insert(0, "clip", [str(two_subjects / d) for d in rows["frame_dir"]])
    table.assign(id=expected["sample_id"]).to_csv(clips, index=False)
    out = tmp_path / "p.csv"
    assert main(["predict", str(fold), "--manifest", str(clips), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    assert got["clip"].tolist() == expected["sample_id"].tolist()
    prob_columns = [c for c in expected.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[prob_columns].to_numpy(), expected[prob_columns].to_numpy(), atol=1e-5)
    au_columns = [c for c in expected.columns if c.endswith("_prob")]
    np.testing.assert_allclose(got[au_columns].to_numpy(), expected[au_columns].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_the_eager_model(final_dir, fmt, tmp_path):
    out = tmp_path / fmt
    path, error = export_model(final_dir, fmt, out=out)
    assert path.is_file() and (out / PREPROCESS_JSON).is_file() and (out / "io.json").is_file()
    assert error <= 1e-4


@pytest.mark.parametrize("shape, size", [((2, 3, 5, 7), (3, 3)), ((1, 2, 2, 4, 5), (1, 3, 3)),
                                         ((1, 1, 6, 6), (3, 2))])
def test_matrix_pooling_is_adaptive_average_pooling(shape, size):
    x = torch.randn(*shape)
    reference = (torch.nn.functional.adaptive_avg_pool2d if len(size) == 2
                 else torch.nn.functional.adaptive_avg_pool3d)(x, size)
    torch.testing.assert_close(MatrixAvgPool(size)(x), reference)


# --- one line, exit 2 ------------------------------------------------------------------------------------

def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _frames_args(tiny_synth, row, **numbers):
    values = {"onset": row["onset"], "apex": row["apex"], "offset": row["offset"], **numbers}
    return ["--frames", str(tiny_synth / row["frame_dir"]),
            *[a for k, v in values.items() for a in (f"--{k}", str(v))]]


def test_predict_errors_are_one_line(final_dir, tiny_synth, manifest, tmp_path, capsys):
    row = manifest.iloc[0]
    late = _frames_args(tiny_synth, row, offset=row["offset"] + 40)
    line = _error(capsys, ["predict", str(final_dir), *late])
    assert "outside the clip's frames" in line and f"offset {row['offset'] + 40}" in line
    line = _error(capsys, ["predict", str(final_dir), *_frames_args(tiny_synth, row, apex=row["onset"],
                                                                    offset=row["onset"])])
    assert "shorter than the 2" in line
    no_bundle = tmp_path / "empty"
    no_bundle.mkdir()
    assert "no preprocess.json" in _error(capsys, ["predict", str(no_bundle), *_frames_args(tiny_synth, row)])
    # a frame that cannot be read
    broken = tmp_path / "broken"
    shutil.copytree(tiny_synth / row["frame_dir"], broken)
    victim = broken / row["frame_pattern"].format(k=int(row["apex"]))
    victim.write_bytes(victim.read_bytes()[:200])
    line = _error(capsys, ["predict", str(final_dir), "--frames", str(broken), "--onset", str(row["onset"]),
                           "--apex", str(row["apex"]), "--offset", str(row["offset"])])
    assert victim.name in line
    video = tmp_path / "bad.mp4"
    video.write_bytes(b"not a video")
    line = _error(capsys, ["predict", str(final_dir), "--video", str(video), "--onset", "0", "--apex", "1",
                           "--offset", "2"])
    assert "bad.mp4" in line and "cannot open video" in line


def test_a_checkpoint_from_another_model_is_refused(final_dir, tiny_synth, manifest, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(final_dir, other)
    pre = json.loads((other / PREPROCESS_JSON).read_text())
    (other / PREPROCESS_JSON).write_text(json.dumps({**pre, "model": "ststnet"}))
    line = _error(capsys, ["predict", str(other), *_frames_args(tiny_synth, manifest.iloc[0])])
    assert "another model" in line
    (other / MODEL_CKPT).write_bytes(b"junk")
    line = _error(capsys, ["export", str(other), "--format", "torchscript"])
    assert "not a famnet_pl model checkpoint" in line


def test_no_face_names_the_frame(final_dir, tmp_path, capsys):
    """With a face detector in preprocess.json, a clip without a face stops at its onset frame."""
    model = tmp_path / "mtcnn"
    shutil.copytree(final_dir, model)
    pre = json.loads((model / PREPROCESS_JSON).read_text())
    views = {**pre["views"], "face_detector": "mtcnn"}
    (model / PREPROCESS_JSON).write_text(json.dumps({**pre, "views": views}))
    clip = tmp_path / "wall"
    clip.mkdir()
    for k in range(5, 12):
        cv2.imwrite(str(clip / f"img{k}.jpg"), np.full((96, 96, 3), 128, np.uint8))
    line = _error(capsys, ["predict", str(model), "--frames", str(clip), "--onset", "5", "--apex", "8",
                           "--offset", "11"])
    assert "no face found on frame 5" in line


def test_train_final_from_a_run_without_inner_validation_is_refused(two_subjects, tmp_path):
    from famnet_pl.utils.errors import BadInput

    args = tiny_args(two_subjects, tmp_path / "cache")
    run_loso(args, exp="r", runs_dir=str(tmp_path / "runs"), wandb="off", progress=False)
    with pytest.raises(BadInput, match="no inner-validation"):
        train_final(args, exp="f", runs_dir=str(tmp_path / "runs"), run=tmp_path / "runs" / "r" / "synth")


def test_train_final_from_a_run_takes_its_validation_selected_epoch_and_refuses_another_config(
        tiny_synth, tmp_path):
    from famnet_pl.utils.errors import BadInput

    args = tiny_args(tiny_synth, tmp_path / "cache", **{"trainer.max_epochs": 3, "data.val_subjects": 1})
    runs = tmp_path / "runs"
    summary = run_loso(args, exp="r", runs_dir=str(runs), wandb="off", progress=False)
    by_epoch = {int(e): v for e, v in summary["val_uf1_by_epoch"].items()}
    chosen = max(by_epoch, key=lambda e: (by_epoch[e], e))
    out = train_final(args, exp="f", runs_dir=str(runs), run=runs / "r" / "synth")
    card = json.loads((out / MODEL_CARD_JSON).read_text())
    assert card["training"]["epochs"] == chosen + 1 and card["training"]["schedule_epochs"] == 3
    assert card["loso"]["loso/uf1"] == summary["loso/uf1"]
    with pytest.raises(BadInput, match="differs from the run's in model.lr"):
        train_final([*args, "--model.lr=0.5"], exp="f", runs_dir=str(runs), run=runs / "r" / "synth")


def test_more_bad_input_is_one_line(final_dir, tiny_synth, manifest, tmp_path, capsys):
    empty = tmp_path / "clips.csv"
    empty.write_text("")
    line = _error(capsys, ["predict", str(final_dir), "--manifest", str(empty)])
    assert "cannot read the clip list" in line
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    line = _error(capsys, ["export", str(final_dir), "--format", "torchscript", "--out", str(busy)])
    assert "holds other files" in line and (busy / "notes.txt").is_file()
    flow_model = tmp_path / "flow_images"
    shutil.copytree(final_dir, flow_model)
    pre = json.loads((flow_model / PREPROCESS_JSON).read_text())
    (flow_model / PREPROCESS_JSON).write_text(json.dumps({**pre, "flow_images": True}))
    line = _error(capsys, ["predict", str(flow_model), *_frames_args(tiny_synth, manifest.iloc[0])])
    assert "precomputed flow images" in line


def test_a_model_trained_from_pretrained_weights_loads_without_them(final_dir, tmp_path):
    """The weight file named at training time (or a download) is not needed where the model is used."""
    from famnet_pl.deploy.bundle import load_bundle

    moved = tmp_path / "moved"
    shutil.copytree(final_dir, moved)
    checkpoint = torch.load(moved / MODEL_CKPT, weights_only=False)
    checkpoint["hyper_parameters"]["net"] = {**checkpoint["hyper_parameters"]["net"],
                                             "pretrained_2d": str(tmp_path / "gone.pth")}
    torch.save(checkpoint, moved / MODEL_CKPT)
    module, _ = load_bundle(moved)
    reference, _ = load_bundle(final_dir)
    for a, b in zip(module.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
