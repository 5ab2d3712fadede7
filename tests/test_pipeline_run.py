"""run / merge: configurations, long table, misclassified images, errors, resume, sharding."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import test_pipeline_standins as S
from validation.pipeline.run import Components as run_components, map_configs, run_eval
from validation.pipeline.shards import chunk_ranges, parse_range, parse_shard, shard_chunks
from validation.pipeline.table import load_predictions, load_results, merge_run

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def models(tmp_path):
    return S.make_models(tmp_path)


def _single_run(models, out):
    torch.set_num_threads(1)
    return run_eval(S.config(models), out, components=S.components(), progress=False)


def test_map_configs_enumerates_layers_and_refinement():
    cfgs = map_configs(["cam", "lime"], ["l1", "l2", "l3"], ["identity", "product", "geomean"],
                       layer_methods=("cam",), refinable=("cam",))
    labels = [c.label for c in cfgs]
    assert labels == ["cam@l1", "cam@l1+product", "cam@l1+geomean", "cam@l2", "cam@l2+product",
                      "cam@l2+geomean", "cam@l3", "lime"]
    with pytest.raises(ValueError, match="unknown --mix"):
        map_configs(["cam"], ["l1"], ["sum"])


def test_shard_helpers():
    assert chunk_ranges((0, 10), 4) == [(0, 4), (4, 8), (8, 10)]
    chunks = chunk_ranges((0, 20), 4)
    parts = [shard_chunks(chunks, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == chunks and all(parts)
    # strided: the expensive first images (method_grid max_images) spread over every shard
    assert parts == [[(0, 4), (12, 16)], [(4, 8), (16, 20)], [(8, 12)]]
    assert parse_shard("1/2") == (1, 2) and parse_shard(None) == (0, 1)
    assert parse_range("10:30") == (10, 30)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_run_writes_long_table_predictions_and_manifest(models, tmp_path):
    out = tmp_path / "run"
    summary = _single_run(models, out)
    res, pred = load_results(out), load_predictions(out)
    ds = S.TinyDataset()
    # predictions: every image of every model, correctness recomputed independently
    assert len(pred) == 2 * S.N_IMAGES
    for path, name in zip(models, ("alpha", "beta")):
        model, _ = S.load_model(path)
        with torch.no_grad():
            p = model(ds.x).argmax(1)
        expect_correct = (p == ds.label).numpy()
        got = pred[pred.model == name].sort_values("image")["correct"].to_numpy()
        np.testing.assert_array_equal(got, expect_correct)
        assert 0 < expect_correct.sum() < S.N_IMAGES  # both kinds present, so the filter is tested
        # only correct images appear in the result table
        imgs = set(res[res.model == name].image)
        assert imgs == set(np.flatnonzero(expect_correct).tolist())
    mis = pd.read_csv(out / "misclassified.csv")
    assert len(mis) == int((~pred.correct).sum()) and not mis.correct.any()
    # row count: configs x correct images x metrics (+2 curve points for each config)
    n_cfg = len(map_configs(S.config(models).methods, ["l1", "l2"], ["identity", "product"],
                            ("cam", "boom"), ("cam",)))
    n_correct = int(pred.correct.sum())
    assert n_cfg == 8  # cam l1, cam l1+product, cam l2, grad, boom l1, boom l2, randomcam, oracle
    per_image_cfg = 4 + 4
    ok_boom = res[(res.method == "boom") & (res.status != "error")]
    n_err_rows = len(res[res.status == "error"])
    assert len(res) == n_cfg * n_correct * per_image_cfg - n_err_rows // 4 * 4
    man = json.loads((out / "manifest.json").read_text())
    assert man["data_fingerprint"] == "tiny-fingerprint"
    assert man["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert man["config"]["methods"] == S.config(models).methods
    assert man["images"]["alpha"]["misclassified"] == int((~pred[pred.model == "alpha"].correct).sum())
    assert man["rows"] == len(res)
    assert summary["chunks_computed"] == 2 * 5
    assert len(ok_boom) > 0


def test_values_match_independent_computation(models, tmp_path):
    out = tmp_path / "run"
    _single_run(models, out)
    res = load_results(out)
    ds = S.TinyDataset()
    row = res[(res.method == "oracle") & (res.metric == "gt_cosine")]
    assert np.allclose(row.value, 1.0)
    sel = res[(res.method == "cam") & (res.layer == "l2") & (res.mix == "identity")
              & (res.metric == "gt_cosine") & (res.model == "alpha")].iloc[0]
    x = ds.x[int(sel.image)].double()
    m = torch.nn.functional.avg_pool2d(x.mean(0, keepdim=True)[None], 4)
    m = torch.nn.functional.interpolate(m, size=(S.SIZE, S.SIZE), mode="nearest")[0, 0]
    m = (m - m.min()) / (m.max() - m.min())
    g = ds.mask[int(sel.image), 0].double()
    ref = float((m * g).sum() / (m.norm() * g.norm()))
    assert sel.value == pytest.approx(ref, abs=1e-6)
    curves = res[res.metric.str.startswith("road_")]
    assert set(curves.metric) == {"road_morf@0.2", "road_morf@0.4", "road_lerf@0.2", "road_lerf@0.4"}


def test_failing_method_is_recorded_and_run_goes_on(models, tmp_path):
    out = tmp_path / "run"
    summary = _single_run(models, out)
    res = load_results(out)
    err = res[res.status == "error"]
    assert summary["errors"] == len(err) > 0
    assert set(err.method) == {"boom"} and set(err.image) == {S.POISON}
    assert err.reason.str.contains("planted failure").all()
    assert err.reason.str.contains(r"\[method\]").all()
    assert err.value.isna().all()
    # the poisoned image's other methods and the other images of its chunk still have values
    same_chunk = res[(res.method == "boom") & res.image.isin([4, 6, 7]) & (res.status == "ok")]
    assert len(same_chunk) > 0
    assert (res[(res.image == S.POISON) & (res.method == "cam")].status == "ok").all()


def test_nan_metric_values_keep_a_reason(models, tmp_path):
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["flat", "grad"]), out, components=S.components(), progress=False)
    res = load_results(out)
    nan_rows = res[res.status == "nan"]
    # a constant map has no peak: NaN with a reason, every other value finite
    assert set(nan_rows.method) == {"flat"} and set(nan_rows.metric) == {"peak"}
    assert len(nan_rows) == len(res[(res.method == "flat") & (res.metric == "peak")]) > 0
    assert (nan_rows.reason != "").all() and nan_rows.value.isna().all()
    assert not res[res.status == "ok"].value.isna().any()


def test_interrupted_run_resumes_where_it_stopped(models, tmp_path):
    torch.set_num_threads(1)
    full = tmp_path / "full"
    _single_run(models, full)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_eval(S.config(models), out, components=S.components(interrupt_after=20), progress=False)
    done_before = sorted(p.name for p in (out / "chunks").glob("*/*.done.json"))
    assert 0 < len(done_before) < 10
    calls = []
    summary = run_eval(S.config(models), out, components=S.components(counter=calls), progress=False)
    assert summary["chunks_skipped"] == len(done_before)
    assert summary["chunks_computed"] == 10 - len(done_before)
    # a finished chunk is never recomputed: at most 8 configs per remaining chunk were evaluated
    assert 0 < len(calls) <= 8 * (10 - len(done_before)) + 8
    assert (out / "results.parquet").read_bytes() == (full / "results.parquet").read_bytes()
    assert (out / "results.csv").read_bytes() == (full / "results.csv").read_bytes()


def test_resume_with_other_config_is_refused(models, tmp_path):
    out = tmp_path / "run"
    _single_run(models, out)
    with pytest.raises(ValueError, match="different configuration.*metrics"):
        run_eval(S.config(models, metrics=["gt_cosine"]), out, components=S.components(), progress=False)


def test_bad_inputs_are_clear(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        run_eval(S.config([str(tmp_path / "nope.ckpt")]), tmp_path / "r", components=S.components(),
                 progress=False)
    with pytest.raises(ValueError, match="more images"):
        run_eval(S.config(models, image_range=(0, 99)), tmp_path / "r2", components=S.components(),
                 progress=False)


@pytest.mark.parametrize("change, message", [
    ({"methods": ["gradcma"]}, r"unknown method 'gradcma'; available: .*gradcam"),
    ({"metrics": ["roadd"]}, r"unknown metric\(s\) \['roadd'\]; available: .*'road'"),
    ({"metric_options": {"gt_treshold": 0.3}}, r"metric options: unknown option\(s\) \['gt_treshold'\]; "
                                               r"accepted: .*'gt_threshold'"),
    ({"method_options": {"gradcma": {"layer": "l1"}}}, r"method options: unknown method 'gradcma'"),
    ({"method_options": {"relax": {"n_maks": 8}}}, r"method options for 'relax': unknown option\(s\) "
                                                   r"\['n_maks'\]; accepted: .*'n_masks'"),
    ({"method_options": {"gradcam": {"layer": "l2"}}}, r"'gradcam': the run sets the layer"),
    ({"method_options": {"lime": 16}}, r"'lime': expected a mapping"),
])
def test_unknown_names_and_options_are_refused_before_any_work(models, tmp_path, change, message):
    """With the project's own explainer and evaluate, a typo fails at once, not as error rows
    after every image's retries (or, for a method's options, silently as the defaults)."""
    loads = []
    comps = S.components()
    own = run_components(load_model=lambda path: loads.append(path) or S.load_model(path), dataset=comps.dataset,
                         fingerprint=comps.fingerprint)
    config = S.config(models, methods=["gradcam"], metrics=["gt_cosine"], layers=["l1"])
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        run_eval(config, tmp_path / "run", components=own, progress=False)
    assert loads == [] and not (tmp_path / "run").exists()


def test_merge_refuses_missing_chunks(models, tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models), out, shard=(0, 2), components=S.components(), progress=False)
    assert not (out / "results.parquet").exists()
    with pytest.raises(RuntimeError, match="chunks are not finished"):
        merge_run(out)
    man = merge_run(out, allow_partial=True)
    assert man["chunks"]["merged"] < man["chunks"]["expected"]


def test_two_processes_merge_bit_identical_to_single_process(models, tmp_path):
    single = tmp_path / "single"
    _single_run(models, single)
    sharded = tmp_path / "sharded"
    code = ("import sys; sys.path.insert(0, {tests!r}); import test_pipeline_standins as S; "
            "S.run_shard_main({models!r}, {out!r}, {shard!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(tests=str(TESTS), models=str(tmp_path),
                                                                 out=str(sharded), shard=f"{i}/2")],
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert not (sharded / "results.parquet").exists()  # shards never merge on their own
    merge_run(sharded)
    for name in ("results.parquet", "results.csv", "predictions.csv", "misclassified.csv"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes(), name
    # saved maps for the report are identical too
    a = np.load(next((single / "chunks" / "alpha").glob("*.maps.npz")))
    b = np.load(next((sharded / "chunks" / "alpha").glob("*.maps.npz")))
    assert list(a["configs"]) == list(b["configs"])
    np.testing.assert_array_equal(a["map_0"], b["map_0"])


def test_refine_layers_differ_from_evaluated_layers():
    cfgs = map_configs(["cam"], ["l1", "l4"], ["identity", "product"], layer_methods=("cam",),
                       refinable=("cam",), refine_layers=["l1", "l2", "l3", "l4"])
    assert [c.label for c in cfgs] == ["cam@l1", "cam@l1+product", "cam@l4"]


def test_method_grid_overrides_layers_and_mixes():
    cfgs = map_configs(["cam", "dear"], ["l1", "l2", "l3"], ["identity", "product", "geomean"],
                       layer_methods=("cam", "dear"), refinable=("cam", "dear"),
                       method_grid={"dear": {"layers": ["l1"], "mixes": ["identity", "product"]}})
    labels = [c.label for c in cfgs]
    assert [l for l in labels if l.startswith("dear")] == ["dear@l1", "dear@l1+product"]
    assert len([l for l in labels if l.startswith("cam")]) == 3 + 2 * 2
    with pytest.raises(ValueError, match="not run"):
        map_configs(["cam"], ["l1"], ["identity"], method_grid={"lime": {}})
    with pytest.raises(ValueError, match="unknown keys"):
        map_configs(["cam"], ["l1"], ["identity"], layer_methods=("cam",), method_grid={"cam": {"layer": []}})


def test_failing_metric_costs_only_its_own_rows(models, tmp_path):
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam", "oracle"],
                      metrics=["gt_cosine", "fragile", "recompute", "recompute_single"]), out,
             components=S.components(), progress=False)
    res, pred = load_results(out), load_predictions(out)
    err = res[res.status == "error"]
    assert len(err) > 0 and set(err.metric) == {"fragile"} and set(err.image) == {S.POISON}
    assert err.reason.str.contains(r"\[metrics\].*fragile metric failed").all()
    ok = res[(res.image == S.POISON) & (res.metric != "fragile")]
    assert len(ok) > 0 and (ok.status == "ok").all()
    # the oracle needs the ground truth; a metric that re-runs it gets back the image's own mask,
    # so its cosine with the map is 1: on the batch (recompute) and in the image-by-image retry
    # (recompute_single refuses batches), where each image must get its own mask
    correct = pred[pred.correct]
    assert (correct.groupby(["model", correct.image // 4]).size() >= 2).any()  # retry past image 0
    for metric in ("recompute", "recompute_single"):
        rec = res[(res.method == "oracle") & (res.metric == metric)]
        assert len(rec) == len(correct) and (rec.status == "ok").all()
        np.testing.assert_allclose(rec.value, 1.0, atol=1e-6)


def test_metric_fallback_writes_each_shared_column_once(models, tmp_path):
    """A failing metric makes the chunk retry metric by metric; ROAD and ARCC both return ROAD's
    curves, which must still give one row per (image, metric), with the batch's values."""
    out = tmp_path / "run"
    metrics = ["road", "arcc", "fragile"]
    run_eval(S.config(models, methods=["cam"], metrics=metrics), out, components=S.components(), progress=False)
    res = load_results(out)
    key = ["model", "image", "method", "layer", "mix", "metric"]
    assert not res.duplicated(key).any()
    curves = res[res.metric.str.startswith("road_")]
    assert set(curves.metric) == {"road_morf@0.2", "road_morf@0.4", "road_lerf@0.2", "road_lerf@0.4"}
    # every image has its 4 curve columns once, also in the chunk that took the fallback
    assert (curves.groupby(["model", "image", "layer", "mix"]).size() == 4).all()
    poisoned = res[res.image == S.POISON]
    assert set(poisoned[poisoned.status == "error"].metric) == {"fragile"}
    # the same values as a run without the failing metric (no fallback anywhere)
    clean_out = tmp_path / "clean"
    run_eval(S.config(models, methods=["cam"], metrics=["road", "arcc"]), clean_out, components=S.components(),
             progress=False)
    clean = load_results(clean_out).set_index(key).value
    merged = res[res.metric != "fragile"].set_index(key).value
    pd.testing.assert_series_equal(merged.sort_index(), clean.sort_index())


