"""Behaviour of ``run`` / ``merge`` / ``analyze`` that a mutation audit found untested.

Each test below failed on a planted fault that the other pipeline tests let through:

* an image range that does not start at 0: its chunks, the image cap of ``method_grid``
  (``max_images``) and the saved maps all count from the range's start, and a sharded run of it
  merges to the single process's files;
* the chunk seed: it follows the run's ``seed`` and differs from chunk to chunk;
* the prediction table: ``prob`` is the softmax probability of the *true* class (misclassified
  images included), with the documented dtypes;
* the merged result table: canonical column order and dtypes, sorted by key, and a CSV that
  round-trips the parquet values exactly;
* error / NaN accounting: ``summary["errors"]`` counts only error rows, the manifest's
  ``status_counts`` and ``images.evaluated`` match the table, a metric's own NaN reason and an
  infinite value are kept as status ``nan``; a partial merge takes no chunk of another run;
* evaluate()'s curves given as ``road_morf`` / ``road_lerf`` attributes or as a (B, K) tensor
  with ``<name>_fractions`` become one column per fraction, each with its own values;
* analyze: table e uses the unrefined (identity) maps only and counts NaN and error rows, a
  method without any finite score rests on no model; ``<metric>@<x>`` curve columns stay out of
  tables a and b; table f's start point is each image's own model's unperturbed probability
  (over the images with a value at the first fraction); table a_paired and ``analyze_run``
  follow ``seed``.

Stand-ins come from ``test_pipeline_standins``; every reference value is recomputed here
independently (softmax of the stand-in model, the stand-in explainer's maps, hand-made tables).
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import test_pipeline_standins as S
from validation import analyze as A
from validation.metrics.evaluate import EvaluationResult
from validation.pipeline.run import _flatten_metric_values, run_eval
from validation.pipeline.table import (COLUMNS, KEY_COLUMNS, PREDICTION_COLUMNS, load_predictions,
                                       load_results, make_results_frame, merge_run)


@pytest.fixture
def models(tmp_path):
    return S.make_models(tmp_path)


def _run(models, out, components=None, **over):
    torch.set_num_threads(1)
    kw = dict(methods=["cam", "grad"], metrics=["gt_cosine", "complexity"], mixes=["identity"])
    kw.update(over)
    shard = kw.pop("shard", (0, 1))
    return run_eval(S.config(models, **kw), out, shard=shard, components=components or S.components(),
                    progress=False)


def _correct_images(path) -> set[int]:
    """The images the stand-in model at ``path`` classifies correctly (recomputed, not read back)."""
    ds = S.TinyDataset()
    model, _ = S.load_model(path)
    with torch.no_grad():
        pred = model(ds.x).argmax(1)
    return set(torch.nonzero(pred == ds.label).flatten().tolist())


# ----------------------------------------------------------------------------- image ranges
def test_a_range_not_starting_at_zero_is_chunked_capped_and_saved_from_its_start(models, tmp_path):
    """--images 6:18, chunks of 4: chunks 6-10, 10-14, 14-18; ``max_images: 5`` keeps grad to
    images 6..10, ``save_maps: 3`` keeps the maps of images 6..8 (beta classifies 9 correctly:
    the bound is tested). Values equal those of a run over all images (the stand-ins' maps and
    metrics are per image)."""
    out = tmp_path / "run"
    summary = _run(models, out, image_range=(6, 18), save_maps=3, method_grid={"grad": {"max_images": 5}})
    assert summary["chunks_computed"] == 2 * 3
    for name in ("alpha", "beta"):
        markers = sorted(p.name for p in (out / "chunks" / name).glob("*.done.json"))
        assert markers == ["c0000006-0000010.done.json", "c0000010-0000014.done.json",
                           "c0000014-0000018.done.json"]
    res, pred = load_results(out), load_predictions(out)
    ds = S.TinyDataset()
    for path, name in zip(models, ("alpha", "beta")):
        correct = _correct_images(path)
        assert sorted(pred[pred.model == name].image) == list(range(6, 18))
        in_range = {i for i in correct if 6 <= i < 18}
        assert set(res[(res.model == name) & (res.method == "cam")].image) == in_range
        assert set(res[(res.model == name) & (res.method == "grad")].image) == {i for i in in_range if i < 11}
        saved = np.load(out / "chunks" / name / "c0000006-0000010.maps.npz")
        kept = sorted(i for i in in_range if i < 9)
        np.testing.assert_array_equal(saved["images"], kept)
        # each saved map is its own image's (the stand-in CAM recomputed), none of image 9's
        configs = list(saved["configs"])
        for label, method, layer in (("cam@l1", "cam", "l1"), ("grad", "grad", "-")):
            maps = saved[f"map_{configs.index(label)}"]
            assert maps.shape == (len(kept), S.SIZE, S.SIZE)
            for row, img in enumerate(kept):
                expected = S.Explainer(None, method, layer, "identity", 0).attribute(ds.x[img][None], None)[0]
                np.testing.assert_allclose(maps[row].astype(np.float64), expected.numpy(), atol=1e-3)
        assert not (out / "chunks" / name / "c0000010-0000014.maps.npz").exists()
    timing = pd.read_csv(out / "timing.csv").set_index(["model", "config"])["images"]
    for path, name in zip(models, ("alpha", "beta")):
        correct = _correct_images(path)
        assert timing[(name, "grad")] == len({i for i in correct if 6 <= i < 11})
    full = tmp_path / "full"
    _run(models, full)
    whole = load_results(full)
    whole = whole[whole.image.between(6, 17) & ((whole.method != "grad") | (whole.image < 11))]
    pd.testing.assert_frame_equal(res, whole.reset_index(drop=True))


def test_a_sharded_run_over_a_range_not_starting_at_zero_merges_to_the_single_process_files(models, tmp_path):
    single = tmp_path / "single"
    _run(models, single, image_range=(6, 18), save_maps=3)
    sharded = tmp_path / "sharded"
    first = _run(models, sharded, image_range=(6, 18), save_maps=3, shard=(0, 2))
    second = _run(models, sharded, image_range=(6, 18), save_maps=3, shard=(1, 2))
    # strided: shard 0 takes chunks 6-10 and 14-18, shard 1 chunk 10-14, for each model
    assert (first["chunks_computed"], second["chunks_computed"]) == (2 * 2, 2 * 1)
    assert sorted(p.name for p in (sharded / "chunks" / "alpha").glob("*.done.json")) == [
        "c0000006-0000010.done.json", "c0000010-0000014.done.json", "c0000014-0000018.done.json"]
    merge_run(sharded)
    for name in ("results.parquet", "results.csv", "predictions.csv", "misclassified.csv", "timing.csv"):
        if name == "timing.csv":  # seconds differ; the images each configuration had do not
            a, b = (pd.read_csv(d / name).drop(columns="seconds") for d in (single, sharded))
            pd.testing.assert_frame_equal(a, b)
        else:
            assert (sharded / name).read_bytes() == (single / name).read_bytes(), name


# ----------------------------------------------------------------------------- chunk seeds
def test_the_chunk_seed_follows_the_run_seed_and_differs_between_chunks(models, tmp_path):
    """RandomCAM's stand-in draws its map from the chunk seed: another run seed must give other
    maps, and two chunks of one run must not repeat one draw (their first images' maps equal)."""
    def first_map_means(out):
        res = load_results(out)
        rows = res[(res.model == "alpha") & (res.method == "randomcam") & (res.metric == "complexity")]
        # the first correct image of each chunk: position 0 of its batch, so the first draws
        return rows.assign(chunk=rows.image // 4).groupby("chunk").value.first()

    seed0, seed0_again, seed1 = tmp_path / "s0", tmp_path / "s0b", tmp_path / "s1"
    _run(models, seed0, methods=["randomcam"], seed=0)
    _run(models, seed0_again, methods=["randomcam"], seed=0)
    _run(models, seed1, methods=["randomcam"], seed=1)
    a, again, b = first_map_means(seed0), first_map_means(seed0_again), first_map_means(seed1)
    assert len(a) >= 3
    pd.testing.assert_series_equal(a, again)  # reproducible
    assert (a != b).all()  # the run seed reaches every chunk
    assert a.nunique() == len(a)  # and every chunk has its own draws
    seeds = [json.loads(m.read_text())["seed"] for m in sorted((seed0 / "chunks" / "alpha").glob("*.done.json"))]
    assert len(set(seeds)) == len(seeds) == 5


def test_resuming_with_another_seed_is_refused(models, tmp_path):
    out = tmp_path / "run"
    _run(models, out, seed=0)
    with pytest.raises(ValueError, match=r"different configuration \(differs in \['seed'\]\)"):
        _run(models, out, seed=1)


# ----------------------------------------------------------------------------- predictions, table schema
def _text_column(col: pd.Series) -> bool:
    """Strings throughout (object or pandas' string dtype, whichever the pandas version gives)."""
    return pd.api.types.is_string_dtype(col) and all(isinstance(v, str) for v in col)


def test_predictions_hold_the_true_class_probability_of_every_image(models, tmp_path):
    """docs/evaluation.md: ``prob`` is the softmax probability of the true class; for a
    misclassified image that is not the probability of the predicted class."""
    out = tmp_path / "run"
    _run(models, out)
    pred = load_predictions(out)
    assert list(pred.columns) == PREDICTION_COLUMNS
    assert {c: str(t) for c, t in pred.drop(columns="model").dtypes.items()} == {
        "image": "int64", "label": "int64", "pred": "int64", "prob": "float64", "correct": "bool"}
    assert _text_column(pred["model"])
    ds = S.TinyDataset()
    for path, name in zip(models, ("alpha", "beta")):
        model, _ = S.load_model(path)
        with torch.no_grad():
            p = torch.softmax(model(ds.x).double(), dim=1)
        mine = pred[pred.model == name].sort_values("image")
        np.testing.assert_array_equal(mine.image, np.arange(S.N_IMAGES))
        np.testing.assert_array_equal(mine.label, ds.label.numpy())
        np.testing.assert_array_equal(mine.pred, p.argmax(1).numpy())
        expected = p[torch.arange(S.N_IMAGES), ds.label].numpy()
        np.testing.assert_allclose(mine.prob, expected, rtol=1e-5)
        assert (~mine.correct).any()  # misclassified images are there, so pred != label is tested


def test_the_merged_table_has_canonical_columns_dtypes_order_and_an_exact_csv(models, tmp_path):
    out = tmp_path / "run"
    _run(models, out, methods=["cam", "grad", "boom"], metrics=["gt_cosine", "complexity", "peak"])
    raw = pd.read_parquet(out / "results.parquet")
    assert list(raw.columns) == COLUMNS
    assert (str(raw["image"].dtype), str(raw["value"].dtype)) == ("int64", "float64")
    assert all(_text_column(raw[c]) for c in ("model", "method", "layer", "mix", "metric", "status", "reason"))
    keys = list(zip(*(raw[c] for c in KEY_COLUMNS)))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # sorted by key, each key once
    csv = pd.read_csv(out / "results.csv", keep_default_na=False, na_values={"value": [""]})
    assert list(csv.columns) == COLUMNS
    # 17 significant digits: every value (and NaN) back bit for bit
    np.testing.assert_array_equal(csv["value"].to_numpy(), raw["value"].to_numpy())
    assert (csv[KEY_COLUMNS].astype(str).to_numpy() == raw[KEY_COLUMNS].astype(str).to_numpy()).all()


# ----------------------------------------------------------------------------- errors and NaN
def test_errors_nan_and_ok_are_counted_apart_in_the_summary_and_the_manifest(models, tmp_path):
    """boom fails on image 5 (error rows); flat is a constant map, so ``peak`` is NaN on it."""
    out = tmp_path / "run"
    summary = _run(models, out, methods=["flat", "boom"], metrics=["gt_cosine", "peak"], layers=["l1"])
    res = load_results(out)
    counts = res.status.value_counts().to_dict()
    assert counts.get("error", 0) > 0 and counts.get("nan", 0) > 0 and counts.get("ok", 0) > 0
    assert summary["errors"] == counts["error"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["status_counts"] == counts
    pred = load_predictions(out)
    for path, name in zip(models, ("alpha", "beta")):
        correct = _correct_images(path)
        assert man["images"][name]["evaluated"] == len(correct)
        assert man["images"][name]["misclassified"] == S.N_IMAGES - len(correct)
        assert man["images"][name]["misclassified_images"] == sorted(set(range(S.N_IMAGES)) - correct)
    # per chunk, the marker's errors are the chunk's error rows
    for marker in (out / "chunks").glob("*/*.done.json"):
        info = json.loads(marker.read_text())
        mine = res[(res.model == info["model"]) & res.image.between(info["start"], info["stop"] - 1)]
        assert info["errors"] == int((mine.status == "error").sum())
        assert info["n_images"] == 4
        assert info["n_correct"] == int(pred[(pred.model == info["model"]) & pred.correct
                                            & pred.image.between(info["start"], info["stop"] - 1)].shape[0])


def _evaluate_with_reasons_and_inf(model, x, target, maps, metrics, explainer, gt, options):
    """The stand-in evaluate() as the project's EvaluationResult: ``peak`` says why it is NaN,
    ``ratio`` is +inf on constant maps (a division by a zero spread)."""
    plain = S.evaluate(model, x, target, maps, [m for m in metrics if m != "ratio"], explainer, gt, options)
    result = EvaluationResult()
    result.update({k: v for k, v in plain.items() if torch.is_tensor(v)})
    if "peak" in metrics:
        result.reasons["peak"] = ["" if torch.isfinite(v) else "constant map: no peak" for v in plain["peak"]]
    if "ratio" in metrics:
        spread = maps.flatten(1).std(1)
        result["ratio"] = torch.where(spread == 0, torch.inf, 1.0 / spread.clamp_min(1e-12))
    return result


def test_a_metrics_own_nan_reason_and_an_infinite_value_are_kept_as_status_nan(models, tmp_path):
    comps = S.components()
    comps.evaluate = _evaluate_with_reasons_and_inf
    out = tmp_path / "run"
    _run(models, out, comps, methods=["flat", "cam"], metrics=["peak", "ratio"], layers=["l1"])
    res = load_results(out)
    flat, cam = res[res.method == "flat"], res[res.method == "cam"]
    assert len(flat) > 0 and (flat.status == "nan").all() and flat.value.isna().all()
    assert (flat[flat.metric == "peak"].reason == "constant map: no peak").all()
    assert (flat[flat.metric == "ratio"].reason == "metric returned NaN/inf").all()
    assert len(cam) > 0 and (cam.status == "ok").all() and np.isfinite(cam.value).all()


def test_curves_given_as_attributes_or_as_a_fraction_tensor_become_one_column_per_fraction():
    """evaluate()'s ROAD curves (``road_morf`` / ``road_lerf`` (B, F) with ``road_fractions``)
    and a (B, K) metric with ``<name>_fractions``: column j holds the values at fraction j."""
    result = EvaluationResult()
    result["gt_cosine"] = torch.tensor([0.5, 0.25])
    result.road_fractions = [0.1, 0.5, 0.9]
    result.road_morf = torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.5, 0.2]])
    result.road_lerf = torch.tensor([[0.95, 0.85, 0.75], [0.7, 0.65, 0.6]])
    result["curve"] = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 6.0]])
    result["curve_fractions"] = torch.tensor([0.25, 0.5, 0.75])
    result["per_level"] = {"a": torch.tensor([7.0, 8.0]), "b": torch.tensor([9.0, 10.0])}
    got = {k: v.tolist() for k, v in _flatten_metric_values(result, 2).items()}
    assert got == {"gt_cosine": [0.5, 0.25],
                   "road_morf@0.1": pytest.approx([0.9, 0.8]), "road_morf@0.5": pytest.approx([0.6, 0.5]),
                   "road_morf@0.9": pytest.approx([0.3, 0.2]),
                   "road_lerf@0.1": pytest.approx([0.95, 0.7]), "road_lerf@0.5": pytest.approx([0.85, 0.65]),
                   "road_lerf@0.9": pytest.approx([0.75, 0.6]),
                   "curve@0.25": [1.0, 3.0], "curve@0.5": [2.0, 4.0], "curve@0.75": [5.0, 6.0],
                   "per_level@a": [7.0, 8.0], "per_level@b": [9.0, 10.0]}


