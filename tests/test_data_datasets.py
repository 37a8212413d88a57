"""Every dataset and protocol: published counts from the real sheets, and LOSO on fabricated trees.

The real sheets (../shared/annotations, tests marked ``shared``) must reproduce the published
counts; the fabricated trees (data/fabricate.py: tiny frame folders in each dataset's real layout)
must run through manifest -> cache -> LOSO for every protocol.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from famnet_pl.data import fabricate
from famnet_pl.data.annotations import SheetError, read_samm_sheet
from famnet_pl.data.au import au_targets
from famnet_pl.data.manifest import ManifestError, build_manifest
from famnet_pl.data.protocols import PROTOCOLS
from tests.conftest import REPO, SHARED, tiny_args

SAMM = SHARED / "samm" / "SAMM_Micro_FACS_Codes_v2.xlsx"
CASME3 = SHARED / "casme3" / "cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx"


def _real(protocol: str, **kwargs):
    """Manifest of ``protocol`` from the real sheets (found below ../shared/annotations)."""
    from famnet_pl.data.manifest import pinned_sheets

    return build_manifest(protocol=protocol, annotations=pinned_sheets(protocol, SHARED), **kwargs)


def _per_dataset(manifest: pd.DataFrame, classes) -> dict[str, tuple[int, ...]]:
    counts = manifest.groupby("dataset")["label"].value_counts().unstack(fill_value=0)
    return {d: tuple(int(counts.loc[d].get(i, 0)) for i in range(len(classes))) for d in counts.index}


# --- published counts (real sheets) --------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.parametrize("protocol, samples, subjects", [
    ("casme2", 255, 26), ("casme2_5cls", 246, 26), ("casme2_5cls_2019", 249, 26),
    ("samm", 159, 29), ("samm_5cls", 136, None), ("samm_3cls", 133, 28),
    ("mmew", 234, 30), ("mmew_6cls", 234, 30), ("mmew_5cls", 226, 30),
    ("megc2019_3cls", 442, 68), ("megc2019_flow_3cls", 442, 68), ("famnet_3cls", 512, 82),
])
def test_published_counts(protocol, samples, subjects):
    manifest, _ = _real(protocol)
    assert len(manifest) == samples and manifest["sample_id"].is_unique
    if subjects is not None:
        assert manifest["subject"].nunique() == subjects


@pytest.mark.shared
@pytest.mark.parametrize("protocol", ["megc2019_3cls", "megc2019_flow_3cls"])
def test_megc2019_split_per_dataset(protocol):
    manifest, _ = _real(protocol)
    assert PROTOCOLS[protocol].classes == ("negative", "positive", "surprise")
    assert _per_dataset(manifest, PROTOCOLS[protocol].classes) == {
        "casme2": (88, 32, 25), "samm": (92, 26, 15), "smic": (70, 51, 43)}
    assert manifest["subject"].str.match(r"^(casme2/sub\d\d|samm/\d{3}|smic/s\d\d)$").all()


@pytest.mark.shared
def test_casme3_860_mes_keyed_by_onset_with_errata_and_official_lists():
    manifest, report = _real("casme3", official_lists=False)
    assert report.rows_in_sheet["casme3"] == 860 and len(manifest) == 860
    assert manifest["sample_id"].is_unique                 # (subject, video, onset), never (subject, video)
    assert manifest["subject"].nunique() == 94
    row = manifest.set_index("sample_id").loc["casme3/spNO.149/d/112"]
    assert row["apex"] == 160                             # apex 83 < onset: fixed from the full sheet
    assert "casme3/spNO.216/d/2647" in set(manifest["sample_id"])   # onset 3647 > apex: fixed
    assert len(report.fixed) == 6
    with_lists, report = _real("casme3")
    assert len(with_lists) == 845                         # 15 MEs with an occluded apex dropped
    assert sum("apex occluded" in m for m in report.dropped_by_rule) == 15
    assert (with_lists["frame_dir"]
            == with_lists["subject"].str[7:] + "/" + with_lists["video"] + "/color").all()
    assert with_lists["depth_dir"].str.endswith("/depth").all()


@pytest.mark.shared
@pytest.mark.parametrize("protocol, official_lists, samples", [
    ("casme3_7cls", False, 860), ("casme3_4cls", False, 860), ("casme3_3cls", False, 699),
    ("casme3_3cls_687", False, 687), ("casme3_3cls_687", True, 678),
])
def test_casme3_protocol_counts(protocol, official_lists, samples):
    manifest, _ = _real(protocol, official_lists=official_lists)
    assert len(manifest) == samples


@pytest.mark.shared
@pytest.mark.parametrize("protocol, per_class, official_lists", [
    ("casme2_5cls", {"casme2": (32, 25, 63, 27, 99)}, True),
    ("samm_5cls", {"samm": (57, 12, 26, 15, 26)}, True),
    ("mmew_6cls", {"mmew": (36, 89, 72, 16, 13, 8)}, True),
    ("casme3_4cls", {"casme3": (457, 55, 187, 161)}, False),
    ("casme3_3cls_687", {"casme3": (449, 54, 184)}, False),
    ("famnet_3cls", {"casme2": (88, 32, 25), "samm": (92, 26, 15), "mmew": (109, 36, 89)}, True),
])
def test_published_per_class_counts(protocol, per_class, official_lists):
    manifest, _ = _real(protocol, official_lists=official_lists)
    assert _per_dataset(manifest, PROTOCOLS[protocol].classes) == per_class


@pytest.mark.shared
@pytest.mark.parametrize("protocol, subjects", [("casme3_3cls", 88), ("casme3_3cls_687", 87)])
def test_casme3_3cls_subjects(protocol, subjects):
    assert _real(protocol, official_lists=False)[0]["subject"].nunique() == subjects


@pytest.mark.shared
def test_a_sheet_that_is_not_the_official_release_is_reported(tmp_path):
    copy = tmp_path / "SAMM_Micro_FACS_Codes_v2.xlsx"
    grid = pd.read_excel(SAMM, sheet_name="MICRO_ONLY", header=None, dtype=str)
    grid.to_excel(copy, sheet_name="MICRO_ONLY", header=False, index=False)
    _, report = build_manifest(protocol="samm_5cls", annotation=copy)
    assert "DIFFERS from the official release" in report.sheets["samm"]
    _, report = build_manifest(protocol="samm_5cls", annotation=SAMM)
    assert "official release" in report.sheets["samm"] and "DIFFERS" not in report.sheets["samm"]


@pytest.mark.shared
def test_mmew_4cls_needs_the_original_sheet():
    with pytest.raises(ManifestError, match=r"class\(es\) \['others'\] have no sample"):
        build_manifest(protocol="mmew_4cls", annotation=SHARED / "mmew" / "MMEW_Micro_Exp_delete_others.csv")


@pytest.mark.shared
@pytest.mark.parametrize("path", sorted((REPO / "data_manifests").glob("*.csv")), ids=lambda p: p.stem)
def test_committed_manifests_equal_fresh_builds(path):
    committed = pd.read_csv(path, dtype=str, keep_default_na=False)
    fresh, report = _real(path.stem)
    fresh = fresh.assign(sheet_sha256=report.sheet_sha256)
    fresh = pd.read_csv(__import__("io").StringIO(fresh.to_csv(index=False)), dtype=str,
                        keep_default_na=False)
    pd.testing.assert_frame_equal(committed, fresh)


@pytest.mark.shared
def test_samm_header_row_is_detected_not_hard_coded(tmp_path):
    """Another release has its header after one preamble row: same 159 samples."""
    grid = pd.read_excel(SAMM, sheet_name="MICRO_ONLY", header=None, dtype=str)
    short = pd.concat([grid.iloc[[0]], grid.iloc[13:]], ignore_index=True)
    out = tmp_path / "samm_short.xlsx"
    short.to_excel(out, sheet_name="MICRO_ONLY", header=False, index=False)
    table = read_samm_sheet(out)
    assert len(table) == 159 and table["subject"].iloc[0] == "006"
    assert table["sheet_row"].iloc[0] == 3               # header on row 2, first sample on row 3


@pytest.mark.shared
@pytest.mark.parametrize("column, value, message", [
    ("Estimated Emotion", "Angr", r"row 15, column 'Estimated Emotion': unknown emotion 'angr'"),
    ("Onset Frame", "soon", r"row 15, column 'Onset Frame': 'soon' is not a frame number"),
])
def test_malformed_samm_cells_name_row_and_column(tmp_path, column, value, message):
    grid = pd.read_excel(SAMM, sheet_name="MICRO_ONLY", header=None, dtype=str)
    grid.iloc[14, list(grid.iloc[13]).index(column)] = value
    out = tmp_path / "samm_bad.xlsx"
    grid.to_excel(out, sheet_name="MICRO_ONLY", header=False, index=False)
    with pytest.raises(SheetError, match=rf"samm_bad\.xlsx: {message}"):
        read_samm_sheet(out)


@pytest.mark.shared
def test_samm_missing_column_names_the_header_row(tmp_path):
    grid = pd.read_excel(SAMM, sheet_name="MICRO_ONLY", header=None, dtype=str)
    grid = grid.drop(columns=list(grid.iloc[13]).index("Apex Frame"))
    out = tmp_path / "samm_cols.xlsx"
    grid.to_excel(out, sheet_name="MICRO_ONLY", header=False, index=False)
    with pytest.raises(SheetError, match=r"samm_cols\.xlsx: row 14: missing column\(s\) \['Apex Frame'\]"):
        read_samm_sheet(out)


# --- AU masks in composites -------------------------------------------------------------------------

def test_composite_masks_aus_a_dataset_never_codes():
    vocab = (1, 2, 4, 12)
    targets, mask = au_targets([{4}, {12}, set()], np.array([False, False, False]), vocab,
                               coded=[None, (2, 4, 7, 12), ()])
    np.testing.assert_array_equal(targets, [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])


def test_megc_composite_masks_smic_aus_only(trees, tmp_path):
    from famnet_pl.data.datamodule import MERDataModule

    dm = MERDataModule(protocol="megc2019_3cls", data_root=str(trees["megc2019"]), cache_dir=str(tmp_path),
                       image_size=16, clip_len=2, clip_size=16, flow_algorithm="farneback", flow_size=32)
    dm.setup()
    datasets = dm.manifest["dataset"].to_numpy()
    mask = dm.train_set.au_mask
    assert dm.au_vocab == (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17)
    assert (mask[datasets == "smic"] == 0).all() and (mask[datasets != "smic"] == 1).all()
    assert dm.train_set.au[datasets == "casme2"].sum() > 0


# --- fabricated trees: every protocol runs -----------------------------------------------------------

_TREE = {"megc2019_3cls": "megc2019", "famnet_3cls": "famnet", "megc2019_flow_3cls": "megc2019_flow"}
_RUNNABLE = sorted(p for p in PROTOCOLS if p != "synth_4cls")


def _tree_of(protocol: str) -> str:
    return _TREE.get(protocol, PROTOCOLS[protocol].dataset)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """One fabricated tree per dataset kind (3 subjects, every emotion once, 6 frames)."""
    base = tmp_path_factory.mktemp("trees")
    return {name: fabricate.fabricate(name, base / name) for name in sorted({_tree_of(p) for p in _RUNNABLE})}


@pytest.mark.parametrize("protocol", _RUNNABLE)
def test_every_protocol_runs_loso_on_a_fabricated_tree(protocol, trees, tmp_path):
    from famnet_pl.loso import run_loso

    root = trees[_tree_of(protocol)]
    manifest, report = build_manifest(protocol=protocol, root=root)
    assert (report.frames_checked and len(manifest)
            and set(manifest["label"]) == set(range(len(PROTOCOLS[protocol].classes))))
    args = tiny_args(root, tmp_path / "cache", **{"data.protocol": protocol, "trainer.max_epochs": 1})
    summary = run_loso(args, exp="fab", runs_dir=str(tmp_path / "runs"), folds=["0"], wandb="off")
    assert summary is not None and summary["n_folds"] == 1
    if len(PROTOCOLS[protocol].parts) > 1:
        fold = next((tmp_path / "runs" / "fab").glob("*/fold_00_*"))
        assert pd.read_csv(fold / "predictions.csv")["dataset"].nunique() == 1   # one subject, one dataset


def test_composite_summary_breaks_down_per_dataset(trees, tmp_path):
    from famnet_pl.loso import run_loso

    args = tiny_args(trees["megc2019"], tmp_path / "cache", **{"data.protocol": "megc2019_3cls",
                                                                "trainer.max_epochs": 1})
    summary = run_loso(args, exp="fab", runs_dir=str(tmp_path / "runs"), wandb="off")
    assert summary["n_folds"] == 9                     # 3 subjects per dataset, namespaced
    for dataset in ("casme2", "samm", "smic"):
        assert f"loso/{dataset}/uf1" in summary and f"loso/{dataset}/uar" in summary


def test_leave_one_dataset_out(trees, tmp_path):
    from famnet_pl.data.datamodule import MERDataModule

    dm = MERDataModule(protocol="famnet_3cls", data_root=str(trees["famnet"]), split="dataset", fold=1,
                       cache_dir=str(tmp_path / "cache"), image_size=16, clip_len=2, clip_size=16,
                       flow_algorithm="farneback", flow_size=32)
    assert dm.subjects() == ["casme2", "mmew", "samm"] and dm.run_name == "famnet_3cls_lodo"
    dm.setup()
    assert dm.split["test"] == ["mmew"]
    test_rows = dm.manifest.iloc[dm.test_set.indices]
    assert ((test_rows["dataset"] == "mmew").all()
            and len(test_rows) == (dm.manifest["dataset"] == "mmew").sum())


def test_leave_one_dataset_out_summary_has_one_fold_per_dataset(trees, tmp_path):
    from famnet_pl.loso import run_loso

    args = tiny_args(trees["famnet"], tmp_path / "cache",
                     **{"data.protocol": "famnet_3cls", "data.split": "dataset", "trainer.max_epochs": 1})
    summary = run_loso(args, exp="lodo", runs_dir=str(tmp_path / "runs"), wandb="off")
    assert (summary["n_folds"] == 3
            and [f["subject"] for f in summary["per_fold"]] == ["casme2", "mmew", "samm"])
    assert sorted(p.name for p in (tmp_path / "runs" / "lodo" / "famnet_3cls_lodo").glob("fold_*")) == [
        "fold_00_casme2", "fold_01_mmew", "fold_02_samm"]


def test_flow_images_have_no_3d_view_and_famnet_runs_2d(trees, tmp_path, caplog):
    from famnet_pl.config import build_cli

    args = tiny_args(trees["megc2019_flow"], tmp_path / "cache", **{"data.protocol": "megc2019_flow_3cls",
                                                                     "data.input_2d": "both"})
    cli = build_cli([*args, "--model.model=famnet_r18"])
    assert cli.model.hparams.model == "amnet2d_r18" and "runs its 2D branch alone" in caplog.text
    cli.datamodule.setup()
    batch = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.train_dataloader())))
    assert "x3d" not in batch and batch["x2d"].shape[1] == 6
    with pytest.raises(ValueError, match="no frame sequences"):
        build_cli([*args, "--model.model=amnet3d_r18"])


def test_onset_apex_views_are_refused_on_flow_images_in_one_line(trees, tmp_path):
    """FRL-DGT needs onset and apex frames; the flow-image layout has neither: exit 2, one line."""
    import subprocess
    import sys

    args = tiny_args(trees["megc2019_flow"], tmp_path / "cache", **{"data.protocol": "megc2019_flow_3cls",
                                                                     "data.input_2d": "pair_flow"})
    result = subprocess.run([sys.executable, "-m", "famnet_pl.cli", "loso", "--wandb", "off", "--runs-dir",
                             str(tmp_path / "runs"), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and "no onset or apex frames" in error[0] and "megc2019_3cls" in error[0]
    assert "Traceback" not in result.stderr


def test_cropped_layout_is_found(tmp_path):
    root = fabricate.fabricate("casme2", tmp_path / "c2", layout="cropped")
    manifest, report = build_manifest(protocol="casme2_5cls", root=root)
    assert report.layouts["casme2"] == "cropped"
    assert (manifest["frame_dir"].str.startswith("Cropped/").all()
            and (manifest["frame_pattern"] == "reg_img{k}.jpg").all())


def test_frame_tree_that_does_not_match_the_sheet_names_row_and_file(trees, tmp_path):
    root = tmp_path / "samm"
    shutil.copytree(trees["samm"], root)
    manifest, _ = build_manifest(protocol="samm_5cls", root=root)
    first = manifest.iloc[0]
    victim = root / first["frame_dir"] / first["frame_pattern"].format(k=int(first["apex"]))
    victim.unlink()
    with pytest.raises(ManifestError,
                       match=rf"row {first['sheet_row']} \({first['sample_id']}\).*{victim.name}"):
        build_manifest(protocol="samm_5cls", root=root)
    kept, report = build_manifest(protocol="samm_5cls", root=root, missing_frames="drop")
    assert len(kept) == len(manifest) - 1 and first["sample_id"] in report.dropped_ids


def test_smic_apex_is_the_midpoint_and_flagged(trees):
    manifest, report = build_manifest(protocol="smic_3cls", root=trees["smic"])
    assert (manifest["apex_source"] == "midpoint").all()
    assert (manifest["apex"] == (manifest["onset"] + manifest["offset"]) // 2).all()
    assert manifest["flags"].str.contains("apex_not_annotated").all() and manifest["au_unknown"].all()
    assert manifest["subject"].str.match(r"^smic/s\d\d$").all()


def test_flow_peak_apex_finds_the_known_apex(trees):
    """The fabricated blob moves from onset to onset + n//2 and back: the motion peak is there."""
    manifest, _ = build_manifest(protocol="smic_3cls", root=trees["smic"], apex_fix="flow_peak")
    assert (manifest["apex_source"] == "flow_peak").all()
    known = manifest["onset"] + (manifest["offset"] - manifest["onset"] + 1) // 2
    assert ((manifest["apex"] - known).abs() <= 1).mean() >= 0.8
    midpoint = (manifest["onset"] + manifest["offset"]) // 2
    assert (manifest["apex"] != midpoint).any() or (known == midpoint).all()