def test_run_leaves_the_global_random_state_as_it_found_it(models, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    run_eval(S.config(models, methods=["cam", "randomcam"]), tmp_path / "run", components=S.components(),
             progress=False)
    assert torch.equal(torch.rand(4), expected)


def test_method_grid_max_images_limits_one_method(models, tmp_path):
    out = tmp_path / "run"
    cfg = S.config(models, methods=["cam", "grad"], method_grid={"grad": {"max_images": 6}})
    run_eval(cfg, out, components=S.components(), progress=False)
    res, pred = load_results(out), load_predictions(out)
    assert res[res.method == "grad"].image.max() < 6
    assert res[res.method == "cam"].image.max() >= 6
    saved = np.load(next((out / "chunks" / "alpha").glob("*.maps.npz")))
    assert len(saved["images"]) > 0
    # seconds per image divide by the images each configuration really had, not the chunk's
    timing = pd.read_csv(out / "timing.csv").set_index(["model", "config"])["images"]
    for name in ("alpha", "beta"):
        correct = pred[(pred.model == name) & pred.correct]
        assert timing[(name, "grad")] == (correct.image < 6).sum() < len(correct)
        assert timing[(name, "cam@l1")] == len(correct)
    # chunks written before the count was recorded fall back to the images that have rows
    for marker in (out / "chunks").glob("*/*.done.json"):
        info = json.loads(marker.read_text())
        info.pop("images")
        marker.write_text(json.dumps(info))
    merge_run(out)
    assert pd.read_csv(out / "timing.csv").set_index(["model", "config"])["images"].equals(timing)


def test_model_of_another_image_size_or_classes_is_refused_before_any_work(models, tmp_path):
    def loader(meta):
        return lambda path: (S.load_model(path)[0], meta)

    fits = S.load_model(models[0])[1]
    cases = [({**fits, "image_size": 32}, r"takes 32 px images but tiny \(test split\) has 16 x 16"),
             ({**fits, "class_names": ["a", "b", "c", "d"]}, r"classes \['a', 'b', 'c', 'd'\] differ"),
             ({"arch": "tiny"}, r"metadata has no \['image_size', 'class_names'\]")]  # cannot be checked
    for meta, match in cases:
        comps = S.components()
        comps.load_model = loader(meta)
        out = tmp_path / "run"
        with pytest.raises(ValueError, match=f"--model {models[0]}.*" + match):
            run_eval(S.config(models), out, components=comps, progress=False)
        assert not out.exists()  # refused before run_config.json or any chunk


def test_replaced_model_weights_are_refused_on_resume_and_at_merge(models, tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models, methods=["cam"]), out, shard=(0, 2), components=S.components(), progress=False)
    cfg = json.loads((out / "run_config.json").read_text())
    assert set(cfg["model_weights"]) == {"alpha", "beta"}
    Path(models[0]).write_bytes(b"retrained: other weights")
    with pytest.raises(ValueError, match=r"weights of model\(s\) \['alpha'\].*changed"):
        run_eval(S.config(models, methods=["cam"]), out, shard=(1, 2), components=S.components(), progress=False)
    # chunks computed elsewhere with the new weights, copied in: merge refuses to mix networks
    other = tmp_path / "other"
    run_eval(S.config(models, methods=["cam"]), other, shard=(1, 2), components=S.components(), progress=False)
    for f in (other / "chunks").glob("*/*"):
        target = out / f.relative_to(other)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="other weights of model 'alpha'"):
        merge_run(out)


