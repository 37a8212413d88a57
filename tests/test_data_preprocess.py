"""Preprocessing: flow accuracy against a known field, the cache and its keys, bad frames, video
files, clip sampling."""

from __future__ import annotations

import dataclasses
import os
import shutil

import cv2
import numpy as np
import pytest

from famnet_pl.data.frames import (
    FrameError,
    FrameSource,
    clip_times,
    magnify,
    onset_apex_flow,
    read_frame,
    sample_clip,
)
from famnet_pl.data.manifest import build_manifest
from famnet_pl.data.preprocess import ViewConfig, preprocess, preprocess_sample, sample_key
from famnet_pl.data.synthetic import displacement_pair

SMALL = ViewConfig(image_size=32, clip_len=4, clip_size=24, flow_algorithm="farneback", flow_size=64)


# --- optical flow against the generator's displacement field ----------------------------------------

# Documented bound (README, "Preprocessing"): inside the AU regions (|d| > half its maximum), TV-L1's
# mean endpoint error at 128 px is below 0.8 px and below 0.6 of the zero-flow error |d|
# (measured 0.24-0.75 px for displacements of 0.7-2.3 px).
@pytest.mark.parametrize("label", ["1+2", "6+12", "4+9", "14", "15+17"])
def test_tvl1_recovers_the_known_displacement_inside_au_regions(label):
    onset, apex, field = displacement_pair(label=label, seed=0)
    flow = onset_apex_flow(onset, apex, algorithm="tvl1", flow_size=128, out_size=128)[..., :2]
    magnitude = np.linalg.norm(field, axis=-1)
    region = magnitude > 0.5 * magnitude.max()
    epe = np.linalg.norm(flow - field, axis=-1)[region].mean()
    assert epe < 0.8 and epe < 0.6 * magnitude[region].mean()


def test_flow_is_rescaled_to_the_input_size():
    """Computed at 128 px, returned at 64 px: vectors halve (pixels at the input size)."""
    onset, apex, field = displacement_pair(label="15+17", seed=0)
    flow = onset_apex_flow(onset, apex, algorithm="tvl1", flow_size=128, out_size=64)[..., :2]
    small = cv2.resize(field, (64, 64), interpolation=cv2.INTER_AREA) * 0.5
    magnitude = np.linalg.norm(small, axis=-1)
    region = magnitude > 0.5 * magnitude.max()
    assert np.linalg.norm(flow - small, axis=-1)[region].mean() < 0.6 * magnitude[region].mean()


# --- the cache -------------------------------------------------------------------------------------

@pytest.fixture()
def synth_manifest(tiny_synth):
    return build_manifest(protocol="synth_4cls", root=tiny_synth)[0]


def _variants() -> list[tuple[str, object]]:
    """One changed value for every preprocessing field."""
    changed = {"image_size": 48, "clip_len": 6, "clip_size": 32, "flow_algorithm": "dis", "flow_size": 96,
               "need_flow": False, "need_onset": True, "need_apex": False, "register": False,
               "need_clip": False,
               "face_detector": "center", "face_margin": 0.3, "face_align": True, "face_size": 128,
               "flow_pair": "apex_offset", "clip_fps": 100.0, "clip_view": "flow",
               "flow_norm": "sample", "magnify": 8.0}
    assert set(changed) == {f.name for f in dataclasses.fields(ViewConfig)}  # a new field needs a variant
    return list(changed.items())


@pytest.mark.parametrize("name, value", _variants())
def test_configs_that_differ_in_any_parameter_never_share_an_entry(name, value, synth_manifest, tiny_synth):
    row = dict(next(synth_manifest.itertuples(index=False))._asdict())
    other = dataclasses.replace(SMALL, **{name: value})
    assert sample_key(row, tiny_synth, SMALL) != sample_key(row, tiny_synth, other)


