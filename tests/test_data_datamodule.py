"""MERDataModule: subject-disjoint folds, views, AU targets, clip-consistent augmentation; the
per-dataset DataModules (CASME2DataModule...): their protocols, and nothing else changed."""

import numpy as np
import pytest
import torch

from famnet_pl.data import datamodule as dm_module
from famnet_pl.data.datamodule import MERDataModule
from famnet_pl.data.protocols import ALIASES, PROTOCOLS, ProtocolError
from famnet_pl.data.transforms import ClipAugment
from famnet_pl.data.views import flow_u_channels


def _dm(root, cache, **kw):
    base = dict(protocol="synth_4cls", data_root=str(root), cache_dir=str(cache), image_size=32, clip_len=4,
                clip_size=24, flow_size=64, flow_algorithm="farneback", batch_size=4)
    base.update(kw)
    return MERDataModule(**base)


def test_folds_are_subject_disjoint_and_cover_every_sample_once(tiny_synth, tmp_path):
    seen = []
    n_folds = len(_dm(tiny_synth, tmp_path).subjects())
    for fold in range(n_folds):
        dm = _dm(tiny_synth, tmp_path, fold=fold, val_subjects=1)
        dm.setup("fit")
        subject = dm.manifest["subject"].to_numpy()
        train, val, test = (set(subject[s.indices]) for s in (dm.train_set, dm.val_set, dm.test_set))
        assert test == {dm.test_subject} and not train & test and not val & test and not train & val
        assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == len(dm.manifest)
        seen.extend(dm.test_set.indices.tolist())
    assert sorted(seen) == list(range(len(dm.manifest)))


@pytest.mark.parametrize("input_2d, channels",
                         [("apex", 3), ("flow", 3), ("both", 6), ("pair", 6), ("pair_flow", 9)])
def test_batch_views_and_targets(tiny_synth, tmp_path, input_2d, channels):
    dm = _dm(tiny_synth, tmp_path, input_2d=input_2d)
    assert dm.in_channels_2d == channels
    dm.setup("fit")
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())))
    assert batch["x2d"].shape == (4, channels, 32, 32)
    assert batch["x3d"].shape == (4, 3, 4, 24, 24)
    assert batch["au"].shape == batch["au_mask"].shape == (4, dm.num_aus)
    assert torch.isfinite(batch["x2d"]).all() and torch.isfinite(batch["x3d"]).all()


def test_pair_views_hold_onset_then_apex_then_flow(tiny_synth, tmp_path):
    """FRL-DGT's views: the cached onset and apex frames (and flow) stacked in that order, and one
    photometric draw for both frames (a brightness change between them would be fake motion)."""
    dm = _dm(tiny_synth, tmp_path, input_2d="pair_flow", augment=False)
    dm.setup("fit")
    test = dm.test_set
    i = int(test.indices[0])
    view = test.view_2d(i)
    assert view.shape == (32, 32, 9)
    np.testing.assert_array_equal(view[..., 0:3], test.arrays["onset"][i] / np.float32(255))
    np.testing.assert_array_equal(view[..., 3:6], test.arrays["apex"][i] / np.float32(255))
    np.testing.assert_array_equal(view[..., 6:9], test.arrays["flow"][i])
    assert not np.array_equal(test.arrays["onset"][i], test.arrays["apex"][i])  # the frames differ: motion

    augmented = _dm(tiny_synth, tmp_path, input_2d="pair")
    augmented.setup("fit")
    x = augmented.train_set.tensors([0])["x2d"][0].numpy()
    plain = _dm(tiny_synth, tmp_path, input_2d="pair", augment=False)
    plain.setup("fit")
    y = plain.train_set.tensors([0])["x2d"][0].numpy()
    # Same geometric and photometric change on both frames: the onset-apex difference is only
    # shifted/flipped, never brightened on one side (checked through the per-frame mean difference).
    assert abs((x[3:6] - x[0:3]).mean() - (y[3:6] - y[0:3]).mean()) < 0.2


def test_au_targets_not_all_zero(tiny_synth, tmp_path):
    dm = _dm(tiny_synth, tmp_path)
    dm.setup("fit")
    au = dm.train_set.au
    assert au.sum(axis=1).min() >= 1            # every synthetic sample has an AU
    assert (au.sum(axis=0) > 0).sum() >= 5