def test_tables_merged_before_newer_chunks_are_refused(models, tmp_path):
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam"]), out, components=S.components(), progress=False)
    merged = (out / "results.parquet").stat().st_mtime_ns
    markers = sorted((out / "chunks").glob("*/*.done.json"))
    for m in markers:  # every chunk finished before the merge ...
        os.utime(m, ns=(merged - 10**9, merged - 10**9))
    os.utime(markers[-1], ns=(merged + 1, merged + 1))  # ... but this one was recomputed after it
    with pytest.raises(RuntimeError, match=r"1 chunk\(s\) finished after results.parquet was merged.*merge"):
        load_results(out)
    merge_run(out)
    assert len(load_results(out)) > 0


def test_a_chunk_rewritten_within_the_merges_clock_tick_is_refused(models, tmp_path):
    """Coarse file times (e.g. 1-2 s on some file systems): a marker rewritten, or a new one
    written, in the merge's own tick has no later time, but the merge recorded what it saw."""
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam"]), out, components=S.components(), progress=False)
    merged = (out / "results.parquet").stat().st_mtime_ns
    markers = sorted((out / "chunks").glob("*/*.done.json"))
    info = json.loads(markers[0].read_text())
    info["seconds"] = {k: v + 1.0 for k, v in info["seconds"].items()}  # recomputed: other timings
    markers[0].write_text(json.dumps(info))
    os.utime(markers[0], ns=(merged, merged))
    with pytest.raises(RuntimeError, match=r"1 chunk\(s\) finished after results.parquet was merged"):
        load_results(out)
    merge_run(out)
    assert len(load_results(out)) > 0
    # a marker the merge never saw (a chunk of another shard copied in), with the merge's time
    extra = markers[0].with_name("c90000-90008.done.json")
    extra.write_text(markers[0].read_text())
    os.utime(extra, ns=(merged, merged))
    with pytest.raises(RuntimeError, match=r"1 chunk\(s\) finished after"):
        load_results(out)
    extra.unlink()
    assert len(load_results(out)) > 0
    # a run merged before the markers were recorded: judged by time alone, as before
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["chunk_markers"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.utime(markers[0], ns=(merged, merged))
    assert len(load_results(out)) > 0


def _cam_run(models, out, components=None, **kw):
    torch.set_num_threads(1)
    return run_eval(S.config(models, methods=["cam"]), out, components=components or S.components(),
                    progress=False, **kw)


def test_resume_with_changed_dataset_fingerprint_is_refused(models, tmp_path):
    out = tmp_path / "run"
    _cam_run(models, out)
    before = {p: p.read_bytes() for p in (out / "chunks").glob("*/*")}
    comps = S.components()
    comps.fingerprint = lambda path: "regenerated-fingerprint"
    with pytest.raises(ValueError, match=r"dataset changed since this run started \(fingerprint "
                                         r"tiny-fingerprint -> regenerated-fingerprint\).*--overwrite"):
        _cam_run(models, out, comps)
    assert {p: p.read_bytes() for p in (out / "chunks").glob("*/*")} == before  # nothing touched
    assert json.loads((out / "run_config.json").read_text())["data_fingerprint"] == "tiny-fingerprint"


def _retrained_components():
    """Stand-ins for another network at the same model paths and a regenerated dataset."""
    def retrained(path):
        model, meta = S.load_model(path)
        return S.TinyNet(sum(Path(path).name.encode()) + 1).eval(), meta

    c = S.components()
    c.load_model, c.fingerprint = retrained, (lambda path: "regenerated-fingerprint")
    return c


def test_overwrite_discards_old_chunks_and_equals_a_fresh_run(models, tmp_path):
    out = tmp_path / "run"
    _cam_run(models, out)
    markers = {p: p.stat().st_mtime_ns for p in (out / "chunks").glob("*/*.done.json")}
    old = load_results(out)
    stray = out / "chunks" / "alpha" / "c0000099-0000103.results.parquet"
    stray.write_bytes(b"left over from the old run")

    summary = _cam_run(models, out, _retrained_components(), overwrite=True)
    assert summary["chunks_computed"] == 10 and summary["chunks_skipped"] == 0
    assert not stray.exists()
    for p, ns in markers.items():
        assert p.stat().st_mtime_ns > ns, p
    assert json.loads((out / "run_config.json").read_text())["data_fingerprint"] == "regenerated-fingerprint"
    fresh = tmp_path / "fresh"
    _cam_run(models, fresh, _retrained_components())
    for name in ("results.parquet", "results.csv", "predictions.csv"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not load_results(out).equals(old)  # the stand-in model really changed the values


def test_sharded_overwrite_redoes_its_own_chunks_and_never_merges_stale_ones(models, tmp_path):
    """`--overwrite --shard i/n` must not delete the other shards' chunks (they may be running),
    and the other shards' chunks of the old run are recomputed, never merged."""
    out = tmp_path / "run"
    _cam_run(models, out)

    before = sorted(p.name for p in (out / "chunks").rglob("*.done.json"))
    first = _cam_run(models, out, _retrained_components(), overwrite=True, shard=(0, 2))
    assert first["chunks_computed"] == first["chunks_in_shard"]  # its own chunks, recomputed
    assert sorted(p.name for p in (out / "chunks").rglob("*.done.json")) == before  # others kept
    with pytest.raises(RuntimeError, match=r"computed for another configuration or dataset"):
        merge_run(out)  # shard 1's chunks still belong to the old run
    # shard 1 without --overwrite: its old chunks do not count as done for the new run
    second = _cam_run(models, out, _retrained_components(), shard=(1, 2))
    assert second["chunks_computed"] == second["chunks_in_shard"] and second["chunks_skipped"] == 0
    merge_run(out)
    fresh = tmp_path / "fresh"
    _cam_run(models, fresh, _retrained_components())
    for name in ("results.parquet", "results.csv", "predictions.csv"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def test_chunk_without_marker_is_recomputed_and_not_merged(models, tmp_path):
    out = tmp_path / "run"
    _cam_run(models, out)
    stem = out / "chunks" / "alpha" / "c0000004-0000008"
    good = Path(f"{stem}.results.parquet").read_bytes()
    # a crash between the results and the marker: results of an earlier attempt, no marker
    stale = pd.read_parquet(f"{stem}.results.parquet").assign(value=-1.0)
    stale.to_parquet(f"{stem}.results.parquet", index=False)
    Path(f"{stem}.done.json").unlink()
    with pytest.raises(RuntimeError, match=r"1 of 10 chunks are not finished \(alpha\[4:8\]\)"):
        merge_run(out)
    man = merge_run(out, allow_partial=True)
    assert man["chunks"]["missing"] == [["alpha", 4, 8]]
    partial = load_results(out)  # the stale rows of the unmarked chunk are never merged
    assert not partial[partial.model == "alpha"].image.between(4, 7).any() and (partial.value != -1.0).all()
    assert partial[partial.model == "beta"].image.between(4, 7).any()
    calls = []
    summary = _cam_run(models, out, S.components(counter=calls))
    assert summary["chunks_computed"] == 1 and summary["chunks_skipped"] == 9 and len(calls) > 0
    assert Path(f"{stem}.results.parquet").read_bytes() == good
    assert Path(f"{stem}.done.json").exists()
    fresh = tmp_path / "fresh"
    _cam_run(models, fresh)
    assert (out / "results.parquet").read_bytes() == (fresh / "results.parquet").read_bytes()


def test_models_are_evaluated_as_inference_copies_unless_no_fold(models, tmp_path):
    seen = []
    base = S.components()

    def recording_explainer(model, cfg, layers, options, seed):
        seen.append(model)
        return base.explainer(model, cfg, layers, options, seed)

    comps = S.Components(**{**base.__dict__, "explainer": recording_explainer})
    torch.set_num_threads(1)
    run_eval(S.config(models), tmp_path / "folded", components=comps, progress=False)
    assert seen and all(hasattr(m, "inference_folds") for m in seen)
    assert json.loads((tmp_path / "folded" / "run_config.json").read_text())["fold"] is True
    seen.clear()
    run_eval(S.config(models, fold=False), tmp_path / "as_loaded", components=comps, progress=False)
    assert seen and not any(hasattr(m, "inference_folds") for m in seen)


def test_a_run_from_before_folding_resumes_only_unfolded(models, tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models, fold=False), out, components=S.components(), progress=False)
    path = out / "run_config.json"
    old = json.loads(path.read_text())
    del old["fold"]  # what a run folder written before the option existed holds (its chunks too)
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"different configuration \(differs in \['fold'\]\); it was computed "
                                         r"before models were folded for inference: resume it with --no-fold"):
        run_eval(S.config(models), out, components=S.components(), progress=False)
    summary = run_eval(S.config(models, fold=False), out, components=S.components(), progress=False)
    assert summary["chunks_computed"] == 0 and summary["chunks_skipped"] == 10



def test_a_recomputed_chunk_keeps_no_maps_of_the_run_it_replaced(models, tmp_path):
    """Shard 1's chunk 4:8 kept maps for the report under the old run (save_maps 6); recomputed
    for a run that saves the first 3 images' maps only, it must not leave the old maps behind for
    the report's qualitative grid."""
    from validation.report import load_saved_maps

    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models, methods=["cam"], save_maps=6), out, components=S.components(), progress=False)
    assert (out / "chunks" / "alpha" / "c0000004-0000008.maps.npz").exists()
    for shard in ((0, 2), (1, 2)):
        run_eval(S.config(models, methods=["cam"], save_maps=3), out, shard=shard, overwrite=shard == (0, 2),
                 components=S.components(), progress=False)
    merge_run(out)
    assert not (out / "chunks" / "alpha" / "c0000004-0000008.maps.npz").exists()
    saved = load_saved_maps(out, "alpha")
    assert len(saved["images"]) and (saved["images"] < 3).all()


_HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def test_a_chunk_takes_a_fixed_number_of_host_syncs_whatever_its_size(models, tmp_path, monkeypatch):
    """The runner reads the correct images' indices and the saved maps in one transfer each, not
    one device sync per image: the tensor -> host conversions made by run.py for a chunk of 4
    images equal those for a chunk of 12 (labels come as ints, as ShapesDataset gives them)."""
    class IntLabels(S.TinyDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "label": int(self.label[i])}

    components = S.components()
    components.dataset = lambda path, split: IntLabels()
    torch.set_num_threads(1)
    counts, saved = [], []
    for n in (4, 12):
        out = tmp_path / f"run{n}"
        with monkeypatch.context() as patch:
            calls = []
            for name in _HOST_SYNCS:
                def wrapper(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
                    if sys._getframe(1).f_code.co_filename.endswith("validation/pipeline/run.py"):
                        calls.append(_name)
                    return _original(self, *args, **kwargs)
                patch.setattr(torch.Tensor, name, wrapper)
            run_eval(S.config(models[:1], methods=["cam"], image_range=(0, n), chunk_size=n, save_maps=n), out,
                     components=components, progress=False)
        counts.append(len(calls))
        saved.append(np.load(out / "chunks" / "alpha" / f"c0000000-{n:07d}.maps.npz"))
    assert counts[0] == counts[1], counts
    # the 12-image chunk scores more images, and its saved maps are the 4-image chunk's for those
    assert len(saved[1]["images"]) > len(saved[0]["images"]) > 0
    first = np.isin(saved[1]["images"], saved[0]["images"])
    for key in [k for k in saved[0].files if k.startswith("map_")]:
        np.testing.assert_array_equal(saved[1][key][first], saved[0][key])


def _own_components(loads=None):
    """The project's explainer and evaluate, with the tiny stand-in models and dataset."""
    comps = S.components()
    return run_components(load_model=lambda path: (loads.append(path) if loads is not None else None)
                          or S.load_model(path), dataset=comps.dataset, fingerprint=comps.fingerprint)


@pytest.mark.parametrize("change, message", [
    ({"layers": ["stage9"]}, r"unknown layer 'stage9' \(--layers\)"),
    ({"layers": ["conv"], "method_grid": {"gradcam": {"layers": ["conv", "cnov"]}}},
     r"unknown layer 'cnov' \(method grid of 'gradcam'\)"),
    ({"layers": ["conv"], "refine_layers": ["conv", "stage9"], "mixes": ["identity", "product"]},
     r"unknown layer 'stage9' \(--refine-layers\)"),
    ({"methods": ["relax"], "layers": ["conv"], "method_options": {"relax": {"embedding_layer": "stage9"}}},
     r"unknown layer 'stage9' \(method options of 'relax' \(embedding_layer\)\)"),
])
def test_an_unknown_layer_is_refused_before_any_work_naming_the_accepted_names(models, tmp_path, change, message):
    """A misspelt layer was only found map by map: every layer-based row an error, exit 0."""
    torch.set_num_threads(1)
    config = S.config(models, methods=["gradcam", "lafam", "halfcam"], metrics=["gt_cosine"], mixes=["identity"],
                      image_range=(0, 4))
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message) as err:
        run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    text = str(err.value)
    for path in models:  # each model, with what it accepts
        assert f"--model {path}: unknown layer" in text
    assert "accepted: no stage aliases (architecture not recognised), or any of its 2 module names" in text
    assert not (tmp_path / "run").exists()