def test_sample_key_changes_with_the_sample_and_its_frames(synth_manifest, tiny_synth, tmp_path):
    rows = [dict(r._asdict()) for r in synth_manifest.itertuples(index=False)]
    assert len({sample_key(r, tiny_synth, SMALL) for r in rows}) == len(rows)
    root = tmp_path / "copy"
    shutil.copytree(tiny_synth, root)
    before = sample_key(rows[0], root, SMALL)
    folder = root / rows[0]["frame_dir"]
    (folder / "extra.txt").write_text("a file that is not a frame of the sample changes nothing")
    assert sample_key(rows[0], root, SMALL) == before
    frame = folder / rows[0]["frame_pattern"].format(k=rows[0]["apex"])
    stat = frame.stat()
    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a frame re-extracted in place
    assert sample_key(rows[0], root, SMALL) != before
    moved = dict(rows[0], apex=rows[0]["apex"] + 1)
    assert sample_key(moved, root, SMALL) != sample_key(rows[0], root, SMALL)


def test_second_run_is_served_from_the_cache_and_resumes(synth_manifest, tiny_synth, tmp_path):
    first = preprocess(synth_manifest, tiny_synth, SMALL, tmp_path, progress=False)
    assert first.built == len(synth_manifest) and first.ok.all()
    second = preprocess(synth_manifest, tiny_synth, SMALL, tmp_path, progress=False)
    assert second.built == 0 and second.cached == len(synth_manifest)
    for name in ("apex", "flow", "clip"):
        np.testing.assert_array_equal(first.arrays[name], second.arrays[name])
    # A run killed midway left some entries and no pack: the next run builds only what is missing.
    shutil.rmtree(tmp_path / "packs")
    for entry in sorted((tmp_path / "samples").rglob("*.npz"))[:3]:
        entry.unlink()
    third = preprocess(synth_manifest, tiny_synth, SMALL, tmp_path, progress=False)
    assert third.built == 3 and third.cached == len(synth_manifest) - 3
    np.testing.assert_array_equal(first.arrays["clip"], third.arrays["clip"])


def test_parallel_workers_give_the_same_arrays(synth_manifest, tiny_synth, tmp_path):
    one = preprocess(synth_manifest, tiny_synth, SMALL, tmp_path / "one", progress=False)
    two = preprocess(synth_manifest, tiny_synth, SMALL, tmp_path / "two", workers=2, progress=False)
    for name in ("apex", "flow", "clip"):
        np.testing.assert_array_equal(one.arrays[name], two.arrays[name])


# --- bad frames --------------------------------------------------------------------------------------

def test_truncated_jpeg_and_missing_frame_name_the_file_and_lose_nothing_else(synth_manifest, tiny_synth,
                                                                              tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_synth, root)
    rows = [dict(r._asdict()) for r in synth_manifest.itertuples(index=False)]
    truncated = root / rows[0]["frame_dir"] / rows[0]["frame_pattern"].format(k=rows[0]["apex"])
    truncated.write_bytes(truncated.read_bytes()[:-300])
    missing = root / rows[1]["frame_dir"] / rows[1]["frame_pattern"].format(k=rows[1]["offset"])
    missing.unlink()

    with pytest.raises(FrameError, match="truncated JPEG"):
        read_frame(truncated)
    result = preprocess(synth_manifest, root, SMALL, tmp_path / "cache", progress=False)
    assert result.failures.keys() == {rows[0]["sample_id"], rows[1]["sample_id"]}
    assert str(truncated) in result.failures[rows[0]["sample_id"]]
    assert (str(missing) in result.failures[rows[1]["sample_id"]]
            and "missing" in result.failures[rows[1]["sample_id"]])
    assert result.ok.sum() == len(rows) - 2 and len(result.arrays["clip"]) == len(rows) - 2
    good = preprocess(synth_manifest.iloc[2:], tiny_synth, SMALL, tmp_path / "clean", progress=False)
    np.testing.assert_array_equal(result.arrays["clip"], good.arrays["clip"])   # the others are untouched
    with pytest.raises(FrameError, match=str(truncated)):
        preprocess(synth_manifest, root, SMALL, tmp_path / "strict", strict=True, progress=False)
    # Restoring the file (in place: the folder's timestamp does not change) is picked up next run.
    shutil.copy2(tiny_synth / rows[0]["frame_dir"] / truncated.name, truncated)
    again = preprocess(synth_manifest, root, SMALL, tmp_path / "cache", progress=False)
    assert rows[0]["sample_id"] not in again.failures and again.ok.sum() == len(rows) - 1


