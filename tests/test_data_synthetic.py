"""Synthetic CASME II-format generator: determinism, on-disk layout, caching and crash safety."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import cv2
import openpyxl
import pandas as pd
import pytest

from famnet_pl.data import synthetic
from famnet_pl.data.synthetic import (
    EMOTION_AUS,
    FRAMES_DIRNAME,
    SHEET_NAME,
    SPEC_NAME,
    SYNTH_CLASSES,
    SynthSpec,
    generate,
)

TINY = SynthSpec(n_subjects=2, clips_per_class=1, image_size=64, min_frames=6, max_frames=8, seed=3)
COLUMNS = ["Subject", "Filename", "Unnamed: 2", "OnsetFrame", "ApexFrame", "OffsetFrame", "Unnamed: 6",
           "Action Units", "Estimated Emotion"]


def _frames(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / FRAMES_DIRNAME).rglob("*"))
            if p.is_file()}


def _sheet(root: Path) -> pd.DataFrame:
    return pd.read_excel(root / SHEET_NAME, engine="openpyxl")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_a")
    assert generate(root, TINY) == root / SHEET_NAME
    return root


def test_same_spec_gives_identical_bytes_and_sheet(tiny_root, tmp_path):
    generate(tmp_path / "b", TINY)
    assert _frames(tiny_root) == _frames(tmp_path / "b")
    pd.testing.assert_frame_equal(_sheet(tiny_root), _sheet(tmp_path / "b"))


def test_other_seed_gives_other_frames(tiny_root, tmp_path):
    generate(tmp_path / "c", replace(TINY, seed=4))
    assert set(_frames(tiny_root).values()).isdisjoint(_frames(tmp_path / "c").values())


def test_sheet_matches_casme2_layout(tiny_root):
    assert openpyxl.load_workbook(tiny_root / SHEET_NAME, read_only=True).sheetnames == ["Sheet1"]
    df = _sheet(tiny_root)
    assert list(df.columns) == COLUMNS
    assert len(df) == TINY.n_subjects * len(SYNTH_CLASSES) * TINY.clips_per_class
    assert df[["Unnamed: 2", "Unnamed: 6"]].isna().all().all()
    assert df.equals(df.sort_values(["Subject", "Filename"]).reset_index(drop=True))
    assert set(df["Subject"]) == set(range(1, TINY.n_subjects + 1))
    assert set(df["Estimated Emotion"]) == set(SYNTH_CLASSES)
    assert not df.duplicated(["Subject", "Filename"]).any()
    for row in df.itertuples(index=False):
        assert re.fullmatch(r"EP\d{2}_\d{2}f?", row.Filename)
        cell = row[7]
        assert re.search(r"\d", str(cell)) and str(cell) in EMOTION_AUS[row[8]]
        assert isinstance(cell, int) == str(cell).isdigit()  # single AU -> int cell, as in the real sheet
        assert 20 <= row.OnsetFrame < row.ApexFrame < row.OffsetFrame
        assert TINY.min_frames <= row.OffsetFrame - row.OnsetFrame + 1 <= TINY.max_frames


def test_frames_run_exactly_onset_to_offset(tiny_root):
    df = _sheet(tiny_root)
    frames_root = tiny_root / FRAMES_DIRNAME
    subjects = [f"sub{s:02d}" for s in range(1, TINY.n_subjects + 1)]
    assert sorted(p.name for p in frames_root.iterdir()) == subjects
    for s, group in df.groupby("Subject"):
        assert sorted(p.name for p in (frames_root / f"sub{s:02d}").iterdir()) == sorted(group["Filename"])
    for row in df.itertuples(index=False):
        clip = frames_root / f"sub{row.Subject:02d}" / row.Filename
        numbers = sorted(int(p.stem[3:]) for p in clip.glob("img*.jpg"))
        assert numbers == list(range(row.OnsetFrame, row.OffsetFrame + 1))
        assert len(list(clip.iterdir())) == len(numbers)
    img = cv2.imread(str(next(frames_root.rglob("*.jpg"))))
    assert img.shape == (TINY.image_size, TINY.image_size, 3)


def test_spec_json_is_complete(tiny_root):
    saved = json.loads((tiny_root / SPEC_NAME).read_text())
    assert saved["spec"]["seed"] == TINY.seed and saved["spec"]["classes"] == list(TINY.classes)
    assert saved["emotion_aus"] == EMOTION_AUS
    assert saved["counts"]["samples"] == len(_sheet(tiny_root))
    assert saved["counts"]["frames"] == len(list((tiny_root / FRAMES_DIRNAME).rglob("*.jpg")))


def test_complete_root_is_not_rewritten(tmp_path):
    generate(tmp_path, TINY)
    files = [tmp_path / SHEET_NAME, tmp_path / SPEC_NAME, next((tmp_path / FRAMES_DIRNAME).rglob("*.jpg"))]
    before = [f.stat().st_mtime_ns for f in files]
    generate(tmp_path, TINY)
    assert [f.stat().st_mtime_ns for f in files] == before


def test_root_without_spec_json_is_regenerated(tmp_path):
    generate(tmp_path, TINY)
    expected = _frames(tmp_path)
    damaged = next((tmp_path / FRAMES_DIRNAME).rglob("*.jpg"))
    damaged.write_bytes(b"half-written")
    (tmp_path / SPEC_NAME).unlink()
    generate(tmp_path, TINY)
    assert _frames(tmp_path) == expected and (tmp_path / SPEC_NAME).is_file()
    assert not list(tmp_path.glob(".synth-staging-*"))


def test_other_spec_replaces_dataset(tmp_path):
    generate(tmp_path, TINY)
    generate(tmp_path, replace(TINY, n_subjects=1))
    assert json.loads((tmp_path / SPEC_NAME).read_text())["spec"]["n_subjects"] == 1
    assert [p.name for p in (tmp_path / FRAMES_DIRNAME).iterdir()] == ["sub01"]
    assert set(_sheet(tmp_path)["Subject"]) == {1}


def test_crash_midway_never_looks_complete(tmp_path, monkeypatch):
    generate(tmp_path, TINY)
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    real = synthetic._render_clip
    monkeypatch.setattr(synthetic, "_render_clip", crash)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, replace(TINY, seed=9))
    monkeypatch.setattr(synthetic, "_render_clip", real)
    # The old dataset is still intact and complete; the new one was never published.
    assert synthetic._is_complete(tmp_path, TINY)
    assert not synthetic._is_complete(tmp_path, replace(TINY, seed=9))
    assert not list(tmp_path.glob(".synth-staging-*"))


def test_foreign_frames_folder_is_protected(tmp_path):
    (tmp_path / FRAMES_DIRNAME / "sub01").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate(tmp_path, TINY)
    assert (tmp_path / FRAMES_DIRNAME / "sub01").is_dir()


def test_spec_validation():
    with pytest.raises(ValueError):
        SynthSpec(classes=("anger",))
    with pytest.raises(ValueError):
        SynthSpec(min_frames=2, max_frames=5)
    assert SynthSpec(classes=["surprise"]).classes == ("surprise",)


def test_cli_prints_summary(tmp_path, capsys):
    assert synthetic.main([str(tmp_path), "--subjects", "1", "--clips-per-class", "1", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 subjects, 4 samples, 4 classes" in out and "frames written" in out
    assert json.loads((tmp_path / SPEC_NAME).read_text())["spec"]["seed"] == 2


def test_ensure_keeps_a_custom_spec(tmp_path):
    from famnet_pl.data import synthetic as syn

    small = syn.SynthSpec(n_subjects=1, clips_per_class=1, image_size=32, min_frames=3, max_frames=4, seed=3)
    syn.generate(tmp_path / "a", small)
    before = (tmp_path / "a" / syn.SPEC_NAME).stat().st_mtime_ns
    syn.ensure(tmp_path / "a")
    assert (tmp_path / "a" / syn.SPEC_NAME).stat().st_mtime_ns == before      # kept as it is


def test_the_casme2_size_is_the_same_generator_with_more_subjects(tmp_path, monkeypatch):
    """make data SYNTH=casme2: 26 subjects x 4 classes x 2 clips, the default spec otherwise (seed,
    frames, classes), and a SynthDataModule with size=casme2 generates it into an empty root."""
    from dataclasses import asdict

    from famnet_pl.data.datamodule import SynthDataModule

    spec = synthetic.spec_of_size("casme2")
    assert (spec.n_subjects, spec.clips_per_class) == (26, 2)
    changed = {k for k, v in asdict(spec).items() if v != asdict(synthetic.SynthSpec())[k]}
    assert changed == {"n_subjects", "clips_per_class"}
    dm = SynthDataModule(data_root=str(tmp_path / "s"), size="casme2")
    assert dm.run_name == "synth_casme2" and SynthDataModule().run_name == "synth"
    calls = []
    monkeypatch.setattr(synthetic, "ensure", lambda root, size="demo": calls.append((root, size)))
    dm.prepare_data()
    assert calls == [(str(tmp_path / "s"), "casme2")]
