"""analyze: tables a-f on synthetic long tables with planted answers; scipy is the reference."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from validation import analyze as A
from validation.pipeline.table import make_results_frame

REAL = [("gradcam", "layer1"), ("gradcam", "layer4"), ("gradcampp", "layer1"), ("lafam", "layer1"),
        ("lime", "-"), ("deeplift", "-")]


def synthetic_table(n_images=40, models=("m_a", "m_b"), seed=0):
    """Long table with planted metrics.

    gt_cosine ~ U(0, 1) per (image, config) plus a per-config offset; ``perfect`` equals it;
    ``noise`` is independent; ``average_drop`` is 1 - gt (lower is better, perfect inversely);
    trivial maps: HalfCAM scores mid-range on ``fooled_metric`` and far below on ``robust_metric``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for model in models:
        for img in range(n_images):
            for k, (method, layer) in enumerate(REAL):
                mixes = ["identity", "product", "geomean"] if method == "gradcampp" else ["identity"]
                for mix in mixes:
                    gt = 0.1 * k + 0.5 * rng.random() + (0.1 if mix == "product" else 0.0)
                    vals = {"gt_cosine": gt, "perfect": gt, "noise": rng.random(),
                            "average_drop": 1.0 - gt, "fooled_metric": gt, "robust_metric": gt,
                            "arcc": gt + (0.2 if mix == "product" else 0.0)}
                    for f in (0.2, 0.4):
                        vals[f"road_morf@{f}"] = 0.9 - f - 0.1 * k
                        vals[f"road_lerf@{f}"] = 0.9 - f / 4
                    for metric, v in vals.items():
                        rows.append(dict(image=img, model=model, method=method, layer=layer, mix=mix,
                                         metric=metric, value=v))
            for trivial in A.TRIVIAL_MAPS:
                vals = {"gt_cosine": 0.3, "perfect": 0.3, "noise": rng.random(), "average_drop": 0.7,
                        "fooled_metric": 0.5 if trivial == "halfcam" else -5.0,
                        "robust_metric": -5.0, "arcc": 0.0}
                for metric, v in vals.items():
                    rows.append(dict(image=img, model=model, method=trivial, layer="-", mix="identity",
                                     metric=metric, value=v))
    return make_results_frame(rows)


@pytest.fixture(scope="module")
def table():
    return synthetic_table()


def test_weighted_ranks_equal_scipy_on_repeated_sample():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, size=30).astype(float)  # many ties
    w = rng.integers(0, 4, size=(3, 30)).astype(float)
    ranks = A.weighted_ranks(x, w)
    for b in range(3):
        keep = w[b] > 0
        rep = np.repeat(x[keep], w[b][keep].astype(int))
        ref = stats.rankdata(rep)
        expected = np.repeat(ranks[b][keep], w[b][keep].astype(int))
        np.testing.assert_allclose(expected, ref)


def test_weighted_correlations_equal_scipy_on_materialised_replicate():
    rng = np.random.default_rng(2)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    x[::7] = x[0]  # ties
    w = rng.integers(0, 3, size=(4, 50)).astype(float)
    pear, spear = A.weighted_pearson(x, y, w), A.weighted_spearman(x, y, w)
    for b in range(4):
        xr, yr = np.repeat(x, w[b].astype(int)), np.repeat(y, w[b].astype(int))
        assert pear[b] == pytest.approx(stats.pearsonr(xr, yr)[0], abs=1e-12)
        assert spear[b] == pytest.approx(stats.spearmanr(xr, yr)[0], abs=1e-12)


def test_correlations_follow_scipy_at_any_scale_and_are_nan_for_a_constant_side():
    rng = np.random.default_rng(4)
    y = rng.normal(size=60)
    x = 0.6 * y + rng.normal(size=60)
    ones = np.ones((1, 60))
    rows = lambda a, b: A._rowwise_weighted_pearson(a[None], b[None], ones)[0]  # noqa: E731
    # one side's scale must not decide for the other (a tolerance from max(|x|, |y|) did)
    for sx, sy in ((1e-7, 1.0), (1.0, 1e-7), (1e-9, 1e3), (1.0, 1.0)):
        xs, ys = x * sx, y * sy
        ref_p, ref_s = stats.pearsonr(xs, ys)[0], stats.spearmanr(xs, ys)[0]
        assert A.weighted_pearson(xs, ys, ones)[0] == pytest.approx(ref_p, abs=1e-12)
        assert A.weighted_spearman(xs, ys, ones)[0] == pytest.approx(ref_s, abs=1e-12)
        assert rows(xs, ys) == pytest.approx(ref_p, abs=1e-12)
    # constant up to float rounding: no correlation (scipy: NaN for an exactly constant input),
    # whatever the constant's scale; an absolute cutoff gave rounding noise a finite r
    for c in (0.1, 123.456, 1e-9):
        flat = c * (1 + rng.normal(size=60) * 1e-15)
        with pytest.warns(stats.ConstantInputWarning):
            assert np.isnan(stats.pearsonr(np.full(60, c), y)[0])
        assert np.isnan(A.weighted_pearson(flat, y, ones)[0]) and np.isnan(A.weighted_pearson(y, flat, ones)[0])
        assert np.isnan(A.weighted_spearman(np.full(60, c), y, ones)[0])
        assert np.isnan(rows(flat, y)) and np.isnan(rows(y, flat))
        # a bootstrap replicate that draws only tied values is constant too
        w = np.zeros((1, 60))
        w[0, :5] = 2.0
        tied = y.copy()
        tied[:5] = c
        assert np.isnan(A.weighted_pearson(tied, x, w)[0])
        assert np.isnan(A._rowwise_weighted_pearson(tied[None], x[None], w)[0])


def test_a_side_constant_up_to_rounding_has_no_spearman_either():
    """Pearson is NaN for a side constant up to rounding; its Spearman used to stay finite, the
    correlation of the rounding noise's ranks, in table a's per-model rows."""
    rng = np.random.default_rng(7)
    y = rng.normal(size=40)
    flat = 0.5 * (1 + rng.normal(size=40) * 1e-9)  # float32-like noise on a constant metric
    assert np.isfinite(stats.spearmanr(flat, y)[0])  # the noise does have ranks
    counts = A.image_bootstrap_counts(40, 30, seed=0)
    c = A.pair_correlation(flat, y, np.arange(40), counts)
    assert np.isnan(c.pearson) and np.isnan(c.spearman)
    assert np.isnan(c.pearson_boot).all() and np.isnan(c.spearman_boot).all()
    # the same across configurations' means: 5 configurations x 8 images
    m = A.means_correlation(flat.reshape(8, 5), y.reshape(8, 5), A.image_bootstrap_counts(8, 30, seed=0))
    assert np.isnan(m.pearson) and np.isnan(m.spearman) and np.isnan(m.spearman_boot).all()
    # a varying side keeps both (the guard is tied to Pearson's constancy test only)
    varying = y + rng.normal(size=40)
    v = A.pair_correlation(varying, y, np.arange(40), counts)
    assert v.spearman == pytest.approx(stats.spearmanr(varying, y)[0], abs=1e-12)
    assert np.isfinite(v.spearman_boot).all()


