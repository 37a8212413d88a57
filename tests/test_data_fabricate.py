"""Fake dataset trees (data/fabricate.py): layout, sheet formats, frame ranges, determinism."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from famnet_pl.data import fabricate as fab
from famnet_pl.data.fabricate import fabricate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "annotations"

# A few exact paths per dataset with the default arguments (onset 40, 6 frames, apex 43).
EXPECTED = {
    "casme2": ["CASME2-coding-20140508.xlsx", "CASME2-coding-20190701.xlsx",
               "CASME2_RAW_selected/sub01/EP02_01f/img40.jpg", "CASME2_RAW_selected/sub03/EP03_02/img55.jpg"],
    "samm": ["SAMM_Micro_FACS_Codes_v2.xlsx", "006/006_1_2/006_00040.jpg", "008/008_1_3/008_00115.jpg"],
    "mmew": ["MMEW_Micro_Exp_delete_others.csv", "MMEW_Micro_Exp.xlsx",
             "Micro_Expression/happiness/S01-01-001/1.jpg", "Micro_Expression/others/S03-04-001/6.jpg"],
    "casme3": ["cas(me)3_part_A_ME_label_JpgIndex_v2.xlsx", "cas(me)3_part_A_edited.csv",
               "spNO.1/a/color/40.jpg", "spNO.1/a/color/55.jpg", "spNO.1/a/depth/40.png",
               "spNO.3/d/color/105.jpg"],
    "smic": ["HS/s1/micro/negative/s1_ne_01/image000040.bmp",
             "HS/s3/micro/surprise/s3_sur_01/image000065.bmp"],
    "megc2019": ["combined_3class_gt.csv", "casme2/CASME2-coding-20140508.xlsx",
                 "samm/006/006_1_2/006_00040.jpg",
                 "smic/HS/s2/micro/positive/s2_po_01/image000050.bmp"],
    "famnet": ["casme2/CASME2_RAW_selected/sub01/EP02_01f/img45.jpg", "samm/SAMM_Micro_FACS_Codes_v2.xlsx",
               "mmew/MMEW_Micro_Exp_delete_others.csv"],
    "megc2019_flow": ["combined_3_class2_for_optical_flow.csv",
                      "STSNet_whole_norm_u_v_os/sub01_EP02_01f .png",  # note the space before .png
                      "STSNet_whole_norm_u_v_os/006_006_1_2 .png",
                      "STSNet_whole_norm_u_v_os/s01_s01_ne_01 .png",
                      "combined_datasets_whole/s01_s1_ne_01.jpg", "combined_datasets_whole/006_006_1_2.jpg"],
}


def _excel(path: Path, **kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():  # pandas 3 warns about its future default engine
        warnings.simplefilter("ignore")
        return pd.read_excel(path, engine="openpyxl", **kwargs)


def _samm_sheet(root: Path) -> pd.DataFrame:
    return _excel(root / fab.SAMM_SHEET, sheet_name="MICRO_ONLY", header=13,
                  dtype={"Subject": str, "Filename": str})


@pytest.mark.parametrize("dataset", fab.DATASETS)
def test_data_fabricate_writes_the_layout(tmp_path, dataset):
    root = fabricate(dataset, tmp_path / dataset)
    assert root == tmp_path / dataset
    missing = [p for p in EXPECTED[dataset] if not (root / p).is_file()]
    assert not missing


def test_data_fabricate_frame_formats(tmp_path):
    def read(path):
        return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)

    assert read(fabricate("casme2", tmp_path / "c", size=32) / EXPECTED["casme2"][2]).shape == (32, 32, 3)
    assert read(fabricate("samm", tmp_path / "s") / EXPECTED["samm"][1]).shape == (48, 48)  # greyscale
    assert read(fabricate("smic", tmp_path / "m") / EXPECTED["smic"][0]).shape == (48, 48, 3)
    depth = read(fabricate("casme3", tmp_path / "d") / "spNO.1/a/depth/40.png")
    assert depth.dtype == np.uint16 and depth.shape == (48, 48)
    flow_root = fabricate("megc2019_flow", tmp_path / "f")
    assert read(flow_root / EXPECTED["megc2019_flow"][1]).shape == (28, 28, 3)
    assert read(flow_root / EXPECTED["megc2019_flow"][4]).shape == (48, 48, 3)


def test_data_fabricate_is_deterministic(tmp_path):
    files = ["CASME2_RAW_selected/sub02/EP03_02/img53.jpg", "CASME2-coding-20140508.xlsx",
             "CASME2-coding-20190701.xlsx"]
    a, b = (fabricate("casme2", tmp_path / name, seed=3) for name in ("a", "b"))
    c = fabricate("casme2", tmp_path / "c", seed=4)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes()
    for dataset, f in [("megc2019", "combined_3class_gt.csv"), ("megc2019_flow", fab.MEGC_FLOW_CSV),
                       ("megc2019_flow", EXPECTED["megc2019_flow"][2]), ("mmew", fab.MMEW_CSV),
                       ("casme3", fab.CASME3_EDITED_CSV), ("smic", EXPECTED["smic"][1])]:
        x, y = (fabricate(dataset, tmp_path / f"{dataset}-{n}") for n in (1, 2))
        assert (x / f).read_bytes() == (y / f).read_bytes(), f


def test_data_fabricate_casme2_sheet(tmp_path):
    root = fabricate("casme2", tmp_path, subjects=2, per_class=2)
    df = _excel(root / fab.CASME2_SHEET)
    assert list(df.columns) == ["Subject", "Filename", "Unnamed: 2", "OnsetFrame", "ApexFrame", "OffsetFrame",
                                "Unnamed: 6", "Action Units", "Estimated Emotion"]
    assert df["Unnamed: 2"].isna().all() and df["Unnamed: 6"].isna().all()
    assert sorted(df["Subject"].unique()) == [1, 2] and len(df) == 2 * 7 * 2
    assert df["Filename"].iloc[:2].tolist() == ["EP02_01f", "EP03_02"]
    assert set(df["Estimated Emotion"]) == set(fab.CASME2_AUS)
    assert {type(a) for a in df["Action Units"]} == {int, str}  # mixed cells, as in the real sheet
    assert not (df["OnsetFrame"] == 1).any()
    assert ((df["ApexFrame"] - df["OnsetFrame"]) == 3).all()
    assert ((df["OffsetFrame"] - df["OnsetFrame"]) == 5).all()
    df19 = _excel(root / fab.CASME2_SHEET_2019)
    assert list(df19.columns) == [*df.columns, "Objective Classes"]
    pd.testing.assert_frame_equal(df19[df.columns], df)
    assert df19["Objective Classes"].between(1, 7).all()


@pytest.mark.parametrize("layout,folder,prefix", [("raw", "CASME2_RAW_selected", "img"),
                                                  ("cropped", "Cropped", "reg_img")])
def test_data_fabricate_casme2_frames_match_sheet(tmp_path, layout, folder, prefix):
    root = fabricate("casme2", tmp_path, subjects=2, n_frames=7, layout=layout)
    assert not (root / ("Cropped" if layout == "raw" else "CASME2_RAW_selected")).exists()
    for r in _excel(root / fab.CASME2_SHEET).itertuples():
        clip = root / folder / f"sub{r.Subject:02d}" / r.Filename
        numbers = sorted(int(p.stem.removeprefix(prefix)) for p in clip.glob("*.jpg"))
        assert numbers == list(range(r.OnsetFrame, r.OffsetFrame + 1)), clip
        assert r.OnsetFrame < r.ApexFrame < r.OffsetFrame


def test_data_fabricate_other_sheets_match_frames(tmp_path):
    samm = _samm_sheet(fabricate("samm", tmp_path / "samm"))
    for r in samm.itertuples():
        clip = tmp_path / "samm" / r.Subject / r.Filename
        got = sorted(int(p.stem.split("_")[-1]) for p in clip.glob("*.jpg"))
        assert got == list(range(r._4, r._6 + 1))  # Onset Frame .. Offset Frame
    mmew = pd.read_csv(fabricate("mmew", tmp_path / "mmew") / fab.MMEW_CSV)
    assert (mmew["OnsetFrame"] == 1).all()  # MMEW clips are pre-trimmed
    for r in mmew.itertuples():
        clip = tmp_path / "mmew" / "Micro_Expression" / r._7 / r.Filename
        assert sorted(int(p.stem) for p in clip.glob("*.jpg")) == list(range(1, r.OffsetFrame + 1))
    casme3 = _excel(fabricate("casme3", tmp_path / "c3", per_class=2) / fab.CASME3_SHEET, sheet_name="label")
    for r in casme3.itertuples():
        color = tmp_path / "c3" / r.Subject / r.Filename / "color"
        assert all((color / f"{k}.jpg").is_file() and (color.parent / "depth" / f"{k}.png").is_file()
                   for k in range(r.Onset, r.Offset + 1))


def test_data_fabricate_samm_sheet(tmp_path):
    root = fabricate("samm", tmp_path, subjects=3)
    df = _samm_sheet(root)
    assert list(df.columns) == list(fab.SAMM_COLUMNS)
    assert sorted(df["Subject"].unique()) == ["006", "007", "008"]
    assert df["Filename"].iloc[0] == "006_1_2"
    assert set(df["Estimated Emotion"]) == {"Anger", "Contempt", "Disgust", "Fear", "Happiness", "Sadness",
                                            "Surprise", "Other"}
    assert (df["Duration"] == df["Offset Frame"] - df["Onset Frame"] + 1).all()
    raw = _excel(root / fab.SAMM_SHEET, sheet_name=None, header=None)
    assert list(raw) == ["MICRO_ONLY"]
    assert str(raw["MICRO_ONLY"].iloc[0, 0]).startswith("SAMM Dataset")


def test_data_fabricate_mmew_and_casme3_sheets(tmp_path):
    root = fabricate("mmew", tmp_path / "mmew", subjects=2)
    full, csv = _excel(root / fab.MMEW_SHEET), pd.read_csv(root / fab.MMEW_CSV)
    assert list(full.columns) == list(fab.MMEW_COLUMNS)
    assert list(csv.columns) == [*fab.MMEW_COLUMNS, *fab.MMEW_DERIVED]
    assert len(full) == 2 * 7 and len(csv) == 2 * 6 and "others" not in set(csv["Estimated Emotion"])
    assert csv.loc[0, "one_hot_label"] == "[1,0,0,0,0,0]" and csv.loc[0, "Filename"] == "S01-01-001"
    sheet = _excel(fabricate("casme3", tmp_path / "c3") / fab.CASME3_SHEET, sheet_name="label")
    assert list(sheet.columns) == list(fab.CASME3_COLUMNS)
    assert sheet["Subject"].iloc[0] == "spNO.1" and set(sheet["emotion"]) == set(fab.CASME3_AUS)
    per_video = sheet.groupby(["Subject", "Filename"])["Onset"].nunique()
    assert (per_video == 2).sum() >= 3  # several MEs share a video, at different onsets


def test_data_fabricate_megc_lists(tmp_path):
    root = fabricate("megc2019", tmp_path / "megc")
    text = (root / fab.MEGC_LIST).read_bytes().decode()
    assert text.startswith("casme2,sub01,EP02_01f,1\r\n") and "\nsamm,6,006_1_2,0\r\n" in text
    gt = pd.read_csv(root / fab.MEGC_LIST, header=None, names=["dataset", "subject", "filename", "label"],
                     dtype=str)
    assert gt.groupby("dataset").size().to_dict() == {"casme2": 12, "samm": 21, "smic": 9}
    assert "smic,s01,s01_ne_01,0" in text and set(gt["label"]) == {"0", "1", "2"}
    for r in gt[gt["dataset"] == "casme2"].itertuples():
        assert (root / "casme2" / "CASME2_RAW_selected" / r.subject / r.filename).is_dir()

    flow_root = fabricate("megc2019_flow", tmp_path / "flow", subjects=2, per_class=2)
    flow = pd.read_csv(flow_root / fab.MEGC_FLOW_CSV, dtype={"sub": str})
    assert list(flow.columns) == list(fab.MEGC_FLOW_COLUMNS) and len(flow) == 3 * 2 * 3 * 2
    assert flow["apex"].isna().all() and flow["sub_filename"].isna().all()
    assert set(flow.loc[flow["dataset"] == "samm", "sub"]) == {"006", "007"}
    for r in flow.itertuples():
        assert (flow_root / fab.FLOW_DIR / f"{r.sub}_{r.filename_o} .png").is_file()
        assert (flow_root / fab.APEX_DIR / r.imagename).is_file()


def test_data_fabricate_motion_depends_on_class(tmp_path):
    """The blob's onset -> apex displacement differs between classes (a model can learn a little)."""
    root = fabricate("casme2", tmp_path, subjects=1, size=64)
    frames = root / "CASME2_RAW_selected" / "sub01"

    def peak(path):
        grey = cv2.GaussianBlur(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32), (5, 5), 0)
        return np.array(np.unravel_index(np.argmax(grey), grey.shape))

    happy = peak(frames / "EP02_01f/img43.jpg") - peak(frames / "EP02_01f/img40.jpg")
    surprise = peak(frames / "EP03_02/img53.jpg") - peak(frames / "EP03_02/img50.jpg")
    assert 2 <= np.abs(happy).max() <= 7 and 2 <= np.abs(surprise).max() <= 7
    assert not np.array_equal(happy, surprise)


