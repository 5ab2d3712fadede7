"""Resume audit: an interrupted or repeated command must not leave outputs that a later command
trusts as current, and what a command drops from its input must be counted and listed."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import test_pipeline_standins as S
from shapesynth import SynthConfig
from shapesynth.config import PAPER_SIZE_BANDS
from validation.cli import main
from validation.pipeline.run import run_eval
from validation.pipeline.table import load_results


def _run(models, out, **kw):
    torch.set_num_threads(1)
    over = {k: kw.pop(k) for k in list(kw) if k in ("methods", "metrics", "mixes", "save_maps")}
    return run_eval(S.config(models, **over), out, components=kw.pop("components", S.components()),
                    progress=False, **kw)


# ---------------------------------------------------------------- run --overwrite, stopped early
def test_an_overwrite_stopped_before_its_first_chunk_leaves_no_merged_table_of_the_old_run(tmp_path, capsys):
    models = S.make_models(tmp_path)
    out = tmp_path / "run"
    _run(models, out, methods=["cam"], metrics=["gt_cosine"])
    assert set(load_results(out)["method"]) == {"cam"}
    # another configuration over the same folder, stopped before its first chunk finished:
    # run_config.json is the new run's and every chunk is gone; the old run's merged tables with them
    with pytest.raises(KeyboardInterrupt):
        _run(models, out, methods=["grad"], metrics=["gt_cosine"], overwrite=True,
             components=S.components(interrupt_after=0))
    assert json.loads((out / "run_config.json").read_text())["methods"] == ["grad"]
    assert not list(out.glob("chunks/*/*.done.json"))
    with pytest.raises(FileNotFoundError, match=r"not merged yet \(no results.parquet\)"):
        load_results(out)  # what analyze, audit and report read: not the old run's rows as this one's
    assert not [p.name for p in out.iterdir() if p.is_file() and p.name != "run_config.json"]
    assert main(["analyze", str(out), "--n-boot", "5"]) == 2
    assert "not merged yet" in capsys.readouterr().err
    assert not (out / "analysis").exists()
    _run(models, out, methods=["grad"], metrics=["gt_cosine"])  # the same command, finished
    assert set(load_results(out)["method"]) == {"grad"}


# ---------------------------------------------------------------- report: figures of an earlier report
def test_report_leaves_no_figure_of_an_earlier_report_it_did_not_make(tmp_path):
    from validation.report import write_report

    models = S.make_models(tmp_path)
    out = tmp_path / "run"
    _run(models, out, methods=["cam", "flat"], metrics=["gt_cosine", "road"])
    write_report(out, n_boot=5)
    figures = out / "report" / "figures"
    assert {"qualitative.png", "refinecam.png", "road_curves.png"} <= {p.name for p in figures.iterdir()}
    # another configuration in the same folder: no saved maps, no RefineCAM, no ROAD
    _run(models, out, methods=["cam", "flat"], metrics=["gt_cosine"], mixes=["identity"], save_maps=0,
         overwrite=True)
    html = write_report(out, n_boot=5).read_text()
    assert "Qualitative grid" not in html
    left = {p.name for p in figures.iterdir()}
    assert not {"qualitative.png", "refinecam.png", "road_curves.png"} & left, left
    # every figure left is one the page shows
    assert {f"{name}.png" for name in ("correlation", "trivial") if f"{name}.png" in left} == left


# ---------------------------------------------------------------- reproduce: a generation cut short
def test_reproduce_does_not_reuse_a_dataset_whose_generation_stopped_before_its_card(tmp_path, monkeypatch):
    import shapesynth.card as card
    from shapesynth.generate import generate
    from validation.reproduce import _dataset_ready

    cfg = SynthConfig(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 6, "val": 6, "test": 6},
                      bg_pool_sizes={"train": 2, "val": 2, "test": 2})
    data = tmp_path / "data"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the card")

    with monkeypatch.context() as m:
        m.setattr(card, "write_card", killed)
        with pytest.raises(KeyboardInterrupt):
            generate(cfg, data, samples_per_shard=3, progress=False)
    assert not (data / "README.md").exists()  # every shard written, the card (and its audit) not
    # the generate step is skipped when the data is ready: here it must run (--resume) to finish it
    assert not _dataset_ready(data, "test", 6)
    generate(cfg, data, samples_per_shard=3, progress=False, resume=True)
    assert (data / "README.md").is_file() and _dataset_ready(data, "test", 6)


# ---------------------------------------------------------------- fit from a recipe: skipped backgrounds
def background_folder(bg, broken: bool):
    """A folder of 12 random 48 px backgrounds, and with ``broken`` a "broken.png" that is no image."""
    bg.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(bg / f"b{i:02d}.png")
    if broken:
        (bg / "broken.png").write_bytes(b"not a png")
    return bg


def test_training_from_a_recipe_counts_and_lists_the_background_files_it_skips(tmp_path, fresh_pool_cache):
    from trainers.data import ShapesDataModule

    bg = background_folder(tmp_path / "bg", broken=True)
    dm = ShapesDataModule(image_size=32, synth={"background": "folder", "bg_path": str(bg),
                                                "size_bands": [[0.3, 0.4], [0.2, 0.25]]},
                          train_length=8, val_length=8, test_length=8, batch_size=8)
    with pytest.warns(UserWarning, match=r"1 background file\(s\) skipped \(e.g. .*broken.png: "):
        dm.check_train_backgrounds()  # what fit runs before training
    listed = dm.describe()["skipped_backgrounds"]  # model.json's data
    assert [name for name, _ in listed] == [str(bg / "broken.png")]
    assert "UnidentifiedImageError" in listed[0][1]
