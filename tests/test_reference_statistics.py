"""The meta-evaluation's tables re-derived independently on a messy hand-built long table.

Reference: scipy.stats.pearsonr / spearmanr on explicitly built samples (a bootstrap replicate is
rebuilt as the table of the resampled images, each image's rows repeated as often as it was
drawn), and plain pandas means. Nothing here calls the module's correlation helpers; only the
replicate counts (``image_bootstrap_counts``) are shared, and checked on their own.

The table has three models with different image sets (shared image ids, a model that lacks
images, one that has others), trivial maps and controls with values that would dominate any
correlation they entered, error and NaN rows, metrics with ties (lower-is-better ones among
them), a constant metric and a metric one model does not have.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from validation import analyze as A
from validation.pipeline.table import make_results_frame

CONTROLS = ("randomcam", "halfcam", "all1scam", "oracle", "centre")  # never a real method
CONFIGS = [("gradcam", "stage1", "identity"), ("gradcam", "stage1", "product"), ("gradcam", "stage2", "identity"),
           ("layercam", "stage1", "identity"), ("layercam", "stage1", "product"),
           ("layercam", "stage2", "identity"), ("lime", "-", "identity"), ("deeplift", "-", "identity")]
IMAGES = {"ma": list(range(30)), "mb": [i for i in range(30) if i not in (3, 7, 11)], "mc": list(range(6, 36))}
LOWER = {"average_drop", "complexity"}
N_BOOT = 40


def messy_table(seed=0):
    rng = np.random.default_rng(seed)
    rows = []

    def add(model, image, method, layer, mix, metric, value, status=None):
        rows.append(dict(model=model, image=image, method=method, layer=layer, mix=mix, metric=metric,
                         value=value, status=status or ("ok" if np.isfinite(value) else "nan"),
                         reason="" if status != "error" else "boom"))

    for model, images in IMAGES.items():
        for image in images:
            for k, (method, layer, mix) in enumerate(CONFIGS):
                gt = 0.05 * k + 0.6 * rng.random()
                vals = {"gt_cosine": gt,
                        "arcc": gt + 0.3 * rng.normal(),
                        # ties: quantised, and lower is better
                        "average_drop": np.round(1 - gt + 0.4 * rng.normal(), 1),
                        "complexity": np.round(0.5 - 0.5 * gt + 0.1 * rng.normal(), 1),
                        "road": np.round(0.5 * gt + 0.2 * rng.normal(), 2),
                        "constant": 0.25,
                        # lime has it on one image of each model only (another one for each):
                        # a resample without that image has no mean for lime
                        "patchy": gt + 0.2 * rng.normal() if method != "lime" or image == images[5] else np.nan}
                if model == "mc":
                    del vals["road"]  # this model has no road rows at all
                if (image + k) % 13 == 0:
                    vals["arcc"] = np.nan  # the metric returned NaN
                if (image * 7 + k) % 17 == 0:
                    vals["gt_cosine"] = np.nan
                for metric, v in vals.items():
                    failed = metric == "average_drop" and (image + 2 * k) % 11 == 0
                    add(model, image, method, layer, mix, metric, np.nan if failed else v,
                        "error" if failed else None)
            for control in CONTROLS:
                big = 50.0 if control in ("oracle", "all1scam") else -50.0
                for metric in ("gt_cosine", "arcc", "average_drop", "complexity", "road", "constant"):
                    if model == "mc" and metric == "road":
                        continue
                    add(model, image, control, "-", "identity", metric, big + 0.01 * image)
    return make_results_frame(rows)


@pytest.fixture(scope="module")
def table():
    return messy_table()


# ----------------------------------------------------------------------------- reference
def ref_pairs(df, model, metric, also=()):
    """(x, y, images) of one model's real (image, configuration) pairs where ``metric``, the
    reference and every metric of ``also`` are finite; NaN-only columns for a metric it lacks."""
    sub = df[(df.model == model) & ~df.method.isin(CONTROLS)]
    w = sub.set_index(["image", "method", "layer", "mix", "metric"])["value"].unstack("metric")
    w = w.reindex(columns=sorted({metric, "gt_cosine", *also} | set(w.columns)))
    w = w.dropna(subset=[metric, "gt_cosine", *also])
    return w[metric].to_numpy(), w["gt_cosine"].to_numpy(), w.index.get_level_values("image").to_numpy(), w


def ref_corr(x, y):
    """scipy's Pearson and Spearman; NaN for fewer than 3 points or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    return stats.pearsonr(x, y)[0], stats.spearmanr(x, y)[0]


def ref_means_corr(w, metric):
    means = w[[metric, "gt_cosine"]].groupby(level=["method", "layer", "mix"]).mean()
    return ref_corr(means[metric].to_numpy(), means["gt_cosine"].to_numpy()), len(means)


def all_images(df):
    return np.unique(df.loc[~df.method.isin(CONTROLS), "image"])


def resample(images, universe, counts_row):
    """Row positions of the resampled table: image universe[i]'s rows repeated counts_row[i] times."""
    return np.concatenate([np.tile(np.flatnonzero(images == img), int(c)) for img, c in zip(universe, counts_row)]
                          + [np.zeros(0, int)])


def ref_pair_replicates(df, model, metric, counts, also=()):
    x, y, images, _ = ref_pairs(df, model, metric, also)
    universe = all_images(df)
    out = np.array([ref_corr(x[idx], y[idx]) for idx in (resample(images, universe, c) for c in counts)])
    return out.reshape(-1, 2)