# ----------------------------------------------------------------------------- analyze: tables e, f, seeds
def _long(rows):
    """(model, image, method, layer, mix, metric, value[, status]) tuples -> a result table; without
    a status, make_results_frame derives it (ok where finite, else nan)."""
    keys = ("model", "image", "method", "layer", "mix", "metric", "value", "status")
    records = [dict(zip(keys, r)) for r in rows]
    if any("status" in r for r in records):
        for r in records:
            r.setdefault("status", "ok" if np.isfinite(r["value"]) else "nan")
    return make_results_frame(records)


def test_localisation_table_uses_the_unrefined_maps_only():
    """Grad-CAM refined (product) scores 0.9 everywhere, identity 0.1 / 0.3: table e reports
    identity's mean 0.2, and a NaN or an error identity row counts in ``<metric>_n_nan``. A method without
    any finite score is not counted as a model the mean rests on."""
    rows = []
    for img, v, status in ((0, 0.1, "ok"), (1, 0.3, "ok"), (2, np.nan, "nan"), (3, np.nan, "error")):
        rows.append(("m", img, "gradcam", "layer1", "identity", "pointing_game", v, status))
        rows.append(("m", img, "gradcam", "layer1", "product", "pointing_game", 0.9))
        rows.append(("m", img, "lafam", "layer1", "identity", "pointing_game", 0.5))
        # RELAX never has a finite score: its mean row rests on no model, and names it
        rows.append(("m", img, "relax", "-", "identity", "pointing_game", np.nan))
    e = A.table_localisation(_long(rows)).set_index(["model", "method", "layer"])
    relax = e.loc[("mean", "relax", "-")]
    assert (relax["n_models"], relax["models_nan"], relax["pointing_game_n_nan"]) == (0, "m", 4)
    assert pd.isna(relax["pointing_game"])
    assert e.loc[("m", "gradcam", "layer1"), "pointing_game"] == pytest.approx(0.2)
    assert e.loc[("m", "gradcam", "layer1"), "pointing_game_n_nan"] == 2  # the NaN and the error row
    assert e.loc[("mean", "gradcam", "layer1"), "pointing_game"] == pytest.approx(0.2)
    assert e.loc[("m", "lafam", "layer1"), "pointing_game"] == pytest.approx(0.5)


