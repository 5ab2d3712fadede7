"""Background sources, pools, disjointness and every bad background input."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from shapesynth import ShapeSynth, SynthConfig
from shapesynth.config import PAPER_SIZE_BANDS
from shapesynth.backgrounds import BackgroundError, BackgroundOverlapError, build_pools, clear_pool_cache, pixel_hash
from shapesynth.backgrounds import hf as hf_source
from shapesynth.backgrounds.pools import to_rgb

TINY = dict(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 12, "val": 6, "test": 6})


pytestmark = pytest.mark.usefixtures("fresh_pool_cache")


def _write_images(folder: Path, n: int, size: int = 40, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for k in range(start, start + n):
        arr = rng.integers(0, 256, (size, size + k % 3, 3), dtype=np.uint8)
        p = folder / f"bg_{k:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _folder_cfg(path, **kw):
    return SynthConfig(**TINY, background="folder", bg_path=str(path), **kw)


# ---------------------------------------------------------------- procedural
def test_procedural_pools_are_distinct_disjoint_and_sized():
    cfg = SynthConfig(**TINY, bg_pool_sizes={"train": 5, "val": 2, "test": 3})
    pools = build_pools(cfg)
    assert {s: len(p) for s, p in pools.items()} == {"train": 5, "val": 2, "test": 3}
    hashes = [h for p in pools.values() for h in p.hashes]
    assert len(set(hashes)) == len(hashes)
    side = pools["train"].images[0].shape[0]
    assert side == 40  # 1.25 x 32: room for random crops


def test_procedural_bases_are_colourful_clutter():
    def edge_fraction(images):
        return np.mean([(np.abs(np.diff(b.astype(np.float32).mean(2), axis=1)) > 20).mean() for b in images])

    cfg = SynthConfig(image_size=64, bg_pool_sizes={"train": 3, "val": 1, "test": 1})
    default = build_pools(cfg)["train"].images
    for base in default:
        assert base.std(axis=(0, 1)).min() > 20  # every channel varies strongly
    assert edge_fraction(default) > 0.015  # many sharp element boundaries, not a smooth gradient
    clear_pool_cache()
    hard = build_pools(cfg.with_difficulty("hard"))["train"].images
    assert edge_fraction(hard) > 1.5 * edge_fraction(default)


def test_clutter_knobs_change_difficulty_monotonically():
    def roughness(**kw):
        clear_pool_cache()
        pools = build_pools(SynthConfig(image_size=64, bg_pool_sizes={"train": 4, "val": 1, "test": 1}, bg_jitter=0.0, **kw))
        return np.mean([np.abs(np.diff(b.astype(np.float32), axis=1)).mean() for b in pools["train"].images])

    assert roughness(clutter=0.0, clutter_noise=0.0) < roughness(clutter=0.5, clutter_noise=0.0) < roughness(clutter=1.5, clutter_noise=0.0)
    assert roughness(clutter_contrast=0.2) < roughness(clutter_contrast=1.0)


def test_per_sample_background_augmentation_varies_one_base():
    synth = ShapeSynth(SynthConfig(**TINY, bg_pool_sizes={"train": 1, "val": 1, "test": 1}))
    metas = [synth.sample("train", i).meta for i in range(12)]
    assert {m["bg_id"] for m in metas} == {0}
    backgrounds = {synth.background_only("train", i).tobytes() for i in range(12)}
    assert len(backgrounds) == 12


# ---------------------------------------------------------------- folder: modes and formats
def test_every_mode_decodes_to_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    grey16 = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100)
    images = {
        "grey.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)])),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "sixteen.png": Image.fromarray(grey16),
        "photo.jpg": Image.fromarray(rgb),
        "bits.bmp": Image.fromarray(rgb),
    }
    for name, img in images.items():
        img.save(tmp_path / name)
        with Image.open(tmp_path / name) as im:
            out = to_rgb(im)
        assert out.dtype == np.uint8 and out.shape == (20, 24, 3), name
        if name in ("grey.png", "bits.bmp", "rgba.png"):  # lossless: exact pixels
            want = np.repeat(rgb[..., :1], 3, axis=2) if name == "grey.png" else rgb
            assert np.array_equal(out, want), name
    with Image.open(tmp_path / "sixteen.png") as im:
        out = to_rgb(im)
    expected = np.rint(grey16.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 1], expected)
    with Image.open(tmp_path / "rgba.png") as im:
        assert np.array_equal(to_rgb(im), rgb)


def test_folder_is_dealt_into_disjoint_pools_by_pixel_hash(tmp_path):
    _write_images(tmp_path / "bgs", 30)
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    assert sum(len(p) for p in pools.values()) == 30
    assert all(len(p) >= 1 for p in pools.values())
    splits = sorted(pools)
    for i, a in enumerate(splits):  # no image in two pools
        for b in splits[i + 1:]:
            assert not set(pools[a].hashes) & set(pools[b].hashes), (a, b)
    # renaming files changes nothing: pools depend on pixels only
    for p in sorted((tmp_path / "bgs").iterdir()):
        p.rename(p.with_name("x_" + p.name))
    clear_pool_cache()
    renamed = build_pools(_folder_cfg(tmp_path / "bgs"))
    assert {s: sorted(p.hashes) for s, p in pools.items()} == {s: sorted(p.hashes) for s, p in renamed.items()}
    # the deal itself, re-derived from the documented rule (counts, disjointness and renaming alone
    # passed with the fractions given to the wrong pools)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in (tmp_path / "bgs").iterdir()]
    for fractions, sizes in (({"train": 0.8, "val": 0.05, "test": 0.15}, [24, 1, 5]),
                             ({"test": 0.3, "train": 0.5, "val": 0.2}, [14, 10, 6])):
        want = _dealt_by_the_rule(images, fractions)
        # no pool is empty by the rule, so no fix-up applies and the deal must be the rule's exactly
        assert [len(want[s]) for s in ("train", "val", "test")] == sizes
        clear_pool_cache()
        dealt = build_pools(_folder_cfg(tmp_path / "bgs", bg_pool_fractions=fractions))
        assert {s: sorted(p.hashes) for s, p in dealt.items()} == want, fractions


def _dealt_by_the_rule(images, fractions) -> dict[str, list[str]]:
    """docs/shapesynth.md and `hash_split`, written out: the sha256 of each decoded image (its shape,
    then its bytes) read as a uniform number u = int(hex[:13], 16) / 16^13 goes to the split, in
    train, val, test order, whose cumulative share of bg_pool_fractions covers u."""
    import hashlib

    edges = np.cumsum([fractions["train"], fractions["val"], fractions["test"]]) / sum(fractions.values())
    want = {"train": [], "val": [], "test": []}
    for rgb in images:
        digest = hashlib.sha256(str(rgb.shape).encode() + rgb.tobytes()).hexdigest()
        u = int(digest[:13], 16) / 16.0**13
        want[("train", "val", "test")[int(u >= edges[0]) + int(u >= edges[1])]].append(digest)
    return {split: sorted(digests) for split, digests in want.items()}


def test_duplicates_in_one_folder_never_straddle_pools(tmp_path):
    paths = _write_images(tmp_path / "bgs", 12)
    with Image.open(paths[0]) as im:
        im.save(tmp_path / "bgs" / "copy_of_first.bmp")  # same pixels, other format
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    assert sum(len(p) for p in pools.values()) == 12
    skipped = [s for p in pools.values() for s in p.skipped]
    assert any("duplicate" in reason for _, reason in skipped)


def test_same_background_in_two_split_folders_is_refused_naming_both(tmp_path):
    train = _write_images(tmp_path / "train", 4)
    _write_images(tmp_path / "test", 3, start=10)
    leaked = tmp_path / "test" / "leaked.jpg.png"
    with Image.open(train[2]) as im:
        im.save(leaked)
    cfg = SynthConfig(**TINY, background="folder", bg_split_paths={"train": str(tmp_path / "train"), "test": str(tmp_path / "test")})
    with pytest.raises(BackgroundOverlapError) as err:
        build_pools(cfg)
    assert str(train[2]) in str(err.value) and str(leaked) in str(err.value)


def test_flipped_or_channel_swapped_copy_in_another_split_is_refused(tmp_path):
    # every sample flips its base and permutes its channels at random, so a mirrored or BGR copy
    # of a train background gives test samples exactly the backgrounds train samples get
    train = _write_images(tmp_path / "train", 4)
    _write_images(tmp_path / "test", 3, start=10)
    arr1, arr2 = (np.asarray(Image.open(p).convert("RGB")) for p in train[1:3])
    Image.fromarray(np.ascontiguousarray(arr1[:, ::-1])).save(tmp_path / "test" / "mirrored.png")
    Image.fromarray(np.ascontiguousarray(arr2[::-1, :, ::-1])).save(tmp_path / "test" / "upside_down_bgr.png")
    cfg = SynthConfig(**TINY, background="folder", bg_split_paths={"train": str(tmp_path / "train"), "test": str(tmp_path / "test")})
    with pytest.raises(BackgroundOverlapError, match="2 background") as err:
        build_pools(cfg)
    lines = str(err.value).splitlines()[1:]
    for original, copy in ((train[1], "mirrored.png"), (train[2], "upside_down_bgr.png")):
        assert any(f"{original} (train)" in line and f"{tmp_path / 'test' / copy} (test)" in line for line in lines)


def test_flipped_copies_in_one_folder_are_kept_once(tmp_path):
    paths = _write_images(tmp_path / "bgs", 12)
    arr = np.asarray(Image.open(paths[4]).convert("RGB"))
    Image.fromarray(np.ascontiguousarray(arr[::-1, ::-1][..., [1, 2, 0]])).save(tmp_path / "bgs" / "zz_rotated_gbr.png")
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    assert sum(len(p) for p in pools.values()) == 12
    skipped = dict(s for p in pools.values() for s in p.skipped)
    assert skipped == {str(tmp_path / "bgs" / "zz_rotated_gbr.png"): f"duplicate of {paths[4]} (same pixels up to a flip or channel permutation)"}


def test_flips_and_channel_swaps_are_one_background_only_when_the_config_applies_them(tmp_path):
    paths = _write_images(tmp_path / "bgs", 12)
    arr = np.asarray(Image.open(paths[4]).convert("RGB"))
    Image.fromarray(np.ascontiguousarray(arr[:, ::-1])).save(tmp_path / "bgs" / "zz_mirrored.png")
    Image.fromarray(np.ascontiguousarray(arr[..., [2, 1, 0]])).save(tmp_path / "bgs" / "zz_bgr.png")
    base = _folder_cfg(tmp_path / "bgs").to_dict()

    def kept_and_skipped(**flags):
        clear_pool_cache()
        pools = build_pools(SynthConfig(**{**base, **flags}))
        return sum(len(p) for p in pools.values()), sorted(Path(n).name for p in pools.values() for n, _ in p.skipped)

    assert kept_and_skipped() == (12, ["zz_bgr.png", "zz_mirrored.png"])
    # without flips a mirrored copy is another background (no sample ever flips it back) ...
    assert kept_and_skipped(bg_flip=False) == (13, ["zz_bgr.png"])
    # ... without channel shuffle a BGR copy is, and with neither both are
    assert kept_and_skipped(bg_channel_shuffle=False) == (13, ["zz_mirrored.png"])
    assert kept_and_skipped(bg_flip=False, bg_channel_shuffle=False) == (14, [])
    # and across splits: a mirrored test copy is no leak when nothing is flipped
    split = tmp_path / "split"
    _write_images(split / "train", 4)
    _write_images(split / "test", 3, start=10)
    first = np.asarray(Image.open(split / "train" / sorted(p.name for p in (split / "train").iterdir())[0]).convert("RGB"))
    Image.fromarray(np.ascontiguousarray(first[:, ::-1])).save(split / "test" / "mirrored.png")
    cfg = {**TINY, "background": "folder", "bg_split_paths": {"train": str(split / "train"), "test": str(split / "test")}}
    clear_pool_cache()
    with pytest.raises(BackgroundOverlapError, match="up to a flip"):
        build_pools(SynthConfig(**cfg))
    clear_pool_cache()
    assert len(build_pools(SynthConfig(**cfg, bg_flip=False))["test"]) == 4


def test_split_folders_without_val_carve_val_from_train(tmp_path):
    _write_images(tmp_path / "train", 10)
    _write_images(tmp_path / "test", 3, start=50)
    cfg = SynthConfig(**TINY, background="folder", bg_split_paths={"train": str(tmp_path / "train"), "test": str(tmp_path / "test")})
    pools = build_pools(cfg)
    assert len(pools["test"]) == 3 and len(pools["train"]) + len(pools["val"]) == 10 and len(pools["val"]) >= 1


# ---------------------------------------------------------------- folder: bad input
def test_missing_folder(tmp_path):
    with pytest.raises(BackgroundError, match="does not exist"):
        build_pools(_folder_cfg(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(b"hidden files are not backgrounds")
    with pytest.raises(BackgroundError, match="holds no files"):
        build_pools(_folder_cfg(tmp_path / "empty"))
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(BackgroundError, match=r"holds no readable image \(1 skipped\)"):
        build_pools(_folder_cfg(tmp_path / "empty"))


def test_every_file_is_tried_whatever_its_suffix_and_the_rest_is_listed(tmp_path):
    """Pillow, not a suffix list, decides what is an image: a .jfif or .jpe file is used, and a
    file Pillow cannot read is listed as skipped rather than left out unseen."""
    paths = _write_images(tmp_path / "bgs", 6)
    for p, suffix in zip(paths[:2], (".jfif", ".jpe")):
        Image.open(p).save(p.with_suffix(suffix), format="JPEG")
        p.unlink()
    (tmp_path / "bgs" / "notes.txt").write_text("not a picture")
    (tmp_path / "bgs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    used = {Path(n).name for p in pools.values() for n in p.names}
    assert {"bg_000.jfif", "bg_001.jpe"} <= used and len(used) == 6
    skipped = [Path(n).name for p in pools.values() for n, _ in p.skipped]
    assert skipped == ["notes.txt"]


def test_corrupt_files_are_skipped_counted_and_listed(tmp_path):
    _write_images(tmp_path / "bgs", 6)
    (tmp_path / "bgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "bgs" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 10)
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    skipped = dict(s for p in pools.values() for s in p.skipped)
    assert set(map(lambda n: Path(n).name, skipped)) == {"broken.png", "truncated.jpg"}
    assert sum(len(p) for p in pools.values()) == 6


def test_corrupt_files_are_an_error_when_strict(tmp_path):
    _write_images(tmp_path / "bgs", 6)
    (tmp_path / "bgs" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(BackgroundError, match="broken.png"):
        build_pools(_folder_cfg(tmp_path / "bgs", bg_strict=True))


def test_only_corrupt_files(tmp_path):
    (tmp_path / "bgs").mkdir()
    (tmp_path / "bgs" / "a.png").write_bytes(b"garbage")
    with pytest.raises(BackgroundError, match="no readable image"):
        build_pools(_folder_cfg(tmp_path / "bgs"))


def test_a_subfolder_that_cannot_be_listed_is_skipped_and_listed_not_left_out(tmp_path, monkeypatch):
    """A subfolder without read permission (simulated: these tests may run as root) held
    backgrounds the pools silently went without (pathlib's rglob passes over such folders)."""
    import os

    _write_images(tmp_path / "bgs", 6)
    _write_images(tmp_path / "bgs" / "locked", 3, start=20)
    locked = str(tmp_path / "bgs" / "locked")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    assert sum(len(p) for p in pools.values()) == 6
    skipped = dict(s for p in pools.values() for s in p.skipped)
    assert list(skipped) == [locked] and "Permission denied" in skipped[locked]
    clear_pool_cache()
    with pytest.raises(BackgroundError, match=f"cannot read background {locked}: .*Permission denied"):
        build_pools(_folder_cfg(tmp_path / "bgs", bg_strict=True))
    clear_pool_cache()
    with pytest.raises(BackgroundError, match="cannot be read: .*Permission denied"):
        build_pools(_folder_cfg(tmp_path / "bgs" / "locked"))


def test_links_to_folders_are_walked_and_links_to_nothing_are_listed(tmp_path):
    """Every file in the folder and its subfolders is tried: a subfolder that is a link (e.g. to
    the data on another disk) too, once, even when a link leads back up; a dangling link is
    unreadable, so it is skipped and listed (an error with bg_strict), not left out unseen."""
    _write_images(tmp_path / "bgs", 6)
    elsewhere = _write_images(tmp_path / "elsewhere", 3, start=20)
    (tmp_path / "bgs" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "bgs" / "loop").symlink_to(tmp_path / "bgs", target_is_directory=True)
    (tmp_path / "bgs" / "gone.png").symlink_to(tmp_path / "deleted.png")
    pools = build_pools(_folder_cfg(tmp_path / "bgs"))
    used = sorted(n for p in pools.values() for n in p.names)
    assert len(used) == 9 and {str(tmp_path / "bgs" / "more" / p.name) for p in elsewhere} <= set(used)
    skipped = [s for p in pools.values() for s in p.skipped]
    assert skipped == [(str(tmp_path / "bgs" / "gone.png"), f"link to nothing ({tmp_path / 'deleted.png'})")]
    clear_pool_cache()
    with pytest.raises(BackgroundError, match="cannot read background .*gone.png: link to nothing"):
        build_pools(_folder_cfg(tmp_path / "bgs", bg_strict=True))


def test_small_backgrounds_are_refused_or_upscaled(tmp_path):
    _write_images(tmp_path / "bgs", 6, size=20)
    with pytest.raises(BackgroundError, match="smaller than the 32x32 image"):
        build_pools(_folder_cfg(tmp_path / "bgs"))
    clear_pool_cache()
    pools = build_pools(_folder_cfg(tmp_path / "bgs", bg_small="upscale"))
    assert all(min(im.shape[:2]) >= 32 for p in pools.values() for im in p.images)
    # 20 x (20, 21, 22) px files: the short side becomes 32, the aspect ratio is kept (32 / 20 =
    # 1.6: widths 32, 33.6 -> 34, 35.2 -> 35), by bicubic interpolation of the decoded pixels
    upscaled = {20: (32, 32), 21: (32, 34), 22: (32, 35)}
    seen = set()
    for pool in pools.values():
        for name, im in zip(pool.names, pool.images):
            decoded = np.asarray(Image.open(name).convert("RGB"))
            assert decoded.shape[0] == 20
            h, w = upscaled[decoded.shape[1]]
            assert im.shape == (h, w, 3), name
            assert np.array_equal(im, cv2.resize(decoded, (w, h), interpolation=cv2.INTER_CUBIC)), name
            seen.add(decoded.shape[1])
    assert seen == {20, 21, 22} and sum(len(p) for p in pools.values()) == 6
    s = ShapeSynth(_folder_cfg(tmp_path / "bgs", bg_small="upscale")).sample("train", 0)
    assert s.image.shape == (32, 32, 3)


def test_too_few_backgrounds_for_the_pools(tmp_path):
    _write_images(tmp_path / "bgs", 2)
    with pytest.raises(BackgroundError, match="too few backgrounds"):
        build_pools(_folder_cfg(tmp_path / "bgs"))


@pytest.mark.parametrize("fractions, unshared", [
    ({"train": 0.0, "val": 0.0, "test": 0.0}, "['train', 'val', 'test']"),  # was an IndexError traceback
    ({"train": 0.8, "test": 0.2}, "['val']"),  # was "gave no pool for ['val']", the cause unsaid
    ({"train": 0.9, "val": 0.1, "test": 0.0}, "['test']"),
])
def test_a_pool_without_a_share_of_the_folder_is_refused_naming_bg_pool_fractions(tmp_path, fractions, unshared):
    _write_images(tmp_path / "bgs", 12)
    with pytest.raises(BackgroundError, match=rf"bg_pool_fractions .* gives the {re.escape(unshared)} pool\(s\) no share"):
        build_pools(_folder_cfg(tmp_path / "bgs", bg_pool_fractions=fractions))
    # split folders without val: val is carved out of train by the same fractions
    _write_images(tmp_path / "test", 3, start=50)
    split_cfg = SynthConfig(**TINY, background="folder", bg_pool_fractions={"train": 0.9, "val": 0.0},
                            bg_split_paths={"train": str(tmp_path / "bgs"), "test": str(tmp_path / "test")})
    with pytest.raises(BackgroundError, match=r"gives the \['val'\] pool\(s\) no share .*\(train, to carve val\)"):
        build_pools(split_cfg)


def _recoloured_windows(arr: np.ndarray, side: int, meta: dict) -> np.ndarray:
    """Every side x side window of ``arr`` (H, W, 3 uint8), (Y, X, side, side, 3), put through the
    sample's recorded flips, channel permutation and brightness / contrast / saturation jitter,
    written out here as the documented colour map: p' = contrast * (grey + saturation * (p - grey)
    - mean) + brightness * mean, grey the pixel's channel mean, mean the window's mean grey."""
    win = np.lib.stride_tricks.sliding_window_view(arr.astype(np.float64), (side, side), axis=(0, 1))
    win = win.transpose(0, 1, 3, 4, 2)  # (Y, X, side, side, 3)
    flip_h, flip_v = meta["bg_flip"]
    if flip_h:
        win = win[:, :, :, ::-1]
    if flip_v:
        win = win[:, :, ::-1]
    win = win[..., meta["bg_channels"]]
    brightness, contrast, saturation = meta["bg_jitter"]
    grey = win.mean(-1, keepdims=True)
    mean = grey.mean((2, 3, 4), keepdims=True)
    out = contrast * (grey + saturation * (win - grey) - mean) + brightness * mean
    return np.clip(np.rint(out), 0, 255)


def test_folder_backgrounds_render(tmp_path):
    paths = _write_images(tmp_path / "bgs", 12, size=48)
    synth = ShapeSynth(_folder_cfg(tmp_path / "bgs"))
    s = synth.sample("test", 1)
    assert s.meta["bg_name"].startswith(str(tmp_path / "bgs"))
    assert s.meta["bg_name"] in synth.pools["test"].names
    # the background is a window of the named file and of no other: search every window of every
    # file (after the recorded flips and colour jitter) for the one that gives the background
    # (within 1 grey level: the renderer rounds once, in cv2)
    bg = synth.background_only("test", 1)
    assert np.array_equal(bg, s.background)
    outside = s.mask == 0
    assert np.array_equal(s.image[outside], bg[outside])
    matches = []
    for path in paths:
        windows = _recoloured_windows(np.asarray(Image.open(path).convert("RGB")), 32, s.meta)
        err = np.abs(windows - bg.astype(np.float64)).max(axis=(2, 3, 4))
        matches += [(str(path), [int(x), int(y)]) for y, x in zip(*np.nonzero(err <= 1))]
    assert matches == [(s.meta["bg_name"], s.meta["bg_crop"])]


def test_counterfactuals_refuse_backgrounds_changed_since_generation(tmp_path):
    from shapesynth.generate import generate
    from shapesynth.torchdata import ShapesDataset
    from shapesynth.writers import OutputError

    _write_images(tmp_path / "bgs", 12, size=48)
    out = tmp_path / "data"
    generate(_folder_cfg(tmp_path / "bgs"), out, samples_per_shard=8, progress=False)
    item = ShapesDataset(out, split="test")
    assert np.array_equal(item.counterfactual(0, label=int(item[0]["label"]))["image"], item[0]["image"])
    _write_images(tmp_path / "bgs", 8, size=48, start=12)  # the folder grows: pools are dealt anew
    clear_pool_cache()
    with pytest.raises(OutputError, match="changed since it was generated"):
        ShapesDataset(out, split="test").counterfactual(0, label=0)


def test_resume_and_card_refuse_backgrounds_changed_since_the_interrupted_run(tmp_path, capsys):
    # the recipe (config) is the same, but the files it names are not: resuming would mix shards
    # drawn from two different pools into one dataset, under a card listing only the new pools
    from shapesynth.cli import main
    from shapesynth.generate import generate
    from shapesynth.writers import OutputError

    paths = _write_images(tmp_path / "bgs", 12, size=48)
    out = tmp_path / "data"
    generate(_folder_cfg(tmp_path / "bgs"), out, samples_per_shard=4, progress=False)
    (out / "data" / "train-00001-of-00003.parquet").unlink()  # an interrupted run
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(paths[0])
    clear_pool_cache()  # a new process
    with pytest.raises(OutputError, match=r"has the same config, but its background files differ from those found now \(pools: "):
        generate(_folder_cfg(tmp_path / "bgs"), out, samples_per_shard=4, progress=False, resume=True)
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before  # nothing mixed in
    # a folder written before shapesynth.json recorded the digest: said so, not "files differ"
    manifest = json.loads((out / "shapesynth.json").read_text())
    del manifest["backgrounds"]
    (out / "shapesynth.json").write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match=r"same config, but it was written before shapesynth.json recorded"):
        generate(_folder_cfg(tmp_path / "bgs"), out, samples_per_shard=4, progress=False, resume=True)
    # a folder merged from --shard runs: `shapesynth card` refuses to describe other pools
    generate(_folder_cfg(tmp_path / "bgs"), tmp_path / "merged", samples_per_shard=4, progress=False)
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(paths[1])
    clear_pool_cache()
    assert main(["card", "--data", str(tmp_path / "merged")]) == 2
    assert "differ from those it was generated from" in capsys.readouterr().err