def ref_means_replicates(df, model, metric, counts):
    _, _, images, w = ref_pairs(df, model, metric)
    n_cfg = len(w.groupby(level=["method", "layer", "mix"]))
    universe = all_images(df)
    out = []
    for c in counts:
        sample = w.iloc[resample(images, universe, c)]
        means = sample[[metric, "gt_cosine"]].groupby(level=["method", "layer", "mix"]).mean()
        out.append(ref_corr(means[metric].to_numpy(), means["gt_cosine"].to_numpy())
                   if len(means) == n_cfg else (np.nan, np.nan))
    return np.array(out)


def ref_ci(boot):
    boot = boot[np.isfinite(boot)]
    return tuple(np.percentile(boot, [2.5, 97.5])) if boot.size else (np.nan, np.nan)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- the counts
def test_bootstrap_counts_draw_n_images_with_replacement_from_a_seed():
    c = A.image_bootstrap_counts(25, 500, seed=3)
    assert c.shape == (500, 25) and (c.sum(axis=1) == 25).all() and (c >= 0).all()
    assert (c == np.round(c)).all()
    np.testing.assert_array_equal(c, A.image_bootstrap_counts(25, 500, seed=3))
    assert not np.array_equal(c, A.image_bootstrap_counts(25, 500, seed=4))
    # with replacement, uniform: each image drawn once per replicate on average, Binomial(25, 1/25)
    assert c.mean() == pytest.approx(1.0)
    assert (c == 0).mean() == pytest.approx((24 / 25) ** 25, abs=0.02)


# ----------------------------------------------------------------------------- table a
@pytest.fixture(scope="module")
def validity(table):
    return quiet(A.table_validity, table, n_boot=N_BOOT, seed=5).set_index(["model", "metric", "level"])


@pytest.mark.parametrize("metric", ["arcc", "average_drop", "complexity", "road"])
def test_validity_point_estimates_and_population_equal_scipy(table, validity, metric):
    for model in IMAGES:
        if metric == "road" and model == "mc":
            continue
        x, y, _, w = ref_pairs(table, model, metric)
        row = validity.loc[(model, metric, "pairs")]
        assert row["n"] == len(x)
        # every real (image, configuration) pair of the model not used is counted as dropped
        assert row["n_dropped"] == len(IMAGES[model]) * len(CONFIGS) - len(x)
        p, s = ref_corr(x, y)
        assert (row["pearson"], row["spearman"]) == pytest.approx((p, s), abs=1e-12)
        assert row["better"] == ("lower" if metric in LOWER else "higher")
        (mp, ms), n_cfg = ref_means_corr(w, metric)
        mrow = validity.loc[(model, metric, "method_means")]
        assert mrow["n"] == n_cfg == len(CONFIGS)
        assert (mrow["pearson"], mrow["spearman"]) == pytest.approx((mp, ms), abs=1e-12)


@pytest.mark.parametrize("metric,level", [("average_drop", "pairs"), ("road", "pairs"), ("arcc", "method_means"),
                                          ("patchy", "method_means")])
def test_validity_intervals_are_percentiles_of_explicitly_resampled_tables(table, validity, metric, level):
    counts = A.image_bootstrap_counts(len(all_images(table)), N_BOOT, 5)
    models = [m for m in IMAGES if not (metric == "road" and m == "mc")]
    per_model = {}
    for model in models:
        reps = (ref_pair_replicates if level == "pairs" else ref_means_replicates)(table, model, metric, counts)
        per_model[model] = reps
        row = validity.loc[(model, metric, level)]
        assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(ref_ci(reps[:, 0]), abs=1e-10)
        assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(ref_ci(reps[:, 1]), abs=1e-10)
        assert row["boot_nan"] == max(np.isnan(reps).sum(axis=0))
    # the summary: models weighted equally, replicate by replicate, the same images for each
    summary = validity.loc[("mean+-std", metric, level)]
    points = np.array([validity.loc[(m, metric, level), ["pearson", "spearman"]].to_numpy(float) for m in models])
    assert summary["n_models"] == len(models)
    assert (summary["pearson"], summary["spearman"]) == pytest.approx(tuple(points.mean(axis=0)), abs=1e-12)
    assert summary["pearson_std"] == pytest.approx(points[:, 0].std(ddof=0), abs=1e-12)
    mean_reps = np.mean([per_model[m] for m in models], axis=0)  # NaN where any model has none
    assert summary["boot_nan"] == max(np.isnan(mean_reps).sum(axis=0))
    if metric == "patchy":  # the case is informative: replicates without lime's image, per model and over models
        assert 0 < validity.loc[("ma", metric, level), "boot_nan"] < summary["boot_nan"] < N_BOOT
    assert (summary["pearson_lo"], summary["pearson_hi"]) == pytest.approx(ref_ci(mean_reps[:, 0]), abs=1e-10)
    assert (summary["spearman_lo"], summary["spearman_hi"]) == pytest.approx(ref_ci(mean_reps[:, 1]), abs=1e-10)
    assert summary["n"] == sum(validity.loc[(m, metric, level), "n"] for m in models)


def test_validity_intervals_follow_the_seed(table):
    a = quiet(A.table_validity, table, n_boot=N_BOOT, seed=5, metrics=["arcc"])
    b = quiet(A.table_validity, table, n_boot=N_BOOT, seed=5, metrics=["arcc"])
    c = quiet(A.table_validity, table, n_boot=N_BOOT, seed=6, metrics=["arcc"])
    pd.testing.assert_frame_equal(a, b)
    assert np.isfinite(a["pearson_lo"]).all() and not np.allclose(a["pearson_lo"], c["pearson_lo"])
    np.testing.assert_array_equal(a["pearson"], c["pearson"])  # the point estimates do not depend on it


