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