# ---------------------------------------------------------------- hf source
def _hf_dataset(tmp_path, splits):
    import datasets

    rng = np.random.default_rng(3)
    dd = {}
    for split, n in splits.items():
        imgs = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
        dd[split] = datasets.Dataset.from_dict({"picture": imgs, "caption": ["x"] * n}, features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}))
    return datasets.DatasetDict(dd)


def test_hf_save_to_disk_folder_keeps_its_splits(tmp_path):
    _hf_dataset(tmp_path, {"train": 6, "validation": 2, "test": 3}).save_to_disk(str(tmp_path / "hfds"))
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds")))
    assert {s: len(p) for s, p in pools.items()} == {"train": 6, "val": 2, "test": 3}
    assert pools["test"].names[0].endswith(":test[0]")


def test_hf_splits_that_are_not_pools_are_listed_as_skipped(tmp_path):
    _hf_dataset(tmp_path, {"train": 6, "test": 3, "unlabeled": 10}).save_to_disk(str(tmp_path / "hfds"))
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds")))
    skipped = dict(s for p in pools.values() for s in p.skipped)
    assert list(skipped) == [f"{tmp_path / 'hfds'}:unlabeled"] and "10 rows" in skipped[f"{tmp_path / 'hfds'}:unlabeled"]
    assert sum(len(p) for p in pools.values()) == 9


