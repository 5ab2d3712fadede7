"""Behaviour of the dataset generator that a mutation audit of `shapesynth` found untested.

Each test checks values against an independent reference (exact polygon areas, a one-by-one
colour search, hand-derived geometry, the pool's own base images, an explicit file listing):
the audit's surviving faults were a coarser anti-aliasing band or a biased alpha quantisation,
a batched colour search that keeps a later candidate or miscounts its tries, a band's largest
size never drawn, the border margin ignored, the recorded centre's x and y swapped, the extra
samples of an unbalanced split always going to the first classes, per-sample flips and channel
permutations applied although the config turns them off, ...
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from shapesynth import CLASS_NAMES, ShapeSynth, SynthConfig
from shapesynth.shapes import coverage, polygon_vertices
from shapesynth.streams import SampleDraws

SMALL = dict(image_size=64, split_sizes={"train": 60, "val": 12, "test": 30},
             bg_pool_sizes={"train": 6, "val": 2, "test": 3})


# ---------------------------------------------------------------- exact anti-aliased coverage
def _clip(poly: list[tuple[float, float]], a: float, b: float, c: float) -> list[tuple[float, float]]:
    """The part of a convex polygon where a x + b y <= c (Sutherland-Hodgman, one edge)."""
    out = []
    for p, q in zip(poly, poly[1:] + poly[:1]):
        fp, fq = a * p[0] + b * p[1] - c, a * q[0] + b * q[1] - c
        if fp <= 0:
            out.append(p)
        if (fp < 0) != (fq < 0) and fp != fq:
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _area(poly: list[tuple[float, float]]) -> float:
    if len(poly) < 3:
        return 0.0
    return 0.5 * abs(sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(poly, poly[1:] + poly[:1])))


def _exact_coverage(vertices: np.ndarray, side: int) -> np.ndarray:
    """Per pixel [x, x+1) x [y, y+1), the exact area of its intersection with a convex polygon (float64)."""
    polygon = [tuple(map(float, v)) for v in vertices]
    out = np.zeros((side, side))
    for y in range(side):
        for x in range(side):
            poly = polygon
            for a, b, c in ((1, 0, x + 1), (-1, 0, -x), (0, 1, y + 1), (0, -1, -y)):
                poly = _clip(poly, a, b, c)
                if not poly:
                    break
            out[y, x] = _area(poly)
    return out


@pytest.mark.parametrize("angle", [0.0, 13.0, 31.0, 45.0, 250.5])
@pytest.mark.parametrize("label", [1, 4])  # filled square, empty square (inward stroke)
def test_square_coverage_matches_the_exact_pixel_areas(label, angle):
    # the float64 point-sampled reference elsewhere tolerates 0.07 per pixel; against exact
    # polygon-pixel intersections the renderer is far better than that, and a user comparing
    # saliency with the soft mask relies on it: along the edges (corners aside, where the 4 x 4
    # supersampling is coarser) within 5/255 of the true coverage (measured: at most 4/255, on
    # 45 degree edges; boundary pixels left out of the supersampling are off by 8/255 and more),
    # and unbiased on average (an alpha rounded down instead of to nearest is 0.5/255 low on
    # every edge pixel)
    size, stroke, cx, cy, side = 22, 4, 19.37, 20.81, 40
    (y0, y1, x0, x1), mask, _ = coverage(label, size, angle, cx, cy, side, stroke)
    got = np.zeros((side, side))
    got[y0:y1, x0:x1] = mask
    outer = polygon_vertices("square", size, angle, cx, cy)
    want = _exact_coverage(outer, side)
    corners = [outer]
    if label == 4:
        inner = polygon_vertices("square", size - 2 * stroke, angle, cx, cy)
        want -= _exact_coverage(inner, side)
        corners.append(inner)
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    corner_distance = np.min([np.hypot(xx - vx, yy - vy) for v in corners for vx, vy in v], axis=0)
    err = got - want
    assert np.abs(err[corner_distance > 2.0]).max() < 5.0 / 255
    partial = (want > 0) & (want < 1)
    assert abs(err[partial].mean()) < 0.25 / 255


# ---------------------------------------------------------------- colour search
def _first_colour_meeting(sample, draws: SampleDraws, min_contrast: float, max_tries: int):
    """(colour, contrast, tries) by trying the candidates one at a time in float64."""
    under = sample.background.astype(np.float64)
    alpha = sample.mask.astype(np.float64)
    best = (None, -1.0, 0)
    for tries, colour in zip(range(1, max_tries + 1), draws.colours()):
        dist = np.sqrt(((under - np.asarray(colour, np.float64)) ** 2).sum(axis=2))
        contrast = float((dist * alpha).sum() / (alpha.sum() * 255.0 * math.sqrt(3.0)))
        if contrast >= min_contrast:
            return [int(v) for v in colour], contrast, tries
        if contrast > best[1]:
            best = ([int(v) for v in colour], contrast, tries)
    return best[0], best[1], max_tries


@pytest.mark.parametrize("min_contrast", [0.3, 0.5])
def test_colour_is_the_first_candidate_that_meets_the_contrast_tried_one_by_one(min_contrast):
    cfg = SynthConfig(**SMALL, min_contrast=min_contrast)
    synth = ShapeSynth(cfg)
    several_tries = 0
    for i in range(40):
        s = synth.sample("train", i)
        colour, contrast, tries = _first_colour_meeting(s, SampleDraws(cfg.seed, "train", 0, i), min_contrast,
                                                        cfg.max_colour_tries)
        if abs(contrast - min_contrast) < 1e-5:
            continue  # float32 and float64 may disagree right at the threshold
        assert s.meta["colour"] == colour and list(s.colour) == colour
        assert s.meta["colour_tries"] == tries
        assert s.meta["contrast"] == pytest.approx(contrast, abs=1e-5)
        assert s.meta["contrast_met"] == (contrast >= min_contrast)
        several_tries += tries > 1
    assert several_tries >= 3  # the batched search (1, 3, 12, ... at once) was exercised


# ---------------------------------------------------------------- sizes, position, centre
def test_every_integer_size_of_every_band_is_drawn():
    # 64 px, the paper's bands: 20-24, 10-12 and 5-6 px; the band's top size is drawn too
    synth = ShapeSynth(SynthConfig(**SMALL))
    seen: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
    for i in range(300):
        p = synth.placement("train", i, n=300)
        seen[p.band].add(p.size)
    assert seen == {0: {20, 21, 22, 23, 24}, 1: {10, 11, 12}, 2: {5, 6}}


def test_centres_keep_the_configured_margin_from_the_border():
    margin = 6.0
    cfg = SynthConfig(**{**SMALL, "margin_px": margin})
    synth = ShapeSynth(cfg)
    gaps = []
    for i in range(200):
        p = synth.placement("train", i, n=200)
        keep = p.size / math.sqrt(2.0) + margin  # any rotation of any class fits in this circle
        gap = min(p.cx, p.cy, cfg.image_size - p.cx, cfg.image_size - p.cy) - keep
        assert gap >= -1e-9
        gaps.append(gap)
    assert min(gaps) < 1.0  # positions do reach the allowed border


@pytest.mark.parametrize("label", range(6))
def test_recorded_centre_is_where_the_shape_is(label):
    # the region's centroid, from the documented geometry: circle and square about their
    # centre, the triangle (apex (0, -size/2), base corners (+-size/2, size/2), rotated about
    # the centre) at size/6 below it in its own frame
    synth = ShapeSynth(SynthConfig(**SMALL))
    for i in range(4):
        s = synth.counterfactual("train", i, label)
        cx, cy = s.meta["center"]
        t = math.radians(s.meta["angle"])
        dx, dy = (-math.sin(t) * s.meta["size_px"] / 6, math.cos(t) * s.meta["size_px"] / 6) if label % 3 == 2 else (0, 0)
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        w = s.region.astype(np.float64)
        assert (xx * w).sum() / w.sum() == pytest.approx(cx + dx, abs=0.05)
        assert (yy * w).sum() / w.sum() == pytest.approx(cy + dy, abs=0.05)


def test_stroke_is_recorded_for_empty_shapes_only():
    cfg = SynthConfig(**SMALL)
    synth = ShapeSynth(cfg)
    for i in range(30):
        m = synth.sample("train", i).meta
        assert m["stroke_px"] == (0 if m["filled"] else max(1, m["size_px"] // 5))


# ---------------------------------------------------------------- class balance
@pytest.mark.parametrize("n", [61, 64])
def test_the_extra_samples_of_an_unbalanced_split_go_to_random_classes(n):
    # n = 6 q + r: r classes get q + 1 samples; which ones is drawn, not always the first r
    synth = ShapeSynth(SynthConfig(**SMALL))
    favoured = Counter()
    for epoch in range(60):
        counts = Counter(synth.labels("train", epoch=epoch, n=n).tolist())
        favoured.update(k for k in range(6) if counts[k] == n // 6 + 1)
    assert set(favoured) == set(range(6))
    assert sum(favoured.values()) == 60 * (n % 6)


# ---------------------------------------------------------------- per-sample background draws
@pytest.mark.parametrize("flip, shuffle", [(False, False), (True, True)])
def test_background_is_the_recorded_crop_flip_and_channel_order_of_its_base(flip, shuffle):
    # without jitter the colour map is the identity, so the background must be the base's crop,
    # flipped and channel-permuted exactly as recorded; with bg_flip / bg_channel_shuffle off,
    # never flipped or permuted (else a flipped copy in another pool would leak into it)
    cfg = SynthConfig(**SMALL, bg_jitter=0.0, bg_flip=flip, bg_channel_shuffle=shuffle)
    synth = ShapeSynth(cfg)
    flips, perms = set(), set()
    for i in range(40):
        p = synth.placement("train", i)
        m = p.bg_meta
        x, y = m["bg_crop"]
        want = synth.pools["train"].images[m["bg_id"]][y : y + 64, x : x + 64]
        flip_h, flip_v = m["bg_flip"]
        if flip_h:
            want = want[:, ::-1]
        if flip_v:
            want = want[::-1]
        want = want[..., m["bg_channels"]]
        assert np.array_equal(p.background, want)
        flips.add((flip_h, flip_v))
        perms.add(tuple(m["bg_channels"]))
    if flip:
        assert len(flips) == 4 and len(perms) == 6
    else:
        assert flips == {(False, False)} and perms == {(0, 1, 2)}


def test_colour_jitter_is_the_documented_affine_map_with_uniform_factors():
    # brightness, contrast and saturation are each uniform in [1 - j, 1 + j], and the background
    # is p' = contrast * (grey + saturation * (p - grey) - mean) + brightness * mean of the
    # (flipped, permuted) crop, grey the pixel's channel mean and mean the crop's mean grey
    from scipy import stats

    j = 0.3
    cfg = SynthConfig(**SMALL, bg_jitter=j)
    synth = ShapeSynth(cfg)
    factors = []
    for i in range(60):
        p = synth.placement("train", i)
        m = p.bg_meta
        x, y = m["bg_crop"]
        crop = synth.pools["train"].images[m["bg_id"]][y : y + 64, x : x + 64].astype(np.float64)
        if m["bg_flip"][0]:
            crop = crop[:, ::-1]
        if m["bg_flip"][1]:
            crop = crop[::-1]
        crop = crop[..., m["bg_channels"]]
        brightness, contrast, saturation = m["bg_jitter"]
        grey = crop.mean(axis=2, keepdims=True)
        want = contrast * (grey + saturation * (crop - grey) - grey.mean()) + brightness * grey.mean()
        want = np.clip(np.rint(want), 0, 255)
        assert np.abs(p.background.astype(np.float64) - want).max() <= 1
        factors.append(m["bg_jitter"])
    factors = np.array(factors)
    for k in range(3):
        assert stats.kstest((factors[:, k] - (1 - j)) / (2 * j), "uniform").pvalue > 1e-3


def test_pools_of_another_seed_are_not_taken_from_the_cache():
    # the pool cache is keyed on what the pools depend on: the seed draws the procedural bases,
    # so a config of another seed built after one of seed 0 gets the pools it gets when alone
    from shapesynth.backgrounds import build_pools, clear_pool_cache

    first = SynthConfig(**SMALL, seed=0)
    second = SynthConfig(**SMALL, seed=1)
    build_pools(first)
    after_other = {split: list(pool.hashes) for split, pool in build_pools(second).items()}
    clear_pool_cache()
    alone = {split: list(pool.hashes) for split, pool in build_pools(second).items()}
    assert after_other == alone
    assert alone["train"] != list(build_pools(first)["train"].hashes)


# ---------------------------------------------------------------- every writer format
_DISK = SynthConfig(image_size=32, size_bands=((40 / 256, 49 / 256), (80 / 256, 99 / 256)),
                    split_sizes={"train": 14, "val": 0, "test": 7}, bg_pool_sizes={"train": 3, "val": 1, "test": 2})


@pytest.mark.parametrize("fmt", ["hub", "imagefolder", "arrow"])
def test_every_format_stores_every_samples_pixels_label_and_metadata(tmp_path, fmt):
    # every row, not only the first and last, read back through both readers and compared with
    # the generator's own sample: pixels exactly, label, and each metadata column by its meaning
    from shapesynth.generate import generate
    from shapesynth.readers import load_metadata
    from shapesynth.torchdata import ShapesDataset

    out = tmp_path / fmt
    generate(_DISK, out, fmt=fmt, samples_per_shard=4, progress=False)
    synth = ShapeSynth(_DISK)
    for split, n in (("train", 14), ("test", 7)):
        ds = ShapesDataset(out, split=split)
        meta = load_metadata(out, split)
        assert len(ds) == n and sorted(meta["index"]) == list(range(n))
        for i in range(n):
            item = ds[i]
            s = synth.sample(split, item["index"])
            assert np.array_equal((item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), s.image)
            assert np.array_equal(item["mask"][0].numpy(), s.mask)
            assert np.array_equal(item["region"][0].numpy(), s.region)
            assert int(item["label"]) == s.label
            row = meta[meta["index"] == item["index"]].iloc[0]
            m = s.meta
            assert row["label"] == m["label"] and row["class_name"] == CLASS_NAMES[m["label"]]
            assert (row["shape"], bool(row["filled"])) == (CLASS_NAMES[m["label"]].split("_")[1],
                                                          CLASS_NAMES[m["label"]].startswith("filled"))
            assert (row["center_x"], row["center_y"]) == tuple(m["center"])
            assert list(row["bbox"]) == m["bbox"] and list(row["colour"]) == list(s.colour)
            for key in ("size_band", "size_px", "stroke_px", "angle", "contrast", "contrast_met", "colour_tries",
                        "mask_area", "region_area", "bg_pool", "bg_id", "bg_name", "seed"):
                assert row[key] == m[key], key
            for key in ("bg_crop", "bg_flip", "bg_channels", "bg_jitter"):
                assert list(row[key]) == list(m[key]), key


def test_shard_runs_write_only_their_shards_and_leave_temp_files_that_resume_removes(tmp_path):
    # a temp file (atomic_write's ".<name>.<8 chars>.tmp") in the folder is left by a killed run
    # only when the user says so (--resume); a --shard i/n run joins a folder where other
    # machines may be writing theirs right now, so it must not touch them
    from shapesynth.generate import generate

    cfg = SynthConfig(image_size=32, size_bands=((40 / 256, 49 / 256),), split_sizes={"train": 8, "val": 0, "test": 4},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    out = tmp_path / "hub"
    # shards k of the plan (train 0, train 1, test 0) with k % 2 == 1: train 1 alone
    first = generate(cfg, out, samples_per_shard=4, progress=False, shard=(1, 2))
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00001-of-00002.parquet"]
    assert first.written == 4 and not first.complete
    temp = out / "data" / ".train-00000-of-00002.parquet.ab12cd34.tmp"
    temp.write_bytes(b"half a shard")
    keep = out / "data" / ".notes"  # hidden, but not atomic_write's naming
    keep.write_text("mine")
    second = generate(cfg, out, samples_per_shard=4, progress=False, shard=(0, 2))
    assert second.written == 8 and second.complete
    assert temp.exists() and keep.exists()
    (out / "data" / "test-00000-of-00001.parquet").unlink()
    summary = generate(cfg, out, samples_per_shard=4, progress=False, resume=True)
    assert summary.complete and summary.written == 4
    assert not temp.exists() and keep.read_text() == "mine"


def _tiny_hub(out):
    from shapesynth.generate import generate

    cfg = SynthConfig(image_size=32, size_bands=((40 / 256, 49 / 256),), split_sizes={"train": 8, "val": 0, "test": 4},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    generate(cfg, out, samples_per_shard=4, progress=False)
    return out


def test_a_split_with_more_samples_than_its_recipe_is_refused(tmp_path):
    # a shard file left from a run with another --samples-per-shard (or copied in twice) would
    # give the split duplicate samples: more than the recipe's count is as wrong as fewer
    from shapesynth.readers import load_metadata, open_split
    from shapesynth.writers import OutputError

    out = _tiny_hub(tmp_path / "hub")
    assert len(open_split(out, "train")) == 8
    (out / "data" / "train-00000-of-00003.parquet").write_bytes((out / "data" / "train-00000-of-00002.parquet").read_bytes())
    with pytest.raises(OutputError, match="holds 12 of the 8 samples"):
        open_split(out, "train")
    with pytest.raises(OutputError, match="holds 12 of the 8 samples"):
        load_metadata(out, "train")


def test_samples_fingerprint_does_not_depend_on_the_row_order_in_a_file(tmp_path):
    # the samples fingerprint is per sample by index: the same rows in another order are the
    # same samples (the files, and so dataset_fingerprint, differ)
    import pyarrow.parquet as pq

    from shapesynth.readers import dataset_fingerprint, samples_fingerprint

    out = _tiny_hub(tmp_path / "hub")
    before_samples, before_files = samples_fingerprint(out), dataset_fingerprint(out)
    shard = out / "data" / "train-00001-of-00002.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard)
    assert dataset_fingerprint(out) != before_files
    assert samples_fingerprint(out) == before_samples


# ---------------------------------------------------------------- shortcut audit
def _random_meta(n: int, seed: int):
    """A metadata table whose every nuisance variable is drawn independently of the label."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "label": rng.permutation(np.arange(n) % 6),
        "colour": list(rng.integers(0, 256, (n, 3))),
        "center_x": rng.uniform(10, 54, n), "center_y": rng.uniform(10, 54, n),
        "size_band": rng.integers(0, 3, n), "size_px": rng.integers(5, 25, n),
        "bg_pool": ["train"] * n, "bg_id": rng.integers(0, 20, n),
        "bg_flip": list(rng.integers(0, 2, (n, 2)).astype(bool)), "bg_crop": list(rng.integers(0, 16, (n, 2))),
        "bg_channels": [rng.permutation(3) for _ in range(n)], "bg_jitter": list(rng.uniform(0.8, 1.2, (n, 3))),
        "angle": rng.uniform(0, 360, n),
    })