def test_validity_planted_correlations(table):
    t = A.table_validity(table, n_boot=200, seed=0)
    one = t[(t.model == "m_a")].set_index(["metric", "level"])
    for level in ("pairs", "method_means"):
        assert one.loc[("perfect", level), "pearson"] == pytest.approx(1.0)
        assert one.loc[("perfect", level), "spearman"] == pytest.approx(1.0)
        assert one.loc[("perfect", level), "pearson_lo"] == pytest.approx(1.0)
        assert one.loc[("average_drop", level), "spearman"] == pytest.approx(-1.0)
    noise = one.loc[("noise", "pairs")]
    assert abs(noise["pearson"]) < 0.15 and noise["pearson_lo"] < 0 < noise["pearson_hi"]
    assert noise["pearson_hi"] - noise["pearson_lo"] > 0.05  # a real interval, not a point


def test_validity_point_estimates_equal_scipy(table):
    t = A.table_validity(table, n_boot=50, seed=0).set_index(["model", "metric", "level"])
    real = table[~table.method.isin(A.BASELINES) & (table.model == "m_b")]
    w = real.pivot_table(index=["image", "method", "layer", "mix"], columns="metric", values="value")
    row = t.loc[("m_b", "noise", "pairs")]
    assert row["pearson"] == pytest.approx(stats.pearsonr(w["noise"], w["gt_cosine"])[0], abs=1e-12)
    assert row["spearman"] == pytest.approx(stats.spearmanr(w["noise"], w["gt_cosine"])[0], abs=1e-12)
    assert row["n"] == len(w)
    means = w.groupby(level=["method", "layer", "mix"]).mean()
    row = t.loc[("m_b", "noise", "method_means")]
    assert row["n"] == len(means)
    assert row["pearson"] == pytest.approx(stats.pearsonr(means["noise"], means["gt_cosine"])[0], abs=1e-12)
    assert row["spearman"] == pytest.approx(stats.spearmanr(means["noise"], means["gt_cosine"])[0], abs=1e-12)
    per_model = [t.loc[(m, "noise", "pairs"), "pearson"] for m in ("m_a", "m_b")]
    summary = t.loc[("mean+-std", "noise", "pairs")]
    assert summary["pearson"] == pytest.approx(np.mean(per_model))
    assert summary["pearson_std"] == pytest.approx(np.std(per_model))
    assert summary["n_models"] == 2
    assert np.isnan(t.loc[("m_a", "noise", "pairs"), "pearson_std"])  # one model: no spread