def test_curve_columns_of_any_metric_stay_out_of_the_scalar_tables():
    """A per-fraction column (``<metric>@<fraction>``, as `run` writes a user metric's curve) is
    not a scalar metric: not in table a, not in table b."""
    rng = np.random.default_rng(3)
    rows = []
    for img in range(6):
        for method in ("gradcam", "lime", "deeplift", "halfcam"):
            gt = rng.random()
            for metric, v in (("gt_cosine", gt), ("arcc", gt + rng.random()), ("insertion@0.5", rng.random()),
                              ("road_morf@0.2", rng.random())):
                rows.append(("m", img, method, "-", "identity", metric, v))
    df = _long(rows)
    assert A.scalar_metrics(df) == ["arcc", "gt_cosine"]
    assert set(A.table_validity(df, n_boot=5).metric) == {"arcc"}
    per_model, _ = A.table_trivial(df)
    assert set(per_model.metric) == {"arcc", "gt_cosine"}


def test_road_curve_start_is_each_images_own_probability_per_model():
    """Two models that both classify images 0 and 1 correctly with other probabilities: each
    curve starts at the mean of its own model's probabilities over the images it has; an image
    whose curve value is NaN is left out of that fraction's mean and ``n``."""
    rows = []
    for model, curve in (("m1", {0: (0.6, 0.4), 1: (0.2, np.nan)}), ("m2", {0: (0.5, 0.3), 1: (0.1, 0.05)})):
        for img, (at2, at4) in curve.items():
            rows.append((model, img, "gradcam", "layer1", "identity", "road_morf@0.2", at2))
            rows.append((model, img, "gradcam", "layer1", "identity", "road_morf@0.4", at4))
    preds = pd.DataFrame({"model": ["m1", "m1", "m2", "m2", "m2"], "image": [0, 1, 0, 1, 2],
                          "label": [0, 1, 0, 1, 2], "pred": [0, 1, 0, 1, 0],
                          "prob": [0.9, 0.7, 0.8, 0.4, 0.1], "correct": [True, True, True, True, False]})
    f = A.table_road_curves(_long(rows), preds).set_index(["model", "order", "fraction"])
    expected = {("m1", 0.0): (0.8, 2), ("m1", 0.2): (0.4, 2), ("m1", 0.4): (0.4, 1),
                ("m2", 0.0): (0.6, 2), ("m2", 0.2): (0.3, 2), ("m2", 0.4): (0.175, 2)}
    for (model, frac), (prob, n) in expected.items():
        row = f.loc[(model, "MORF", frac)]
        assert row["prob"] == pytest.approx(prob) and row["n"] == n, (model, frac)
    assert len(f) == len(expected)