def test_layer_free_methods_ignore_the_layers(models, tmp_path):
    """--layers only concerns layer methods: pixel methods and baselines run whatever it says."""
    torch.set_num_threads(1)
    config = S.config(models, methods=["halfcam", "randomcam"], metrics=["gt_cosine"], layers=["stage9"],
                      mixes=["identity"], image_range=(0, 4))
    run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    status = load_results(tmp_path / "run").status
    assert len(status) and (status != "error").all()
    config = S.config(models, methods=["gradcam"], metrics=["gt_cosine"], layers=["conv"], mixes=["identity"],
                      image_range=(0, 4))  # a module name of the stand-in resolves
    run_eval(config, tmp_path / "run2", components=_own_components(), progress=False)
    assert (load_results(tmp_path / "run2").status != "error").all()


@pytest.mark.parametrize("metrics, options, message", [
    (["road"], {"fractions": 0.5}, r"metric options: fractions=0.5 is refused by the metrics \(TypeError: "
                                    r"fractions must be a sequence"),
    (["road", "gt_cosine"], {"noise": 0.02, "fractions": [0.2, 1.5]},
     r"metric options: fractions=\[0.2, 1.5\] is refused .*values in \(0, 1\)"),
    (["topk_intersection"], {"topk": 0}, r"metric options: topk=0 is refused .*k must be in \[1, H\*W = 256\]"),
    (["pointing_game"], {"pointing_ties": "all"}, r"pointing_ties='all' is refused .*ties must be 'any' or 'fraction'"),
])
def test_a_bad_metric_option_value_is_refused_before_any_work(models, tmp_path, metrics, options, message):
    """Checked by the metrics' own checks on a one-image dry run, not on every row of the run."""
    torch.set_num_threads(1)
    state = torch.random.get_rng_state()
    config = S.config(models, methods=["halfcam"], metrics=metrics, metric_options=options, image_range=(0, 4))
    with pytest.raises(ValueError, match=message):
        run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    assert not (tmp_path / "run").exists()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_good_metric_option_values_pass_the_dry_run(models, tmp_path):
    torch.set_num_threads(1)
    config = S.config(models, methods=["halfcam"], metrics=["road", "topk_intersection"], image_range=(0, 4),
                      metric_options={"fractions": [0.25, 0.5], "topk": 10})
    run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    df = load_results(tmp_path / "run")
    assert {"road_morf@0.25", "road_lerf@0.5", "topk_intersection"} <= set(df[df.status == "ok"].metric)
    # the stand-in dataset's image 2 exceeds [0, 1] (ROAD refuses it), nothing else fails
    assert all("outside [0, 1]" in reason for reason in df[df.status == "error"].reason)