def _three_models(seed, values):
    """Results of models A, B, C on 12 images x REAL: gt_cosine plus ``values(model, gt, rng)``,
    a {metric: value} dict per (image, configuration)."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("A", "B", "C"):
        for img in range(12):
            for k, (method, layer) in enumerate(REAL):
                gt = 0.1 * k + rng.random()
                rows += [dict(image=img, model=model, method=method, layer=layer, metric=m, value=v)
                         for m, v in {"gt_cosine": gt, **values(model, gt, rng)}.items()]
    return make_results_frame(rows)


def test_mean_over_models_counts_only_models_with_a_correlation():
    # C: constant, no correlation
    frame = _three_models(5, lambda model, gt, rng: {"m": {"A": gt + 0.01 * rng.random(), "B": -gt, "C": 0.5}[model]})
    t = A.table_validity(frame, n_boot=30).set_index(["model", "metric", "level"])
    for level in ("pairs", "method_means"):
        per = t.loc[[("A", "m", level), ("B", "m", level), ("C", "m", level)]]
        assert per["pearson"].iloc[0] > 0.9 and per["pearson"].iloc[1] == pytest.approx(-1.0)
        assert np.isnan(per["pearson"].iloc[2])
        summary = t.loc[("mean+-std", "m", level)]
        assert summary["n_models"] == 2 and summary["models_nan"] == "C"
        assert summary["n"] == per["n"].iloc[0] + per["n"].iloc[1]
        assert summary["pearson"] == pytest.approx(per["pearson"].iloc[:2].mean())
        assert summary["pearson_std"] == pytest.approx(np.std(per["pearson"].iloc[:2]))


def test_paired_mean_counts_only_models_with_both_correlations():
    def values(model, gt, rng):
        good = gt + 0.01 * rng.random()
        return {"good": good, "bad": {"A": rng.random(), "B": -gt, "C": 0.5}[model]}  # C: constant

    t = A.table_paired(_three_models(6, values), n_boot=30, pairs=[("good", "bad")]).set_index("model")
    assert np.isnan(t.loc["C", "pearson_diff"]) and t.loc[["A", "B"], "pearson_diff"].notna().all()
    mean = t.loc["mean"]
    assert mean["n_models"] == 2 and mean["models_nan"] == "C"
    assert mean["n"] == t.loc["A", "n"] + t.loc["B", "n"]
    assert mean["pearson_diff"] == pytest.approx(t.loc[["A", "B"], "pearson_diff"].mean())


def test_validity_with_one_model_reports_no_spread(table):
    t = A.table_validity(table[table.model == "m_a"], n_boot=20, seed=0).set_index(["model", "metric", "level"])
    summary = t.loc[("mean+-std", "noise", "pairs")]
    assert summary["n_models"] == 1
    assert summary["pearson"] == pytest.approx(t.loc[("m_a", "noise", "pairs"), "pearson"])
    assert np.isnan(summary["pearson_std"]) and np.isnan(summary["spearman_std"])


def test_bootstrap_replicates_equal_explicit_image_resampling(table):
    """A replicate = resample images with replacement, keep all their configs, scipy on the result."""
    real = table[~table.method.isin(A.BASELINES) & (table.model == "m_a")]
    w = real.pivot_table(index=["image", "method", "layer", "mix"], columns="metric", values="value")
    images = w.index.get_level_values("image").to_numpy()
    uniq, codes = np.unique(images, return_inverse=True)
    counts = A.image_bootstrap_counts(len(uniq), 5, seed=3)
    c = A.pair_correlation(w["noise"].to_numpy(), w["gt_cosine"].to_numpy(), codes, counts)
    for b in range(5):
        picks = np.repeat(uniq, counts[b].astype(int))
        sample = pd.concat([w.loc[[i]] for i in picks])
        assert c.pearson_boot[b] == pytest.approx(stats.pearsonr(sample["noise"], sample["gt_cosine"])[0], abs=1e-10)
        assert c.spearman_boot[b] == pytest.approx(stats.spearmanr(sample["noise"], sample["gt_cosine"])[0], abs=1e-10)


def test_nan_values_are_dropped_and_counted(table):
    t2 = table.copy()
    hit = (t2.metric == "noise") & (t2.image < 5) & (t2.model == "m_a")
    t2.loc[hit, "value"] = np.nan
    t2.loc[hit, "status"] = "nan"
    t = A.table_validity(t2, n_boot=20).set_index(["model", "metric", "level"])
    real_configs = 8  # 6 REAL entries, gradcampp with 3 mixes
    assert t.loc[("m_a", "noise", "pairs"), "n_dropped"] == 5 * real_configs
    assert t.loc[("m_a", "noise", "pairs"), "n"] == 35 * real_configs


def test_trivial_verdicts(table):
    per_model, verdict = A.table_trivial(table)
    v = verdict.set_index(["metric", "trivial"])["verdict"]
    assert v[("fooled_metric", "halfcam")] == "fooled"
    assert v[("fooled_metric", "randomcam")] == "not fooled"
    assert v[("robust_metric", "halfcam")] == "not fooled"
    # lower is better for AD: trivial 0.7 vs real 1 - gt in about [0.1, 1.0] -> inside the range
    assert v[("average_drop", "halfcam")] == "fooled"
    row = per_model.set_index(["model", "metric", "trivial"]).loc[("m_a", "fooled_metric", "halfcam")]
    assert row["trivial_score"] == pytest.approx(0.5)
    assert row["real_worst"] < 0.5 < row["real_best"]


def test_trivial_mixed_verdict_when_models_disagree(table):
    t2 = table.copy()
    sel = (t2.model == "m_b") & (t2.method == "halfcam") & (t2.metric == "fooled_metric")
    t2.loc[sel, "value"] = -5.0
    _, verdict = A.table_trivial(t2)
    v = verdict.set_index(["metric", "trivial"]).loc[("fooled_metric", "halfcam")]
    assert v["verdict"].startswith("mixed (1/2")


def test_refine_and_aggregators(table):
    c = A.table_refine(table, {"layers": ["layer1", "layer4"]})
    arcc = c[(c.metric == "arcc") & (c.model == "m_a")].iloc[0]
    assert arcc["method"] == "gradcampp" and arcc["layer"] == "layer1"
    # planted: arcc(product) = gt(product) + 0.2 and gt(product) carries +0.1 in expectation
    assert arcc["delta"] == pytest.approx(c[(c.metric == "gt_cosine") & (c.model == "m_a")].iloc[0]["delta"] + 0.2)
    assert set(c.model) == {"m_a", "m_b", "mean"}
    d = A.table_aggregators(table, {"layers": ["layer1", "layer4"]})
    row = d[(d.model == "mean") & (d.metric == "arcc")].iloc[0]
    assert list(d.columns[4:7]) == ["identity", "product", "geomean"]
    assert row["best"] == "product"
    assert row["best_gain"] == pytest.approx(row["product"] - row["identity"])
    # the best aggregator is chosen among the aggregators even where refining hurts (identity
    # highest), and layers without refined scores have none
    worse = table.copy()
    hit = (worse.mix == "identity") & (worse.method == "gradcampp") & (worse.metric == "arcc")
    worse.loc[hit, "value"] += 10.0
    deepest = worse[hit].assign(layer="layer4")  # an unrefined layer: identity only
    worse = pd.concat([worse, deepest], ignore_index=True)
    d2 = A.table_aggregators(worse, {"layers": ["layer1", "layer4"]})
    row2 = d2[(d2.model == "mean") & (d2.metric == "arcc") & (d2.layer == "layer1")].iloc[0]
    assert row2["best"] == "product" and row2["best_gain"] < 0
    deep = d2[(d2.metric == "arcc") & (d2.layer == "layer4")]
    assert len(deep) and deep["best"].isna().all() and deep["best_gain"].isna().all()


def test_localisation_and_road_curves(table):
    e = A.table_localisation(table)
    assert set(e.method) == {"gradcam", "lafam"} and "gt_cosine" in e.columns
    assert (e["gt_cosine_n_nan"] == 0).all()
    # NaN samples are left out of the mean and counted, per model and summed in the mean row
    t2 = table.copy()
    hit = (t2.metric == "gt_cosine") & (t2.method == "lafam") & (t2.image < 3) & (t2.model == "m_a")
    t2.loc[hit, "value"], t2.loc[hit, "status"] = np.nan, "nan"
    e = A.table_localisation(t2).set_index(["model", "method", "layer"])
    assert e.loc[("m_a", "lafam", "layer1"), "gt_cosine_n_nan"] == 3
    assert e.loc[("m_b", "lafam", "layer1"), "gt_cosine_n_nan"] == 0
    assert e.loc[("mean", "lafam", "layer1"), "gt_cosine_n_nan"] == 3
    kept = t2[(t2.model == "m_a") & (t2.method == "lafam") & (t2.metric == "gt_cosine") & ~hit]
    assert e.loc[("m_a", "lafam", "layer1"), "gt_cosine"] == pytest.approx(kept.value.mean())
    f = A.table_road_curves(table)
    row = f[(f.model == "m_a") & (f.method == "lime") & (f.order == "MORF") & (f.fraction == 0.4)].iloc[0]
    assert row["prob"] == pytest.approx(0.9 - 0.4 - 0.1 * 4)
    assert row["n"] == 40


def test_curve_metrics_excluded_from_validity(table):
    t = A.table_validity(table, n_boot=10)
    assert not t.metric.str.contains("@").any()


def test_missing_reference_metric_is_a_clear_error(table):
    with pytest.raises(ValueError, match="gt_cosine"):
        A.table_validity(table[table.metric != "gt_cosine"], n_boot=10)


def test_markdown_and_written_tables(table, tmp_path):
    tables = A.analyze_frame(table, {"layers": ["layer1", "layer4"]}, n_boot=20)
    A.write_tables(tables, tmp_path)
    md = (tmp_path / "tables.md").read_text()
    for name in A.TABLES:
        assert f"## {name}" in md
        back = pd.read_csv(tmp_path / f"{name}.csv")
        assert len(back) == len(tables[name])


def _paper_like_table(arcc_best=True, n_images=30, seed=4):
    """Planted: ARCC ~ gt, ROAD noisier, ADCC weak, AD (lower better) weakest; HalfCAM scores
    well on AD and ADCC but poorly on ROAD and ARCC; RefineCAM raises ARCC at layer1."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("m1", "m2"):
        for img in range(n_images):
            for k, (method, layer, mix) in enumerate([("gradcampp", "layer1", "identity"),
                                                       ("gradcampp", "layer1", "product"),
                                                       ("gradcampp", "layer1", "geomean"),
                                                       ("layercam", "layer1", "identity"),
                                                       ("layercam", "layer1", "product"),
                                                       ("layercam", "layer1", "geomean"),
                                                       ("gradcam", "layer4", "identity"), ("lime", "-", "identity")]):
                gt = rng.random()
                noise = rng.normal(size=4)
                arcc = (gt if arcc_best else rng.random()) + (0.3 if mix == "product" else 0.1 if mix == "geomean" else 0)
                vals = {"gt_cosine": gt, "arcc": arcc, "road": gt + 0.5 * noise[0],
                        "adcc": gt + 2 * noise[1], "average_drop": 0.5 - 0.05 * gt + 2 * noise[2] ** 2}
                for metric, v in vals.items():
                    rows.append(dict(image=img, model=model, method=method, layer=layer, mix=mix, metric=metric, value=v))
            for trivial in A.TRIVIAL_MAPS:
                good = trivial == "halfcam"
                vals = {"gt_cosine": 0.2, "arcc": -1.0, "road": -1.0, "adcc": 5.0 if good else -9.0,
                        "average_drop": -5.0 if good else 9.0}
                for metric, v in vals.items():
                    rows.append(dict(image=img, model=model, method=trivial, layer="-", mix="identity", metric=metric, value=v))
    return make_results_frame(rows)


