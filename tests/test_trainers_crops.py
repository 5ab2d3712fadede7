"""Training on shape-holding crops (`train_crop`): windows keep the whole shape, repeat, and end."""

import pytest
import torch

from trainers.api import TrainConfig, fit
from trainers.data import DataError, ShapeCrops, ShapesDataModule

BANDS = [[0.3, 0.4], [0.2, 0.25]]
SIZE, CROP = 64, 40  # the largest shapes (25 px) need 38 px windows at any rotation


def _dm(**kw):
    base = dict(image_size=SIZE, synth={"size_bands": BANDS}, train_length=24, train_crop=CROP)
    base.update(kw)
    dm = ShapesDataModule(**base)
    dm.setup("fit")
    return dm


def _window_of(crop: torch.Tensor, full: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where ``crop`` equals a window of ``full`` (brute force)."""
    c = crop.shape[-1]
    return [(t, l) for t in range(full.shape[-2] - c + 1) for l in range(full.shape[-1] - c + 1)
            if torch.equal(full[..., t:t + c, l:l + c], crop)]


def test_every_crop_is_a_window_of_its_image_that_holds_the_whole_shape():
    dm = _dm()
    assert isinstance(dm.train_set, ShapeCrops)
    tops = set()
    for i in range(len(dm.train_set)):
        item, full = dm.train_set[i], dm.train_set.base[i]
        assert item["image"].shape == (3, CROP, CROP) and item["mask"].shape == (1, CROP, CROP)
        assert item["label"] == full["label"]
        places = _window_of(item["image"], full["image"])
        assert places, f"crop {i} is not a window of its image"
        t, l = places[0]
        assert torch.equal(item["mask"], full["mask"][..., t:t + CROP, l:l + CROP])
        assert torch.equal(item["region"], full["region"][..., t:t + CROP, l:l + CROP])
        # nothing of the shape is cut off: all of its mask and region lie inside the window
        assert torch.equal(item["mask"].sum(dtype=torch.float64), full["mask"].sum(dtype=torch.float64))
        assert torch.equal(item["region"].sum(dtype=torch.float64), full["region"].sum(dtype=torch.float64))
        tops.add((t, l))
    assert len(tops) > len(dm.train_set) // 2  # windows move with the shape and the draw


def test_crops_repeat_per_epoch_and_change_between_epochs():
    a, b = _dm(), _dm()
    first = torch.stack([a.train_set[i]["image"] for i in range(8)])
    assert torch.equal(first, torch.stack([b.train_set[i]["image"] for i in range(8)]))
    a.set_epoch(1)
    assert not torch.equal(first, torch.stack([a.train_set[i]["image"] for i in range(8)]))
    a.set_epoch(0)
    assert torch.equal(first, torch.stack([a.train_set[i]["image"] for i in range(8)]))


def test_every_seed_the_config_allows_gives_crops():
    """TrainConfig takes seeds up to 2**32 - 1; the per-item generator key must fit manual_seed
    (at most 2**64 - 1) for all of them, not fail in the first training batch."""
    from trainers.api import TrainConfig

    seed = 2**32 - 1
    TrainConfig(arch="resnet18", image_size=SIZE, seed=seed, train_crop=CROP)  # accepted up front
    a, b = _dm(seed=seed, train_length=4), _dm(seed=seed, train_length=4)
    for epoch in (0, 7):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(4):
            item, full = a.train_set[i], a.train_set.base[i]
            assert item["image"].shape == (3, CROP, CROP) and _window_of(item["image"], full["image"])
            assert torch.equal(item["mask"].sum(dtype=torch.float64), full["mask"].sum(dtype=torch.float64))
            assert torch.equal(item["image"], b.train_set[i]["image"])  # still seeded


def test_crops_stop_after_train_crop_epochs_and_eval_stays_full_size():
    dm = _dm(train_crop_epochs=2)
    dm.setup("validate")
    for epoch, size in ((0, CROP), (1, CROP), (2, SIZE), (5, SIZE)):
        dm.set_epoch(epoch)
        assert next(iter(dm.train_dataloader()))["image"].shape[-1] == size
    assert next(iter(dm.val_dataloader()))["image"].shape[-1] == SIZE
    assert dm.describe()["train_crop"] == CROP and dm.describe()["train_crop_epochs"] == 2
    # the fingerprint names the test data, which crops do not touch
    assert dm.fingerprint() == ShapesDataModule(image_size=SIZE, synth={"size_bands": BANDS}).fingerprint()


def test_bad_crops_error_before_training(tmp_path):
    with pytest.raises(DataError, match="need windows of 38 px"):
        ShapesDataModule(image_size=SIZE, synth={"size_bands": BANDS}, train_crop=37)
    with pytest.raises(DataError, match="between 16 and image_size 64"):
        ShapesDataModule(image_size=SIZE, synth={"size_bands": BANDS}, train_crop=72)
    with pytest.raises(DataError, match="train_source='stream'"):
        ShapesDataModule(image_size=SIZE, data=str(tmp_path), train_source="disk", train_crop=CROP)
    with pytest.raises(ValueError, match="swin_t"):
        TrainConfig(arch="swin_t", image_size=SIZE, train_crop=CROP)
    # a window smaller than one item's shape is named with the item (a crop set by hand)
    dm = ShapesDataModule(image_size=SIZE, synth={"size_bands": BANDS}, train_length=4)
    dm.setup("fit")
    with pytest.raises(DataError, match="cannot hold item"):
        [ShapeCrops(dm.train_set, 20)[i] for i in range(4)]


def test_fit_switches_from_crops_to_full_images(tmp_path):
    sizes = []

    class Sizes(__import__("pytorch_lightning").Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sizes.append(batch["image"].shape[-1])

    cfg = TrainConfig(arch="resnet18", image_size=SIZE, out=str(tmp_path / "run"), batch_size=12, max_epochs=2,
                      train_length=24, val_length=12, test_length=12, precision="32-true", num_workers=0,
                      progress_bar=False, curriculum_epochs=0, synth={"size_bands": BANDS},
                      train_crop=CROP, train_crop_epochs=1)
    meta = fit(cfg, callbacks=(Sizes(),))
    assert sizes == [CROP, CROP, SIZE, SIZE]
    assert meta["data"]["train_crop"] == CROP and meta["config"]["train_crop_epochs"] == 1
    assert f"{CROP} px crops holding the whole shape for the first 1 epochs" in (tmp_path / "run" / "MODEL_CARD.md").read_text()