def test_road_curve_start_holds_an_image_whose_first_fraction_is_nan():
    """Image 1's curve is NaN at the smallest fraction and finite further on: the curve's start
    still holds its unperturbed probability (it started from the smallest fraction's images)."""
    rows = [("m1", 0, "gradcam", "layer1", "identity", "road_lerf@0.2", 0.5),
            ("m1", 0, "gradcam", "layer1", "identity", "road_lerf@0.4", 0.4),
            ("m1", 1, "gradcam", "layer1", "identity", "road_lerf@0.2", np.nan),
            ("m1", 1, "gradcam", "layer1", "identity", "road_lerf@0.4", 0.2)]
    preds = pd.DataFrame({"model": ["m1", "m1"], "image": [0, 1], "label": [0, 1], "pred": [0, 1],
                          "prob": [0.9, 0.7], "correct": [True, True]})
    f = A.table_road_curves(_long(rows), preds).set_index(["order", "fraction"])
    assert f.loc[("LERF", 0.0), "prob"] == pytest.approx(0.8) and f.loc[("LERF", 0.0), "n"] == 2
    assert f.loc[("LERF", 0.2), "n"] == 1 and f.loc[("LERF", 0.4), "prob"] == pytest.approx(0.3)


def _seed_table(n_images=12):
    rng = np.random.default_rng(5)
    rows = []
    for model in ("m1", "m2"):
        for img in range(n_images):
            for method in ("gradcam", "lime", "deeplift"):
                gt = rng.random()
                for metric, v in (("gt_cosine", gt), ("arcc", gt + rng.normal(0, 0.3)),
                                  ("road", gt + rng.normal(0, 0.5)), ("average_drop", rng.random())):
                    rows.append((model, img, method, "-", "identity", metric, v))
    return _long(rows)