def test_expectations_hold_on_a_paper_like_table():
    tables = A.analyze_frame(_paper_like_table(), {"layers": ["layer1", "layer4"]}, n_boot=20)
    exp = tables["expectations"].set_index("expectation")["status"]
    assert (exp == "holds").all(), tables["expectations"].to_string()
    assert len(exp) == 10


def test_expectations_fail_when_the_data_disagree():
    tables = A.analyze_frame(_paper_like_table(arcc_best=False), {"layers": ["layer1", "layer4"]}, n_boot=20)
    exp = tables["expectations"].set_index("expectation")["status"]
    assert exp["ARCC correlates best with the ground-truth cosine (Fig. 3a)"] == "FAILS"
    assert exp["ARCC correlates best with the ground-truth cosine, on the same maps (Fig. 3a)"] == "FAILS"
    assert exp["HalfCAM fools average_drop (Fig. 1)"] == "holds"


def test_paired_differences_equal_scipy_on_common_rows(table):
    """Paired table: both correlations over the rows where both metrics are finite, oriented."""
    t = table.copy()
    drop = (t.metric == "noise") & (t.image % 5 == 0)  # 'noise' missing on some images only
    t.loc[drop, "value"] = np.nan
    out = A.table_paired(t, n_boot=200, seed=0, metrics=["noise", "average_drop", "perfect"])
    assert len(out) == 3 * 2 + 3  # 3 pairs x 2 models + 3 mean rows
    row = out[(out.model == "m_a") & (out.metric == "noise") & (out.versus == "average_drop")].iloc[0]
    real = t[~t.method.isin(A.BASELINES) & (t.model == "m_a")]
    w = real.pivot_table(index=["image", "method", "layer", "mix"], columns="metric", values="value", dropna=False)
    common = w.dropna(subset=["noise", "average_drop", "gt_cosine"])
    assert row["n"] == len(common) < len(w)
    r_noise = stats.pearsonr(common["noise"], common["gt_cosine"])[0]
    r_ad = -stats.pearsonr(common["average_drop"], common["gt_cosine"])[0]  # lower is better: flipped
    assert row["pearson_metric"] == pytest.approx(r_noise, abs=1e-12)
    assert row["pearson_versus"] == pytest.approx(r_ad, abs=1e-12) and r_ad == pytest.approx(1.0)
    assert row["pearson_diff"] == pytest.approx(r_noise - r_ad, abs=1e-12)
    assert row["pearson_diff_hi"] < 0  # noise is clearly worse than a perfect (inverted) metric
    tie = out[(out.model == "m_a") & (out.metric == "average_drop") & (out.versus == "perfect")].iloc[0]
    assert tie["pearson_diff"] == pytest.approx(0, abs=1e-12)
    assert tie["pearson_diff_lo"] == pytest.approx(0, abs=1e-9) and tie["pearson_diff_hi"] == pytest.approx(0, abs=1e-9)
    mean = out[(out.model == "mean") & (out.metric == "noise") & (out.versus == "average_drop")].iloc[0]
    per_model = out[(out.model != "mean") & (out.metric == "noise") & (out.versus == "average_drop")]
    assert mean["pearson_diff"] == pytest.approx(per_model["pearson_diff"].mean())
    assert mean["n"] == per_model["n"].sum()


def test_paired_interval_is_tighter_than_unpaired_when_metrics_share_noise():
    """Two metrics = gt + the same big noise + small own noise: their correlations differ
    little and consistently, which only the paired interval can show."""
    rng = np.random.default_rng(7)
    rows = []
    for img in range(200):
        for k in range(6):
            gt = rng.random()
            shared = rng.normal()
            vals = {"gt_cosine": gt, "arcc": gt + 0.3 * shared,
                    "road": gt + 0.3 * shared + 0.15 * rng.normal()}
            for metric, v in vals.items():
                rows.append(dict(image=img, model="m", method=f"meth{k}", layer="-", mix="identity",
                                 metric=metric, value=v))
    t = make_results_frame(rows)
    paired = A.table_paired(t, n_boot=300, seed=0).set_index(["model", "metric", "versus"])
    row = paired.loc[("m", "road", "arcc")]
    assert row["pearson_diff"] < 0 and row["pearson_diff_hi"] < 0  # road significantly worse
    valid = A.table_validity(t, n_boot=300, seed=0).set_index(["model", "metric", "level"])
    road, arcc = valid.loc[("m", "road", "pairs")], valid.loc[("m", "arcc", "pairs")]
    assert road["pearson_hi"] > arcc["pearson_lo"]  # the unpaired intervals overlap
    exp = A.check_expectations({"a_validity": valid.reset_index(), "a_paired": paired.reset_index()})
    found = exp.set_index("expectation").loc["ARCC correlates best with the ground-truth cosine (Fig. 3a)", "found"]
    assert "on the same maps arcc - road = +" in found


def test_paired_expectation_removes_the_row_set_confound():
    """ARCC undefined on structureless maps where ROAD and the cosine are both low: over their
    own rows ROAD 'wins' (those rows stretch its range); on the same maps ARCC is better."""
    rng = np.random.default_rng(5)
    rows = []
    for model in ("m1", "m2"):
        for img in range(60):
            for k in range(6):
                constant = k < 2
                gt = 0.1 * rng.random() if constant else 0.4 + 0.6 * rng.random()
                road = gt + (0.1 if constant else 0.25) * rng.normal()
                arcc = np.nan if constant else gt + 0.2 * rng.normal()
                vals = {"gt_cosine": gt, "road": road, "arcc": arcc, "average_drop": 1 - gt + 0.8 * rng.normal()}
                for metric, v in vals.items():
                    rows.append(dict(image=img, model=model, method=f"meth{k}", layer="-", mix="identity",
                                     metric=metric, value=v))
    tables = A.analyze_frame(make_results_frame(rows), n_boot=200)
    exp = tables["expectations"].set_index("expectation")
    assert exp.loc["ARCC correlates best with the ground-truth cosine (Fig. 3a)", "status"] == "FAILS"
    assert exp.loc["ARCC correlates best with the ground-truth cosine, on the same maps (Fig. 3a)", "status"] == "holds"
    paired = tables["a_paired"]
    row = paired[(paired.model == "mean") & (paired.metric == "road") & (paired.versus == "arcc")].iloc[0]
    assert row["pearson_diff_hi"] < 0  # ROAD significantly worse on the common rows
    assert "on the same maps arcc - road = +" in exp.loc["ARCC correlates best with the ground-truth cosine (Fig. 3a)", "found"]