def test_a_constant_metric_has_no_correlation_on_any_model(validity):
    for model in list(IMAGES) + ["mean+-std"]:
        for level in ("pairs", "method_means"):
            row = validity.loc[(model, "constant", level)]
            assert np.isnan(row["pearson"]) and np.isnan(row["spearman"]) and np.isnan(row["pearson_lo"])
    summary = validity.loc[("mean+-std", "constant", "pairs")]
    assert summary["n_models"] == 0 and summary["models_nan"] == "ma,mb,mc"
    assert summary["boot_nan"] == N_BOOT


def test_a_model_without_a_metric_is_named_in_the_summary_not_silently_left_out(table, validity):
    """mc has no road rows at all: like a model on which road is never finite, it gets a row
    without a correlation, all its pairs count as dropped, and the summary names it."""
    row = validity.loc[("mc", "road", "pairs")]
    assert row["n"] == 0 and np.isnan(row["pearson"]) and np.isnan(row["spearman"])
    assert row["n_dropped"] == len(IMAGES["mc"]) * len(CONFIGS)
    summary = validity.loc[("mean+-std", "road", "pairs")]
    assert summary["n_models"] == 2 and summary["models_nan"] == "mc"
    assert summary["n_dropped"] == sum(validity.loc[(m, "road", "pairs"), "n_dropped"] for m in IMAGES)
    # the same as a model whose road rows are all NaN
    nan_rows = table[(table.model == "mb") & (table.metric == "road")].assign(model="mc")
    nan_rows = nan_rows[nan_rows.image.isin(IMAGES["mc"])]
    filled = pd.concat([table, nan_rows.assign(value=np.nan, status="nan")], ignore_index=True)
    t = quiet(A.table_validity, filled, n_boot=N_BOOT, seed=5, metrics=["road"]).set_index(["model", "metric", "level"])
    assert t.loc[("mean+-std", "road", "pairs"), "models_nan"] == "mc"


def test_replicate_weights_equal_scipy_on_the_repeated_images_with_ties():
    """A replicate with image counts k_i (zeros and repeats) equals scipy on the data with image
    i's pairs repeated k_i times; ranks tie within and across images, in both sides, as scipy
    ranks the repeated data (mid-ranks over the repeated copies)."""
    rng = np.random.default_rng(11)
    n_images, per_image = 9, 4
    images = np.repeat(np.arange(n_images), per_image)
    x = rng.integers(0, 4, size=len(images)).astype(float) / 4  # heavy ties
    y = np.round(0.5 * x + rng.random(len(images)), 1)
    counts = np.array([[0, 1, 2, 3, 0, 1, 1, 0, 1], [2, 2, 2, 2, 2, 2, 2, 2, 2],
                       [1, 1, 1, 1, 1, 1, 1, 1, 1], [9, 0, 0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 4, 0, 0, 5, 0, 0, 0]], float)
    c = A.pair_correlation(x, y, images, counts)
    for b, row in enumerate(counts):
        idx = np.concatenate([np.tile(np.flatnonzero(images == i), int(k)) for i, k in enumerate(row)])
        p, s = quiet(ref_corr, x[idx], y[idx])
        assert (c.pearson_boot[b], c.spearman_boot[b]) == pytest.approx((p, s), abs=1e-12, nan_ok=True)
    assert (c.pearson, c.spearman) == pytest.approx(tuple(ref_corr(x, y)), abs=1e-12)
    # every image twice is the original sample, ties and all
    assert (c.pearson_boot[1], c.spearman_boot[1]) == pytest.approx((c.pearson, c.spearman), abs=1e-12)


# ----------------------------------------------------------------------------- table a, paired
@pytest.fixture(scope="module")
def paired(table):
    return quiet(A.table_paired, table, n_boot=N_BOOT, seed=5).set_index(["model", "metric", "versus"])


def _ref_paired(table, model, a, b, counts=None):
    sa, sb = (-1 if a in LOWER else 1), (-1 if b in LOWER else 1)
    xa, y, images, w = ref_pairs(table, model, a, also=(b,))
    xb = w[b].to_numpy()
    pa, pb = np.array(ref_corr(xa, y)), np.array(ref_corr(xb, y))
    point = (sa * pa, sb * pb, sa * pa - sb * pb, len(y))
    if counts is None:
        return point
    universe = all_images(table)
    reps = []
    for c in counts:
        idx = resample(images, universe, c)
        reps.append(sa * np.array(ref_corr(xa[idx], y[idx])) - sb * np.array(ref_corr(xb[idx], y[idx])))
    return point, np.array(reps)


def test_paired_point_estimates_are_oriented_and_on_the_common_rows(table, paired):
    fig3 = [m for m in A.FIG3_METRICS if m in set(table.metric)]
    assert fig3 == ["average_drop", "complexity", "road", "arcc"]
    expected_pairs = {(a, b) for i, a in enumerate(fig3) for b in fig3[i + 1:]}
    assert {(a, b) for _, a, b in paired.index} == expected_pairs
    for model in ("ma", "mb"):
        for a, b in expected_pairs:
            ra, rb, diff, n = _ref_paired(table, model, a, b)
            row = paired.loc[(model, a, b)]
            assert row["n"] == n
            assert (row["pearson_metric"], row["spearman_metric"]) == pytest.approx(tuple(ra), abs=1e-12)
            assert (row["pearson_versus"], row["spearman_versus"]) == pytest.approx(tuple(rb), abs=1e-12)
            assert (row["pearson_diff"], row["spearman_diff"]) == pytest.approx(tuple(diff), abs=1e-12)
    # AD is lower-is-better: its oriented correlation is minus table a's (on its own rows there)
    x, y, _, _ = ref_pairs(table, "ma", "average_drop", also=("arcc",))
    assert paired.loc[("ma", "average_drop", "arcc"), "pearson_metric"] == pytest.approx(-stats.pearsonr(x, y)[0])
    assert paired.loc[("ma", "average_drop", "arcc"), "pearson_metric"] > 0