def test_normalisation_uses_training_subjects_only(tiny_synth, tmp_path):
    a = _dm(tiny_synth, tmp_path, fold=0)
    a.setup("fit")
    test_rows = a.test_set.indices
    clip = a.train_set.arrays["clip"]
    assert clip.shape[0] == len(a.manifest)
    stats = {k: v.copy() for k, v in a.train_set.stats.items()}
    # Recompute from train rows by hand.
    x3d = np.stack([a.train_set.view_3d(i) for i in a.train_set.indices])
    np.testing.assert_allclose(stats["mean_3d"], x3d.mean(axis=(0, 1, 2, 3)), rtol=1e-5)
    assert not np.isin(test_rows, a.train_set.indices).any()


def test_augmentation_is_identical_across_frames_and_flips_flow():
    aug = ClipAugment(seed=0, brightness=0.3, contrast=0.3)
    frame = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    flipped_once = False
    for _ in range(20):
        clip = aug(np.repeat(frame[None], 6, axis=0), rgb=slice(0, 3), flow_u=None)
        for t in range(1, 6):
            np.testing.assert_array_equal(clip[t], clip[0])
        flow = np.zeros((1, 24, 24, 3), np.float32)
        flow[..., 0] = 1.0                      # uniform rightward motion
        out = aug(flow, rgb=None, flow_u=0)
        centre = out[0, 12, 12, 0]
        assert centre in (1.0, -1.0)
        flipped_once |= centre == -1.0
    assert flipped_once


def test_augmentation_is_seeded():
    x = np.random.default_rng(1).random((3, 24, 24, 3)).astype(np.float32)
    a = [ClipAugment(seed=5)(x.copy(), rgb=slice(0, 3), flow_u=None) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])


def test_fold_out_of_range_is_a_clear_error(tiny_synth, tmp_path):
    with pytest.raises(ValueError, match="fold 9 out of range.*3 subjects"):
        _dm(tiny_synth, tmp_path, fold=9).setup("fit")


def test_landmarks_travel_from_the_detector_to_frl_dgt_and_move_with_the_augmentation(tiny_synth, tmp_path):
    from famnet_pl.data.face import FaceDetection, register_detector
    from famnet_pl.data.transforms import FLIP_ORDER
    from famnet_pl.models.module import MERLitModule

    points = ((18.0, 26.0), (42.0, 27.0), (31.0, 38.0), (23.0, 48.0), (41.0, 49.0))  # 64 px synthetic frames
    register_detector("with_landmarks",
                      lambda frame: FaceDetection(0, 0, 64, 64, eyes=points[:2], landmarks=points))
    plain = _dm(tiny_synth, tmp_path, input_2d="pair", face_detector="with_landmarks", face_margin=0.0,
                face_size=64, augment=False)
    plain.setup("fit")
    expected = (np.array(points) + 0.5) / 64
    np.testing.assert_allclose(plain.train_set[0]["landmarks"].numpy(), expected, atol=1e-5)

    augmented = _dm(tiny_synth, tmp_path, input_2d="pair", face_detector="with_landmarks", face_margin=0.0,
                    face_size=64)
    augmented.setup("fit")
    flips = 0
    for _ in range(8):
        moved = augmented.train_set[0]["landmarks"].numpy()
        mirrored = expected.copy()
        mirrored[:, 0] = 1 - mirrored[:, 0]
        mirrored = mirrored[list(FLIP_ORDER)]
        # A translation moves every point alike; a flip mirrors them and swaps left and right.
        shift_plain, shift_mirror = moved - expected, moved - mirrored
        is_plain = np.allclose(shift_plain, shift_plain[0], atol=1e-5)
        is_mirror = np.allclose(shift_mirror, shift_mirror[0], atol=1e-5)
        assert is_plain or is_mirror, moved
        assert moved[0, 0] < moved[1, 0]  # the image-left eye stays first after a flip
        flips += is_mirror and not is_plain
    assert flips > 0

    batch = plain.on_after_batch_transfer(next(iter(plain.train_dataloader())))
    assert batch["landmarks"].shape == (4, 5, 2)
    module = MERLitModule(model="frl_dgt", num_classes=4, in_channels_2d=6,
                          net={"dgm_width": 4, "embed_dim": 16, "heads": 2})
    torch.manual_seed(0)
    boxes = module.net.region_boxes(batch["landmarks"], 4)
    # placed from the data, not the template
    assert not torch.allclose(boxes, module.net.region_boxes(None, 4))
    batch["landmarks"][1] = float("nan")  # no face found for that sample: the template is used
    torch.testing.assert_close(module.net.region_boxes(batch["landmarks"], 4)[1],
                               module.net.region_boxes(None, 4)[1])
    module.eval()
    with_points = module(batch["x2d"], None, batch["landmarks"])["emotion"]
    assert not torch.allclose(with_points, module(batch["x2d"])["emotion"])


