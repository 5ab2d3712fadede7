"""`hf` backgrounds from a dataset repo downloaded as files (parquet + card), read offline."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shapesynth import SynthConfig
from shapesynth.backgrounds import BackgroundError, build_pools, clear_pool_cache, pixel_hash
from shapesynth.backgrounds import hf as hf_source
from shapesynth.config import PAPER_SIZE_BANDS
from shapesynth.generate import generate
from shapesynth.readers import open_split
from shapesynth.torchdata import dataset_generator
from shapesynth.writers import OutputError

# no colour jitter or channel shuffle: every background pixel of a sample is its base's colour
TINY = dict(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 4, "val": 2, "test": 4},
            background="hf", bg_jitter=0.0, bg_channel_shuffle=False)
TRAIN = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200), (120, 60, 0), (0, 60, 120)]
TEST = [(250, 250, 250), (5, 5, 5), (128, 128, 128), (90, 160, 20)]
SIDE = 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No Hub, no network at all: a socket that connects anywhere fails the test."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_hub(name):
        raise AssertionError(f"the Hub was asked for {name!r}")

    def no_network(self, address):
        raise AssertionError(f"network connection to {address!r}")

    monkeypatch.setattr(hf_source, "_load_from_hub", no_hub)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    clear_pool_cache()
    yield
    clear_pool_cache()


def _solid(colour) -> Image.Image:
    return Image.new("RGB", (SIDE, SIDE), colour)


def _table(colours, with_images: bool = True):
    import datasets

    if not with_images:
        return datasets.Dataset.from_dict({"caption": [str(c) for c in colours]})
    feats = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"picture": [_solid(c) for c in colours], "caption": [str(c) for c in colours]},
                                      features=feats)


_CARD = """---
license: cc0-1.0
configs:
- config_name: default
  data_files:
{files}
---
# colour tiles
"""


def _download(folder: Path, splits: dict, card: bool = True, with_images: bool = True) -> Path:
    """What `huggingface-cli download --repo-type dataset X --local-dir folder` gives for a repo
    `push_to_hub` wrote: README.md with `configs`, and data/{split}-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, colours in splits.items():
        _table(colours, with_images).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    if card:
        files = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in splits)
        (folder / "README.md").write_text(_CARD.format(files=files))
    return folder


def _colours_by_name(folder: Path, splits: dict) -> dict[str, tuple]:
    return {f"{folder}:{split}[{k}]": c for split, colours in splits.items() for k, c in enumerate(colours)}


def test_downloaded_repo_gives_its_parquet_images_as_backgrounds(tmp_path):
    splits = {"train": TRAIN, "test": TEST}
    d = _download(tmp_path / "tiles", splits)
    by_name = _colours_by_name(d, splits)
    out = tmp_path / "out"
    generate(SynthConfig(**TINY, bg_path=str(d)), out, samples_per_shard=4, progress=False)
    listing = json.loads((out / "backgrounds.json").read_text())
    for split in ("train", "val", "test"):
        assert listing[split], split
        for base in listing[split]:  # recorded by row and by the hash of its pixels
            assert base["sha256"] == pixel_hash(np.asarray(_solid(by_name[base["name"]])))
    assert {b["name"] for b in listing["test"]} == {f"{d}:test[{k}]" for k in range(len(TEST))}
    assert {b["name"] for b in listing["train"] + listing["val"]} == {f"{d}:train[{k}]" for k in range(len(TRAIN))}

    for split, names in (("train", listing["train"]), ("val", listing["val"]), ("test", listing["test"])):
        records = open_split(out, split)
        pool_names = {b["name"] for b in names}
        for i in range(len(records)):
            image, _mask, region, _label, _index = records[i]
            name = records.metadata(i)["bg_name"]
            assert name in pool_names
            # away from the shape (its region grown by 2 px) the pixels are the base's colour
            grown = np.zeros_like(region, dtype=bool)
            ys, xs = np.nonzero(region > 0)
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    grown[np.clip(ys + dy, 0, 31), np.clip(xs + dx, 0, 31)] = True
            far = image[~grown]
            assert len(far) > 100
            assert (far == np.array(by_name[name], np.uint8)).all(), (split, i, name)


def _split_folders(folder: Path, splits: dict, arrow: bool) -> Path:
    """{split}/part-0.parquet, or {split}/data-00000-of-00001.arrow (no save_to_disk state.json)."""
    for split, colours in splits.items():
        (folder / split).mkdir(parents=True)
        if arrow:
            _table(colours).save_to_disk(str(folder / "saved" / split))
            next((folder / "saved" / split).glob("*.arrow")).rename(folder / split / "data-00000-of-00001.arrow")
        else:
            _table(colours).to_parquet(str(folder / split / "part-0.parquet"))
    if arrow:
        import shutil

        shutil.rmtree(folder / "saved")
    return folder


@pytest.mark.parametrize("layout", ["data/split-files.parquet", "split/part.parquet", "split/data.arrow"])
def test_download_without_card_is_read_by_its_file_names(tmp_path, layout):
    # no README: datasets infers the builder from the files, the splits from their names
    splits = {"train": TRAIN, "test": TEST}
    if layout.startswith("data/"):
        d = _download(tmp_path / "tiles", splits, card=False)
    else:
        d = _split_folders(tmp_path / "tiles", splits, arrow=layout.endswith(".arrow"))
    pools = build_pools(SynthConfig(**TINY, bg_path=str(d)))
    by_name = _colours_by_name(d, splits)
    assert sorted(pools["test"].names) == sorted(f"{d}:test[{k}]" for k in range(len(TEST)))
    assert sum(len(p) for p in pools.values()) == len(TRAIN) + len(TEST)
    for pool in pools.values():
        for name, image in zip(pool.names, pool.images):
            assert (image == np.array(by_name[name], np.uint8)).all()


