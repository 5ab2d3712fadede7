"""A user's journey with a generated dataset: regenerate it from its recipe, read it back with
`datasets` and with our readers, train on it and load the model (regressions found that way)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shapesynth import SynthConfig, dataset_fingerprint
from shapesynth.backgrounds import build_pools, clear_pool_cache
from shapesynth.generate import generate
from shapesynth.readers import load_config, load_metadata
from shapesynth.torchdata import ShapesDataset

BANDS = ((0.3, 0.4), (0.2, 0.25))


def _write_backgrounds(folder: Path, n: int, size: int = 40, seed: int = 0) -> None:
    import cv2

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        cv2.imwrite(str(folder / f"b{k}.png"), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _names(pools) -> dict[str, list[str]]:
    return {split: list(pool.names) for split, pool in pools.items()}


def test_folder_pools_do_not_depend_on_the_key_order_of_bg_pool_fractions(tmp_path):
    # shapesynth.json stores the config with sorted keys (test, train, val): read back, it must
    # deal the same files into the same pools as the run that wrote it (train, val, test)
    _write_backgrounds(tmp_path / "bgs", 12)
    common = dict(image_size=32, size_bands=BANDS, background="folder", bg_path=str(tmp_path / "bgs"))
    as_run = SynthConfig(**common, bg_pool_fractions={"train": 0.8, "val": 0.05, "test": 0.15})
    read_back = SynthConfig(**common, bg_pool_fractions={"test": 0.15, "train": 0.8, "val": 0.05})
    clear_pool_cache()  # the cache's key sorts the mapping: a new process has no cache
    first = _names(build_pools(as_run))
    clear_pool_cache()
    second = _names(build_pools(read_back))
    clear_pool_cache()
    assert second == first


def test_split_folders_list_skipped_files_in_the_same_order_whatever_the_key_order(tmp_path):
    for split in ("train", "val", "test"):
        _write_backgrounds(tmp_path / split, 2, seed=len(split))
        (tmp_path / split / f"notes_{split}.txt").write_text("not an image")
    paths = {s: str(tmp_path / s) for s in ("train", "val", "test")}
    common = dict(image_size=32, size_bands=BANDS, background="folder")
    clear_pool_cache()
    first = build_pools(SynthConfig(**common, bg_split_paths=paths))["train"].skipped
    clear_pool_cache()
    second = build_pools(SynthConfig(**common, bg_split_paths=dict(sorted(paths.items()))))["train"].skipped
    clear_pool_cache()
    assert [name for name, _ in first] == [name for name, _ in second]
    assert len(first) == 3


def test_a_cli_dataset_with_folder_backgrounds_regenerates_and_gives_counterfactuals(tmp_path, monkeypatch):
    from shapesynth.cli import main

    _write_backgrounds(tmp_path / "bgs", 12)
    monkeypatch.chdir(tmp_path)
    flags = ["--image-size", "32", "--size-bands", "0.3-0.4,0.2-0.25", "--train-size", "12", "--val-size", "6",
             "--test-size", "6", "--num-proc", "1", "--no-progress"]
    assert main(["generate", "--out", "data", "--backgrounds", "bgs", *flags]) == 0
    clear_pool_cache()  # as a later process would: the dataset is rebuilt from its shapesynth.json
    test = ShapesDataset("data", split="test")
    for i in range(len(test)):
        item, label = test[i], int(test[i]["label"])
        again = test.counterfactual(i, label)  # the same class re-rendered: the stored pixels
        assert torch.equal(again["image"], item["image"]) and torch.equal(again["mask"], item["mask"])
    # the card's command: the recipe file regenerates the same bytes
    clear_pool_cache()
    assert main(["generate", "--config", "data/shapesynth.json", "--out", "again", "--num-proc", "1",
                 "--no-progress"]) == 0
    assert dataset_fingerprint("again") == dataset_fingerprint("data")
    assert (Path("again/backgrounds.json").read_text() == Path("data/backgrounds.json").read_text())
    clear_pool_cache()


def _tiny_arrow(tmp_path, train: int) -> tuple:
    """(config, folder) of a 32 px arrow dataset with ``train`` training images, 6 val and 12 test."""
    cfg = SynthConfig(image_size=32, size_bands=BANDS, split_sizes={"train": train, "val": 6, "test": 12},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    out = tmp_path / "data"
    generate(cfg, out, fmt="arrow", progress=False)
    return cfg, out


def test_arrow_dataset_survives_datasets_cache_files_written_beside_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    cfg, out = _tiny_arrow(tmp_path, train=12)
    before = dataset_fingerprint(out)
    items = [ShapesDataset(out, split="test")[i] for i in range(12)]

    # what a user of the documented `load_from_disk(OUT)` does: datasets caches beside the files
    ds = datasets.load_from_disk(str(out))
    assert len(ds["test"].filter(lambda r: r["label"] == 0)) == 2
    ds["train"].map(lambda r: {"twice": 2 * r["label"]})
    assert list((out / "test").glob("cache-*.arrow")) and list((out / "train").glob("cache-*.arrow"))

    assert dataset_fingerprint(out) == before
    test = ShapesDataset(out, split="test")
    assert len(test) == 12
    for i, item in enumerate(items):
        assert torch.equal(test[i]["image"], item["image"]) and int(test[i]["label"]) == int(item["label"])
    assert len(load_metadata(out, "train")) == 12
    assert load_config(out) == cfg
    assert json.loads((out / "test" / "state.json").read_text())["_data_files"]


def test_the_card_says_what_region_is_and_the_hub_rows_agree(tmp_path):
    datasets = pytest.importorskip("datasets")
    cfg = SynthConfig(image_size=48, size_bands=((0.3, 0.4),), split_sizes={"train": 12, "val": 6, "test": 12},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    generate(cfg, tmp_path / "data", progress=False)
    card = " ".join((tmp_path / "data" / "README.md").read_text().split())
    assert "For empty shapes `mask` is the stroke and `region` the whole shape, stroke and hole" in card
    rows = datasets.load_dataset(str(tmp_path / "data"), split="test")
    ys, xs = np.mgrid[:48, :48]
    circles = 0
    for row in rows:
        mask = np.asarray(row["mask"], np.float64) / 255
        region = np.asarray(row["region"], np.float64) / 255
        assert (region >= mask).all()
        if row["filled"]:
            assert np.array_equal(region, mask)
        else:  # the hole: in the region, not in the stroke
            assert ((region == 1) & (mask == 0)).any()
        if row["class_name"] == "filled_circle":  # the documented pixel-centre convention
            circles += 1
            total = mask.sum()
            assert (mask * xs).sum() / total + 0.5 == pytest.approx(row["center_x"], abs=0.02)
            assert (mask * ys).sum() / total + 0.5 == pytest.approx(row["center_y"], abs=0.02)
    assert circles == 2


def test_load_dataset_of_a_regenerated_folder_gives_the_new_data(tmp_path):
    # datasets caches load_dataset("OUT") under the folder's name and the card's configs: without
    # the fingerprint in them, regenerated data (or another dataset of that name) came back stale
    datasets = pytest.importorskip("datasets")
    out, cache = tmp_path / "data", tmp_path / "hf_cache"
    for seed in (1, 2):
        cfg = SynthConfig(image_size=32, seed=seed, size_bands=BANDS, split_sizes={"train": 6, "val": 6, "test": 6},
                          bg_pool_sizes={"train": 2, "val": 1, "test": 1})
        generate(cfg, out, overwrite=True, progress=False)
        ds = datasets.load_dataset(str(out), cache_dir=str(cache))
        assert set(ds) == {"train", "val", "test"}
        assert {row["seed"] for row in ds["test"]} == {seed}
        stored = ShapesDataset(out, split="test")
        assert all(np.array_equal(np.asarray(row["image"]), stored[i]["image"].mul(255).round().byte().permute(1, 2, 0).numpy())
                   for i, row in enumerate(ds["test"]))


def test_arrow_folder_loads_with_load_dataset_after_cache_files_appear(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, out = _tiny_arrow(tmp_path, train=6)
    datasets.load_from_disk(str(out))["test"].filter(lambda r: r["label"] < 3)
    assert list((out / "test").glob("cache-*.arrow"))
    ds = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf_cache"))
    assert {split: len(ds[split]) for split in ds} == {"train": 6, "val": 6, "test": 12}


# ---------------------------------------------------------------------------------------------
# trainers: what a model's card and metadata say about the data it was tested on

def test_rendered_test_sets_of_other_lengths_have_other_fingerprints():
    from trainers.data import ShapesDataModule

    def fingerprint(**kw):
        return ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, **kw).fingerprint()

    # the first 24 of 30 test images are not the 24 of a 24-image test set (labels balance over n)
    first = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, test_length=24)
    other = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, test_length=30)
    first.setup("test")
    other.setup("test")
    assert [int(first.test_set[i]["label"]) for i in range(24)] != [int(other.test_set[i]["label"]) for i in range(24)]
    assert fingerprint(test_length=24) != fingerprint(test_length=30)
    # what is not the test data leaves it alone
    assert fingerprint(test_length=24) == fingerprint(test_length=24, train_length=4, val_length=12)


def test_synth_split_sizes_are_refused_not_ignored():
    from trainers import TrainConfig

    for field in ("synth", "train_synth"):
        with pytest.raises(ValueError, match=rf"{field}\.split_sizes is not used.*test_length"):
            TrainConfig(image_size=32, **{field: {"split_sizes": {"train": 8, "val": 4, "test": 2000}}})


def test_a_fitted_model_loads_in_plain_torch_and_its_card_names_the_test_set(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    from trainers import TrainConfig, fit, load_model

    cfg = TrainConfig(arch="resnet18", image_size=32, out=str(tmp_path / "run"), batch_size=16, max_epochs=1,
                      train_length=32, val_length=12, test_length=18, precision="32-true", num_workers=0,
                      progress_bar=False, curriculum_epochs=0, log_every_n_steps=1,
                      synth={"size_bands": [list(b) for b in BANDS], "bg_pool_sizes": {"train": 2, "val": 1, "test": 1}})
    meta = fit(cfg)
    card = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert meta["test_images"] == 18 == sum(map(sum, meta["confusion_matrix"]))
    assert f"**{meta['test_accuracy']:.4f}** on 18 images" in card
    assert "32 training images per epoch, 12 val and 18 test images" in card

    # the documented loader: [0, 1] images in, normalisation inside; and the same weights in a
    # plain torchvision network with the recorded mean and std applied by hand
    model, loaded = load_model(tmp_path / "run")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    plain = torchvision.models.resnet18(num_classes=6).eval()
    plain.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    mean, std = (torch.tensor(loaded[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        torch.testing.assert_close(plain((x - mean) / std), model(x))


def test_no_progress_silences_the_arrow_conversions_bars_and_restores_them(tmp_path, capfd):
    """``--no-progress`` (progress=False) left datasets' "Saving the dataset" bars on."""
    datasets = pytest.importorskip("datasets")
    assert datasets.is_progress_bar_enabled()
    _tiny_arrow(tmp_path, train=6)
    assert "Saving the dataset" not in capfd.readouterr().err
    assert datasets.is_progress_bar_enabled()  # the process-wide switch is put back
