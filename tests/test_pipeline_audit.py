"""audit: a user's metric loaded from package.module:function, placed in tables a and b."""

import importlib
import sys
import textwrap

import numpy as np
import pytest
import torch

import test_pipeline_standins as S
from validation.audit import audit_run, load_metric
from validation.pipeline.run import run_eval

USER_MODULE = '''
import torch

def gt_copy(model, x, target, maps, gt=None):
    """Exactly the ground-truth cosine: must correlate perfectly."""
    return torch.nn.functional.cosine_similarity(maps.flatten(1), gt.flatten(1), dim=1)

def noise(model, x, target, maps):
    """Independent of everything."""
    g = torch.Generator().manual_seed(int(maps.sum() * 1e6) % 2**31)
    return torch.rand(maps.shape[0], generator=g)

def half_lover(model, x, target, maps, **kwargs):
    """Rewards maps near 0.5 everywhere: HalfCAM must fool it."""
    return 1 - (maps - 0.5).abs().flatten(1).mean(1)

def gt_distance(model, x, target, maps, gt=None):
    """1 - cosine: lower is better, perfectly (inversely) aligned with the ground truth."""
    return 1 - torch.nn.functional.cosine_similarity(maps.flatten(1), gt.flatten(1), dim=1)

gt_distance.lower_is_better = True

def wrong_shape(model, x, target, maps):
    return maps.mean()

def too_few_args(maps):
    return maps

def prefix_mean(model, x, target, maps):
    return maps.flatten(1).mean(1)

def needs_a_fifth(model, x, target, maps, extra):
    return maps.flatten(1).mean(1)

def nan_on_flat(model, x, target, maps):
    """The mean, but NaN for constant maps (the stand-in HalfCAM's): an unscored trivial map."""
    flat = maps.flatten(1)
    return torch.where(flat.amax(1) - flat.amin(1) < 1e-6, torch.nan, flat.mean(1))
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    (tmp / "user_metrics_mod.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp / "user_metrics_broken.py").write_text("def f(model, x, target, maps):\n    return (\n")
    sys.path.insert(0, str(tmp))
    models = S.make_models(tmp)
    out = tmp / "run"
    cfg = S.config(models, methods=["cam", "grad", "randomcam", "halfcam"], metrics=["gt_cosine", "complexity"])
    torch.set_num_threads(1)
    run_eval(cfg, out, components=S.components(), progress=False)
    yield out
    sys.path.remove(str(tmp))


def test_metric_equal_to_ground_truth_gets_r_one(run_dir):
    res = audit_run(run_dir, "user_metrics_mod:gt_copy", n_boot=100, components=S.components(), progress=False)
    a = res["tables"]["a_validity"].set_index(["model", "metric", "level"])
    assert a.loc[("mean+-std", "gt_copy", "pairs"), "pearson"] == pytest.approx(1.0, abs=1e-9)
    assert a.loc[("alpha", "gt_copy", "pairs"), "spearman"] == pytest.approx(1.0, abs=1e-9)
    assert "tracks the ground truth: Pearson r = 1.00" in res["verdict"]
    paired = res["tables"]["a_paired"]
    # the run has no AD/ADCC/ROAD/ARCC, so the audited metric is paired with Complexity
    vs = paired[(paired.model == "mean") & (paired.metric == "gt_copy") & (paired.versus == "complexity")].iloc[0]
    assert vs["pearson_metric"] == pytest.approx(1.0)
    assert vs["pearson_diff"] == pytest.approx(1.0 - vs["pearson_versus"])
    assert vs["pearson_diff_lo"] > 0  # a copy of the ground truth beats any real metric
    assert f"vs complexity: {vs['pearson_diff']:+.2f}" in res["verdict"]
    assert "significantly better" in res["verdict"]
    assert (run_dir / "audit" / "gt_copy" / "verdict.md").exists()
    assert (run_dir / "audit" / "gt_copy" / "a_validity.csv").exists()


def test_noise_metric_does_not_track_and_halfcam_fooling(run_dir):
    res = audit_run(run_dir, "user_metrics_mod:noise", n_boot=100, components=S.components(), progress=False)
    r = res["tables"]["a_validity"].set_index(["model", "metric", "level"]).loc[("mean+-std", "noise", "pairs"), "pearson"]
    assert abs(r) < 0.3
    res = audit_run(run_dir, "user_metrics_mod:half_lover", n_boot=50, components=S.components(), progress=False)
    v = res["tables"]["b_trivial_verdict"].set_index(["metric", "trivial"])["verdict"]
    assert v[("half_lover", "halfcam")] == "fooled"
    assert "halfcam (fooled)" in res["verdict"]


def test_a_metric_that_fails_on_every_map_is_recorded_then_named_with_its_error(run_dir):
    with pytest.raises(ValueError, match=r"metric 'wrong_shape' failed on every map .*one value per sample"):
        audit_run(run_dir, "user_metrics_mod:wrong_shape", n_boot=20, components=S.components(), progress=False)
    from validation.pipeline.table import load_results

    t = load_results(run_dir / "audit" / "wrong_shape")
    assert len(t) and (t.status == "error").all() and t.reason.str.contains("one value per sample").all()


def test_bad_specs_are_clear_errors(run_dir):
    with pytest.raises(ValueError, match="package.module:function"):
        load_metric("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_metric("surely_missing_mod:f")
    with pytest.raises(ValueError, match="no function"):
        load_metric("user_metrics_mod:missing")
    with pytest.raises(ValueError, match="model, x, target, maps"):
        load_metric("user_metrics_mod:too_few_args")
    with pytest.raises(ValueError, match=r"callable as f\(model, x, target, maps\).*extra"):
        load_metric("user_metrics_mod:needs_a_fifth")
    with pytest.raises(ValueError, match="expected package.module:function"):
        load_metric(":f")
    with pytest.raises(ValueError, match=r"importing module 'user_metrics_broken' raised SyntaxError"):
        load_metric("user_metrics_broken:f")
    with pytest.raises(ValueError, match="'@' is reserved"):
        audit_run(run_dir, "user_metrics_mod:prefix_mean", name="iou@0.5", components=S.components(),
                  progress=False)
    with pytest.raises(ValueError, match="already exists"):
        audit_run(run_dir, "user_metrics_mod:gt_copy", name="gt_cosine", components=S.components(), progress=False)


def test_lower_is_better_metric_is_oriented(run_dir):
    res = audit_run(run_dir, "user_metrics_mod:gt_distance", n_boot=20, components=S.components(), progress=False)
    a = res["tables"]["a_validity"].set_index(["model", "metric", "level"])
    assert a.loc[("mean+-std", "gt_distance", "pairs"), "pearson"] == pytest.approx(-1.0, abs=1e-9)
    assert (a.xs("gt_distance", level="metric")["better"] == "lower").all()  # the table says so too
    assert "tracks the ground truth: Pearson r = 1.00 (oriented" in res["verdict"]


def test_rerun_with_other_n_images_needs_overwrite(run_dir):
    from validation.cli import build_parser
    from validation.pipeline.table import load_results

    audit_run(run_dir, "user_metrics_mod:prefix_mean", n_images=8, n_boot=10, components=S.components(),
              progress=False)
    with pytest.raises(ValueError, match=r"pass --overwrite to recompute it, or --name") as err:
        audit_run(run_dir, "user_metrics_mod:prefix_mean", n_images=12, n_boot=10, components=S.components(),
                  progress=False)
    assert "--out" not in str(err.value)  # audit has no --out
    audit_run(run_dir, "user_metrics_mod:prefix_mean", n_images=12, n_boot=10, components=S.components(),
              progress=False, overwrite=True)
    assert load_results(run_dir / "audit" / "prefix_mean").image.max() >= 8
    args = build_parser().parse_args(["audit", "r", "--metric", "m:f", "--overwrite"])
    assert args.overwrite


def test_edited_metric_code_is_recomputed(run_dir, tmp_path, monkeypatch):
    from validation.pipeline.table import load_results

    monkeypatch.syspath_prepend(str(tmp_path))
    body = "def edited(model, x, target, maps):\n    return maps.flatten(1).mean(1){}\n"

    def audit(version):
        (tmp_path / "edited_mod.py").write_text(body.format(version))
        sys.modules.pop("edited_mod", None)
        importlib.invalidate_caches()
        audit_run(run_dir, "edited_mod:edited", n_images=8, n_boot=10, components=S.components(), progress=False)
        return load_results(run_dir / "audit" / "edited").set_index(["model", "image", "method", "layer", "mix"]).value

    first = audit("")
    markers = lambda: {m: m.stat().st_mtime_ns for m in (run_dir / "audit" / "edited").glob("chunks/*/*.done.json")}  # noqa: E731
    before = markers()
    assert (audit("") == first).all() and markers() == before  # unchanged code: cached chunks reused
    again = audit(" * 2 + 1  # edited")
    np.testing.assert_allclose(again.to_numpy(), 2 * first.to_numpy() + 1)


def test_the_audit_folds_the_models_as_the_run_did(run_dir, tmp_path):
    import json
    import shutil

    def audited_models(folder):
        seen, base = [], S.components()

        def recording_explainer(model, cfg, layers, options, seed):
            seen.append(model)
            return base.explainer(model, cfg, layers, options, seed)

        comps = S.Components(**{**base.__dict__, "explainer": recording_explainer})
        audit_run(folder, "user_metrics_mod:gt_copy", name="fold_probe", n_images=4, n_boot=10, components=comps, progress=False)
        assert seen
        return seen

    assert all(hasattr(m, "inference_folds") for m in audited_models(run_dir))
    legacy = tmp_path / "legacy_run"
    shutil.copytree(run_dir, legacy, ignore=shutil.ignore_patterns("audit"))
    cfg = json.loads((legacy / "run_config.json").read_text())
    del cfg["fold"]  # a run from before folding existed evaluated the models as loaded
    (legacy / "run_config.json").write_text(json.dumps(cfg))
    assert not any(hasattr(m, "inference_folds") for m in audited_models(legacy))


def test_trivial_maps_without_a_score_are_named_not_passed_over(run_dir):
    """The stand-in HalfCAM map is constant, where this metric is NaN: HalfCAM has no score on
    any model, so its verdict is "not checked" and the verdict text says so."""
    res = audit_run(run_dir, "user_metrics_mod:nan_on_flat", n_boot=20, components=S.components(), progress=False)
    per_model, verdicts = res["tables"]["b_trivial"], res["tables"]["b_trivial_verdict"]
    models = sorted(set(per_model.model))
    half = per_model[(per_model.metric == "nan_on_flat") & (per_model.trivial == "halfcam")]
    assert len(half) == len(models) == 2 and half.trivial_score.isna().all() and half.fooled.isna().all()
    row = verdicts[(verdicts.metric == "nan_on_flat") & (verdicts.trivial == "halfcam")].iloc[0]
    assert row.verdict == "not checked (2/2 models unscored)" and row.models_unscored == 2
    rand = verdicts[(verdicts.metric == "nan_on_flat") & (verdicts.trivial == "randomcam")].iloc[0]
    assert rand.models_unscored == 0 and "unscored" not in rand.verdict
    assert "Not checked on every model (no finite score: NaN or errors): halfcam" in res["verdict"]
    assert "No trivial map" not in res["verdict"]


@pytest.mark.parametrize("n_images", [0, -3])
def test_an_empty_or_negative_n_images_is_refused_naming_the_flag(run_dir, n_images):
    """0 used to audit nothing and judge the run without the metric ("too few finite values");
    a negative count failed on an image range the user never gave."""
    with pytest.raises(ValueError, match=rf"--n-images must be >= 1, got {n_images}"):
        audit_run(run_dir, "user_metrics_mod:prefix_mean", name=f"empty_{abs(n_images)}", n_images=n_images,
                  n_boot=10, components=S.components(), progress=False)
    assert not (run_dir / "audit" / f"empty_{abs(n_images)}").exists()


def test_verdict_compares_with_the_best_of_our_metrics_that_has_a_correlation():
    """Average Drop constant (no correlation, NaN): it is no rival, ARCC is."""
    import pandas as pd

    from validation import analyze as A
    from validation.audit import verdict_text
    from validation.pipeline.table import make_results_frame

    rng = np.random.default_rng(0)
    rows = []
    for model in ("m1", "m2"):
        for img in range(15):
            for k in range(4):
                gt = rng.random()
                vals = {"gt_cosine": gt, "average_drop": 0.5, "arcc": gt + 0.5 * rng.normal(),
                        "mine": gt + 0.05 * rng.normal()}
                rows += [dict(image=img, model=model, method=f"meth{k}", layer="-", mix="identity", metric=m, value=v)
                         for m, v in vals.items()]
    validity = A.table_validity(make_results_frame(rows), n_boot=10)
    assert np.isnan(validity.set_index(["model", "metric", "level"]).loc[("mean+-std", "average_drop", "pairs"), "pearson"])
    text = verdict_text("mine", validity, pd.DataFrame())
    assert "It is better than the best of our metrics here (arcc)." in text, text


def test_a_bootstrap_count_below_one_is_refused_before_the_metric_is_computed(run_dir):
    with pytest.raises(ValueError, match=r"--n-boot \(bootstrap replicates\) must be >= 1, got 0"):
        audit_run(run_dir, "user_metrics_mod:prefix_mean", name="no_boot", n_boot=0, components=S.components(),
                  progress=False)
    assert not (run_dir / "audit" / "no_boot").exists()


def test_the_comparison_line_says_its_correlations_are_oriented():
    """Average Drop that falls as the ground truth rises has r < 0 in table a; the verdict's
    comparison line shows it flipped (> 0), so it must say that it is oriented."""
    import pandas as pd

    from validation import analyze as A
    from validation.audit import verdict_text
    from validation.pipeline.table import make_results_frame

    rng = np.random.default_rng(1)
    rows = []
    for img in range(15):
        for k in range(4):
            gt = rng.random()
            vals = {"gt_cosine": gt, "average_drop": 1 - gt + 0.1 * rng.normal(), "mine": gt + 0.05 * rng.normal()}
            rows += [dict(image=img, model="m1", method=f"meth{k}", layer="-", mix="identity", metric=m, value=v)
                     for m, v in vals.items()]
    validity = A.table_validity(make_results_frame(rows), n_boot=10)
    r_table = validity.set_index(["model", "metric", "level"]).loc[("mean+-std", "average_drop", "pairs"), "pearson"]
    assert r_table < -0.5
    text = verdict_text("mine", validity, pd.DataFrame())
    line = next(line for line in text.splitlines() if line.startswith("For comparison"))
    assert "oriented" in line and f"average_drop r = {-r_table:.2f}" in line, line


def test_a_run_without_the_ground_truth_cosine_is_refused_before_the_metric_is_computed(tmp_path, run_dir):
    """The audit judges a metric against gt_cosine: on a run without it, every map was recomputed
    and scored (minutes on a real run) before "reference metric 'gt_cosine' not in the table"."""
    models = S.make_models(tmp_path)
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam", "randomcam"], metrics=["complexity"]), out,
             components=S.components(), progress=False)
    with pytest.raises(ValueError, match=r"has no gt_cosine rows.*rerun it with gt_cosine among its --metrics"):
        audit_run(out, "user_metrics_mod:prefix_mean", n_boot=10, components=S.components(), progress=False)
    assert not (out / "audit").exists()


def test_the_audit_keeps_every_component_it_is_given_but_the_evaluator(run_dir, monkeypatch):
    """The audit replaces only the evaluator; it rebuilt the Components field by field, so a
    component added later (the samples fingerprint) silently fell back to its default."""
    import dataclasses

    import validation.pipeline.run as run_module

    given = dataclasses.replace(S.components(), samples_fingerprint=lambda: None)
    seen = {}
    real_run_eval = run_module.run_eval

    def recording_run_eval(config, out_dir, components=None, **kw):
        seen["components"] = components
        return real_run_eval(config, out_dir, components=components, **kw)

    monkeypatch.setattr(run_module, "run_eval", recording_run_eval)
    audit_run(run_dir, "user_metrics_mod:gt_copy", name="components_probe", n_images=4, n_boot=10,
              components=given, progress=False)
    used = seen["components"]
    assert used.evaluate is not given.evaluate
    for f in dataclasses.fields(given):
        if f.name != "evaluate":
            assert getattr(used, f.name) is getattr(given, f.name), f.name