def test_download_given_as_the_current_folder(tmp_path, monkeypatch):
    splits = {"train": TRAIN, "test": TEST}
    d = _download(tmp_path / "tiles", splits)
    monkeypatch.chdir(d)
    pools = build_pools(SynthConfig(**TINY, bg_path="."))
    assert sorted(pools["test"].names) == [f".:test[{k}]" for k in range(len(TEST))]
    assert {tuple(int(v) for v in im[0, 0]) for im in pools["test"].images} == set(TEST)


def test_download_replaced_in_place_is_read_afresh(tmp_path):
    # datasets caches a folder with card configs under its name, not its files: a newer
    # download into the same folder must not come back as the old images
    d = _download(tmp_path / "tiles", {"train": TRAIN, "test": TEST})
    out = tmp_path / "out"
    generate(SynthConfig(**TINY, bg_path=str(d)), out, samples_per_shard=4, progress=False)
    newer = {"train": [tuple(255 - v for v in c) for c in TRAIN], "test": [tuple(255 - v for v in c) for c in TEST]}
    _download(d, newer)
    clear_pool_cache()
    pools = build_pools(SynthConfig(**TINY, bg_path=str(d)))
    by_name = _colours_by_name(d, newer)
    for pool in pools.values():
        for name, image in zip(pool.names, pool.images):
            assert (image == np.array(by_name[name], np.uint8)).all(), name
    clear_pool_cache()
    with pytest.raises(OutputError, match="backgrounds of .* changed since it was generated"):
        dataset_generator(out)


def test_card_configs_are_followed_not_other_images_in_the_folder(tmp_path):
    splits = {"train": TRAIN, "test": TEST}
    d = _download(tmp_path / "tiles", splits)
    (d / "assets").mkdir()
    for k in range(6):  # the card's pictures: never backgrounds
        Image.new("RGB", (64, 64), (k, 99, 7)).save(d / "assets" / f"preview_{k}.png")
    pools = build_pools(SynthConfig(**TINY, bg_path=str(d)))
    assert sorted(n for p in pools.values() for n in p.names) == sorted(_colours_by_name(d, splits))
    # a card whose configs name no files is an error, not a fall back to those pictures
    for f in (d / "data").iterdir():
        f.unlink()
    clear_pool_cache()
    with pytest.raises(BackgroundError, match=rf"cannot read the HF background folder {d} with datasets "
                                              r"\(tried as datasets.load_dataset\(folder\): [^;]*\):"):
        build_pools(SynthConfig(**TINY, bg_path=str(d)))


def test_folder_datasets_cannot_read_names_the_folder_and_what_was_tried(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "notes.bin").write_bytes(b"\x00\x01")
    with pytest.raises(BackgroundError) as err:
        build_pools(SynthConfig(**TINY, bg_path=str(d)))
    msg = str(err.value)
    assert msg.startswith(f"cannot read the HF background folder {d} with datasets (tried as datasets.load_dataset(folder): ")
    assert "; as an imagefolder: " in msg


def test_missing_split_and_missing_image_column_are_named(tmp_path):
    d = _download(tmp_path / "tiles", {"train": TRAIN, "test": TEST})
    with pytest.raises(BackgroundError, match=r"tiles has no split 'validation' \(splits: \['train', 'test'\]\)"):
        build_pools(SynthConfig(**TINY, bg_path=str(d), bg_hf_split="validation"))
    with pytest.raises(BackgroundError, match=r"tiles\[train\] has no column 'image' \(columns: \['picture', 'caption'\]\)"):
        build_pools(SynthConfig(**TINY, bg_path=str(d), bg_image_column="image"))
    text_only = _download(tmp_path / "captions", {"train": TRAIN, "test": TEST}, with_images=False)
    with pytest.raises(BackgroundError, match=r"captions\[train\] has no Image column \(columns: \['caption'\]\)"):
        build_pools(SynthConfig(**TINY, bg_path=str(text_only)))


def test_images_with_caption_files_are_still_an_imagefolder(tmp_path):
    # as many .txt as images: datasets' own inference picks the text builder; the folder has
    # always been read as an imagefolder, and still is
    colours = {"train": TRAIN, "test": TEST}
    for split, cs in colours.items():
        (tmp_path / "imf" / split).mkdir(parents=True)
        for k, c in enumerate(cs):
            _solid(c).save(tmp_path / "imf" / split / f"{k}.png")
            (tmp_path / "imf" / split / f"{k}.txt").write_text(f"a tile of colour {c}")
    pools = build_pools(SynthConfig(**TINY, bg_path=str(tmp_path / "imf")))
    assert len(pools["test"]) == len(TEST) and len(pools["train"]) + len(pools["val"]) == len(TRAIN)
    test_colours = {tuple(int(v) for v in im[0, 0]) for im in pools["test"].images}
    assert test_colours == set(TEST)
