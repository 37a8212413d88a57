"""CASME II sheet reader and manifest builder, on the real sheets and on broken copies."""

import shutil

import pandas as pd
import pytest

from famnet_pl.data.annotations import SheetError, read_casme2_sheet
from famnet_pl.data.manifest import MANIFEST_COLUMNS, ManifestError, build_manifest
from tests.conftest import CASME2_2014, CASME2_2019

pytestmark = pytest.mark.shared  # reads the real sheets in ../shared/annotations


def test_real_casme2_sheet_parses_255_rows_26_subjects():
    table = read_casme2_sheet(CASME2_2014)
    assert len(table) == 255
    assert table["subject"].nunique() == 26
    assert table["apex"].isna().sum() == 1          # the "/" apex, read as missing, not dropped
    assert table.loc[table["apex"].isna(), "video"].tolist() == ["EP12_01f"]


def test_slash_apex_is_fixed_visibly(caplog):
    caplog.set_level("DEBUG")
    manifest, report = build_manifest(protocol="casme2_5cls", annotation=CASME2_2014)
    row = manifest.set_index("sample_id").loc["casme2/sub04/EP12_01f"]
    assert row["apex_source"] == "midpoint" and "apex_not_numeric" in row["flags"]
    assert row["apex"] == (row["onset"] + row["offset"]) // 2
    assert any("EP12_01f" in m and "apex_not_numeric" in m for m in report.fixed)
    assert "apex_not_numeric" in caplog.text
    assert "sub05/EP09_05f" in "".join(report.flagged)   # onset == apex, kept and flagged


def test_slash_apex_can_be_dropped():
    manifest, report = build_manifest(protocol="casme2_5cls", annotation=CASME2_2014, apex_fix="drop")
    assert len(manifest) == 245 and len(report.dropped_by_rule) == 1


@pytest.mark.parametrize("sheet, kept", [(CASME2_2014, 246), (CASME2_2019, 249)])
def test_casme2_5cls_counts(sheet, kept):
    manifest, report = build_manifest(protocol="casme2_5cls", annotation=sheet)
    assert len(manifest) == kept
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert manifest["subject"].str.startswith("casme2/sub").all()
    assert manifest["sample_id"].is_unique
    assert set(report.dropped_by_protocol["casme2"]) == {"fear", "sadness"}


def _broken_copy(tmp_path, edit):
    frame = pd.read_excel(CASME2_2014, engine="openpyxl")
    frame = edit(frame)
    out = tmp_path / "broken.xlsx"
    frame.to_excel(out, index=False)
    return out


def _with_cell(tmp_path, column, row, value):
    """A copy of the real sheet with one cell replaced (row = 0-based data row)."""
    def edit(frame):
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
        return frame

    return _broken_copy(tmp_path, edit)


def test_missing_column_names_file_and_column(tmp_path):
    sheet = _broken_copy(tmp_path, lambda f: f.drop(columns=["OnsetFrame"]))
    with pytest.raises(SheetError, match=r"broken\.xlsx.*OnsetFrame"):
        read_casme2_sheet(sheet)


def test_synthetic_frames_are_checked(tiny_synth, tmp_path):
    manifest, report = build_manifest(protocol="synth_4cls", root=tiny_synth)
    assert report.frames_checked and len(manifest) == 12 and manifest["subject"].nunique() == 3
    root = tmp_path / "copy"
    shutil.copytree(tiny_synth, root)
    victim = root / manifest.iloc[0]["frame_dir"]
    last = victim / f"img{manifest.iloc[0]['offset']}.jpg"
    last.unlink()
    with pytest.raises(ManifestError,
                       match=rf"{manifest.iloc[0]['sample_id']}.*img{manifest.iloc[0]['offset']}\.jpg"):
        build_manifest(protocol="synth_4cls", root=root)
    shutil.rmtree(victim)
    with pytest.raises(ManifestError, match="does not exist"):
        build_manifest(protocol="synth_4cls", root=root)


@pytest.mark.parametrize("column, row, value, message", [
    ("OffsetFrame", 4, "eighty", r"row 6, column 'OffsetFrame': 'eighty'"),
    ("OffsetFrame", 3, 80.5, r"row 5, column 'OffsetFrame': 80.5 is not a frame number"),
    ("Filename", 7, None, r"row 9, column 'Filename': empty"),
    ("Subject", 7, None, r"row 9, column 'Subject': empty"),
])
def test_malformed_cells_name_row_and_column(tmp_path, column, row, value, message):
    with pytest.raises(SheetError, match=message):
        read_casme2_sheet(_with_cell(tmp_path, column, row, value))


def test_onset_after_offset_names_the_row(tmp_path):
    with pytest.raises(ManifestError, match=r"broken\.xlsx: row 5 .*onset 500 > offset"):
        build_manifest(protocol="casme2_5cls", annotation=_with_cell(tmp_path, "OnsetFrame", 3, 500))


def test_unknown_emotion_names_row_and_column(tmp_path):
    with pytest.raises(SheetError, match=r"row 4, column 'Estimated Emotion': unknown emotion 'hapiness'"):
        read_casme2_sheet(_with_cell(tmp_path, "Estimated Emotion", 2, "hapiness"))


def test_unreadable_au_cell_names_the_row(tmp_path):
    with pytest.raises(ManifestError, match=r"row 4 .*'Action Units'.*4\+1x2"):
        build_manifest(protocol="casme2_5cls", annotation=_with_cell(tmp_path, "Action Units", 2, "4+1x2"))