def test_data_fabricate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        fabricate("casme", tmp_path)
    with pytest.raises(ValueError, match="layout"):
        fabricate("samm", tmp_path, layout="cropped")
    with pytest.raises(ValueError):
        fabricate("casme2", tmp_path, subjects=0)


def test_data_fabricate_cli(tmp_path, capsys):
    assert fab.main(["smic", str(tmp_path), "--subjects", "2", "--n-frames", "4", "--seed", "1"]) == 0
    assert (tmp_path / "HS/s2/micro/positive/s2_po_01/image000053.bmp").is_file()
    assert not (tmp_path / "HS/s3").exists()
    assert "fabricated smic" in capsys.readouterr().out


@pytest.mark.parametrize("protocol,dataset,samples", [
    ("casme2_5cls", "casme2", 15), ("samm_5cls", "samm", 15), ("mmew_6cls", "mmew", 18),
    ("casme3_7cls", "casme3", 21), ("smic_3cls", "smic", 9), ("megc2019_3cls", "megc2019", 42),
    ("famnet_3cls", "famnet", 51), ("megc2019_flow_3cls", "megc2019_flow", 27)])
def test_data_fabricate_trees_build_manifests(tmp_path, protocol, dataset, samples):
    """The project's own readers accept the fabricated trees (what the fabricator is for)."""
    from famnet_pl.data.manifest import build_manifest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest, _ = build_manifest(protocol=protocol, root=str(fabricate(dataset, tmp_path)))
    assert len(manifest) == samples