def test_augmented_landmarks_mark_the_same_pixel_as_before():
    """A bright pixel at a landmark is found where the augmented landmark says (flip and shift)."""
    aug = ClipAugment(seed=3, translate=0.1)
    y, x = 14, 9
    image = np.zeros((1, 32, 32, 3), np.float32)
    image[0, y, x] = 1.0
    points = np.tile([[(x + 0.5) / 32, (y + 0.5) / 32]], (5, 1)).astype(np.float32)
    seen_flip = False
    for _ in range(12):
        out, moved = aug(image, rgb=None, flow_u=None, points=points)
        found_y, found_x = np.unravel_index(out[0, ..., 0].argmax(), (32, 32))
        np.testing.assert_allclose(moved[0] * 32 - 0.5, [found_x, found_y], atol=1e-4)
        seen_flip |= found_x > 16
    assert seen_flip


# --- one DataModule per dataset ----------------------------------------------------------------------

# class -> its default protocol (that of its experiments/data/*.yaml: tests/test_cli.py)
PER_DATASET = {
    dm_module.CASME2DataModule: "casme2_5cls", dm_module.SAMMDataModule: "samm_5cls",
    dm_module.MMEWDataModule: "mmew_6cls", dm_module.CASME3DataModule: "casme3_4cls",
    dm_module.SMICDataModule: "smic_3cls", dm_module.MEGC2019DataModule: "megc2019_3cls",
    dm_module.SynthDataModule: "synth_4cls",
}


@pytest.mark.parametrize("cls", PER_DATASET, ids=lambda c: c.__name__)
def test_dataset_datamodule_takes_its_protocols_and_refuses_others_in_one_line(cls):
    assert cls().hparams.protocol == PER_DATASET[cls] and PER_DATASET[cls] in cls.protocols
    for protocol in cls.protocols:                          # all of its own: no data needed to build one
        assert cls(protocol=protocol).protocol.name == PROTOCOLS[ALIASES.get(protocol, protocol)].name
    other = next(p for p in [*PROTOCOLS, *ALIASES] if p not in cls.protocols)
    with pytest.raises(ValueError, match=f"{cls.__name__}: protocol '{other}' is not one of") as error:
        cls(protocol=other)
    assert isinstance(error.value, ProtocolError) and "\n" not in str(error.value)
    assert all(p in str(error.value) for p in cls.protocols)


def test_every_protocol_has_one_datamodule_and_composites_keep_merdatamodule():
    owners = {}
    for cls in PER_DATASET:
        for protocol in cls.protocols:
            owners.setdefault(protocol, []).append(cls.__name__)
    assert all(len(names) == 1 for names in owners.values()), owners
    assert set(owners) | {"famnet_3cls"} == {*PROTOCOLS, *ALIASES}     # FAMNet's composite: MERDataModule
    with pytest.raises(ProtocolError, match="use SAMMDataModule for it"):
        dm_module.CASME2DataModule(protocol="samm_5cls")
    with pytest.raises(ProtocolError, match="use MERDataModule for it"):
        dm_module.MEGC2019DataModule(protocol="famnet_3cls")
    assert MERDataModule(protocol="famnet_3cls").protocol.composite       # MERDataModule takes any