def test_a_dry_run_that_fails_without_options_blames_no_option(models, tmp_path, monkeypatch):
    """If the stand-in itself fails (a metric it cannot serve), no option is blamed for it."""
    import validation.pipeline.checks as checks

    def stand_in_fails(metrics, options, shape):
        raise RuntimeError("the stand-in cannot run this metric")

    monkeypatch.setattr(checks, "_dry_evaluate", stand_in_fails)
    torch.set_num_threads(1)
    config = S.config(models, methods=["halfcam"], metrics=["topk_intersection"], image_range=(0, 4),
                      metric_options={"topk": 10})
    run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    assert "topk_intersection" in set(load_results(tmp_path / "run").metric)


def _quick_config(models, **over):
    return S.config(models, methods=["halfcam"], metrics=["gt_cosine"], mixes=["identity"], **over)


def test_a_model_below_the_accuracy_threshold_is_warned_about_and_its_accuracy_reported(models, tmp_path,
                                                                                       capsys, monkeypatch):
    """A near-chance model was evaluated without a word (only `reproduce` gates on accuracy)."""
    import validation.pipeline.run as run_module

    torch.set_num_threads(1)
    summary = run_eval(_quick_config(models), tmp_path / "run", components=S.components(), progress=False)
    pred = load_predictions(tmp_path / "run")
    acc = pred.groupby("model").correct.mean().round(4).to_dict()
    assert summary["accuracy"] == acc and max(acc.values()) < run_module.LOW_ACCURACY
    err = capsys.readouterr().err
    for path, name in zip(models, ("alpha", "beta")):
        n_correct = int(pred[pred.model == name].correct.sum())
        assert (f"warning: --model {path}: {n_correct} of {S.N_IMAGES} evaluated images classified correctly "
                f"({acc[name]:.1%}, below 90%); the maps of a model that has not learned the task") in err
    assert len(summary["warnings"]) == 2
    monkeypatch.setattr(run_module, "LOW_ACCURACY", 0.1)  # the results are the same, without the warning
    again = run_eval(_quick_config(models), tmp_path / "run", components=S.components(), progress=False)
    assert again["chunks_computed"] == 0 and again["accuracy"] == acc and again["warnings"] == []
    assert "warning" not in capsys.readouterr().err