def test_flow_peak_respects_missing_frames_drop(trees, tmp_path):
    root = tmp_path / "smic"
    shutil.copytree(trees["smic"], root)
    first = build_manifest(protocol="smic_3cls", root=root)[0].iloc[0]
    (root / first["frame_dir"] / first["frame_pattern"].format(k=int(first["onset"]) + 1)).unlink()
    kept, report = build_manifest(protocol="smic_3cls", root=root, apex_fix="flow_peak",
                                  missing_frames="drop")
    assert first["sample_id"] in report.dropped_ids and len(kept) == 8


def test_flow_images_are_read_in_opencv_channel_order(trees, tmp_path):
    """cv2.imwrite of (u, v, strain) -> channel 0 is u, centred (value / 255 - 0.5)."""
    import cv2

    from famnet_pl.data.preprocess import ViewConfig, preprocess

    root = trees["megc2019_flow"]
    manifest, _ = build_manifest(protocol="megc2019_flow_3cls", root=root)
    arrays = preprocess(manifest, root, ViewConfig(image_size=28, need_clip=False), tmp_path).arrays
    stored = cv2.imread(str(root / manifest.iloc[0]["flow_image"]), cv2.IMREAD_COLOR)
    np.testing.assert_allclose(arrays["flow"][0], stored / 255.0 - 0.5, atol=1e-6)
    assert "clip" not in arrays