# ----------------------------------------------------------------------------- intervals, explicitly
def _real_wide(frame, model):
    """(image, method, layer, mix) x metric values of one model's real methods, NaN kept."""
    real = frame[~frame.method.isin(A.BASELINES) & (frame.model == model)]
    return real.set_index(["image", "method", "layer", "mix", "metric"])["value"].unstack("metric")


def _resampled_rows(images, counts_row):
    """Row positions of one explicit bootstrap sample: image i's rows repeated counts_row[i] times
    (the counts index every image of the model, 0..n_images-1, even those without rows here)."""
    return np.concatenate([np.tile(np.flatnonzero(images == i), int(c)) for i, c in enumerate(counts_row)])


def _explicit_pair_replicates(w, metric, counts, sign=1.0, reference="gt_cosine"):
    """Per replicate: resample images (rows of an image move together), scipy on the sample."""
    w = w.dropna(subset=[metric, reference])
    images = w.index.get_level_values("image").to_numpy()
    x, y = sign * w[metric].to_numpy(), w[reference].to_numpy()
    pear, spear = [], []
    for row in counts:
        idx = _resampled_rows(images, row)
        pear.append(stats.pearsonr(x[idx], y[idx])[0])
        spear.append(stats.spearmanr(x[idx], y[idx])[0])
    return np.array(pear), np.array(spear)


def _explicit_means_correlation(w, metric, counts, reference="gt_cosine"):
    """Per replicate: each configuration's mean over the resampled images (with multiplicity,
    over the images where both the metric and the reference are finite), scipy across configs."""
    n_cfg = len(w.groupby(level=["method", "layer", "mix"]))
    w = w[[metric, reference]].dropna()
    images = w.index.get_level_values("image").to_numpy()
    pear, spear = [], []
    for row in counts:
        means = w.iloc[_resampled_rows(images, row)].groupby(level=["method", "layer", "mix"]).mean()
        ok = len(means) == n_cfg  # a configuration with no image drawn: no correlation
        pear.append(stats.pearsonr(means[metric], means[reference])[0] if ok else np.nan)
        spear.append(stats.spearmanr(means[metric], means[reference])[0] if ok else np.nan)
    return np.array(pear), np.array(spear)


def _percentile_ci(boot):
    boot = boot[np.isfinite(boot)]  # as _ci: replicates without a correlation are left out
    return tuple(np.percentile(boot, [2.5, 97.5]))  # numpy's default (linear), as _ci


N_BOOT = 120


def test_pairs_interval_is_the_95_percentile_interval_of_explicit_replicates(table):
    t = A.table_validity(table, n_boot=N_BOOT, seed=0, metrics=["noise"]).set_index(["model", "metric", "level"])
    counts = A.image_bootstrap_counts(40, N_BOOT, 0)
    row = t.loc[("m_a", "noise", "pairs")]
    pear, spear = _explicit_pair_replicates(_real_wide(table, "m_a"), "noise", counts)
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pear), abs=1e-10)
    assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(_percentile_ci(spear), abs=1e-10)


def test_summary_interval_averages_explicit_replicates_over_models(table):
    t = A.table_validity(table, n_boot=N_BOOT, seed=0, metrics=["noise"]).set_index(["model", "metric", "level"])
    counts = A.image_bootstrap_counts(40, N_BOOT, 0)  # the same images drawn for every model
    per_model = [_explicit_pair_replicates(_real_wide(table, m), "noise", counts) for m in ("m_a", "m_b")]
    row = t.loc[("mean+-std", "noise", "pairs")]
    pear = np.mean([p for p, _ in per_model], axis=0)
    spear = np.mean([s for _, s in per_model], axis=0)
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pear), abs=1e-10)
    assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(_percentile_ci(spear), abs=1e-10)


@pytest.mark.parametrize("plant_nan", [False, True])
def test_method_means_point_and_interval_equal_explicit_resampling(table, plant_nan):
    frame = table.copy()
    if plant_nan:
        # 'noise' missing on a few (image, configuration) pairs of m_a; the documented rule: a
        # configuration's mean uses only the images where both the metric and the reference are finite
        hit = ((frame.model == "m_a") & (frame.metric == "noise")
               & (((frame.method == "gradcam") & (frame.layer == "layer1") & (frame.image < 6))
                  | ((frame.method == "lime") & frame.image.isin([3, 17]))))
        frame.loc[hit, ["value", "status"]] = [np.nan, "nan"]
    t = A.table_validity(frame, n_boot=N_BOOT, seed=0, metrics=["noise"]).set_index(["model", "metric", "level"])
    row = t.loc[("m_a", "noise", "method_means")]
    w = _real_wide(frame, "m_a")
    (p0,), (s0,) = _explicit_means_correlation(w, "noise", np.ones((1, 40)))
    assert row["n"] == 8
    assert row["pearson"] == pytest.approx(p0, abs=1e-12)
    assert row["spearman"] == pytest.approx(s0, abs=1e-12)
    if plant_nan:  # the rule matters here: the reference's mean over all images gives another r
        means = w.groupby(level=["method", "layer", "mix"]).mean()  # each column skips its own NaN
        assert abs(stats.pearsonr(means["noise"], means["gt_cosine"])[0] - p0) > 1e-4
    pear, spear = _explicit_means_correlation(w, "noise", A.image_bootstrap_counts(40, N_BOOT, 0))
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pear), abs=1e-10)
    assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(_percentile_ci(spear), abs=1e-10)


def test_paired_spearman_columns_equal_scipy_on_common_rows(table):
    t = table.copy()
    t.loc[(t.metric == "noise") & (t.image % 5 == 0), ["value", "status"]] = [np.nan, "nan"]
    out = A.table_paired(t, n_boot=N_BOOT, seed=0, pairs=[("noise", "average_drop")])
    row = out[(out.model == "m_a") & (out.metric == "noise") & (out.versus == "average_drop")].iloc[0]
    common = _real_wide(t, "m_a").dropna(subset=["noise", "average_drop", "gt_cosine"])
    assert row["n"] == len(common)
    s_noise = stats.spearmanr(common["noise"], common["gt_cosine"])[0]
    s_ad = -stats.spearmanr(common["average_drop"], common["gt_cosine"])[0]  # lower is better: flipped
    assert row["spearman_metric"] == pytest.approx(s_noise, abs=1e-12)
    assert row["spearman_versus"] == pytest.approx(s_ad, abs=1e-12) and s_ad == pytest.approx(1.0)
    assert row["spearman_diff"] == pytest.approx(s_noise - s_ad, abs=1e-12)
    # the difference's interval: both correlations on the same explicit resample of the common rows
    counts = A.image_bootstrap_counts(40, N_BOOT, 0)
    _, s_a = _explicit_pair_replicates(common, "noise", counts)
    _, s_b = _explicit_pair_replicates(common, "average_drop", counts, sign=-1.0)
    assert (row["spearman_diff_lo"], row["spearman_diff_hi"]) == pytest.approx(_percentile_ci(s_a - s_b), abs=1e-10)