def test_a_dataset_of_another_recipe_or_fingerprint_than_the_training_data_is_warned_about(tmp_path, capsys):
    """A model trained on two size bands, evaluated on three, without a word; likewise a model
    trained from disk on another dataset. A warning, not an error: the run goes on."""
    from shapesynth.config import SynthConfig

    torch.set_num_threads(1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "shapesynth.json").write_text(json.dumps({"config": SynthConfig(image_size=64, seed=1).to_dict()}))
    two_bands = SynthConfig(image_size=64, size_bands=((0.31, 0.39), (0.16, 0.19)), clutter=0.2,
                            split_sizes={"train": 5, "val": 5, "test": 5}).to_dict()
    trained_on = {"rendered": {"data": None, "synth": two_bands},
                  "same": {"data": None, "synth": SynthConfig(image_size=64, seed=7).to_dict()},
                  "disk": {"data": "/elsewhere/data", "synth": None}}
    paths = S.make_models(tmp_path, trained_on)

    def load_model(path):
        model, meta = S.load_model(path)
        return model, {**meta, "data": trained_on[Path(path).stem], "dataset_fingerprint": "abc"}

    comps = S.components()
    comps.load_model = load_model
    summary = run_eval(_quick_config(paths, data=str(data), image_range=(0, 4)), tmp_path / "run",
                       components=comps, progress=False)
    assert summary["chunks_computed"] == 3
    err = capsys.readouterr().err
    assert (f"warning: --model {paths[0]}: the dataset's recipe differs from the one it was trained with in "
            "clutter (0.2 -> 0.65), size_bands ([[0.31, 0.39], [0.16, 0.19]] -> [[0.3125, 0.38671875], "
            "[0.15625, 0.19140625], [0.078125, 0.09375]]) (model's -> dataset's); the maps and metrics "
            "describe it on a shifted distribution") in err
    assert f"--model {paths[1]}: the dataset's recipe" not in err  # seed, split sizes: the same images
    assert (f"warning: --model {paths[2]}: it was trained on another dataset (/elsewhere/data, fingerprint abc) "
            f"than {data} (fingerprint tiny-fingerprint)") in err
    assert sum("recipe" in w or "another dataset" in w for w in summary["warnings"]) == 2