def _pearson_chi2(labels: np.ndarray, categories: np.ndarray) -> float:
    _, r = np.unique(labels, return_inverse=True)
    _, c = np.unique(categories, return_inverse=True)
    observed = np.zeros((r.max() + 1, c.max() + 1))
    np.add.at(observed, (r, c), 1)
    expected = observed.sum(1, keepdims=True) * observed.sum(0, keepdims=True) / observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


def test_audit_octant_row_tells_all_eight_octants_apart_and_bins_keep_five_per_cell():
    from shapesynth.audit import shortcut_audit

    n = 240
    meta = _random_meta(n, seed=3)
    # plant: the label picks which one channel is bright (3 octants, one bright channel each), a
    # dependence a count of bright channels cannot see
    rng = np.random.default_rng(4)
    colours = rng.integers(0, 128, (n, 3))
    bright = meta["label"].to_numpy() % 3
    colours[np.arange(n), bright] += 128
    meta["colour"] = list(colours)
    by_view = {t.view: t for t in shortcut_audit(meta)}
    octant = (colours[:, 0] >= 128) * 4 + (colours[:, 1] >= 128) * 2 + (colours[:, 2] >= 128)
    assert by_view["RGB octant"].statistic == pytest.approx(_pearson_chi2(meta["label"].to_numpy(), octant))
    assert not by_view["RGB octant"].passed
    # hash bins of the base id: as many as keep every label x bin cell at >= 5 expected samples
    # (n / (6 classes * bins) >= 5), at most 16: 240 samples -> 8 bins; grid cells likewise (at most 3 x 3)
    assert "base id (8 hash bins)" in by_view and "3x3 grid cell" in by_view
    small = {t.view for t in shortcut_audit(_random_meta(90, seed=5))}
    assert "base id (3 hash bins)" in small and "3x3 grid cell" in small