def test_hf_single_split_is_dealt_by_hash(tmp_path):
    _hf_dataset(tmp_path, {"train": 20}).save_to_disk(str(tmp_path / "hfds"))
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds")))
    assert sum(len(p) for p in pools.values()) == 20 and all(len(p) for p in pools.values())
    import datasets  # the rows' decoded pixels, dealt by the documented rule

    rows = datasets.load_from_disk(str(tmp_path / "hfds"))["train"]["picture"]
    fractions = {"train": 0.5, "val": 0.2, "test": 0.3}  # the defaults leave test empty here (fix-up)
    want = _dealt_by_the_rule([np.asarray(im.convert("RGB")) for im in rows], fractions)
    assert [len(want[s]) for s in ("train", "val", "test")] == [13, 4, 3]  # no fix-up: exactly the rule's
    clear_pool_cache()
    dealt = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds"), bg_pool_fractions=fractions))
    assert {s: sorted(p.hashes) for s, p in dealt.items()} == want


def test_hf_local_imagefolder(tmp_path):
    _write_images(tmp_path / "imf" / "train", 8)
    _write_images(tmp_path / "imf" / "test", 3, start=20)
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "imf")))
    assert len(pools["test"]) == 3 and len(pools["train"]) + len(pools["val"]) == 8