def test_synth_datamodule_is_merdatamodule_on_the_synthetic_protocol(tiny_synth, tmp_path):
    """Same hyperparameters, same batches: the subclass only fixes the dataset."""
    options = dict(data_root=str(tiny_synth), cache_dir=str(tmp_path), image_size=32, clip_len=4,
                   clip_size=24, flow_size=64, flow_algorithm="farneback", batch_size=4, val_subjects=1,
                   fold=1)
    synth, plain = dm_module.SynthDataModule(**options), MERDataModule(protocol="synth_4cls", **options)
    assert synth.hparams.pop("size") == "demo"  # the set's size: SynthDataModule's one option of its own
    assert dict(synth.hparams) == dict(plain.hparams)
    for dm in (synth, plain):
        dm.setup("fit")
    assert synth.split == plain.split
    for a, b in zip(synth.train_dataloader(), plain.train_dataloader()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hflip_is_the_training_flip():
    """Flip TTA mirrors a sample exactly as the training augmentation's flip does (flow u negated)."""
    from famnet_pl.data.transforms import hflip

    x = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
    always = ClipAugment(flip_p=1.0, translate=0.0, seed=0)
    mirrored = hflip(torch.from_numpy(x), 0)
    np.testing.assert_array_equal(mirrored.numpy(), always(x.copy(), rgb=None, flow_u=0))
    np.testing.assert_array_equal(hflip(mirrored, 0).numpy(), x)


@pytest.mark.parametrize("input_2d, clip_mode", [("flow", "flow"), ("both", "frames")])
def test_tta_hflip_adds_the_mirrored_views_to_evaluation_batches_only(tiny_synth, tmp_path, input_2d,
                                                                      clip_mode):
    dm = _dm(tiny_synth, tmp_path, input_2d=input_2d, clip_mode=clip_mode, val_subjects=1, tta="hflip")
    dm.setup("fit")
    assert "x2d_flip" not in dm.on_after_batch_transfer(next(iter(dm.train_dataloader())))
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batch = dm.on_after_batch_transfer(next(iter(loader)))
        stats = dm.test_set.stats
        flow_u = flow_u_channels(input_2d, clip_mode)
        for key, mean, std in (("x2d", "mean_2d", "std_2d"), ("x3d", "mean_3d", "std_3d")):
            # un-normalise, mirror, negate u: the original view back
            view = batch[key].movedim(1, -1).numpy() * stats[std] + stats[mean]
            mirrored = batch[f"{key}_flip"].movedim(1, -1).numpy() * stats[std] + stats[mean]
            back = mirrored[..., ::-1, :].copy()
            if flow_u[key] is not None:
                back[..., flow_u[key]] *= -1
            np.testing.assert_allclose(back, view, atol=1e-5)


def test_a_batch_at_once_is_the_collated_items(tiny_synth, tmp_path):
    """__getitems__ (one np.take per cached array) gives what default_collate of the items gives,
    with the same augmentation draws from the same stream."""
    from torch.utils.data import default_collate

    dm = _dm(tiny_synth, tmp_path, tta="hflip")
    dm.setup("fit")
    train = dm.train_set
    state = train.augment.get_state()
    items = [2, 0, 3, 1]
    one_by_one = default_collate([train[j] for j in items])
    train.augment.set_state(state)
    at_once = dm_module.collate(train.__getitems__(items))
    train.augment.set_state(state)
    plain = default_collate(train.__getitems__(items))  # any other collate_fn: a list of samples
    for batch in (at_once, plain):
        assert sorted(batch) == sorted(one_by_one)
        for key, value in one_by_one.items():
            assert torch.equal(batch[key], value), key


def test_worker_batches_get_the_cached_arrays_in_the_main_process(tiny_synth, tmp_path):
    """With workers, the workers leave the cached arrays out and the loader fills them in: the
    evaluation batches equal the 0-worker ones, and every training batch holds its rows' arrays."""
    import pickle

    from torch.utils.data import DataLoader

    batches = {}
    for workers in (0, 2):
        dm = _dm(tiny_synth, tmp_path, num_workers=workers)
        dm.setup("fit")
        batches[workers] = list(dm.test_dataloader())
        loader = dm.train_dataloader()
        if workers:  # what the workers send: no cached arrays (the bytes stay in this process)
            raw = next(iter(DataLoader.__iter__(loader)))
            assert "flow" not in raw and "clip" not in raw and "aug2d" in raw
            pickle.dumps(iter(loader))  # as Lightning's loop iterators allow (the worker iterator dropped)
        for batch in loader:
            rows = batch["index"].numpy()
            for name in ("flow", "clip"):
                np.testing.assert_array_equal(batch[name].numpy(), dm.train_set.arrays[name][rows])
            assert "aug2d" in batch and "aug3d" in batch
    assert len(batches[0]) == len(batches[2])
    for plain, filled in zip(batches[0], batches[2]):
        assert sorted(plain) == sorted(filled)
        assert all(torch.equal(plain[k], filled[k]) for k in plain)
