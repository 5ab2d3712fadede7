"""The shortcut audit passes clean data and catches every planted dependence."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from shapesynth import ShapeSynth, SynthConfig
from shapesynth.config import PAPER_SIZE_BANDS
from shapesynth.audit import audit_passed, audit_table, shortcut_audit
from shapesynth.schema import meta_row


@pytest.fixture(scope="module")
def clean_meta():
    cfg = SynthConfig(image_size=48, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 600, "val": 6, "test": 6}, bg_pool_sizes={"train": 24, "val": 1, "test": 1})
    synth = ShapeSynth(cfg)
    rows = []
    for i in range(600):
        s = synth.sample("train", i)
        rows.append({"label": s.label, **meta_row(s.meta)})
    return pd.DataFrame(rows)


def _failed(tests):
    return {(t.variable, t.view) for t in tests if not t.passed}


def test_clean_data_passes_every_test(clean_meta):
    tests = shortcut_audit(clean_meta)
    assert audit_passed(tests), audit_table(tests)
    assert {t.variable for t in tests} >= {"colour", "size band", "position", "background"}
    assert all(0 <= t.p_value <= 1 for t in tests)
    # Bonferroni: each test passes iff p >= alpha / (number of tests), for any alpha
    for alpha in (0.01, 0.5):
        tests = shortcut_audit(clean_meta, alpha=alpha)
        assert all(t.passed == (t.p_value >= alpha / len(tests)) for t in tests)
    p_min = min(t.p_value for t in tests)
    strict = shortcut_audit(clean_meta, alpha=1.01 * p_min * len(tests))  # the smallest p now fails
    assert sum(not t.passed for t in strict) >= 1


def _chi2_by_hand(labels, categories):
    """Pearson's chi-square test of independence written out: observed label x category counts,
    expected counts row total * column total / n, (r - 1)(c - 1) degrees of freedom."""
    _, r = np.unique(labels, return_inverse=True)
    _, c = np.unique(categories, return_inverse=True)
    observed = np.zeros((r.max() + 1, c.max() + 1))
    np.add.at(observed, (r, c), 1)
    expected = observed.sum(1, keepdims=True) * observed.sum(0, keepdims=True) / observed.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = (observed.shape[0] - 1) * (observed.shape[1] - 1)
    return statistic, stats.chi2.sf(statistic, dof), observed


def test_reported_statistics_and_p_values_are_the_tests_of_the_counts(clean_meta):
    y = clean_meta["label"].to_numpy()
    for meta, planted in ((clean_meta, False), (_plant_r_mod_8(clean_meta), True)):
        by_view = {t.view: t for t in shortcut_audit(meta)}
        categories = (np.array([c[0] % 8 for c in meta["colour"]]), meta["size_band"].to_numpy())
        for view, cats in zip(("R mod 8", "band"), categories):
            statistic, p, observed = _chi2_by_hand(y, cats)
            assert observed.shape[0] == 6 and observed.sum() == len(y)
            reference = stats.chi2_contingency(observed, correction=False)
            assert reference.statistic == pytest.approx(statistic, rel=1e-9)
            assert reference.pvalue == pytest.approx(p, rel=1e-9, abs=1e-300)
            t = by_view[view]
            assert t.method == "chi-square"
            assert t.statistic == pytest.approx(statistic, rel=1e-9), view
            assert t.p_value == pytest.approx(p, rel=1e-9, abs=1e-300), view
        if planted:
            assert by_view["R mod 8"].p_value < 1e-30
        else:
            assert by_view["R mod 8"].p_value > 1e-3
        # a Kruskal-Wallis view: the angle's distribution per class
        angles = meta["angle"].to_numpy()
        kw = stats.kruskal(*[angles[y == k] for k in range(6)])
        assert by_view["angle"].method == "Kruskal-Wallis"
        assert by_view["angle"].statistic == pytest.approx(kw.statistic, rel=1e-9)
        assert by_view["angle"].p_value == pytest.approx(kw.pvalue, rel=1e-9)


def _plant_r_mod_8(clean_meta):
    m = clean_meta.copy()
    # the paper's bug: R & 7 == label in most samples, nothing else about the colour changes
    rng = np.random.default_rng(0)
    coupled = rng.random(len(m)) < 0.77
    m["colour"] = [
        [(c[0] & ~7) | int(y), c[1], c[2]] if k else c for c, y, k in zip(m["colour"], m["label"], coupled)
    ]
    return m


def test_planted_colour_coupling_of_the_public_code_is_caught(clean_meta):
    m = clean_meta.copy()
    # the paper's bug: R & 7 == label in most samples, nothing else about the colour changes
    rng = np.random.default_rng(0)
    coupled = rng.random(len(m)) < 0.77
    m["colour"] = [
        [(c[0] & ~7) | int(y), c[1], c[2]] if k else c for c, y, k in zip(m["colour"], m["label"], coupled)
    ]
    tests = shortcut_audit(m)
    assert ("colour", "R mod 8") in _failed(tests)
    assert {v for v, _ in _failed(tests)} == {"colour"}


def test_planted_colour_brightness_dependence_is_caught(clean_meta):
    m = clean_meta.copy()
    m["colour"] = [[min(255, c[0] // 2 + 20 * int(y)), c[1], c[2]] for c, y in zip(m["colour"], m["label"])]
    assert ("colour", "R channel") in _failed(shortcut_audit(m))


def test_planted_size_band_dependence_is_caught(clean_meta):
    m = clean_meta.copy()
    rng = np.random.default_rng(1)
    m["size_band"] = np.where(rng.random(len(m)) < 0.3, m["label"] % 3, m["size_band"])
    failed = _failed(shortcut_audit(m))
    assert ("size band", "band") in failed and {v for v, _ in failed} == {"size band"}


def test_planted_position_dependence_is_caught(clean_meta):
    m = clean_meta.copy()
    m["center_x"] = m["center_x"] * 0.7 + 2.0 * m["label"]
    assert "position" in {v for v, _ in _failed(shortcut_audit(m))}


def test_planted_background_dependence_is_caught(clean_meta):
    m = clean_meta.copy()
    rng = np.random.default_rng(2)
    m["bg_id"] = np.where(rng.random(len(m)) < 0.5, m["label"], m["bg_id"])
    failed = _failed(shortcut_audit(m))
    assert ("background", next(v for _, v in failed if v.startswith("base id"))) in failed
    assert {v for v, _ in failed} == {"background"}


def _circles_differ(m, column, change):
    """Replace `column` by change(value) on circles (classes 0 and 3) only."""
    circle = m["label"].isin([0, 3]).to_numpy()
    m[column] = [change(v) if c else v for v, c in zip(m[column], circle)]
    return m


@pytest.mark.parametrize(
    "column, change, view",
    [
        # circles drawn at the top of their band, the others anywhere in it
        ("size_px", None, "size within its band"),
        ("bg_channels", lambda v: [0, 1, 2], "channel permutation"),
        ("bg_jitter", lambda v: [v[0], v[1] * 0.2, v[2]], "contrast jitter"),
        ("bg_flip", lambda v: [True, v[1]], "flips"),
        ("angle", lambda v: v * 0.25, "angle"),
    ],
)
def test_planted_nuisance_dependence_is_caught(clean_meta, column, change, view):
    m = clean_meta.copy()
    if column == "size_px":
        top = m.groupby("size_band")["size_px"].transform("max")
        m["size_px"] = np.where(m["label"].isin([0, 3]), top, m["size_px"])
    else:
        m = _circles_differ(m, column, change)
    failed = _failed(shortcut_audit(m))
    assert view in {v for _, v in failed}, failed


def test_audit_of_a_tiny_or_constant_table_does_not_crash():
    m = pd.DataFrame(
        {
            "label": [0, 1, 2, 3, 4, 5] * 2,
            "colour": [[10, 10, 10]] * 12,
            "size_band": [0] * 12,
            "size_px": [9] * 12,
            "bg_channels": [[0, 1, 2]] * 12,
            "bg_jitter": [[0.0, 0.0, 0.0]] * 12,
            "center_x": [5.0] * 12,
            "center_y": [5.0] * 12,
            "bg_pool": ["train"] * 12,
            "bg_id": [0] * 12,
            "bg_flip": [[False, False]] * 12,
            "bg_crop": [[0, 0]] * 12,
            "angle": [0.0] * 12,
        }
    )
    tests = shortcut_audit(m)
    assert all(t.p_value == 1.0 and t.passed for t in tests)