def test_preprocess_cli_reports_and_strict_stops_with_one_line(tiny_synth, tmp_path, capsys):
    from famnet_pl.cli import main

    root = tmp_path / "broken"
    shutil.copytree(tiny_synth, root)
    row = build_manifest(protocol="synth_4cls", root=root)[0].iloc[3]
    victim = root / row["frame_dir"] / row["frame_pattern"].format(k=row["apex"])
    victim.write_bytes(victim.read_bytes()[:200])   # (a missing file is caught by the manifest check)
    args = ["preprocess", "synth", "--data-root", str(root), "--workers", "1", f"--data.cache_dir={tmp_path}",
            "--data.image_size=24", "--data.clip_len=2", "--data.clip_size=16", "--data.flow_size=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "11 built" in out and "1 left out" in out and victim.name in out
    assert main([*args, "--strict"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert (len(errors) == 1 and errors[0].startswith("famnet-pl preprocess: error")
            and victim.name in errors[0])


# --- video files --------------------------------------------------------------------------------------

# Documented tolerance (README): an MPEG-4 Part 2 (mp4v) file written by OpenCV at its default
# quality gives the same frame numbers and arrays within a mean absolute error of 4 grey levels
# per pixel (apex and clip) and 0.35 px of mean flow difference.
def test_mp4_clip_gives_the_same_arrays_as_its_frame_folder(synth_manifest, tiny_synth, tmp_path):
    row = dict(next(synth_manifest.itertuples(index=False))._asdict())
    source = FrameSource(tiny_synth / row["frame_dir"], row["frame_pattern"])
    frames = source.read_many(list(range(row["onset"], row["offset"] + 1)))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    as_video = dict(row, frame_dir=str(video), frame_pattern=f"@{row['onset']}")
    views = dataclasses.replace(SMALL, flow_algorithm="tvl1")
    a, b = preprocess_sample(row, tiny_synth, views), preprocess_sample(as_video, tmp_path, views)
    for name in ("apex", "clip"):
        assert a[name].shape == b[name].shape
        assert np.abs(a[name].astype(float) - b[name].astype(float)).mean() < 4
    assert np.abs(a["flow"][..., :2] - b["flow"][..., :2]).mean() < 0.35
    with pytest.raises(FrameError, match="outside the video"):
        preprocess_sample(dict(as_video, offset=row["offset"] + 50), tmp_path, views)


def test_video_frame_numbers_map_to_the_right_frames(tmp_path):
    """Frame k of a video whose first frame is number 40 is the (k - 40)-th picture: each picture
    is a flat grey of 20 * its index, so an off-by-one shows as 20 grey levels (codec error ~1)."""
    from famnet_pl.data.frames import VideoSource

    video = tmp_path / "counter.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 64))
    for i in range(10):
        writer.write(np.full((64, 64, 3), 20 * i + 10, np.uint8))
    writer.release()
    frames = VideoSource(video, first=40).read_many([47, 40, 43, 43])
    np.testing.assert_allclose([f.mean() for f in frames], [150, 10, 70, 70], atol=3)


# --- clip sampling --------------------------------------------------------------------------------------

class _Counter(FrameSource):
    """Frame k is a constant image of value 10 * k (to see interpolation)."""

    def __init__(self):
        self.reads = []

    def read(self, k):
        self.reads.append(k)
        return np.full((2, 2, 3), 10 * k, np.uint8)


def test_short_clip_is_interpolated_long_clip_is_sampled():
    # 3 frames -> 5: blends in between
    short = sample_clip(_Counter().read_many, clip_times(1, 3, 5))
    np.testing.assert_array_equal(short[:, 0, 0, 0], [10, 15, 20, 25, 30])
    source = _Counter()
    # whole frames only, each read once
    long = sample_clip(source.read_many, clip_times(1, 20, 4))
    np.testing.assert_array_equal(long[:, 0, 0, 0], [10, 70, 140, 200])
    assert sorted(source.reads) == [1, 7, 14, 20]


def test_clip_fps_puts_datasets_on_one_time_scale():
    np.testing.assert_allclose(clip_times(100, 200, 4, fps=200, clip_fps=50), [100, 104, 108, 112])
    np.testing.assert_allclose(clip_times(10, 12, 4, fps=30, clip_fps=50), [10, 10.6, 11.2, 11.8])
    np.testing.assert_allclose(clip_times(10, 11, 4, fps=30, clip_fps=50), [10, 10.6, 11, 11])


# --- seeing it ---------------------------------------------------------------------------------------

def test_show_writes_a_png_of_one_sample(tiny_synth, tmp_path):
    from famnet_pl.cli import main

    out = tmp_path / "sample.png"
    args = ["show", "synth/sub01", "synth", "--data-root", str(tiny_synth), "--out", str(out),
            f"--data.cache_dir={tmp_path}", "--data.flow_algorithm=farneback"]
    assert main(args) == 2                                    # ambiguous prefix: one-line error
    first = sorted(p.name for p in (tiny_synth / "CASME2_RAW_selected" / "sub01").iterdir())[0]
    assert main([*args[:1], f"synth/sub01/{first}", *args[2:]]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = read_frame(out)
    assert image.shape[0] > 300 and image.std() > 10


def test_flow_colours_follow_direction():
    from famnet_pl.data.show import flow_to_rgb

    right = flow_to_rgb(np.dstack([np.ones((4, 4)), np.zeros((4, 4))]).astype(np.float32))
    left = flow_to_rgb(np.dstack([-np.ones((4, 4)), np.zeros((4, 4))]).astype(np.float32))
    assert (right[0, 0] != left[0, 0]).any() and right.max() == 255


def test_a_video_layout_goes_through_the_manifest_check(synth_manifest, tiny_synth, tmp_path):
    from famnet_pl.data.manifest import check_files

    row = synth_manifest.iloc[:1].assign(frame_dir="clip.mp4", frame_pattern="@1")
    with pytest.raises(Exception, match="video .*clip.mp4 does not exist"):
        check_files(row, tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert len(check_files(row, tmp_path)) == 1


def test_samples_without_a_face_are_reported_and_custom_detectors_run_in_process(synth_manifest, tiny_synth,
                                                                                  tmp_path, caplog):
    from famnet_pl.data.face import register_detector

    register_detector("never_finds", lambda frame: None)
    views = dataclasses.replace(SMALL, face_detector="never_finds", face_size=48)
    result = preprocess(synth_manifest.iloc[:3], tiny_synth, views, tmp_path, workers=2, progress=False)
    assert result.no_face == synth_manifest["sample_id"].iloc[:3].tolist() and result.ok.all()
    assert "registered in this process only" in caplog.text
    again = preprocess(synth_manifest.iloc[:3], tiny_synth, views, tmp_path, workers=2, progress=False)
    assert again.no_face == result.no_face and again.built == 0


def test_clip_view_flow_is_the_motion_from_the_onset_to_each_frame(synth_manifest, tiny_synth):
    row = dict(next(synth_manifest.itertuples(index=False))._asdict())
    frames = preprocess_sample(row, tiny_synth, SMALL)["clip"]
    flows = preprocess_sample(row, tiny_synth, dataclasses.replace(SMALL, clip_view="flow"))["clip"]
    assert frames.dtype == np.uint8 and flows.dtype == np.float32 and flows.shape == frames.shape
    magnitude = np.linalg.norm(flows[..., :2], axis=-1).mean(axis=(1, 2))
    assert magnitude[0] < 0.1 * magnitude.max()  # the onset against itself
    # The frame nearest the apex carries the most motion, as the 2D onset->apex flow says.
    times = np.linspace(row["onset"], row["offset"], SMALL.clip_len)
    apex_flow = preprocess_sample(row, tiny_synth, SMALL)["flow"]
    nearest = int(np.argmin(np.abs(times - row["apex"])))
    assert magnitude[nearest] > 0.5 * magnitude.max()
    assert (np.linalg.norm(apex_flow[..., :2], axis=-1).mean() * SMALL.clip_size / SMALL.image_size
            == pytest.approx(magnitude.max(), rel=0.6))


def test_a_frame_truncated_in_place_is_not_served_from_the_cache(synth_manifest, tiny_synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    preprocess(synth_manifest, root, SMALL, tmp_path / "cache", strict=True, progress=False)
    row = dict(next(synth_manifest.itertuples(index=False))._asdict())
    folder = root / row["frame_dir"]
    frame = folder / row["frame_pattern"].format(k=row["apex"])
    folder_time = folder.stat().st_mtime_ns
    frame.write_bytes(frame.read_bytes()[:-300])             # edited in place: the folder's time stays
    os.utime(folder, ns=(folder_time, folder_time))
    with pytest.raises(FrameError, match="truncated JPEG"):
        preprocess(synth_manifest, root, SMALL, tmp_path / "cache", strict=True, progress=False)


@pytest.mark.parametrize("where", ["entry", "pack"])
def test_disk_full_in_the_cache_names_the_path_and_leaves_no_temp_file(synth_manifest, tiny_synth, tmp_path,
                                                                       monkeypatch, where):
    import errno

    from famnet_pl.utils.io import DiskFullError

    real_replace = os.replace

    def replace(src, dst):
        if (where == "entry") == str(dst).endswith(".npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr("famnet_pl.data.preprocess.os.replace", replace)
    with pytest.raises(DiskFullError, match="no space left on device for .*MB are free"):
        preprocess(synth_manifest, tiny_synth, SMALL, tmp_path, progress=False)
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_an_unreadable_frame_is_reported_as_such_not_as_missing(tmp_path, monkeypatch):
    from pathlib import Path

    frame = tmp_path / "img1.jpg"
    frame.write_bytes(b"\xff\xd8 jpeg \xff\xd9")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads any file: chmod 000 would not do it
    with pytest.raises(FrameError, match="permission denied") as info:
        read_frame(frame)
    assert "missing" not in str(info.value) and str(frame) in str(info.value)


def test_magnify_amplifies_the_change_against_the_onset_frame():
    """Linear magnification: identity at alpha 0 and on the onset itself; a 1 px motion's intensity
    change comes out about (1 + alpha) times larger (low-passed first, so a little less)."""
    import cv2


    rng = np.random.default_rng(0)
    onset = cv2.GaussianBlur(rng.integers(40, 220, (64, 64, 3)).astype(np.uint8), (0, 0), 3)
    frame = np.roll(onset, 1, axis=1)
    assert (magnify(onset, frame, 0) == frame).all() and (magnify(onset, onset, 10) == onset).all()
    change = np.abs(frame.astype(np.float64) - onset).mean()
    ratio = np.abs(magnify(onset, frame, 4).astype(np.float64) - onset).mean() / change
    assert 3.5 < ratio < 5.0


def test_normalise_motion_puts_every_sample_at_one_scale():
    from famnet_pl.data.frames import normalise_motion

    rng = np.random.default_rng(0)
    flow = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    small, large = normalise_motion(flow * 0.1), normalise_motion(flow * 7)
    np.testing.assert_allclose(small, large, rtol=1e-4, atol=1e-5)
    assert np.sqrt(np.mean(large[..., 0] ** 2 + large[..., 1] ** 2)) == pytest.approx(1, rel=1e-4)