def test_paired_intervals_are_percentiles_of_explicitly_resampled_differences(table, paired):
    counts = A.image_bootstrap_counts(len(all_images(table)), N_BOOT, 5)
    reps = {}
    for model in IMAGES:
        _, reps[model] = _ref_paired(table, model, "average_drop", "arcc", counts)
        row = paired.loc[(model, "average_drop", "arcc")]
        assert (row["pearson_diff_lo"], row["pearson_diff_hi"]) == pytest.approx(ref_ci(reps[model][:, 0]), abs=1e-10)
        assert (row["spearman_diff_lo"], row["spearman_diff_hi"]) == pytest.approx(ref_ci(reps[model][:, 1]), abs=1e-10)
    mean = paired.loc[("mean", "average_drop", "arcc")]
    mean_reps = np.mean([reps[m] for m in IMAGES], axis=0)
    assert (mean["pearson_diff_lo"], mean["pearson_diff_hi"]) == pytest.approx(ref_ci(mean_reps[:, 0]), abs=1e-10)
    diffs = [paired.loc[(m, "average_drop", "arcc"), "pearson_diff"] for m in IMAGES]
    assert mean["pearson_diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
    assert mean["n_models"] == 3 and mean["n"] == sum(paired.loc[(m, "average_drop", "arcc"), "n"] for m in IMAGES)


def test_paired_with_a_model_that_lacks_a_metric_names_it(table, paired):
    """mc has no road rows: the pairs with road have no correlation on it (n = 0), and the mean
    rows average the two other models and name mc (a KeyError stopped the whole analysis)."""
    for a, b in (("average_drop", "road"), ("road", "arcc")):
        row = paired.loc[("mc", a, b)]
        assert row["n"] == 0 and np.isnan(row["pearson_diff"]) and np.isnan(row["spearman_diff"])
        mean = paired.loc[("mean", a, b)]
        assert mean["n_models"] == 2 and mean["models_nan"] == "mc"
        expected = np.mean([_ref_paired(table, m, a, b)[2] for m in ("ma", "mb")], axis=0)
        assert (mean["pearson_diff"], mean["spearman_diff"]) == pytest.approx(tuple(expected), abs=1e-12)
    # a model without the reference at all is the same: no pairs, named
    no_ref = table[~((table.model == "mc") & (table.metric == "gt_cosine"))]
    p = quiet(A.table_paired, no_ref, n_boot=10, seed=0, pairs=[("arcc", "average_drop")]).set_index("model")
    assert p.loc["mc", "n"] == 0 and p.loc["mean", "models_nan"] == "mc"
    v = quiet(A.table_validity, no_ref, n_boot=10, seed=0, metrics=["arcc"]).set_index(["model", "level"])
    assert v.loc[("mean+-std", "pairs"), "models_nan"] == "mc"


def test_analyze_frame_runs_on_a_table_where_a_model_lacks_a_fig3_metric(table):
    tables = quiet(A.analyze_frame, table, n_boot=10)
    assert "mc" in set(tables["a_paired"]["model"])


# ----------------------------------------------------------------------------- table b
def _trivial_case():
    """Two models, two images each. Real configurations' image means (hand):
    adcc (higher better): gradcam 0.4, lime 0.6; halfcam 0.5 -> fooled (>= worst 0.4) on both.
    road (higher better): gradcam 0.1875, lime 0.3; halfcam 0.1 -> not fooled; all1scam 0.1875 ->
    ties the worst (exactly: dyadic): fooled. average_drop (lower better): gradcam 0.3125, lime 0.5;
    halfcam 0.4 on ma
    (fooled), 0.6 on mb (not): mixed. arcc: halfcam NaN on ma and an error on mb: unscored."""
    real = {("adcc", "gradcam"): (0.375, 0.425), ("adcc", "lime"): (0.5, 0.7),
            ("road", "gradcam"): (0.25, 0.125), ("road", "lime"): (0.3, 0.3),
            ("average_drop", "gradcam"): (0.25, 0.375), ("average_drop", "lime"): (0.5, 0.5),
            ("arcc", "gradcam"): (0.5, 0.5), ("arcc", "lime"): (0.25, 0.75)}
    trivial = {("adcc", "halfcam"): {"ma": 0.5, "mb": 0.5}, ("road", "halfcam"): {"ma": 0.1, "mb": 0.1},
               ("road", "all1scam"): {"ma": 0.1875, "mb": 0.1875},
               ("average_drop", "halfcam"): {"ma": 0.4, "mb": 0.6}, ("arcc", "halfcam"): {"ma": np.nan, "mb": np.nan}}
    rows = []
    for model in ("ma", "mb"):
        for img in range(2):
            for (metric, method), v in real.items():
                rows.append(dict(model=model, image=img, method=method, layer="-", mix="identity", metric=metric,
                                 value=v[img], status="ok"))
            for (metric, method), per_model in trivial.items():
                v = per_model[model]
                status = "ok" if np.isfinite(v) else ("nan" if model == "ma" else "error")
                rows.append(dict(model=model, image=img, method=method, layer="-", mix="identity", metric=metric,
                                 value=v, status=status))
            # an oracle far beyond every real method, and a real row that failed: neither counts
            rows.append(dict(model=model, image=img, method="oracle", layer="-", mix="identity", metric="road",
                             value=-9.0, status="ok"))
        rows.append(dict(model=model, image=2, method="lime", layer="-", mix="identity", metric="road",
                         value=np.nan, status="error"))
    return make_results_frame(pd.DataFrame(rows).assign(reason=""))


def test_trivial_verdicts_hand_computed():
    per_model, verdict = A.table_trivial(_trivial_case())
    t = per_model.set_index(["model", "metric", "trivial"])
    assert t.loc[("ma", "road", "halfcam"), "real_worst"] == 0.1875  # the oracle's -9 is not real
    assert t.loc[("ma", "road", "halfcam"), "real_n_nan"] == 1
    assert t.loc[("ma", "average_drop", "halfcam"), ["real_worst", "real_best"]].tolist() == [0.5, 0.3125]
    assert bool(t.loc[("ma", "average_drop", "halfcam"), "fooled"])
    assert not bool(t.loc[("mb", "average_drop", "halfcam"), "fooled"])
    assert pd.isna(t.loc[("ma", "arcc", "halfcam"), "fooled"]) and pd.isna(t.loc[("mb", "arcc", "halfcam"), "fooled"])
    assert t.loc[("mb", "arcc", "halfcam"), "trivial_n_nan"] == 2
    v = verdict.set_index(["metric", "trivial"])["verdict"]
    assert v[("adcc", "halfcam")] == "fooled"
    assert v[("road", "halfcam")] == "not fooled"
    assert v[("road", "all1scam")] == "fooled"  # a tie with the worst real configuration fools it
    assert v[("average_drop", "halfcam")] == "mixed (1/2 models fooled)"
    assert v[("arcc", "halfcam")] == "not checked (2/2 models unscored)"
    exp = A.check_expectations({"b_trivial_verdict": verdict}).set_index("expectation")
    assert tuple(exp.loc["HalfCAM fools adcc (Fig. 1)", ["found", "status"]]) == ("verdict: fooled", "holds")
    assert tuple(exp.loc["HalfCAM fools average_drop (Fig. 1)", ["found", "status"]]) == (
        "verdict: mixed (1/2 models fooled)", "FAILS")
    road = exp.loc["No trivial map fools road (Fig. 1)"]
    assert road["found"] == "randomcam: n/a; halfcam: not fooled; all1scam: fooled" and road["status"] == "FAILS"
    arcc = exp.loc["No trivial map fools arcc (Fig. 1)"]
    assert arcc["status"] == "n/a" and "halfcam: not checked (2/2 models unscored)" in arcc["found"]


# ----------------------------------------------------------------------------- tables c, d
def _refine_case():
    """ma has 2 images, mb 4: the mean rows weight models equally (not by images).
    gradcam stage1 arcc: identity / product / geomean per image; stage2 identity only."""
    values = {"ma": {"identity": [0.2, 0.4], "product": [0.5, 0.3], "geomean": [0.25, 0.45]},
              "mb": {"identity": [0.1, 0.1, 0.3, 0.5], "product": [0.2, 0.3, 0.1, 0.9],
                     "geomean": [0.4, 0.4, 0.4, np.nan]}}
    rows = []
    for model, mixes in values.items():
        for mix, vals in mixes.items():
            for img, v in enumerate(vals):
                rows.append(dict(model=model, image=img, method="gradcam", layer="stage1", mix=mix, metric="arcc",
                                 value=v))
                if mix == "identity":
                    rows.append(dict(model=model, image=img, method="gradcam", layer="stage2", mix=mix,
                                     metric="arcc", value=v + 1))
        for img in range(len(mixes["identity"])):
            rows.append(dict(model=model, image=img, method="lime", layer="-", mix="identity", metric="arcc",
                             value=0.5 * img))
    return make_results_frame(rows)


def test_refine_and_aggregator_means_hand_computed():
    config = {"layers": ["stage1", "stage2"]}
    c = A.table_refine(_refine_case(), config).set_index(["model", "method", "metric"])
    ma, mb, mean = (c.loc[(m, "gradcam", "arcc")] for m in ("ma", "mb", "mean"))
    assert (ma.base, ma.refined, ma.delta, ma.improved_frac) == pytest.approx((0.3, 0.4, 0.1, 0.5))
    assert (mb.base, mb.refined, mb.delta, mb.improved_frac) == pytest.approx((0.25, 0.375, 0.125, 0.75))
    assert (mean.base, mean.refined, mean.delta, mean.n) == pytest.approx((0.275, 0.3875, 0.1125, 6))
    assert c.loc[("mean", "lime", "arcc"), "base"] == pytest.approx((0.25 + 0.75) / 2)  # ma 0.25, mb 0.75
    d = A.table_aggregators(_refine_case(), config)
    d = d[d.metric == "arcc"].set_index(["model", "layer"])
    # mb image 3 has no geomean: every column of mb's stage1 row is over images 0-2
    assert tuple(d.loc[("mb", "stage1"), ["identity", "product", "geomean", "n", "n_dropped"]]) == pytest.approx(
        (0.5 / 3, 0.2, 0.4, 3, 1))
    assert d.loc[("mb", "stage1"), "best"] == "geomean"
    assert d.loc[("ma", "stage1"), "best"] == "product"  # 0.4 vs 0.35
    m = d.loc[("mean", "stage1")]
    assert (m["identity"], m["product"], m["geomean"]) == pytest.approx(((0.3 + 0.5 / 3) / 2, 0.3, 0.375))
    assert m.best == "geomean" and m.best_gain == pytest.approx(0.375 - (0.3 + 0.5 / 3) / 2)
    # stage2 (identity only, nothing refines it): ma 1.3, mb 1.25
    assert pd.isna(d.loc[("mean", "stage2"), "best"]) and np.isnan(d.loc[("mean", "stage2"), "best_gain"])
    assert d.loc[("mean", "stage2"), "identity"] == pytest.approx((1.3 + 1.25) / 2)
    exp = A.check_expectations({"c_refinecam": A.table_refine(_refine_case(), config),
                                "d_aggregators": A.table_aggregators(_refine_case(), config)}).set_index("expectation")
    raise_ = exp.loc["RefineCAM raises ARCC at the shallowest layer (Table 1)"]
    assert raise_["status"] == "holds"
    assert raise_["found"] == f"1/1 methods improve: gradcam {mean.base:.3f}->{mean.refined:.3f}"
    assert raise_["found"].startswith("1/1 methods improve: gradcam 0.275->0.38")
    best = exp.loc["Product is the best aggregator (Table 2)"]
    assert best["status"] == "FAILS" and best["found"] == "best mix at the shallowest layer: {'gradcam': 'geomean'}"


# ----------------------------------------------------------------------------- expectations, table a
def test_expectations_text_follows_tables_a_and_a_paired(table, validity, paired):
    tables = {"a_validity": validity.reset_index(), "a_paired": paired.reset_index()}
    exp = A.check_expectations(tables).set_index("expectation")
    oriented = {m: validity.loc[("mean+-std", m, "pairs"), "pearson"] * (-1 if m in LOWER else 1)
                for m in ("average_drop", "complexity", "road", "arcc")}
    ranked = sorted(oriented, key=oriented.get, reverse=True)
    best = exp.loc["ARCC correlates best with the ground-truth cosine (Fig. 3a)"]

    def note(m):  # a correlation averaged over fewer models than the run has says so
        row = validity.loc[("mean+-std", m, "pairs")]
        left = [x for x in row["models_nan"].split(",") if x]
        return f" (mean of {row['n_models']}/{row['n_models'] + len(left)} models, without {', '.join(left)})" if left else ""

    listing = ", ".join(f"{m} {oriented[m]:+.2f}{note(m)}" for m in ranked)
    assert any(note(m) for m in ranked)  # the messy table has such a metric (road lacks model mc)
    assert best["found"].startswith(f"oriented Pearson r, mean over models: {listing}")
    assert best["status"] == ("holds" if ranked[0] == "arcc" else "FAILS")
    worst = exp.loc["Average Drop correlates worst (Fig. 3a)"]
    assert worst["found"] == f"lowest: {ranked[-1]}"
    assert worst["status"] == ("holds" if ranked[-1] == "average_drop" else "FAILS")
    same = exp.loc["ARCC correlates best with the ground-truth cosine, on the same maps (Fig. 3a)"]
    diffs = {}
    for other in ("average_drop", "complexity", "road"):
        row = paired.loc[("mean", other, "arcc")]  # stored as (other, arcc): arcc - other = -diff
        diffs[other] = -row["pearson_diff"]
        lo, hi = -row["pearson_diff_hi"], -row["pearson_diff_lo"]
        assert f"vs {other} {diffs[other]:+.3f} [{lo:+.3f}, {hi:+.3f}]" in same["found"]
    assert same["status"] == ("holds" if all(d > 0 for d in diffs.values()) else "FAILS")


# ----------------------------------------------------------------------------- over how many models
def _partial_refine_case():
    """_refine_case's ma and mb, plus two models its mean rows cannot rest on:
    mc: gradcam's product errs on every image (no paired score); lime is NaN everywhere;
    md: gradcam has no refined rows at all (identity only), lime has scores."""
    base = _refine_case()
    rows = []
    for img in range(3):
        for mix, v, status in (("identity", 0.9, "ok"), ("product", np.nan, "error"), ("geomean", 0.95, "ok")):
            rows.append(dict(model="mc", image=img, method="gradcam", layer="stage1", mix=mix, metric="arcc",
                             value=v, status=status))
        rows.append(dict(model="mc", image=img, method="lime", layer="-", mix="identity", metric="arcc",
                         value=np.nan, status="nan"))
        rows.append(dict(model="md", image=img, method="gradcam", layer="stage1", mix="identity", metric="arcc",
                         value=5.0, status="ok"))
        rows.append(dict(model="md", image=img, method="lime", layer="-", mix="identity", metric="arcc",
                         value=0.1 * img, status="ok"))
    extra = make_results_frame(pd.DataFrame(rows).assign(reason=""))
    return pd.concat([base, extra], ignore_index=True)


def _ref_paired_mean(df, model, method, layer, mixes):
    """Plain pandas: one model's per-mix means over the images where every mix in ``mixes`` is finite."""
    sub = df[(df.model == model) & (df.method == method) & (df.layer == layer) & (df.metric == "arcc")]
    w = sub.pivot(index="image", columns="mix", values="value").reindex(columns=list(mixes)).dropna()
    return w.mean(), len(w)


def test_refine_mean_rows_say_on_how_many_models_they_rest():
    """Table c's mean rows averaged whichever models had a value (pandas skips NaN) and said
    nothing: gradcam's mean rested on 2 of the run's 4 models, lime's on 3, as if on all of them."""
    df, config = _partial_refine_case(), {"layers": ["stage1", "stage2"]}
    c = A.table_refine(df, config).set_index(["model", "method", "metric"])
    g = c.loc[("mean", "gradcam", "arcc")]
    per = {m: _ref_paired_mean(df, m, "gradcam", "stage1", ("identity", "product")) for m in ("ma", "mb")}
    assert (g["n_models"], g["models_nan"]) == (2, "mc,md")  # mc: no paired image; md: never refined
    assert g["base"] == pytest.approx(np.mean([per[m][0]["identity"] for m in per]))
    assert g["refined"] == pytest.approx(np.mean([per[m][0]["product"] for m in per]))
    assert (g["n"], g["n_dropped"]) == (2 + 4, 3)  # mc's three images are dropped, md has no row
    lime = c.loc[("mean", "lime", "arcc")]
    assert (lime["n_models"], lime["models_nan"]) == (3, "mc")
    assert lime["base"] == pytest.approx(np.mean([0.25, 0.75, 0.1]))
    assert (c.loc[("ma", "gradcam", "arcc"), "n_models"], c.loc[("ma", "gradcam", "arcc"), "models_nan"]) == (1, "")


def test_aggregator_mean_rows_rest_on_the_same_models_in_every_column():
    """Table d's mean row took each column's mean over the models that had it, so identity averaged
    md's 5.0 (md has no refined map) while product and geomean did not: best_gain compared means
    over different models. Now every column is over the models with a score in all of them,
    counted in n_models and the others named."""
    df, config = _partial_refine_case(), {"layers": ["stage1", "stage2"]}
    d = A.table_aggregators(df, config)
    d = d[d.metric == "arcc"].set_index(["model", "layer"])
    mixes = ("identity", "product", "geomean")
    per = {m: _ref_paired_mean(df, m, "gradcam", "stage1", mixes) for m in ("ma", "mb")}
    row = d.loc[("mean", "stage1")]
    assert (row["n_models"], row["models_nan"]) == (2, "mc,md")
    for mix in mixes:
        assert row[mix] == pytest.approx(np.mean([per[m][0][mix] for m in per])), mix
    assert row["best_gain"] == pytest.approx(row["geomean"] - row["identity"])
    # n over the models it rests on; every image of a left-out model counts as dropped
    assert row["n"] == sum(n for _, n in per.values())
    assert row["n_dropped"] == (4 - per["mb"][1]) + 3 + 3
    # stage2 (identity only): mc has no stage2 row, md neither
    deep = d.loc[("mean", "stage2")]
    assert (deep["n_models"], deep["models_nan"], deep["identity"]) == (2, "mc,md", pytest.approx((1.3 + 1.25) / 2))


def test_refinecam_expectations_say_when_a_mean_rests_on_fewer_models():
    df, config = _partial_refine_case(), {"layers": ["stage1", "stage2"]}
    c, d = A.table_refine(df, config), A.table_aggregators(df, config)
    exp = A.check_expectations({"c_refinecam": c, "d_aggregators": d}).set_index("expectation")
    mean = c[(c.model == "mean") & (c.method == "gradcam")].iloc[0]
    raise_ = exp.loc["RefineCAM raises ARCC at the shallowest layer (Table 1)"]
    assert raise_["found"] == (f"1/1 methods improve: gradcam {mean.base:.3f}->{mean.refined:.3f} "
                               "(mean of 2/4 models, without mc, md)")
    best = exp.loc["Product is the best aggregator (Table 2)"]
    assert best["found"] == ("best mix at the shallowest layer: {'gradcam': 'geomean'}; "
                             "gradcam: mean of 2/4 models, without mc, md")
    # on every model: the texts as before
    full = A.check_expectations({"c_refinecam": A.table_refine(_refine_case(), config),
                                 "d_aggregators": A.table_aggregators(_refine_case(), config)})
    assert not full["found"].str.contains("models").any()


def _trivial_models_case():
    """adcc (higher is better), one image per model; real means gradcam / lime, halfcam's score:
    ma: 0.2 / 0.6, halfcam 0.5 (fooled);  mb: 0.4 / 0.8, halfcam 0.5 (fooled);
    mc: 0.0 / 1.0, halfcam NaN (unscored: its real range must not widen the verdict's);
    md: halfcam 0.5 but no real method rows at all (unscored, not skipped)."""
    real = {"ma": (0.2, 0.6), "mb": (0.4, 0.8), "mc": (0.0, 1.0)}
    half = {"ma": 0.5, "mb": 0.5, "mc": np.nan, "md": 0.5}
    rows = []
    for model, (g, l) in real.items():
        rows += [dict(model=model, image=0, method="gradcam", metric="adcc", value=g),
                 dict(model=model, image=0, method="lime", metric="adcc", value=l)]
    for model, v in half.items():
        rows.append(dict(model=model, image=0, method="halfcam", metric="adcc", value=v))
    return make_results_frame(rows)


def test_trivial_verdict_columns_rest_on_the_scored_models():
    """The verdict's real_worst / real_best averaged every model (mc's wider range too) while
    trivial_score averaged only the scored ones, so the columns compared different models."""
    per_model, verdict = A.table_trivial(_trivial_models_case())
    v = verdict.set_index(["metric", "trivial"]).loc[("adcc", "halfcam")]
    assert v["trivial_score"] == 0.5
    assert (v["real_worst"], v["real_best"]) == pytest.approx(((0.2 + 0.4) / 2, (0.6 + 0.8) / 2))
    t = per_model.set_index("model")
    assert (t.loc["mc", "real_worst"], t.loc["mc", "real_best"]) == (0.0, 1.0)  # shown per model
    assert pd.isna(t.loc["mc", "fooled"])


def test_a_model_without_real_rows_is_an_unscored_model_not_a_skipped_one():
    """md has HalfCAM rows but no real method's: it was left out of table b, so the verdict said
    "fooled" over 3 models and an expectation resting on it "holds" though md was never checked."""
    df = _trivial_models_case()
    df = df[df.model != "mc"]
    per_model, verdict = A.table_trivial(df)
    md = per_model.set_index("model").loc["md"]
    assert md["n_real"] == 0 and np.isnan(md["real_worst"]) and md["trivial_score"] == 0.5
    assert pd.isna(md["fooled"]) and np.isnan(md["real_beaten"])
    v = verdict.set_index(["metric", "trivial"]).loc[("adcc", "halfcam")]
    assert (v["models"], v["models_unscored"], v["models_nan"]) == (3, 1, "md")
    assert v["verdict"] == "fooled, 1/3 models unscored"
    exp = A.check_expectations({"b_trivial_verdict": verdict}).set_index("expectation")
    assert exp.loc["HalfCAM fools adcc (Fig. 1)", "status"] == "n/a"
    # both kinds of unscored model named together
    _, verdict = A.table_trivial(_trivial_models_case())
    v = verdict.set_index(["metric", "trivial"]).loc[("adcc", "halfcam")]
    assert (v["models"], v["models_unscored"], v["models_nan"]) == (4, 2, "mc,md")


def test_fig3a_expectation_says_when_a_correlation_rests_on_fewer_models():
    """Table a's summary row of a metric without a correlation on one model averages the others
    only; the expectation's ranking printed it as a mean over all models."""
    from validation.analyze import check_expectations

    def row(metric, r, n_models, models_nan):
        return {"model": "mean+-std", "metric": metric, "level": "pairs", "pearson": r,
                "n_models": n_models, "models_nan": models_nan}

    a = pd.DataFrame([row("arcc", 0.6, 2, ""), row("road", 0.5, 1, "vgg"), row("average_drop", -0.1, 2, "")])
    found = check_expectations({"a_validity": a}).set_index("expectation")["found"]
    text = found["ARCC correlates best with the ground-truth cosine (Fig. 3a)"]
    assert "road +0.50 (mean of 1/2 models, without vgg)" in text
    assert "arcc +0.60," in text and "average_drop +0.10" in text  # AD oriented; full means unmarked


# ----------------------------------------------------------------------------- table e
def _localisation_case():
    """lafam@stage1 on three models: mb has one NaN gt_cosine sample, mc none finite (left out of
    the mean, its samples counted); md has no lafam row at all; relax (layer-free) on every model;
    gradcam on md only."""
    vals = {"ma": {"pointing_game": [1.0, 0.0], "gt_cosine": [0.2, 0.4]},
            "mb": {"pointing_game": [1.0, 1.0], "gt_cosine": [0.6, np.nan]},
            "mc": {"pointing_game": [0.0, 0.0], "gt_cosine": [np.nan, np.nan]}}
    rows = [dict(model=model, image=img, method="lafam", layer="stage1", metric=metric, value=v)
            for model, per in vals.items() for metric, vs in per.items() for img, v in enumerate(vs)]
    rows += [dict(model=m, image=0, method="relax", layer="-", metric="gt_cosine", value=0.1 * k)
             for k, m in enumerate(("ma", "mb", "mc", "md"))]
    rows.append(dict(model="md", image=0, method="gradcam", layer="stage1", metric="gt_cosine", value=0.5))
    return make_results_frame(rows)


def test_localisation_mean_rows_say_on_how_many_models_they_rest():
    """Table e's mean rows averaged each column over whichever models had a value (pandas skips
    NaN) and said nothing: lafam's pointing game averaged mc's 0.0 while its cosine did not (mc has
    none), so the row's columns rested on different models, and md (no lafam row) went unnamed."""
    e = A.table_localisation(_localisation_case()).set_index(["model", "method", "layer"])
    lafam = e.loc[("mean", "lafam", "stage1")]
    assert (lafam["n_models"], lafam["models_nan"]) == (2, "mc,md")
    assert (lafam["pointing_game"], lafam["gt_cosine"]) == pytest.approx(((0.5 + 1.0) / 2, (0.3 + 0.6) / 2))
    # left out of the mean: mb's NaN sample, and every sample of mc
    assert (lafam["pointing_game_n_nan"], lafam["gt_cosine_n_nan"]) == (0 + 0 + 2, 0 + 1 + 2)
    relax = e.loc[("mean", "relax", "-")]
    assert (relax["n_models"], relax["models_nan"], relax["gt_cosine"]) == (4, "", pytest.approx(0.15))
    assert pd.isna(relax["pointing_game"]) and pd.isna(relax["pointing_game_n_nan"])  # no model has it
    gradcam = e.loc[("mean", "gradcam", "stage1")]
    assert (gradcam["n_models"], gradcam["models_nan"], gradcam["gt_cosine"]) == (1, "ma,mb,mc", 0.5)
    mc = e.loc[("mc", "lafam", "stage1")]
    assert (mc["n_models"], mc["models_nan"], mc["pointing_game"], mc["gt_cosine_n_nan"]) == (1, "", 0.0, 2)


def test_localisation_has_a_row_only_for_what_the_run_computed():
    """pivot_table(dropna=False) filled in every combination of the index levels: rows of NaN for
    relax@stage1, lafam@- and gradcam on models that never computed it (the shipped benchmark's
    table e had 12 of them)."""
    e = A.table_localisation(_localisation_case())
    computed = {("ma", "lafam", "stage1"), ("mb", "lafam", "stage1"), ("mc", "lafam", "stage1"),
                ("md", "gradcam", "stage1")} | {(m, "relax", "-") for m in ("ma", "mb", "mc", "md")}
    computed |= {("mean", method, layer) for _, method, layer in computed}
    assert set(zip(e.model, e.method, e.layer)) == computed and len(e) == len(computed)