def _first_chunk(out, suffix):
    return sorted((out / "chunks" / "alpha").glob(f"*.{suffix}"))[0]


@pytest.mark.parametrize("damage, message", [
    # a file of another program in place of a chunk's results or predictions: the merge failed on
    # pandas' "Cannot convert non-finite values" (or a KeyError) naming no file
    (lambda out: pd.DataFrame({"a": [1]}).to_parquet(_first_chunk(out, "results.parquet")),
     r"c0000000-0000004\.results\.parquet: not a results chunk .*lack required columns.* delete it and its marker"),
    (lambda out: pd.DataFrame({"a": [1]}).to_parquet(_first_chunk(out, "predictions.parquet")),
     r"c0000000-0000004\.predictions\.parquet: not a predictions chunk .*lack required columns"),
    (lambda out: _first_chunk(out, "results.parquet").unlink(),
     r"c0000000-0000004\.results\.parquet: missing, though its marker .* delete the marker"),
    # a marker that is not a JSON object: AttributeError 'list' object has no attribute 'get'
    (lambda out: _first_chunk(out, "done.json").write_text("[1, 2]"),
     r"c0000000-0000004\.done\.json: not a chunk marker \(a JSON object\), got list"),
    # a stray file matching the marker pattern: "not enough values to unpack", naming no file
    (lambda out: (out / "chunks" / "alpha" / "c_copy.done.json").write_text("{}"),
     r"c_copy\.done\.json: not a chunk marker name"),
    # a run_config.json that is not a run's: TypeError list indices must be integers
    (lambda out: (out / "run_config.json").write_text("[]"),
     r"run_config\.json: not the run config of a `shapesynth-eval run`"),
], ids=["foreign-results", "foreign-predictions", "missing-results", "marker-not-object", "stray-marker-name",
        "foreign-run-config"])
def test_merge_of_foreign_or_damaged_files_names_the_file(models, tmp_path, capsys, damage, message):
    from validation.cli import main

    out = tmp_path / "run"
    _single_run(models, out)
    damage(out)
    assert main(["merge", str(out)]) == 2  # one line on stderr, not a traceback
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, columns", [("results.parquet", "result rows"), ("predictions.parquet", "prediction rows")])
def test_analyze_of_a_foreign_merged_table_names_the_file(models, tmp_path, capsys, name, columns):
    """A results.parquet / predictions.parquet of another program: analyze said "result rows lack
    required columns" without the file, and a foreign predictions.parquet was a KeyError traceback."""
    from validation.cli import main

    out = tmp_path / "run"
    _single_run(models, out)
    pd.DataFrame({"a": [1]}).to_parquet(out / name)
    assert main(["analyze", str(out), "--n-boot", "5"]) == 2
    err = capsys.readouterr().err
    assert f"{out / name}: not a table merged by shapesynth-eval ({columns} lack required columns" in err, err
    assert f"run `shapesynth-eval merge {out}`" in err


@pytest.mark.parametrize("options", [{"interpolation": "nearest"}, {"cell_centres": "model"},
                                     {"interpolation": "nearest", "cell_centres": "model", "score": "softmax"}])
def test_a_refined_configuration_takes_the_methods_upsampling_options(options):
    """`method_options` of a refinable method reach its RefineCAM configurations: the upsampling
    options are RefineCAM's own (it refuses them among its base's), the rest its base's. Before,
    every refined configuration of such a run failed with "unknown base_options"."""
    import torchvision

    from validation.attributions import explain
    from validation.pipeline.run import MapConfig, _default_explainer

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    layers = ["stage1", "stage2", "stage3", "stage4"]
    given = {"gradcam": dict(options)}
    explainer = _default_explainer(model, MapConfig("gradcam", "stage2", "product"), layers, given, seed=0)
    assert given == {"gradcam": options}  # the run's options are not consumed
    ours = explainer.attribute(x, target=[1, 2])
    own = {k: v for k, v in options.items() if k in ("interpolation", "cell_centres")}
    base = {k: v for k, v in options.items() if k not in own}
    expected = explain(model, x, [1, 2], method="refinecam", base="gradcam", layers=("stage2", "stage3", "stage4"),
                       mix="product", base_options=base, **own)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    default = explain(model, x, [1, 2], method="refinecam", base="gradcam", layers=("stage2", "stage3", "stage4"),
                      mix="product", base_options=base)
    assert (ours - default).abs().max() > 1e-3  # the options changed the maps


def test_an_explainer_its_options_refuse_is_refused_before_any_work(models, tmp_path):
    """cell_centres='model' at a layer without declared cell geometry (the stand-in's `conv`) was
    refused by the explainer map by map: every row of the configuration an error, exit 0."""
    torch.set_num_threads(1)
    config = S.config(models, methods=["gradcam", "halfcam"], metrics=["gt_cosine"], layers=["conv"],
                      mixes=["identity"], image_range=(0, 4), method_options={"gradcam": {"cell_centres": "model"}})
    with pytest.raises(ValueError, match=r"these configurations cannot be explained: --model .*gradcam at conv "
                                         r"\(identity\): cell_centres='model': where the cells of layer 'conv'"):
        run_eval(config, tmp_path / "run", components=_own_components(), progress=False)
    assert not (tmp_path / "run").exists()
