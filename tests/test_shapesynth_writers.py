"""Writers: round trips through `datasets`, determinism across processes and shards, resume,
overwrite refusal, atomic writes, the card and the torch loader on disk."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shapesynth import CLASS_NAMES, ShapeSynth, SynthConfig, dataset_fingerprint
from shapesynth.config import PAPER_SIZE_BANDS
from shapesynth.generate import generate
from shapesynth.readers import load_metadata
from shapesynth.torchdata import ShapesDataset
from shapesynth.writers import OutputError

CFG = SynthConfig(
    image_size=32,
    size_bands=PAPER_SIZE_BANDS[:2],  # the smallest band's 3 px triangles have no hole at 32 px
    split_sizes={"train": 30, "val": 6, "test": 12},
    bg_pool_sizes={"train": 4, "val": 2, "test": 2},
)


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _gen(out, **kw):
    kw.setdefault("samples_per_shard", 8)
    kw.setdefault("progress", False)
    return generate(CFG, out, **kw)


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "data"
    summary = _gen(out)
    assert summary.complete and summary.written == 48
    return out


# ---------------------------------------------------------------- 9. formats round trip
def _check_loaded(ds, synth, split, n):
    assert ds.num_rows == n
    assert ds.features["label"].names == list(CLASS_NAMES)
    for k in (0, n - 1):
        row = ds[k]
        s = synth.sample(split, row["index"])
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), s.image)
        assert np.array_equal(np.asarray(row["mask"], dtype=np.float32) / 255, s.mask)
        assert np.array_equal(np.asarray(row["region"], dtype=np.float32) / 255, s.region)
        assert row["label"] == s.label and row["class_name"] == s.meta["class_name"]
        assert row["colour"] == s.meta["colour"] and row["bbox"] == s.meta["bbox"]


def test_hub_layout_round_trips_through_load_dataset(hub_dir, tmp_path):
    import datasets

    files = sorted(p.name for p in (hub_dir / "data").iterdir())
    assert files[0] == "test-00000-of-00002.parquet" and "train-00003-of-00004.parquet" in files
    ds = datasets.load_dataset(str(hub_dir), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "val", "test"}
    synth = ShapeSynth(CFG)
    for split, n in CFG.split_sizes.items():
        _check_loaded(ds[split], synth, split, n)


def test_imagefolder_round_trips_through_load_dataset(tmp_path):
    import datasets

    out = tmp_path / "imf"
    _gen(out, fmt="imagefolder")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))
    synth = ShapeSynth(CFG)
    for split, n in CFG.split_sizes.items():
        ds_split = ds["validation" if split == "val" else split]
        assert ds_split.num_rows == n
        row = ds_split[0]
        s = synth.sample(split, row["index"])
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), s.image)
        assert np.array_equal(np.asarray(row["mask"], dtype=np.float32) / 255, s.mask)
        assert row["label"] == s.label


def test_arrow_round_trips_through_load_from_disk(tmp_path):
    import datasets

    out = tmp_path / "arr"
    _gen(out, fmt="arrow")
    assert not (out / ".shapesynth").exists()  # work files are gone
    ds = datasets.load_from_disk(str(out))
    synth = ShapeSynth(CFG)
    for split, n in CFG.split_sizes.items():
        _check_loaded(ds[split], synth, split, n)


@pytest.mark.parametrize("fmt", ["hub", "imagefolder", "arrow"])
def test_shapes_dataset_reads_every_format(tmp_path, fmt, hub_dir):
    out = hub_dir if fmt == "hub" else tmp_path / fmt
    if fmt != "hub":
        _gen(out, fmt=fmt)
    ds = ShapesDataset(out, split="test")
    assert len(ds) == 12
    synth = ShapeSynth(CFG)
    for i in (0, 11):
        item = ds[i]
        s = synth.sample("test", item["index"])
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert torch.equal(item["image"], torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
        assert torch.equal(item["mask"][0], torch.from_numpy(s.mask))
        assert torch.equal(item["region"][0], torch.from_numpy(s.region))
        assert int(item["label"]) == s.label
    assert ds.metadata(0)["class_name"] == CLASS_NAMES[int(ds[0]["label"])]


def test_shapes_dataset_joint_transform(hub_dir):
    from torchvision.transforms import v2

    plain = ShapesDataset(hub_dir, split="val")
    flipped = ShapesDataset(hub_dir, split="val", transform=v2.RandomHorizontalFlip(1.0))
    assert torch.equal(flipped[1]["image"], plain[1]["image"].flip(-1))
    assert torch.equal(flipped[1]["mask"], plain[1]["mask"].flip(-1))


def test_shapes_dataset_missing_split_and_folder(hub_dir, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=rf"dataset folder {re.escape(str(missing))} does not exist"):
        ShapesDataset(missing, split="test")
    with pytest.raises(OutputError, match=r"has no 'holdout' split"):
        ShapesDataset(hub_dir, split="holdout")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="no shapesynth dataset"):
        ShapesDataset(tmp_path / "empty", split="test")


# ---------------------------------------------------------------- 6. determinism
def test_output_is_byte_identical_across_process_counts(hub_dir, tmp_path):
    out = tmp_path / "two_procs"
    _gen(out, num_proc=2)
    assert _tree(out) == _tree(hub_dir)
    assert dataset_fingerprint(out) == dataset_fingerprint(hub_dir)


def test_output_is_byte_identical_across_shards(hub_dir, tmp_path):
    out = tmp_path / "sharded"
    first = _gen(out, shard=(0, 3))
    assert not first.complete and not (out / "README.md").exists()
    _gen(out, shard=(2, 3))
    last = _gen(out, shard=(1, 3))
    assert last.complete
    assert _tree(out) == _tree(hub_dir)


@pytest.mark.parametrize("fmt", ["hub", "imagefolder"])
def test_a_dataset_with_shards_missing_is_refused_by_readers(tmp_path, fmt):
    out = tmp_path / "half"
    assert not _gen(out, fmt=fmt, shard=(0, 2)).complete
    for read in (lambda: ShapesDataset(out, split="test"), lambda: load_metadata(out, "train")):
        with pytest.raises(OutputError, match=r"incomplete: split '(test|train)' holds \d+ of the (12|30) samples"):
            read()
    # an explicit opt-in still reads what is there (e.g. a preview of a run in progress)
    assert 0 < len(load_metadata(out, "train", allow_incomplete=True)) < 30
    _gen(out, fmt=fmt, shard=(1, 2))
    assert len(ShapesDataset(out, split="test")) == 12


def test_shards_on_separate_machines_merge_identically(hub_dir, tmp_path):
    parts = []
    for i in range(2):
        part = tmp_path / f"machine{i}"
        _gen(part, shard=(i, 2))
        parts.append(part)
    merged = tmp_path / "merged"
    merged.mkdir()
    for part in parts:
        for f in (part / "data").iterdir():
            (merged / "data").mkdir(exist_ok=True)
            (merged / "data" / f.name).write_bytes(f.read_bytes())
    assert dataset_fingerprint(merged) == dataset_fingerprint(hub_dir)


def test_imagefolder_is_identical_across_process_counts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _gen(a, fmt="imagefolder", num_proc=1)
    _gen(b, fmt="imagefolder", num_proc=2)
    assert _tree(a) == _tree(b)


# ---------------------------------------------------------------- output folder policy
def test_refuses_a_folder_that_holds_data(hub_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already holds data.*--overwrite"):
        _gen(out)
    assert (out / "precious.txt").read_text() == "keep me"
    _gen(out, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "README.md").exists()


def test_overwrite_and_resume_together_is_an_error(tmp_path):
    with pytest.raises(OutputError, match="either"):
        _gen(tmp_path / "x", overwrite=True, resume=True)


def test_resume_finishes_without_rewriting_finished_shards(hub_dir, tmp_path):
    out = tmp_path / "interrupted"
    _gen(out)
    victims = [out / "data" / "train-00001-of-00004.parquet", out / "README.md"]
    for v in victims:
        v.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    summary = _gen(out, resume=True)
    assert summary.written == 8 and summary.written_shards == 1 and summary.resumed_shards == 6
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert _tree(out) == _tree(hub_dir)


def test_arrow_resume_after_an_interrupted_finalize(tmp_path, monkeypatch):
    import pathlib

    reference = tmp_path / "ref"
    _gen(reference, fmt="arrow")
    out = tmp_path / "arr"
    real_replace, moved = pathlib.Path.replace, []

    def dies_on_the_second_move(self, target):
        if len(moved) == 1:
            raise KeyboardInterrupt("killed during finalize")
        moved.append(target)
        return real_replace(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", dies_on_the_second_move)
    with pytest.raises(KeyboardInterrupt):
        _gen(out, fmt="arrow")
    monkeypatch.setattr(pathlib.Path, "replace", real_replace)
    assert moved[0].is_dir() and not (out / "dataset_dict.json").exists()
    _gen(out, fmt="arrow", resume=True)
    assert _tree(out) == _tree(reference)


def test_resume_refuses_a_different_recipe(tmp_path):
    out = tmp_path / "r"
    _gen(out)
    with pytest.raises(OutputError, match="differs in"):
        generate(CFG.replace(seed=7), out, samples_per_shard=8, progress=False, resume=True)


def test_crash_mid_shard_leaves_no_file_that_looks_complete(tmp_path, monkeypatch):
    import shapesynth.writers as writers

    out = tmp_path / "crash"
    real = writers.render_rows
    calls = {"n": 0}

    def flaky(synth, shard):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("power cut")
        return real(synth, shard)

    monkeypatch.setattr(writers, "render_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        _gen(out)
    finished = sorted(p.name for p in (out / "data").iterdir())
    assert len(finished) == 2 and all(not n.startswith(".") for n in finished)
    monkeypatch.setattr(writers, "render_rows", real)
    summary = _gen(out, resume=True)
    assert summary.complete and summary.resumed_shards == 2


def test_atomic_write_failure_leaves_no_temp_or_partial(tmp_path, monkeypatch):
    import os

    from shapesynth.schema import atomic_write

    target = tmp_path / "f.bin"
    atomic_write(target, b"old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match=r"^disk full$"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ---------------------------------------------------------------- 7. metadata, 10. card
def test_metadata_columns(hub_dir):
    meta = load_metadata(hub_dir, "train")
    for col in ("label", "class_name", "size_band", "size_px", "angle", "center_x", "center_y", "bbox", "colour", "contrast", "mask_area", "bg_pool", "bg_id", "seed"):
        assert col in meta.columns
    assert (meta["bg_pool"] == "train").all()
    counts = meta["label"].value_counts()
    assert counts.max() - counts.min() <= 1
    assert sorted(meta["index"]) == list(range(30))
    # mask_area, region_area and bbox describe the stored mask exactly: the alpha is quantised to
    # k/255 before it is measured, so the 8-bit PNG holds the very values (float32 sums aside)
    # and the box is the tight box of its nonzero pixels
    from shapesynth.torchdata import ShapesDataset

    ds = ShapesDataset(str(hub_dir), "train")
    by_index = meta.set_index("index")
    for i in range(len(ds)):
        item = ds[i]
        mask = item["mask"][0].numpy()
        row = by_index.loc[item["index"]]
        h, w = mask.shape
        assert abs(mask.sum() / (h * w) - row["mask_area"]) <= (mask > 0).sum() * 0.5 / 255 / (h * w) + 1e-7
        assert mask.astype(np.float64).sum() / (h * w) == pytest.approx(row["mask_area"], abs=1e-7)
        region = item["region"][0].numpy().astype(np.float64)
        assert region.sum() / (h * w) == pytest.approx(row["region_area"], abs=1e-7)
        x0, y0, x1, y1 = row["bbox"]
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_card_has_yaml_counts_pools_grid_and_audit(hub_dir):
    import yaml

    text = (hub_dir / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["license"] == "mit" and "image-classification" in header["task_categories"]
    assert header["size_categories"] == ["n<1K"]
    assert {d["split"] for d in header["configs"][0]["data_files"]} == {"train", "val", "test"}
    assert "| train | 5 | 5 | 5 | 5 | 5 | 5 | 30 |" in text
    assert "![examples](examples.png)" in text and (hub_dir / "examples.png").stat().st_size > 1000
    assert "R mod 8" in text and "p-value" in text and "DEPENDENT" not in text
    pools = json.loads((hub_dir / "backgrounds.json").read_text())
    assert len(pools["train"]) == 4 and len(pools["train"][0]["sha256"]) == 64
    assert dataset_fingerprint(hub_dir) in text
    cfg = json.loads((hub_dir / "shapesynth.json").read_text())["config"]
    assert SynthConfig.from_dict(cfg) == CFG


def test_counterfactuals_of_a_dataset_on_disk(hub_dir):
    ds = ShapesDataset(hub_dir, split="test")
    item = ds[3]
    same = ds.counterfactual(3, int(item["label"]))
    assert torch.equal(same["image"], item["image"]) and torch.equal(same["mask"], item["mask"])
    other = (int(item["label"]) + 1) % 6
    cf = ds.counterfactual(3, other)
    assert int(cf["label"]) == other and not torch.equal(cf["mask"], item["mask"])
    bg = ds.counterfactual(3)
    outside = item["mask"][0] == 0
    assert torch.equal(bg["image"][:, outside], item["image"][:, outside])
    assert bg["mask"].sum() == 0
    # an index outside the split is refused as ds[i] refuses it (-1 used to give the last item's)
    for i in (-1, len(ds)):
        with pytest.raises(IndexError, match=f"index {i} out of range for split 'test'"):
            ds.counterfactual(i, other)