def test_official_list_label_disagreement_is_flagged(trees, tmp_path):
    root = tmp_path / "megc"
    shutil.copytree(trees["megc2019"], root)
    lines = (root / "combined_3class_gt.csv").read_text().splitlines()
    dataset, subject, video, label = lines[0].split(",")
    lines[0] = ",".join([dataset, subject, video, str((int(label) + 1) % 3)])
    (root / "combined_3class_gt.csv").write_text("\r\n".join(lines) + "\r\n")
    manifest, report = build_manifest(protocol="megc2019_3cls", root=root)
    assert sum("the official list says" in m for m in report.flagged) == 1
    row = manifest.set_index("sample_id").loc[f"casme2/{subject}/{video}"]
    assert row["label"] == (int(label) + 1) % 3                # the list wins, visibly


def test_composite_narrowed_to_one_dataset_keeps_its_folder(trees, tmp_path):
    from famnet_pl.data.datamodule import MERDataModule

    dm = MERDataModule(protocol="famnet_3cls", data_root=str(trees["famnet"]), datasets=["samm"])
    assert dm.subjects() == ["samm/006", "samm/007", "samm/008"] and dm.run_name == "famnet_3cls"
    assert dm.load_manifest()["frame_dir"].str.startswith("samm/").all()


def test_manifest_memo_sees_an_edited_list(trees, tmp_path):
    from famnet_pl.data.datamodule import MERDataModule

    root = tmp_path / "megc"
    shutil.copytree(trees["megc2019"], root)
    before = MERDataModule(protocol="megc2019_3cls", data_root=str(root)).load_manifest()
    listed = root / "combined_3class_gt.csv"
    lines = listed.read_text().splitlines()
    listed.write_text("\r\n".join(lines[1:]) + "\r\n")
    after = MERDataModule(protocol="megc2019_3cls", data_root=str(root)).load_manifest()
    assert len(after) == len(before) - 1