def test_paired_table_and_analyze_run_follow_the_bootstrap_seed(tmp_path):
    """Table a_paired's intervals come from the ``seed``'s replicates (another seed, other
    intervals), and ``analyze_run(seed=...)`` passes the seed to tables a and a_paired."""
    df = _seed_table()
    cols = ["pearson_diff_lo", "pearson_diff_hi", "spearman_diff_lo", "spearman_diff_hi"]
    p1, p1_again, p2 = (A.table_paired(df, n_boot=40, seed=s)[cols] for s in (1, 1, 2))
    pd.testing.assert_frame_equal(p1, p1_again)
    assert (p1.to_numpy() != p2.to_numpy()).any(axis=1).all()

    run = tmp_path / "run"
    run.mkdir()
    df.to_parquet(run / "results.parquet", index=False)  # a merged table, no chunks
    tables = A.analyze_run(run, tmp_path / "analysis", n_boot=40, seed=7)
    pd.testing.assert_frame_equal(tables["a_validity"], A.table_validity(df, n_boot=40, seed=7))
    pd.testing.assert_frame_equal(tables["a_paired"], A.table_paired(df, n_boot=40, seed=7))
    assert not tables["a_paired"].equals(A.table_paired(df, n_boot=40, seed=0))
    assert not tables["a_validity"].equals(A.table_validity(df, n_boot=40, seed=0))


