"""The generator's core: geometry, exact ground truth, balance, determinism, counterfactuals."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

from shapesynth import CLASS_NAMES, ConfigError, ShapeSynth, SynthConfig
from shapesynth.shapes import coverage, hole_px, polygon_vertices
from shapesynth.torchdata import SynthStream

SMALL = dict(image_size=64, split_sizes={"train": 60, "val": 12, "test": 30}, bg_pool_sizes={"train": 6, "val": 2, "test": 3})


@pytest.fixture(scope="module")
def synth():
    return ShapeSynth(SynthConfig(**SMALL))


# ---------------------------------------------------------------- 2. geometry: analytic areas
@pytest.mark.parametrize("size", [12, 25, 40])
@pytest.mark.parametrize("centre", [(32.0, 32.0), (31.37, 30.81)])
def test_circle_area_is_analytic(size, centre):
    _, mask, region = coverage(0, size, 0.0, *centre, 64, stroke=2)
    assert np.array_equal(mask, region)
    expected = math.pi * (size / 2) ** 2
    assert abs(mask.sum() - expected) / expected < 0.01


@pytest.mark.parametrize("size", [14, 25, 40])
@pytest.mark.parametrize("angle", [0.0, 17.0, 45.0, 133.3])
def test_square_area_is_analytic(size, angle):
    _, mask, _ = coverage(1, size, angle, 32.21, 31.64, 64, stroke=2)
    assert abs(mask.sum() - size**2) / size**2 < 0.01


@pytest.mark.parametrize("angle", [0.0, 71.0])
def test_triangle_area_is_half_base_times_height(angle):
    size = 36
    _, mask, _ = coverage(2, size, angle, 32.4, 32.1, 64, stroke=2)
    assert abs(mask.sum() - size * size / 2) / (size * size / 2) < 0.01


def test_empty_shapes_are_inward_strokes():
    size, w = 40, 8
    _, ring, disc = coverage(3, size, 0.0, 32.3, 31.8, 64, stroke=w)
    r = size / 2
    assert abs(ring.sum() - math.pi * (r**2 - (r - w) ** 2)) / (math.pi * (r**2 - (r - w) ** 2)) < 0.01
    assert abs(disc.sum() - math.pi * r**2) / (math.pi * r**2) < 0.01
    _, frame, full = coverage(4, size, 30.0, 32.3, 31.8, 64, stroke=w)
    assert abs(frame.sum() - (size**2 - (size - 2 * w) ** 2)) / (size**2 - (size - 2 * w) ** 2) < 0.01
    assert abs(full.sum() - size**2) / size**2 < 0.01
    assert np.all(frame <= full + 1e-7)


@pytest.mark.parametrize("size, w, rel", [(5, 1, 0.04), (10, 2, 0.005), (24, 4, 1e-3), (40, 8, 1e-3)])
def test_empty_triangle_hole_is_the_shrunk_triangle(size, w, rel):
    # the renderer's triangle: apex (0, -size/2), base corners (+-size/2, size/2), i.e. base =
    # height = size; the inward stroke moves each edge in by w, which leaves the similar triangle
    # about the incentre with inradius r - w, r = 2 * area / perimeter. The smallest sizes are those
    # of the paper's bands at 64 and 128 px.
    area = size * size / 2
    perimeter = size + 2 * math.hypot(size / 2, size)
    r = 2 * area / perimeter
    assert r == pytest.approx(size / (1 + math.sqrt(5)))
    expected = ((r - w) / r) ** 2 * area
    assert expected > 1.0
    _, frame, full = coverage(5, size, 23.0, 32.3, 31.8, 64, stroke=w)
    # tolerance: the rasterisation's boundary error (measured 2.8 % at 5 px, 0.3 % at 10 px,
    # <= 0.05 % from 24 px), far below what a wrong inradius gives (e.g. an equilateral's
    # size / (2 sqrt 3): -24 % at 40 px)
    assert float(full.sum()) - float(frame.sum()) == pytest.approx(expected, rel=rel)


def test_config_refuses_sizes_where_an_empty_shape_has_no_hole():
    # the paper's smallest band at 32 px: 3 px triangles, 1 px stroke, inradius 0.93 px
    with pytest.raises(ConfigError, match="3 px empty triangle .* no interior"):
        SynthConfig(image_size=32)
    with pytest.raises(ConfigError, match="4 px empty triangle"):
        SynthConfig(image_size=48)
    # at 64 px the smallest (5 px) triangle keeps a 1.09 px hole
    assert hole_px("triangle", SynthConfig(image_size=64).band_px(2)[0], 1) == pytest.approx(1.09, abs=0.01)


def test_triangle_vertices_match_its_mask():
    # the rendered triangle contains its own vertices' inner neighbourhood and is isosceles
    v = polygon_vertices("triangle", 30, 0.0, 32.0, 32.0)
    base = np.linalg.norm(v[1] - v[2])
    height = abs(v[0, 1] - v[1, 1])
    assert base == pytest.approx(30) and height == pytest.approx(30)
    (y0, _, x0, _), mask, _ = coverage(2, 30, 0.0, 32.0, 32.0, 64, stroke=2)
    assert mask[int(v[0, 1]) + 3 - y0, int(v[0, 0]) - x0] > 0.5  # just below the apex
    assert mask[int(v[0, 1]) - 2 - y0, int(v[0, 0]) - x0] == 0  # just above it


# ---------------------------------------------------------------- 3. exact ground truth
def test_image_recomposes_from_background_colour_and_alpha(synth):
    for i in range(30):
        s = synth.sample("train", i)
        a = s.mask[..., None].astype(np.float64)
        recomposed = s.background.astype(np.float64) * (1 - a) + np.array(s.colour, np.float64) * a
        assert np.abs(recomposed - s.image.astype(np.float64)).max() <= 0.5 + 1e-6  # within 1/255 of [0,1]
        outside = s.mask == 0
        assert np.array_equal(s.image[outside], s.background[outside])


def test_mask_is_lossless_in_8_bit_and_binary_matches(synth):
    for i in range(20):
        s = synth.sample("test", i)
        assert s.mask.dtype == np.float32 and s.mask.shape == (64, 64)
        k = s.mask * 255.0
        assert np.allclose(k, np.rint(k), atol=1e-4)
        assert np.array_equal(s.binary_mask, np.rint(k) >= 128)
        assert 0 <= s.mask.min() and s.mask.max() <= 1
        assert np.all(s.region >= s.mask - 1e-6)
        if s.meta["filled"]:
            assert np.array_equal(s.region, s.mask)
        else:
            assert s.region.sum() > s.mask.sum() + 1  # the interior counts in the region only


def test_mask_has_soft_edges(synth):
    s = synth.sample("train", 0)
    assert ((s.mask > 0) & (s.mask < 1)).any()


# ---------------------------------------------------------------- 1. balance and order
@pytest.mark.parametrize("n", [60, 61, 65, 7])
def test_every_split_is_exactly_balanced(synth, n):
    counts = Counter(synth.labels("train", n=n).tolist())
    assert set(counts) <= set(range(6))
    values = [counts.get(k, 0) for k in range(6)]
    assert max(values) - min(values) <= 1 and sum(values) == n


def test_labels_are_shuffled_and_splits_differ(synth):
    labels = synth.labels("train", n=60)
    assert not np.array_equal(labels, np.arange(60) % 6)
    assert not np.array_equal(synth.labels("test", n=60), labels)
    assert not np.array_equal(synth.labels("train", epoch=1, n=60), labels)


# ---------------------------------------------------------------- 2. sizes, rotation, position
def test_sizes_stay_in_their_bands_and_shapes_inside(synth):
    cfg = synth.config
    for i in range(60):
        m = synth.sample("train", i).meta
        lo, hi = cfg.band_px(m["size_band"])
        assert lo <= m["size_px"] <= hi
        x0, y0, x1, y1 = m["bbox"]
        assert 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1 <= cfg.image_size
        if not m["filled"]:
            assert m["stroke_px"] == max(1, m["size_px"] // 5)


def test_whole_shape_stays_inside_the_image():
    synth = ShapeSynth(SynthConfig(**{**SMALL, "margin_px": 0.0}))
    for i in range(60):
        s = synth.sample("train", i)
        # the full region never touches the border: the shape is not cut
        assert s.region[0].max() < 1 and s.region[-1].max() < 1
        assert s.region[:, 0].max() < 1 and s.region[:, -1].max() < 1


def test_angles_are_uniform(synth):
    angles = [synth.placement("train", i, n=60, epoch=e).angle for e in range(5) for i in range(60)]
    assert stats.kstest(np.array(angles) / 360.0, "uniform").pvalue > 1e-3


# ---------------------------------------------------------------- 4. colour contrast
def test_colour_meets_the_minimum_contrast_and_is_recorded(synth):
    from shapesynth.render import colour_contrast

    for i in range(30):
        s = synth.sample("train", i)
        recomputed = colour_contrast(np.array(s.colour), s.background, s.mask)
        assert s.meta["contrast"] == pytest.approx(recomputed, abs=1e-6)
        assert s.meta["contrast_met"] == (s.meta["contrast"] >= synth.config.min_contrast)
    assert all(synth.sample("train", i).meta["contrast_met"] for i in range(30))


def test_impossible_contrast_keeps_the_best_colour_and_says_so():
    synth = ShapeSynth(SynthConfig(**{**SMALL, "min_contrast": 0.99, "max_colour_tries": 5}))
    s = synth.sample("train", 0)
    assert s.meta["colour_tries"] == 5 and s.meta["contrast_met"] is False


# ---------------------------------------------------------------- 6. determinism
def test_sample_is_a_pure_function_of_its_key():
    a = ShapeSynth(SynthConfig(**SMALL)).sample("val", 5)
    b = ShapeSynth(SynthConfig(**SMALL)).sample("val", 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.meta == b.meta
    c = ShapeSynth(SynthConfig(**{**SMALL, "seed": 1})).sample("val", 5)
    assert not np.array_equal(a.image, c.image)


def test_changing_one_attribute_does_not_shift_the_others():
    # a stricter colour rule may change the colour but never the placement or background
    base = ShapeSynth(SynthConfig(**SMALL))
    strict = ShapeSynth(SynthConfig(**{**SMALL, "min_contrast": 0.6}))
    for i in range(10):
        p, q = base.placement("train", i), strict.placement("train", i)
        assert (p.size, p.angle, p.cx, p.cy, p.label) == (q.size, q.angle, q.cx, q.cy, q.label)
        assert np.array_equal(p.background, q.background)


def test_samples_do_not_repeat(synth):
    images = {synth.sample("train", i).image.tobytes() for i in range(60)}
    assert len(images) == 60


# ---------------------------------------------------------------- 8. counterfactuals
def test_counterfactuals_keep_everything_but_the_class(synth):
    s = synth.sample("test", 3)
    bg = synth.background_only("test", 3)
    assert np.array_equal(bg, s.background)
    for label in range(6):
        cf = synth.counterfactual("test", 3, label)
        assert cf.label == label and cf.meta["class_name"] == CLASS_NAMES[label]
        assert cf.colour == s.colour
        assert np.array_equal(cf.background, bg)
        for key in ("size_px", "angle", "center", "bg_id", "bg_crop"):
            assert cf.meta[key] == s.meta[key]
        if label == s.label:
            assert np.array_equal(cf.image, s.image) and np.array_equal(cf.mask, s.mask)
        else:
            assert not np.array_equal(cf.mask, s.mask)
        outside = cf.mask == 0
        assert np.array_equal(cf.image[outside], bg[outside])


# ---------------------------------------------------------------- config errors
@pytest.mark.parametrize(
    "changes, words",
    [
        ({"size_bands": ((0.8, 0.9),)}, "cannot fit"),
        ({"size_bands": ((0.21, 0.24),), "image_size": 20}, "no integer size"),
        ({"size_bands": ((0.12, 0.13),), "stroke_fraction": 0.5}, "no interior"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"min_stroke_px": 0}, "min_stroke_px"),
        ({"max_colour_tries": 0}, "max_colour_tries"),
        ({"margin_px": -2.0}, "margin_px"),
        ({"stroke_fraction": -0.1}, "stroke_fraction"),
        ({"bg_pool_fractions": {"tain": 0.5}}, "bg_pool_fractions"),
        ({"background": "nope"}, "background"),
        ({"background": "folder"}, "bg_path"),
        ({"split_sizes": {"training": 5}}, "training"),
        ({"clutter_contrast": 2.0}, "clutter_contrast"),
        ({"size_band_weights": (1.0,)}, "one finite weight"),
        ({"size_band_weights": (1.0, -1.0, 1.0)}, "size_band_weights"),
        ({"size_band_weights": (0.0, 0.0, 0.0)}, "size_band_weights"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(changes, words):
    with pytest.raises(ConfigError, match=words):
        SynthConfig(**{**SMALL, **changes})


def test_config_round_trips_through_dict():
    cfg = SynthConfig(**SMALL, clutter=0.5)
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        SynthConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_size_band_weights_set_how_often_each_band_is_drawn():
    cfg = SynthConfig(**SMALL, size_band_weights=(1.0, 0.0, 3.0))
    # inverse CDF by hand: band 0 below u = 1/4, band 2 from there, band 1 never
    assert [cfg.draw_band(u) for u in (0.0, 0.2499, 0.25, 0.9999)] == [0, 0, 2, 2]
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    synth = ShapeSynth(cfg)
    bands = Counter(synth.placement("train", i, n=400).band for i in range(400))
    assert bands[1] == 0 and stats.binomtest(bands[2], 400, 0.75).pvalue > 1e-3
    only_first = ShapeSynth(SynthConfig(**SMALL, size_band_weights=(1.0, 0.0, 0.0)))
    assert {only_first.placement("train", i, n=50).band for i in range(50)} == {0}
    # equal weights draw exactly what the unweighted default draws; the default's recipe is unchanged
    equal = ShapeSynth(SynthConfig(**SMALL, size_band_weights=(2.0, 2.0, 2.0)))
    plain = ShapeSynth(SynthConfig(**SMALL))
    assert [equal.placement("train", i, n=50).band for i in range(50)] == [
        plain.placement("train", i, n=50).band for i in range(50)]
    assert "size_band_weights" not in SynthConfig(**SMALL).to_dict()


def test_index_outside_the_split_is_an_error(synth):
    with pytest.raises(IndexError, match="outside split"):
        synth.sample("val", 12)


# ---------------------------------------------------------------- 11. on-the-fly torch dataset
def test_synthstream_items_follow_the_contract():
    stream = SynthStream(SynthConfig(**SMALL), split="train", length=12)
    item = stream[4]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 64)
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 64, 64) and item["region"].shape == (1, 64, 64)
    assert item["label"].dtype == torch.int64 and item["index"] == 4
    s = stream.sample(4)
    assert torch.equal(item["image"], torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["mask"][0], torch.from_numpy(s.mask))
    labels = [int(stream[i]["label"]) for i in range(12)]
    assert sorted(Counter(labels).values()) == [2] * 6


def test_synthstream_epochs_change_draws_deterministically():
    stream = SynthStream(SynthConfig(**SMALL), split="train", length=6)
    e0 = stream[0]["image"]
    stream.set_epoch(1)
    e1 = stream[0]["image"]
    assert not torch.equal(e0, e1)
    again = SynthStream(SynthConfig(**SMALL), split="train", length=6, epoch=1)
    assert torch.equal(again[0]["image"], e1)


def test_joint_transforms_keep_mask_and_image_aligned():
    from torchvision.transforms import v2

    plain = SynthStream(SynthConfig(**SMALL), length=6)
    moved = SynthStream(SynthConfig(**SMALL), length=6, transform=v2.Compose([v2.RandomHorizontalFlip(1.0), v2.RandomVerticalFlip(1.0)]))
    a, b = plain[2], moved[2]
    assert torch.equal(b["image"], a["image"].flip(-1).flip(-2))
    assert torch.equal(b["mask"], a["mask"].flip(-1).flip(-2))
    assert torch.equal(b["region"], a["region"].flip(-1).flip(-2))


def test_difficulty_presets_interpolate_and_medium_is_the_default():
    cfg = SynthConfig(**SMALL)
    assert cfg.with_difficulty("medium") == cfg
    easy, hard = cfg.with_difficulty("easy"), cfg.with_difficulty(1.0)
    assert easy.clutter < cfg.clutter < hard.clutter
    assert easy.min_contrast > cfg.min_contrast > hard.min_contrast
    assert cfg.with_difficulty(0.25).clutter == pytest.approx((easy.clutter + cfg.clutter) / 2)
    assert (easy.image_size, easy.split_sizes, easy.seed) == (cfg.image_size, cfg.split_sizes, cfg.seed)
    with pytest.raises(ConfigError, match="difficulty"):
        cfg.with_difficulty(1.5)
    with pytest.raises(ConfigError, match="unknown difficulty"):
        cfg.with_difficulty("brutal")


def test_synthstream_curriculum_switches_config():
    stream = SynthStream(SynthConfig(**SMALL).with_difficulty("easy"), length=6)
    easy = stream[0]["image"]
    stream.set_config(SynthConfig(**SMALL).with_difficulty("hard"))
    hard = stream[0]["image"]
    assert not torch.equal(easy, hard) and int(stream[0]["label"]) == int(SynthStream(SynthConfig(**SMALL), length=6)[0]["label"])


def test_colours_are_uniform_when_no_contrast_is_required():
    synth = ShapeSynth(SynthConfig(**{**SMALL, "min_contrast": 0.0, "split_sizes": {"train": 600, "val": 6, "test": 6}}))
    colours = np.array([synth.sample("train", i).colour for i in range(600)])
    for channel in range(3):
        counts = np.bincount(colours[:, channel] // 32, minlength=8)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.pearsonr(colours[:, 0], colours[:, 1]).pvalue > 1e-3


def test_synthstream_through_dataloader_workers_matches_direct_rendering():
    from torch.utils.data import DataLoader

    stream = SynthStream(SynthConfig(**SMALL), split="val", length=8)
    direct = torch.stack([stream[i]["image"] for i in range(8)])
    loaded = torch.cat([b["image"] for b in DataLoader(stream, batch_size=3, num_workers=2)])
    assert torch.equal(direct, loaded)


@pytest.mark.parametrize("size", [5, 6, 11])
def test_tiny_shapes_keep_their_analytic_area(size):
    # boundary pixels are supersampled, so even the smallest band at 64 px is exact to 1 %
    rng = np.random.default_rng(size)
    for _ in range(40):
        angle, cx, cy = rng.uniform(0, 360), *rng.uniform(20, 44, 2)
        _, circle, _ = coverage(0, size, angle, cx, cy, 64, stroke=1)
        _, square, _ = coverage(1, size, angle, cx, cy, 64, stroke=1)
        assert abs(circle.sum() / (math.pi * size**2 / 4) - 1) < 0.01
        assert abs(square.sum() / size**2 - 1) < 0.01
        if size >= 10:
            _, tri, _ = coverage(2, size, angle, cx, cy, 64, stroke=1)
            assert abs(tri.sum() / (size**2 / 2) - 1) < 0.01


def test_pixels_away_from_the_boundary_are_exactly_in_or_out():
    (y0, y1, x0, x1), mask, _ = coverage(1, 20, 30.0, 32.2, 31.7, 64, stroke=4)
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    t = math.radians(30.0)
    u = (xx - 32.2) * math.cos(t) + (yy - 31.7) * math.sin(t)
    v = (yy - 31.7) * math.cos(t) - (xx - 32.2) * math.sin(t)
    sd = np.maximum(abs(u), abs(v)) - 10
    assert np.all(mask[sd < -1] == 1) and np.all(mask[sd > 1] == 0)
    near = mask[np.abs(sd) < 0.3]
    assert near.size and np.all((near > 0) & (near < 1))


def _reference_coverage(label, size, angle, cx, cy, image_size, stroke, n=16):
    """Area coverage per pixel by float64 point sampling (n x n points per pixel), written from
    the documented geometry alone: pixel (x, y) spans [x, x + 1) x [y, y + 1); circle of diameter
    size; polygons from `polygon_vertices` as half-plane intersections; empty shapes minus the
    shape with every edge moved inward by `stroke` (the circle's radius shrunk by it)."""
    t = (np.arange(image_size * n) + 0.5) / n
    X, Y = np.meshgrid(t, t)
    kind = ("circle", "square", "triangle")[label % 3]

    def inside(inset):
        if kind == "circle":
            return np.hypot(X - cx, Y - cy) < size / 2 - inset
        v = polygon_vertices(kind, size, angle, cx, cy)
        centre = v.mean(axis=0)
        keep = np.ones(X.shape, bool)
        for a, b in zip(v, np.roll(v, -1, axis=0)):
            normal = np.array([b[1] - a[1], a[0] - b[0]]) / np.hypot(*(b - a))
            if normal @ (centre - a) > 0:  # point it outward whatever the winding
                normal = -normal
            keep &= (X - a[0]) * normal[0] + (Y - a[1]) * normal[1] < -inset
        return keep

    region = inside(0.0)
    mask = region if label < 3 else region & ~inside(float(stroke))
    pool = lambda m: m.reshape(image_size, n, image_size, n).mean(axis=(1, 3))  # noqa: E731
    return pool(mask), pool(region)


@pytest.mark.parametrize("label", range(6))
@pytest.mark.parametrize("angle", [0.0, 31.0, 250.5])
def test_coverage_matches_an_independent_float64_rasterisation_pixel_by_pixel(label, angle):
    # areas alone cannot see a shape that is shifted by a sub-pixel offset or rotated the wrong
    # way: compare every pixel with a point-sampled reference of the documented geometry
    size, stroke, cx, cy, side = 22, 4, 23.37, 24.81, 48
    (y0, y1, x0, x1), mask, region = coverage(label, size, angle, cx, cy, side, stroke)
    got_mask, got_region = np.zeros((side, side)), np.zeros((side, side))
    got_mask[y0:y1, x0:x1], got_region[y0:y1, x0:x1] = mask, region
    want_mask, want_region = _reference_coverage(label, size, angle, cx, cy, side, stroke)
    for got, want in ((got_mask, want_mask), (got_region, want_region)):
        # the reference's own error: 1/16 px of edge per sample row, at most ~0.06 per pixel
        assert np.abs(got - want).max() < 0.07
        assert np.abs(got - want).mean() < 2e-3
        assert abs(got.sum() - want.sum()) < 0.01 * want.sum()