def test_casme3_video_letters_are_case_blind(trees, tmp_path):
    root = tmp_path / "c3"
    shutil.copytree(trees["casme3"], root)
    (root / "spNO.1" / "a").rename(root / "spNO.1" / "A")      # the folder spelled as on some disks
    manifest, _ = build_manifest(protocol="casme3_7cls", root=root)
    rows = manifest[manifest["subject"] == "casme3/spNO.1"]
    assert rows["sample_id"].str.match(r"casme3/spNO\.1/[a-z]/\d+$").all()
    assert rows["frame_dir"].str.startswith("spNO.1/A/").any()


def test_manifest_cli_writes_and_reports(trees, tmp_path, capsys):
    from famnet_pl.cli import main

    out = tmp_path / "m.csv"
    assert main(["manifest", "megc2019_3cls", "--root", str(trees["megc2019"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "protocol megc2019_3cls" in printed and "files on disk: checked" in printed
    assert len(pd.read_csv(out)) == 42
    assert main(["manifest", "no_such_protocol", "--out", str(out)]) == 2
    assert "unknown protocol 'no_such_protocol'" in capsys.readouterr().err
    bad = json.dumps({"casme2": str(tmp_path / "nope.xlsx")})
    assert main(["manifest", "megc2019_3cls", "--root", str(trees["megc2019"]), "--annotations", bad,
                 "--out", str(out)]) == 2
    assert "nope.xlsx" in capsys.readouterr().err


_CONFIG_TREE = {"famnet_lodo": "famnet"}
_DATA_CONFIGS = sorted(p.stem for p in (REPO / "experiments" / "data").glob("*.yaml")
                       if not p.stem.startswith("synth"))  # generated, not fabricated


@pytest.mark.parametrize("dataset", _DATA_CONFIGS)
def test_make_loso_line_runs_every_data_config(dataset, trees, tmp_path):
    """The exact command of ``make loso DATASET=<name> DATA_ROOT=<fabricated tree>`` (taken from
    ``make -n``), run in-process on one fold with CPU demo sizes."""
    from famnet_pl.cli import main

    root = trees[_CONFIG_TREE.get(dataset, dataset)]
    argv = _make_loso_argv(tmp_path, "--data.image_size=24 --data.clip_len=4 --data.clip_size=16",
                           DATASET=dataset, DATA_ROOT=root)
    assert main(argv) == 0
    assert list((tmp_path / "runs").glob("*/*/fold_00_*/predictions.csv"))


def _make_loso_argv(tmp_path, extra: str = "", **make_vars) -> list[str]:
    """``famnet-pl loso ...`` exactly as ``make loso VAR=...`` would run it (from ``make -n``)."""
    import shlex
    import subprocess

    small = (f"--data.flow_size=48 --data.flow_algorithm=farneback --data.cache_dir={tmp_path}/cache "
             "--data.val_subjects=1 "  # the fabricated trees have 3 subjects
             f"--trainer.max_epochs=1 --runs-dir={tmp_path}/runs {extra}")
    dry = subprocess.run(["make", "-s", "-n", "loso", *[f"{k}={v}" for k, v in make_vars.items()],
                          "WANDB=off", "FOLDS=0", f"ARGS={small}", "STAMP=/dev/null"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    line = next(x for x in dry.stdout.replace("\\\n", " ").splitlines() if "famnet-pl loso" in x)
    argv = shlex.split(line)
    return argv[argv.index("loso"):]


def test_ststnet_runs_on_the_flow_image_layout_and_frl_dgt_refuses_it(trees, tmp_path, capsys):
    """STSTNet is the MEGC2019 reference on precomputed flow; FRL-DGT needs onset and apex frames,
    which that layout lacks: it stops with one line saying what to run instead."""
    from famnet_pl.cli import main

    root = trees["megc2019_flow"]
    assert main(_make_loso_argv(tmp_path, MODEL="ststnet", DATASET="megc2019_flow", DATA_ROOT=root)) == 0
    fold = next((tmp_path / "runs").glob("ststnet/*/fold_00_*"))
    assert (fold / "predictions.csv").is_file()
    assert "model: ststnet" in (fold / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_make_loso_argv(tmp_path, MODEL="frl_dgt", DATASET="megc2019_flow", DATA_ROOT=root)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no onset or apex frames" in err[0] and "megc2019_3cls" in err[0]



def test_megc2019_flow_reads_the_layout_as_published(trees, tmp_path):
    """The release puts both image folders under datasets/ (the CSV stays at the root)."""
    root = tmp_path / "megc2019_flow"
    shutil.copytree(trees["megc2019_flow"], root)
    (root / "datasets").mkdir()
    for folder in ("STSNet_whole_norm_u_v_os", "combined_datasets_whole"):
        shutil.move(root / folder, root / "datasets" / folder)
    manifest, _ = build_manifest(protocol="megc2019_flow_3cls", root=root)
    flat, _ = build_manifest(protocol="megc2019_flow_3cls", root=trees["megc2019_flow"])
    assert len(manifest) == len(flat) and manifest["flow_image"].str.startswith("datasets/").all()