def test_refine_delta_and_improved_frac_use_images_with_both_values(table):
    t = table.copy()
    sel = (t.model == "m_a") & (t.method == "gradcampp") & (t.layer == "layer1") & (t.metric == "gt_cosine")
    t.loc[sel & (t.mix == "product") & (t.image < 7), ["value", "status"]] = [np.nan, "nan"]
    t.loc[sel & (t.mix == "identity") & (t.image == 20), ["value", "status"]] = [np.nan, "nan"]
    c = A.table_refine(t, {"layers": ["layer1", "layer4"]}).set_index(["model", "method", "layer", "metric"])
    row = c.loc[("m_a", "gradcampp", "layer1", "gt_cosine")]
    p = t[sel].pivot_table(index="image", columns="mix", values="value", dropna=False)
    both = p.dropna(subset=["identity", "product"])
    assert len(both) == 40 - 7 - 1
    d = both["product"] - both["identity"]
    assert row["delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert row["improved_frac"] == pytest.approx((d > 0).mean(), abs=1e-12)
    assert row["base"] == pytest.approx(both["identity"].mean(), abs=1e-12)
    assert row["refined"] == pytest.approx(both["product"].mean(), abs=1e-12)
    assert row["n"] == len(both)
    assert 0.3 < row["improved_frac"] < 0.95  # a real fraction (gt_cosine: product only +0.1)
    other = c.loc[("m_b", "gradcampp", "layer1", "gt_cosine")]
    mean = c.loc[("mean", "gradcampp", "layer1", "gt_cosine")]
    assert mean["delta"] == pytest.approx((row["delta"] + other["delta"]) / 2)
    assert mean["improved_frac"] == pytest.approx((row["improved_frac"] + other["improved_frac"]) / 2)


def _trivial_frame():
    """One model, two images; every mean is a dyadic fraction, so ties are exact.

    gt_cosine (higher better), complexity (lower better), custom (lower better only when told):
    real means 0.25 / 0.5 / 0.75 (custom: 0.25 / 0.75), the oracle and the NaN/error rows must
    not count."""
    real = {"gradcam": (0.125, 0.375), "lime": (0.5, 0.5), "rise": (0.75, 0.75)}
    trivial = {"gt_cosine": {"halfcam": 0.25, "randomcam": 0.125, "all1scam": 0.5},
               "complexity": {"halfcam": 0.75, "randomcam": 0.875, "all1scam": 0.25},
               "custom": {"halfcam": 0.25, "randomcam": 0.875}}
    rows = []
    for metric in trivial:
        for method, values in real.items():
            if metric == "custom" and method == "lime":
                continue
            for img, v in enumerate(values):
                rows.append(dict(image=img, model="m", method=method, layer="-", mix="identity",
                                 metric=metric, value=v))
        rows.append(dict(image=2, model="m", method="gradcam", layer="-", mix="identity", metric=metric,
                         value=np.nan, status="error", reason="x"))
        for img in range(2):
            rows.append(dict(image=img, model="m", method="oracle", layer="-", mix="identity",
                             metric=metric, value=5.0 if metric == "gt_cosine" else -5.0))
            for method, v in trivial[metric].items():
                rows.append(dict(image=img, model="m", method=method, layer="-", mix="identity",
                                 metric=metric, value=v))
    df = pd.DataFrame(rows)
    return make_results_frame(df.assign(status=df["status"].fillna("ok"), reason=df["reason"].fillna("")))


def test_trivial_real_beaten_and_ties_hand_computed():
    per_model, verdict = A.table_trivial(_trivial_frame(), lower_is_better=("custom",))
    t = per_model.set_index(["metric", "trivial"])
    cols = ["better", "real_worst", "real_median", "real_best", "n_real", "trivial_score", "real_beaten", "fooled"]
    expect = {  # (metric, trivial): better, worst, median, best, n_real, score, beaten, fooled
        ("gt_cosine", "halfcam"): ("higher", 0.25, 0.5, 0.75, 3, 0.25, 1, True),  # tie with the worst
        ("gt_cosine", "randomcam"): ("higher", 0.25, 0.5, 0.75, 3, 0.125, 0, False),
        ("gt_cosine", "all1scam"): ("higher", 0.25, 0.5, 0.75, 3, 0.5, 2, True),  # tie with the median
        ("complexity", "halfcam"): ("lower", 0.75, 0.5, 0.25, 3, 0.75, 1, True),  # tie with the worst
        ("complexity", "randomcam"): ("lower", 0.75, 0.5, 0.25, 3, 0.875, 0, False),
        ("complexity", "all1scam"): ("lower", 0.75, 0.5, 0.25, 3, 0.25, 3, True),  # tie with the best
        ("custom", "halfcam"): ("lower", 0.75, 0.5, 0.25, 2, 0.25, 2, True),
        ("custom", "randomcam"): ("lower", 0.75, 0.5, 0.25, 2, 0.875, 0, False),
    }
    assert sorted(t.index) == sorted(expect)
    for key, values in expect.items():
        assert tuple(t.loc[key, cols]) == values, key
    v = verdict.set_index(["metric", "trivial"])
    assert v.loc[("gt_cosine", "halfcam"), "verdict"] == "fooled"
    assert v.loc[("complexity", "randomcam"), "verdict"] == "not fooled"
    assert v.loc[("complexity", "halfcam"), "models_fooled"] == 1 == v.loc[("complexity", "halfcam"), "models"]
    # without lower_is_better the custom metric is read as higher-is-better: the verdicts flip
    t2 = A.table_trivial(_trivial_frame())[0].set_index(["metric", "trivial"])
    assert t2.loc[("custom", "halfcam"), "better"] == "higher"
    assert tuple(t2.loc[("custom", "halfcam"), ["real_beaten", "fooled"]]) == (1, True)  # 0.25 ties the worst
    assert tuple(t2.loc[("custom", "randomcam"), ["real_beaten", "fooled"]]) == (2, True)


def test_written_csv_round_trips_17_digit_floats(tmp_path):
    floats = [0.1 + 0.2, 1 / 3, np.pi * 1e-300, 1.7976931348623157e308, 5e-324, -2 / 3, np.nan, 123456789.12345679]
    table = pd.DataFrame({"model": [f"m{i}" for i in range(len(floats))], "metric": "gt_cosine",
                          "value": floats, "n": np.arange(len(floats)), "fooled": [True, False] * 4,
                          "verdict": ["mixed (1/2 models fooled)", "not fooled"] * 4})
    assert any(f"{v:.15g}" != repr(v) for v in floats if np.isfinite(v))  # 15 digits would not do
    A.write_tables({"b_trivial": table, "empty": pd.DataFrame()}, tmp_path)
    back = pd.read_csv(tmp_path / "b_trivial.csv")
    pd.testing.assert_frame_equal(back, table, check_dtype=False, check_exact=True)
    md = (tmp_path / "tables.md").read_text()
    assert "## b_trivial: " + A.TABLES["b_trivial"] in md and "_no rows" in md
    assert "| m0 | gt_cosine | 0.300 | 0 | True | mixed (1/2 models fooled) |" in md
    assert "| m6 | gt_cosine | nan |" in md


def _with_failures(table):
    """gradcampp layer1: product fails (error) on images 0-9 of m_a for arcc; deeplift's arcc
    is NaN everywhere on m_a; halfcam's fooled_metric is NaN on m_b."""
    t = table.copy()
    hit = ((t.model == "m_a") & (t.method == "gradcampp") & (t.mix == "product") & (t.metric == "arcc")
           & (t.image < 10))
    t.loc[hit, ["value", "status", "reason"]] = [np.nan, "error", "boom"]
    t.loc[(t.model == "m_a") & (t.method == "deeplift") & (t.metric == "arcc"), ["value", "status"]] = [np.nan, "nan"]
    t.loc[(t.model == "m_b") & (t.method == "halfcam") & (t.metric == "fooled_metric"),
          ["value", "status"]] = [np.nan, "nan"]
    return t


def test_failed_rows_are_counted_and_tables_c_d_stay_paired(table):
    t = _with_failures(table)
    c = A.table_refine(t, {"layers": ["layer1", "layer4"]}).set_index(["model", "method", "metric"])
    row = c.loc[("m_a", "gradcampp", "arcc")]
    assert (row.n, row.n_dropped) == (30, 10)
    ok = t[(t.model == "m_a") & (t.method == "gradcampp") & (t.layer == "layer1") & (t.metric == "arcc")
           & (t.image >= 10)].pivot(index="image", columns="mix", values="value")
    assert row.delta == pytest.approx((ok["product"] - ok["identity"]).mean())
    dl = c.loc[("m_a", "deeplift", "arcc")]  # all NaN: kept, with nothing to average
    assert (dl.n, dl.n_dropped) == (0, 40) and np.isnan(dl.base)
    assert c.loc[("mean", "gradcampp", "arcc")].n_dropped == 10
    d = A.table_aggregators(t, {"layers": ["layer1", "layer4"]})
    drow = d[(d.model == "m_a") & (d.method == "gradcampp") & (d.layer == "layer1") & (d.metric == "arcc")].iloc[0]
    # every column over the same 30 images (geomean included), so best_gain is the paired gain
    assert (drow.n, drow.n_dropped) == (30, 10)
    assert drow.identity == pytest.approx(ok["identity"].mean()) and drow.geomean == pytest.approx(ok["geomean"].mean())
    assert drow.best_gain == pytest.approx(row.delta)


def test_method_means_count_the_configurations_dropped(table):
    t = _with_failures(table)
    a = A.table_validity(t[t.metric.isin(["gt_cosine", "arcc"])], n_boot=20).set_index(["model", "metric", "level"])
    # m_a's deeplift has no finite arcc: one of the real configurations is dropped
    n_configs = len(REAL) + 2  # gradcampp also has product and geomean
    assert a.loc[("m_a", "arcc", "method_means"), "n_dropped"] == 1
    assert a.loc[("m_a", "arcc", "method_means"), "n"] == n_configs - 1
    assert a.loc[("m_b", "arcc", "method_means"), "n_dropped"] == 0
    assert a.loc[("m_a", "arcc", "pairs"), "n_dropped"] == 10 + 40


def test_a_trivial_map_without_a_score_on_a_model_is_unscored_not_skipped(table):
    t = _with_failures(table)
    per_model, verdicts = A.table_trivial(t, metrics=["fooled_metric"])
    half = per_model[per_model.trivial == "halfcam"].set_index("model")
    assert np.isnan(half.loc["m_b", "trivial_score"]) and pd.isna(half.loc["m_b", "fooled"])
    assert bool(half.loc["m_a", "fooled"])
    v = verdicts.set_index("trivial").loc["halfcam"]
    assert v.verdict == "fooled, 1/2 models unscored" and (v.models_fooled, v.models, v.models_unscored) == (1, 2, 1)
    # an expectation resting on it is not checked, not "holds"
    t2 = t.copy()
    t2["metric"] = t2["metric"].replace({"fooled_metric": "average_drop", "average_drop": "unused"})
    tables = {"b_trivial_verdict": A.table_trivial(t2, metrics=["average_drop"])[1]}
    exp = A.check_expectations(tables).set_index("expectation")
    assert exp.loc["HalfCAM fools average_drop (Fig. 1)", "status"] == "n/a"


def _fig3_frame(values, n_images=20, seed=0):
    """Two models, 5 layer-free methods; gt_cosine ~ U(0, 1) plus ``values(gt, rng)``: {metric: value}."""
    rng = np.random.default_rng(seed)
    rows = []
    for model in ("m1", "m2"):
        for img in range(n_images):
            for k in range(5):
                gt = rng.random()
                for metric, v in {"gt_cosine": gt, **values(gt, rng)}.items():
                    ok = np.isfinite(v)
                    rows.append(dict(image=img, model=model, method=f"meth{k}", layer="-", mix="identity",
                                     metric=metric, value=v, status="ok" if ok else "error",
                                     reason="" if ok else "failed"))
    return make_results_frame(rows)


def test_paired_expectation_leaves_out_a_metric_without_correlation():
    """Coherency failed on every map: it has no correlation, in table a (left out of the ranking)
    and in a_paired (NaN difference); ARCC beating every metric that has one holds, not FAILS."""
    frame = _fig3_frame(lambda gt, rng: {"arcc": gt + 0.1 * rng.normal(), "road": gt + 0.5 * rng.normal(),
                                         "coherency": np.nan})
    exp = A.analyze_frame(frame, n_boot=20)["expectations"].set_index("expectation")
    assert exp.loc["ARCC correlates best with the ground-truth cosine (Fig. 3a)", "status"] == "holds"
    same_maps = exp.loc["ARCC correlates best with the ground-truth cosine, on the same maps (Fig. 3a)"]
    assert same_maps["status"] == "holds", same_maps["found"]
    assert "vs road +" in same_maps["found"] and "no paired correlation with coherency" in same_maps["found"]


def test_expectations_when_no_fig3_metric_has_a_correlation_are_not_checked():
    """ARCC and ROAD constant: nothing to rank; 'n/a', not a crash (IndexError) nor a verdict."""
    frame = _fig3_frame(lambda gt, rng: {"arcc": 0.5, "road": 0.25})
    exp = A.analyze_frame(frame, n_boot=20)["expectations"]
    fig3 = exp[exp.expectation.str.contains("Fig. 3a")]
    assert len(fig3) >= 1 and (fig3.status == "n/a").all(), fig3.to_string()
    assert "fewer than two of the Fig. 3a metrics have a correlation" in " ".join(fig3.found)


def test_bootstrap_draws_the_same_images_for_models_with_different_correct_images(table):
    """Each model has rows only for the images it classifies correctly, so the models' image sets
    differ. A replicate must resample the same test images for every model (the summary averages
    the models' replicates, and one image's results under two models are not independent); drawing
    by position in each model's own image list paired different images after the first gap."""
    frame = table[~((table.model == "m_b") & table.image.isin([0, 1, 2]))]  # misclassified by m_b
    t = A.table_validity(frame, n_boot=N_BOOT, seed=0, metrics=["noise"]).set_index(["model", "metric", "level"])
    counts = A.image_bootstrap_counts(40, N_BOOT, 0)  # over the run's 40 images, by image index
    per_model = {m: _explicit_pair_replicates(_real_wide(frame, m), "noise", counts) for m in ("m_a", "m_b")}
    row = t.loc[("m_b", "noise", "pairs")]
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(per_model["m_b"][0]), abs=1e-10)
    row = t.loc[("mean+-std", "noise", "pairs")]
    pear = np.mean([p for p, _ in per_model.values()], axis=0)
    spear = np.mean([s for _, s in per_model.values()], axis=0)
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pear), abs=1e-10)
    assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(_percentile_ci(spear), abs=1e-10)
    pm, _ = _explicit_means_correlation(_real_wide(frame, "m_b"), "noise", counts)
    row = t.loc[("m_b", "noise", "method_means")]
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pm), abs=1e-10)
    # the paired table resamples the same way
    paired = A.table_paired(frame, n_boot=N_BOOT, seed=0, pairs=[("noise", "perfect")]).set_index("model")
    a = [_explicit_pair_replicates(_real_wide(frame, m), "noise", counts)[0] for m in ("m_a", "m_b")]
    b = [_explicit_pair_replicates(_real_wide(frame, m), "perfect", counts)[0] for m in ("m_a", "m_b")]
    diff = np.mean([x - y for x, y in zip(a, b)], axis=0)
    mean = paired.loc["mean"]
    assert (mean["pearson_diff_lo"], mean["pearson_diff_hi"]) == pytest.approx(_percentile_ci(diff), abs=1e-10)


