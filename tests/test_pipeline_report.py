"""analyze + report on a stand-in run: tables on disk, self-contained HTML, valid PNG figures."""

import base64
import io
import re

import pandas as pd
import pytest
import torch
from PIL import Image

import test_pipeline_standins as S
from validation.analyze import TABLES, analyze_run
from validation.cli import main
from validation.pipeline.run import run_eval
from validation.report import write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    models = S.make_models(tmp)
    out = tmp / "run"
    torch.set_num_threads(1)
    cfg = S.config(models, methods=["cam", "grad", "randomcam", "halfcam", "oracle"],
                   metrics=["gt_cosine", "complexity", "road"])
    run_eval(cfg, out, components=S.components(), progress=False)
    return out


def test_analyze_writes_every_table(run_dir):
    assert main(["analyze", str(run_dir), "--n-boot", "50"]) == 0
    for name in TABLES:
        assert (run_dir / "analysis" / f"{name}.csv").exists()
    c = pd.read_csv(run_dir / "analysis" / "c_refinecam.csv")
    refined = c[c.refined.notna()]
    assert set(refined.method) == {"cam"} and set(refined.layer) == {"l1"}
    # layer-free real methods are listed base-only, as in the paper's Table 1; trivial maps are not
    flat = c[c.refined.isna()]
    assert set(flat.method) == {"grad"} and set(flat.layer) == {"-"}
    f = pd.read_csv(run_dir / "analysis" / "f_road_curves.csv")
    assert set(f.order) == {"MORF", "LERF"} and set(f.fraction) == {0.0, 0.2, 0.4}
    md = (run_dir / "analysis" / "tables.md").read_text()
    assert "| model | metric |" in md


def test_report_is_self_contained_with_figures(run_dir):
    analyze_run(run_dir, n_boot=50)
    path = write_report(run_dir)
    page = path.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        assert img.size[0] > 100 and img.size[1] > 100
    for name in ("correlation", "trivial", "refinecam", "road_curves", "qualitative"):
        png = path.parent / "figures" / f"{name}.png"
        assert png.exists(), name
        Image.open(png).verify()
    assert "Expectations from the papers" in page and "alpha" in page
    for name in TABLES:  # every analysis table has its section
        assert f"<h2>{name}:" in page or name == "expectations", name
    assert "http://" not in page and "https://" not in page


def test_report_cli_and_missing_run_error(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "index.html").exists()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_road_curves_start_at_the_unperturbed_probability(run_dir):
    from validation.pipeline.table import load_predictions, load_results
    from validation.analyze import table_road_curves

    res, pred = load_results(run_dir), load_predictions(run_dir)
    f = table_road_curves(res, pred)
    row = f[(f.model == "alpha") & (f.method == "grad") & (f.order == "MORF") & (f.fraction == 0.0)].iloc[0]
    imgs = set(res[(res.model == "alpha") & (res.method == "grad")].image)
    expect = pred[(pred.model == "alpha") & pred.image.isin(imgs)].prob.mean()
    assert row["prob"] == pytest.approx(expect) and row["n"] == len(imgs)
    # stand-in LeRF curve is p * (1 - f / 2): at 0.4 that is 0.8 of the start
    lerf = f[(f.model == "alpha") & (f.method == "grad") & (f.order == "LERF")].set_index("fraction")["prob"]
    assert lerf[0.4] == pytest.approx(0.8 * lerf[0.0])


def test_report_reanalyzes_tables_older_than_the_merge_and_refuses_unmerged_chunks(run_dir):
    import os

    from validation.pipeline.table import merge_run

    analyze_run(run_dir, n_boot=20)
    stale = "model,metric,better,level,pearson\nSTALE_ROW,gt_cosine,higher,pairs,0.5\n"
    (run_dir / "analysis" / "a_validity.csv").write_text(stale)  # tables of an older merge ...
    merge_run(run_dir)  # ... then results.parquet is merged again
    page = write_report(run_dir, n_boot=20).read_text()
    assert "STALE_ROW" not in page and "STALE_ROW" not in (run_dir / "analysis" / "a_validity.csv").read_text()
    # a chunk that finished after the merge: the report would describe a table without it
    marker = next((run_dir / "chunks" / "alpha").glob("*.done.json"))
    later = (run_dir / "results.parquet").stat().st_mtime_ns + 1
    os.utime(marker, ns=(later, later))
    try:
        with pytest.raises(RuntimeError, match="finished after results.parquet was merged"):
            write_report(run_dir, n_boot=20)
    finally:
        merge_run(run_dir)


