"""Shortcut audit: is the label statistically independent of every nuisance variable?

One test per nuisance variable and view of it: chi-square tests of independence on contingency
tables (label x category) and Kruskal-Wallis tests for continuous variables (does the
distribution differ between classes?). A variable fails when its p-value is below
``alpha / number_of_tests`` (Bonferroni), so a clean dataset passes with probability about
1 - alpha however many tests run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from shapesynth import CLASS_NAMES


@dataclass
class AuditTest:
    variable: str  # the nuisance variable (colour, size band, position, background, ...)
    view: str  # what exactly is tested
    method: str
    statistic: float
    p_value: float
    passed: bool = True


def _chi2(labels: np.ndarray, categories: np.ndarray) -> tuple[float, float]:
    table = pd.crosstab(labels, categories).to_numpy()
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if table.shape[0] < 2 or table.shape[1] < 2:
        return 0.0, 1.0  # no variation to depend on
    res = stats.chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue)


def _kruskal(labels: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    groups = [values[labels == k] for k in np.unique(labels)]
    groups = [g for g in groups if len(g)]
    if len(groups) < 2 or np.ptp(values) == 0:
        return 0.0, 1.0
    res = stats.kruskal(*groups)
    return float(res.statistic), float(res.pvalue)


def _bins_for(n: int, classes: int, wanted: int) -> int:
    """Categories such that each label x category cell expects at least 5 samples."""
    return int(max(2, min(wanted, n // (5 * classes))))


def shortcut_audit(meta: pd.DataFrame, alpha: float = 0.01) -> list[AuditTest]:
    """Test label independence of colour, size (band and size within it), position, background
    (base, flips, crop, channel permutation, colour jitter) and angle."""
    y = meta["label"].to_numpy()
    n, k = len(y), len(CLASS_NAMES)
    colour = np.stack(meta["colour"].to_numpy()).astype(np.int64)
    centre = np.stack([meta["center_x"].to_numpy(), meta["center_y"].to_numpy()], axis=1)
    tests: list[tuple[str, str, str, tuple[float, float]]] = []
    for c, name in enumerate("RGB"):
        tests.append(("colour", f"{name} channel", "Kruskal-Wallis", _kruskal(y, colour[:, c])))
    octant = (colour >= 128).astype(np.int64) @ np.array([4, 2, 1])
    tests.append(("colour", "RGB octant", "chi-square", _chi2(y, octant)))
    # the public code's bug: the low bits of R equal the label
    tests.append(("colour", "R mod 8", "chi-square", _chi2(y, colour[:, 0] % 8)))
    band, size = meta["size_band"].to_numpy(), meta["size_px"].to_numpy().astype(np.float64)
    tests.append(("size band", "band", "chi-square", _chi2(y, band)))
    # where a size falls inside its band (0 = the band's smallest size seen, 1 = its largest)
    within = np.zeros_like(size)
    for b in np.unique(band):
        sel = band == b
        lo, hi = size[sel].min(), size[sel].max()
        within[sel] = (size[sel] - lo) / max(hi - lo, 1.0)
    tests.append(("size band", "size within its band", "Kruskal-Wallis", _kruskal(y, within)))
    for axis, name in enumerate("xy"):
        tests.append(("position", f"centre {name}", "Kruskal-Wallis", _kruskal(y, centre[:, axis])))
    side = max(float(np.max(centre)), 1.0) + 1.0
    grid = _bins_for(n, k, 3)
    cell = np.minimum((centre / side * grid).astype(np.int64), grid - 1) @ np.array([grid, 1])
    tests.append(("position", f"{grid}x{grid} grid cell", "chi-square", _chi2(y, cell)))
    bins = _bins_for(n, k, 16)
    bg_key = meta["bg_pool"].astype(str) + ":" + meta["bg_id"].astype(str)
    bg_bin = pd.util.hash_array(bg_key.to_numpy()) % np.uint64(bins)
    tests.append(("background", f"base id ({bins} hash bins)", "chi-square", _chi2(y, bg_bin.astype(np.int64))))
    flips = np.stack(meta["bg_flip"].to_numpy()).astype(np.int64) @ np.array([2, 1])
    tests.append(("background", "flips", "chi-square", _chi2(y, flips)))
    crop = np.stack(meta["bg_crop"].to_numpy()).astype(np.float64)
    tests.append(("background", "crop x", "Kruskal-Wallis", _kruskal(y, crop[:, 0])))
    tests.append(("background", "crop y", "Kruskal-Wallis", _kruskal(y, crop[:, 1])))
    channels = np.stack(meta["bg_channels"].to_numpy()).astype(np.int64) @ np.array([9, 3, 1])
    tests.append(("background", "channel permutation", "chi-square", _chi2(y, channels)))
    jitter = np.stack(meta["bg_jitter"].to_numpy()).astype(np.float64)
    for c, name in enumerate(("brightness", "contrast", "saturation")):
        tests.append(("background", f"{name} jitter", "Kruskal-Wallis", _kruskal(y, jitter[:, c])))
    tests.append(("angle", "angle", "Kruskal-Wallis", _kruskal(y, meta["angle"].to_numpy())))
    threshold = alpha / len(tests)
    return [AuditTest(v, view, m, s, p, p >= threshold) for v, view, m, (s, p) in tests]


def audit_table(tests: list[AuditTest]) -> pd.DataFrame:
    return pd.DataFrame([asdict(t) for t in tests])


def audit_passed(tests: list[AuditTest]) -> bool:
    return all(t.passed for t in tests)