def test_bootstrap_replicates_without_a_correlation_are_counted():
    """A metric that varies on one image only (constant elsewhere) has no correlation in every
    replicate that does not draw that image: those replicates are left out of the interval, and
    ``boot_nan`` says how many (they used to be dropped without a count)."""
    only, n_images, n_boot = 3, 10, 60

    def values(model, gt, rng, image):
        return {"flat": gt if image == only else 0.5, "m": gt + 0.1 * rng.random()}

    rng = np.random.default_rng(2)
    rows = []
    for model in ("A", "B"):
        for img in range(n_images):
            for k, (method, layer) in enumerate(REAL):
                gt = 0.1 * k + rng.random()
                rows += [dict(image=img, model=model, method=method, layer=layer, metric=m, value=v)
                         for m, v in {"gt_cosine": gt, **values(model, gt, rng, img)}.items()]
    frame = make_results_frame(rows)
    counts = A.image_bootstrap_counts(n_images, n_boot, seed=0)
    expected = int((counts[:, only] == 0).sum())
    assert 0 < expected < n_boot  # the case is informative: some replicates miss the image
    t = A.table_validity(frame, n_boot=n_boot, seed=0).set_index(["model", "metric", "level"])
    for model in ("A", "B", "mean+-std"):  # both models resample the same images: the same count
        assert t.loc[(model, "flat", "pairs"), "boot_nan"] == expected
        assert t.loc[(model, "m", "pairs"), "boot_nan"] == 0
    paired = A.table_paired(frame, n_boot=n_boot, seed=0, pairs=[("m", "flat")]).set_index("model")
    assert list(paired["boot_nan"]) == [expected] * 3