def test_hf_hub_name_goes_through_the_network_boundary(tmp_path, monkeypatch):
    calls = []
    ds = _hf_dataset(tmp_path, {"train": 8, "test": 3})

    def fake_hub(name):
        calls.append(name)
        return ds

    monkeypatch.setattr(hf_source, "_load_from_hub", fake_hub)
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path="someone/waldo-tiles"))
    assert calls == ["someone/waldo-tiles"]
    assert len(pools["test"]) == 3


def test_hf_hub_failure_is_a_clear_error(monkeypatch):
    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(hf_source, "_load_from_hub", offline)
    with pytest.raises(BackgroundError, match="no local folder and could not be loaded"):
        build_pools(SynthConfig(**TINY, background="hf", bg_path="someone/missing"))


def test_hf_hub_name_offline_says_how_to_provide_it_locally(tmp_path):
    # the real datasets.load_dataset behind _load_from_hub, with the Hub switched off
    import os
    import subprocess
    import sys

    code = ("from shapesynth import SynthConfig; from shapesynth.backgrounds import build_pools; "
            "build_pools(SynthConfig(background='hf', bg_path='shapesynth-tests/no-such-tiles'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("shapesynth.backgrounds.pools.BackgroundError: "), done.stderr
    assert "'shapesynth-tests/no-such-tiles' is no local folder and could not be loaded from the Hub" in last
    assert "OfflineModeIsEnabled" in last
    assert "`datasets.load_dataset('shapesynth-tests/no-such-tiles').save_to_disk(DIR)`" in last
    assert "pass it as --backgrounds" in last


def test_hf_chosen_column_that_holds_no_images_is_named(tmp_path):
    _hf_dataset(tmp_path, {"train": 4}).map(lambda row, k: {"n": k}, with_indices=True).save_to_disk(str(tmp_path / "hfds"))
    with pytest.raises(BackgroundError, match=r"hfds\[train\]: column 'n' \(Value\('int64'\)\) cannot be read as images"):
        build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds"), bg_image_column="n"))


def test_hf_rows_without_an_image_are_skipped_and_say_so(tmp_path):
    import datasets

    imgs = [Image.fromarray(np.random.default_rng(k).integers(0, 256, (40, 40, 3), dtype=np.uint8)) for k in range(8)]
    datasets.Dataset.from_dict({"picture": imgs + [None]}, features=datasets.Features({"picture": datasets.Image()})
                               ).save_to_disk(str(tmp_path / "hfds"))
    cfg = SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds"))
    pools = build_pools(cfg)
    assert sum(len(p) for p in pools.values()) == 8
    skipped = dict(s for p in pools.values() for s in p.skipped)
    assert skipped == {f"{tmp_path / 'hfds'}:train[8]": "ValueError: no image in this row (empty cell)"}
    clear_pool_cache()
    with pytest.raises(BackgroundError, match=r"hfds:train\[8\]: ValueError: no image in this row"):
        build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "hfds"), bg_strict=True))