@pytest.mark.shared
def test_data_fabricate_formats_match_the_real_sheets(tmp_path):
    """Column names/order, worksheet names and header rows equal those of ../shared/annotations."""
    def columns(path, **kw):
        return list(_excel(path, nrows=0, **kw).columns)

    fake = {d: fabricate(d, tmp_path / d)
            for d in ("casme2", "samm", "mmew", "casme3", "megc2019", "megc2019_flow")}
    for name in (fab.CASME2_SHEET, fab.CASME2_SHEET_2019):
        assert columns(fake["casme2"] / name) == columns(SHARED / "casme2" / name)
        assert _excel(fake["casme2"] / name, sheet_name=None).keys() == _excel(SHARED / "casme2" / name,
                                                                              sheet_name=None).keys()
    assert (columns(fake["samm"] / fab.SAMM_SHEET, sheet_name="MICRO_ONLY", header=13)
            == columns(SHARED / "samm" / fab.SAMM_SHEET, sheet_name="MICRO_ONLY", header=13))
    assert (columns(fake["casme3"] / fab.CASME3_SHEET, sheet_name="label")
            == columns(SHARED / "casme3" / fab.CASME3_SHEET, sheet_name="label"))
    for sub, name in [("mmew", fab.MMEW_CSV), ("casme3", fab.CASME3_EDITED_CSV),
                      ("megc2019_flow", fab.MEGC_FLOW_CSV)]:
        real = SHARED / ("megc2019" if sub == "megc2019_flow" else sub) / name
        assert (fake[sub] / name).read_text().splitlines()[0] == real.read_text().splitlines()[0]
    real_row = (SHARED / "megc2019" / fab.MEGC_LIST).read_bytes().split(b"\r\n")[0]
    fake_row = (fake["megc2019"] / fab.MEGC_LIST).read_bytes().split(b"\r\n")[0]
    assert real_row == fake_row == b"casme2,sub01,EP02_01f,1"