# ---------------------------------------------------------------- config and folder backgrounds
def test_a_band_whose_rotated_shapes_do_not_fit_is_refused_and_one_that_fits_is_not():
    # a size-s shape at any rotation needs a circle of s / sqrt 2 plus the margin on each side:
    # at 64 px with a 1 px margin, 43 px needs 62.8 px (fits), 44 px needs 64.2 px (does not)
    from shapesynth import ConfigError

    SynthConfig(**{**SMALL, "size_bands": ((43 / 64, 43 / 64),)})
    with pytest.raises(ConfigError, match="shapes cannot fit"):
        SynthConfig(**{**SMALL, "size_bands": ((44 / 64, 44 / 64),)})


def _write_backgrounds(folder, images, names):
    from PIL import Image

    folder.mkdir()
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)


def test_folder_pools_do_not_depend_on_file_names_and_take_backgrounds_of_exactly_the_image_size(tmp_path):
    # backgrounds are dealt and ordered by pixel hash, so renaming the files leaves every pool,
    # and so every sample, as it was; a background exactly as large as the image is not "smaller
    # than the image" (bg_small="refuse" takes it)
    from shapesynth.backgrounds import build_pools

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (32, 32 + k, 3), dtype=np.uint8) for k in range(12)]
    names = [f"{c}.png" for c in "abcdefghijkl"]
    _write_backgrounds(tmp_path / "one", images, names)
    _write_backgrounds(tmp_path / "two", images, names[::-1])
    pools = []
    for folder in ("one", "two"):
        cfg = SynthConfig(image_size=32, size_bands=((40 / 256, 49 / 256),), background="folder",
                          bg_path=str(tmp_path / folder), bg_small="refuse")
        pools.append({split: list(pool.hashes) for split, pool in build_pools(cfg).items()})
    assert pools[0] == pools[1]
    assert sum(len(h) for h in pools[0].values()) == 12 and len(pools[0]["train"]) >= 2


def test_every_base_of_a_pool_is_drawn():
    synth = ShapeSynth(SynthConfig(**SMALL))
    used = {synth.placement("train", i, n=200).bg_meta["bg_id"] for i in range(200)}
    assert used == set(range(len(synth.pools["train"])))