def test_hf_grey_alpha_palette_16bit_and_tiny_images(tmp_path):
    # a Hub dataset's odd images: decoded to RGB like a folder's, and a too small one is refused by name
    import datasets

    rng = np.random.default_rng(4)
    rgb = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(8)]
    odd = [rgb[0].convert("L"), rgb[1].convert("RGBA"), rgb[2].convert("P"),
           Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16))]
    feats = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"picture": odd + rgb[4:], "caption": ["x"] * 8}, features=feats).save_to_disk(str(tmp_path / "ok"))
    pools = build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "ok")))
    bases = {n: b for p in pools.values() for n, b in zip(p.names, p.images)}
    assert len(bases) == 8 and all(b.shape == (40, 40, 3) and b.dtype == np.uint8 for b in bases.values())
    assert np.array_equal(bases[f"{tmp_path / 'ok'}:train[0]"], np.repeat(np.asarray(odd[0])[..., None], 3, -1))
    small = odd + [rgb[4].resize((16, 16))]
    datasets.Dataset.from_dict({"picture": small, "caption": ["x"] * 5}, features=feats).save_to_disk(str(tmp_path / "small"))
    with pytest.raises(BackgroundError, match=r"small:train\[4\] is 16x16, smaller than the 32x32 image"):
        build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "small")))


def test_hf_missing_image_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "txt"))
    with pytest.raises(BackgroundError, match="no Image column"):
        build_pools(SynthConfig(**TINY, background="hf", bg_path=str(tmp_path / "txt")))


def test_pixel_hash_ignores_file_format():
    a = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    assert pixel_hash(a) == pixel_hash(a.copy()) != pixel_hash(a[:, ::-1])