# ----------------------------------------------------------------------------- partial merge
def test_a_partial_merge_leaves_out_the_chunks_of_another_run(models, tmp_path):
    """After `--overwrite --shard 0/2` with a regenerated dataset, shard 1's chunks belong to the
    old run: ``merge --allow-partial`` lists them as missing and merges none of their rows."""
    out = tmp_path / "run"
    _run(models, out)
    regenerated = S.components()
    regenerated.fingerprint = lambda path: "regenerated-fingerprint"
    run_eval(S.config(models, methods=["cam", "grad"], metrics=["gt_cosine", "complexity"], mixes=["identity"]),
             out, shard=(0, 2), components=regenerated, progress=False, overwrite=True)
    man = merge_run(out, allow_partial=True)
    shard1 = [[name, 4, 8] for name in ("alpha", "beta")] + [[name, 12, 16] for name in ("alpha", "beta")]
    assert sorted(man["chunks"]["missing"]) == sorted(shard1)
    assert (man["chunks"]["merged"], man["chunks"]["expected"]) == (6, 10)
    res, pred = load_results(out), load_predictions(out)
    in_shard0 = (res.image // 4).isin([0, 2, 4])
    assert len(res) > 0 and in_shard0.all()
    assert sorted(set(pred.image)) == [i for i in range(S.N_IMAGES) if i // 4 in (0, 2, 4)]