def test_summary_replicate_without_every_models_correlation_is_left_out_and_counted():
    """The summary row's point estimate is the mean over its ``n_models`` models, so a replicate of
    it needs every one of them: a replicate where one model has no correlation (its resample holds
    only constant values) is left out of the interval and counted in ``boot_nan``. It used to be
    the mean of the other models alone (``nanmean``): those replicates estimated another quantity,
    shifting the interval, and ``boot_nan`` counted only replicates where every model was NaN."""
    only, n_images, n_boot = 3, 12, 80
    rng = np.random.default_rng(7)
    rows = []
    for model in ("A", "B"):
        for img in range(n_images):
            for k, (method, layer) in enumerate(REAL):
                gt = 0.1 * k + rng.random()
                # B's metric varies on one image only, and runs against the ground truth there;
                # A's tracks it everywhere: the two models' correlations are far apart
                value = gt + 0.3 * rng.random() if model == "A" else (-gt if img == only else 0.5)
                rows += [dict(image=img, model=model, method=method, layer=layer, metric=m, value=v)
                         for m, v in {"gt_cosine": gt, "m": value, "other": gt + rng.random()}.items()]
    frame = make_results_frame(rows)
    counts = A.image_bootstrap_counts(n_images, n_boot, seed=0)
    missed = counts[:, only] == 0
    assert 0 < missed.sum() < n_boot  # some replicates leave B without a correlation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        per_model = [_explicit_pair_replicates(_real_wide(frame, m), "m", counts) for m in ("A", "B")]
    pear = np.mean([p for p, _ in per_model], axis=0)  # NaN where either model has none
    spear = np.mean([s for _, s in per_model], axis=0)
    assert np.isnan(pear[missed]).all() and np.isfinite(pear[~missed]).all()
    t = A.table_validity(frame, n_boot=n_boot, seed=0, metrics=["m"]).set_index(["model", "metric", "level"])
    row = t.loc[("mean+-std", "m", "pairs")]
    assert row["n_models"] == 2 and row["boot_nan"] == missed.sum()
    assert (row["pearson_lo"], row["pearson_hi"]) == pytest.approx(_percentile_ci(pear), abs=1e-10)
    assert (row["spearman_lo"], row["spearman_hi"]) == pytest.approx(_percentile_ci(spear), abs=1e-10)
    # the paired table's mean row averages the models' replicates the same way
    paired = A.table_paired(frame, n_boot=n_boot, seed=0, pairs=[("m", "other")]).set_index("model")
    assert paired.loc["mean", "n_models"] == 2 and paired.loc["mean", "boot_nan"] == missed.sum()