def test_not_checked_expectations_read_back_as_n_a_and_figures_leave_matplotlib_alone(tmp_path):
    """"n/a" is a value, not a missing cell, when the report reads the tables from disk; and
    importing the figures selects no backend (a notebook's stays as it was)."""
    import subprocess
    import sys

    from validation.report import read_table

    code = ("import matplotlib; matplotlib.use('svg'); import validation.report.figures; "
            "import matplotlib as m; print(m.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "svg"
    frame = pd.DataFrame({"expectation": ["a", "b"], "found": ["x", ""], "status": ["n/a", "holds"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    back = read_table(tmp_path / "t.csv")
    assert back.status.tolist() == ["n/a", "holds"] and pd.isna(back.found[1])


def test_report_of_a_partial_merge_says_which_chunks_are_missing(tmp_path):
    """`merge --allow-partial` then `report`: the page must say the tables lack chunks."""
    from validation.pipeline.table import merge_run

    models = S.make_models(tmp_path)
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models, methods=["cam", "halfcam"], metrics=["gt_cosine", "complexity"]), out, shard=(0, 2),
             components=S.components(), progress=False)
    man = merge_run(out, allow_partial=True)
    assert man["chunks"]["merged"] == 6 and man["chunks"]["expected"] == 10
    page = write_report(out, n_boot=10).read_text()
    assert "Partial run: 4 of 10 chunks were not merged (alpha[4:8], alpha[12:16], beta[4:8], beta[12:16])" in page
    assert "<th>chunks merged</th><td>6 of 10; missing: alpha[4:8]" in page
    run_eval(S.config(models, methods=["cam", "halfcam"], metrics=["gt_cosine", "complexity"]), out, shard=(1, 2),
             components=S.components(), progress=False)
    merge_run(out)
    page = write_report(out, n_boot=10).read_text()
    assert "Partial run" not in page and "<th>chunks merged</th><td>10 of 10</td>" in page


def test_saved_maps_keep_every_chunks_images_and_name_a_configuration_some_chunks_lack(tmp_path):
    """A configuration that failed on one chunk's images has no maps there. The grid used to drop
    that whole chunk (its images too) without a word; it now keeps every image, shows the
    configurations all chunks hold and warns naming the other one and the chunk lacking it."""
    import numpy as np

    from validation.report import load_saved_maps

    folder = tmp_path / "chunks" / "alpha"
    folder.mkdir(parents=True)

    def chunk(name, images, configs):
        n = len(images)
        maps = {f"map_{i}": np.full((n, 4, 4), 10 * i + images[0], np.float32) for i in range(len(configs))}
        np.savez(folder / name, images=np.asarray(images), x=np.zeros((n, 3, 4, 4), np.float16),
                 gt=np.zeros((n, 4, 4), np.float16), labels=np.asarray(images) % 6, configs=np.asarray(configs),
                 **maps)

    chunk("c0-2.maps.npz", [0, 1], ["cam@stage1", "gradcam@stage1", "lafam@stage1"])
    chunk("c2-4.maps.npz", [2, 3], ["cam@stage1", "lafam@stage1"])  # gradcam failed here
    with pytest.warns(UserWarning, match=r"gradcam@stage1 \(not in c2-4.maps.npz\)"):
        saved = load_saved_maps(tmp_path, "alpha")
    assert saved["images"].tolist() == [0, 1, 2, 3]
    assert saved["configs"].tolist() == ["cam@stage1", "lafam@stage1"]
    # each configuration's maps come from its own entry in every chunk
    assert saved["map_0"][:, 0, 0].tolist() == [0, 0, 2, 2]
    assert saved["map_1"][:, 0, 0].tolist() == [20, 20, 12, 12]


def test_the_grid_shows_the_first_model_with_saved_maps(run_dir, tmp_path):
    """A first model without maps in the saved range (e.g. it misclassified those images) used to
    leave the report without a qualitative grid although the others had maps."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for f in (run / "chunks" / "alpha").glob("*.maps.npz"):
        f.unlink()
    analyze_run(run, n_boot=20)
    page = write_report(run).read_text()
    assert (run / "report" / "figures" / "qualitative.png").exists()
    assert "<h2>Qualitative grid</h2><p>Model beta:" in page


def test_the_grid_caption_names_the_model_the_grid_shows_when_maps_appear_meanwhile(run_dir, tmp_path, monkeypatch):
    """The saved maps were listed three times per report (the figure's model, its maps, the
    caption's model): maps written while the figures were drawn (a chunk finishing meanwhile)
    gave a grid of beta captioned "Model alpha". They are listed once now."""
    import shutil

    from validation.report import figures as F

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    kept = tmp_path / "alpha_maps"
    kept.mkdir()
    for f in (run / "chunks" / "alpha").glob("*.maps.npz"):
        shutil.move(f, kept / f.name)
    analyze_run(run, n_boot=20)
    drawn, real = [], F.qualitative_grid

    def draw_then_alpha_maps_appear(saved, *args, **kwargs):
        drawn.append(saved["images"].tolist())
        for f in kept.iterdir():
            shutil.copy(f, run / "chunks" / "alpha" / f.name)
        return real(saved, *args, **kwargs)

    monkeypatch.setattr(F, "qualitative_grid", draw_then_alpha_maps_appear)
    page = write_report(run).read_text()
    assert len(drawn) == 1 and list((run / "chunks" / "alpha").glob("*.maps.npz"))
    assert "<h2>Qualitative grid</h2><p>Model beta:" in page


# ----------------------------------------------------------------------------- figure data
def _trivial_per_model():
    """Table b's per-model rows, adcc and road, real range ma (0.2, 0.6), mb (0.4, 0.8), mc (0.0, 1.0):
    halfcam is scored on ma and mb (mc's halfcam is NaN); randomcam on ma only for adcc, on all
    three for road."""
    import numpy as np

    from validation.analyze import table_trivial
    from validation.pipeline.table import make_results_frame

    real = {"ma": (0.2, 0.6), "mb": (0.4, 0.8), "mc": (0.0, 1.0)}
    rows = []
    for model, (g, l) in real.items():
        for metric in ("adcc", "road"):
            rows += [dict(model=model, image=0, method="gradcam", metric=metric, value=g),
                     dict(model=model, image=0, method="lime", metric=metric, value=l + 0.1 * (metric == "road")),
                     dict(model=model, image=0, method="halfcam", metric=metric,
                          value=np.nan if model == "mc" else 0.5)]
        rows.append(dict(model=model, image=0, method="randomcam", metric="adcc",
                         value=0.3 if model == "ma" else np.nan))
        rows.append(dict(model=model, image=0, method="randomcam", metric="road", value=0.1))
    return table_trivial(make_results_frame(rows))


def test_trivial_figure_averages_the_models_the_verdict_does(tmp_path):
    """The figure averaged every model's real range (mc's too, where halfcam has no score) with
    NaN-skipping means, so its range was wider than the verdict table's for the same trivial map,
    and it drew randomcam's adcc score (ma only) against a range over all three models."""
    from validation.report import figures as F
    from validation.report import read_table

    per_model, verdict = _trivial_per_model()
    labels = [t.get_text() for t in F.trivial_bars(per_model).axes[0].get_xticklabels()]
    assert labels == ["randomcam (1/3 models)", "halfcam (2/3 models)"]  # adcc: each in its own range
    path = tmp_path / "b_trivial.csv"
    per_model.to_csv(path, index=False)  # as the report reads it back: `fooled` empty where unscored
    for table in (per_model, read_table(path)):
        d = F.trivial_bar_data(table).set_index(["metric", "trivial"])
        half = d.loc[("adcc", "halfcam")]
        assert (half.real_worst, half.real_median, half.real_best, half.trivial_score) == pytest.approx(
            ((0.2 + 0.4) / 2, (0.4 + 0.6) / 2, (0.6 + 0.8) / 2, 0.5))
        assert (half.n_models, half.models, half.scored_models) == (2, 3, "ma,mb")
        rand = d.loc[("adcc", "randomcam")]
        assert (rand.real_worst, rand.real_best, rand.trivial_score, rand.n_models) == pytest.approx((0.2, 0.6, 0.3, 1))
        assert not half.shared_range and not rand.shared_range  # adcc: no one range fits both
        # road: halfcam on ma, mb; randomcam on all three, so no shared range either
        assert d.loc[("road", "randomcam"), "real_best"] == pytest.approx((0.7 + 0.9 + 1.1) / 3)
        assert not d.loc[("road", "halfcam"), "shared_range"]
        # the verdict table's columns, for every (metric, trivial map)
        v = verdict.set_index(["metric", "trivial"])
        for col in ("real_worst", "real_best", "trivial_score"):
            assert d[col].to_numpy() == pytest.approx(v.loc[d.index, col].to_numpy(), nan_ok=True), col


def test_trivial_figure_draws_one_range_when_every_trivial_map_rests_on_the_same_models():
    from validation.report import figures as F

    per_model, _ = _trivial_per_model()
    same = per_model[per_model.model != "mc"]
    d = F.trivial_bar_data(same).set_index(["metric", "trivial"])
    assert d.loc["road", "shared_range"].all() and d.loc["road", "n_models"].tolist() == [2, 2]
    assert not d.loc["adcc", "shared_range"].any()  # adcc randomcam: ma only
    road = F.trivial_bars(same).axes[1]
    assert [t.get_text() for t in road.get_xticklabels()] == ["real range", "randomcam", "halfcam"]


def test_refine_and_correlation_figures_mark_means_over_fewer_models():
    """The RefineCAM figure was titled "mean over models" and the correlation figure "mean of N
    model(s)" even where a method's or metric's mean rested on fewer of the run's models."""
    from validation.report import figures as F

    refine = pd.DataFrame({"model": ["ma", "mean", "mean", "mean"], "method": ["gradcam", "gradcam", "layercam", "lime"],
                           "layer": ["s1", "s1", "s1", "-"], "metric": "arcc", "n_models": [1, 3, 1, 3],
                           "models_nan": ["", float("nan"), "mb,mc", ""], "base": 0.1, "refined": [0.2, 0.2, 0.3, None]})
    fig = F.refine_bars(refine)
    assert fig._suptitle.get_text() == "RefineCAM before / after (mean over 3 model(s), fewer where marked)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["gradcam", "layercam (1/3 models)"]
    d = F.refine_bar_data(refine)
    assert d.label.tolist() == ["gradcam", "layercam (1/3 models)"] and d.run_models.tolist() == [3, 3]
    validity = pd.DataFrame({"model": ["mean+-std"] * 2 + ["ma"], "metric": ["arcc", "road", "arcc"],
                             "level": "pairs", "n_models": [2, 1, 1], "models_nan": ["", "mb", ""],
                             "pearson": [0.5, 0.4, 0.5], "spearman": 0.5, "pearson_lo": 0.3, "pearson_hi": 0.6,
                             "spearman_lo": 0.3, "spearman_hi": 0.6, "pearson_std": 0.1, "spearman_std": 0.1})
    assert F.correlation_bar_data(validity).label.tolist() == ["arcc", "road (1/2 models)"]
    ax = F.correlation_bars(validity).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["arcc", "road (1/2 models)"]
    assert ax.get_title() == "pairs (mean of 2 model(s), fewer where marked)"
