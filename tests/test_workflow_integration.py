"""A researcher's whole workflow across the three packages, at 32 px and trained for seconds:
generate a dataset over their own background folder, load it with `datasets`, train on it from
Python and from the command line, load and test the models, evaluate with a method they register
themselves (sharded by image range, then merged), analyze, report and audit a metric of their own.
Each step's output is checked against the previous step's: the dataset fingerprint, the labels,
the class names, the masks, and the report's numbers against the tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shapesynth import CLASS_NAMES, dataset_fingerprint
from shapesynth.torchdata import ShapesDataset

SIZE = 32
SPLITS = {"train": 48, "val": 12, "test": 24}


def _write_backgrounds(folder: Path, n: int = 24, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"bg{k:02d}.png")


def _generate(root: Path) -> None:
    """``shapesynth generate`` as a user types it, run in ``root``: the background folder is given
    relative to it, as the recipe then records it."""
    from shapesynth.cli import main

    _write_backgrounds(root / "bgs")
    here = Path.cwd()
    os.chdir(root)
    try:
        assert main(["generate", "--out", "data", "--image-size", str(SIZE), "--size-bands", "0.31-0.39",
                     "--train-size", str(SPLITS["train"]), "--val-size", str(SPLITS["val"]),
                     "--test-size", str(SPLITS["test"]), "--backgrounds", "bgs", "--num-proc", "1",
                     "--samples-per-shard", "12", "--no-progress"]) == 0
    finally:
        os.chdir(here)


METRIC_MODULE = '''
import torch

def mass_inside(model, x, target, maps, *, gt=None):
    """Share of the map's mass on the shape."""
    return (maps * gt).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-12)
'''


def test_generate_train_evaluate_analyze_report_audit(tmp_path, monkeypatch, capsys, user_cam):
    datasets = pytest.importorskip("datasets")
    from trainers import TrainConfig, fit, load_model
    from trainers.cli import main as train_cli
    from validation.cli import main as eval_cli
    from validation.pipeline.run import RunConfig, run_eval
    from validation.pipeline.table import load_results, read_json

    _generate(tmp_path)
    monkeypatch.chdir(tmp_path)
    fingerprint = dataset_fingerprint("data")
    test = ShapesDataset("data", split="test")
    labels = np.array([int(test[i]["label"]) for i in range(len(test))])
    masks = torch.stack([test[i]["mask"][0] for i in range(len(test))])

    # -- 1. the Hub layout loads with `datasets` as the card says: splits, ClassLabel, lossless masks
    hub = datasets.load_dataset("data", cache_dir=str(tmp_path / "hf_cache"))
    assert {s: len(hub[s]) for s in hub} == SPLITS
    class_names = hub["test"].features["label"].names
    assert class_names == list(CLASS_NAMES)
    assert [row["label"] for row in hub["test"]] == labels.tolist()
    stored = torch.stack([torch.from_numpy(np.asarray(row["mask"], np.float32) / 255) for row in hub["test"]])
    torch.testing.assert_close(stored, masks, rtol=0, atol=0)

    # -- 2. two models: the Python API (train stream rendered from the dataset's recipe) and the CLI
    #    (the stored train split); both record the dataset they were tested on
    meta_py = fit(TrainConfig(arch="resnet18", image_size=SIZE, data="data", out="models/stream", max_epochs=1,
                              train_length=32, batch_size=16, curriculum_epochs=0, precision="32-true",
                              progress_bar=False, log_every_n_steps=1))
    assert train_cli(["fit", "--arch", "resnet18", "--image-size", str(SIZE), "--data", "data",
                      "--train-source", "disk", "--max-epochs", "1", "--batch-size", "16", "--out", "models/disk",
                      "--curriculum-epochs", "0", "--precision", "32-true", "--progress-bar", "false",
                      "--log-every-n-steps", "1"]) == 0
    metas = {}
    for name in ("stream", "disk"):
        _, meta = load_model(f"models/{name}")
        metas[name] = meta
        assert meta["dataset_fingerprint"] == fingerprint
        assert meta["class_names"] == class_names
        assert f"`{fingerprint}`" in Path(f"models/{name}/MODEL_CARD.md").read_text()
        assert meta["test_images"] == SPLITS["test"]
        # the saved model tested again by `shapesynth-train test` gives the numbers training recorded
        assert train_cli(["test", "--model", f"models/{name}", "--data", "data", "--out", f"{name}_test.json"]) == 0
        again = json.loads(Path(f"{name}_test.json").read_text())
        assert again["dataset_fingerprint"] == fingerprint
        assert again["confusion_matrix"] == meta["confusion_matrix"]
        assert again["test_accuracy"] == pytest.approx(meta["test_accuracy"])
    assert metas["stream"] == meta_py  # what fit returned is what load_model reads back

    # -- 3. the evaluation with the user's method, two shards of the image range, merged by the CLI
    config = dict(data="data", models=["models/stream", "models/disk"],
                  methods=[user_cam, "gradcam", "randomcam"], metrics=["average_drop", "gt_cosine", "pointing_game"],
                  layers=["stage1", "stage4"], mixes=["identity", "product"], image_range=(0, SPLITS["test"]),
                  chunk_size=12, save_maps=SPLITS["test"])
    for shard in ((0, 2), (1, 2)):
        run_eval(RunConfig(**config), "run", shard=shard, progress=False)
    assert not Path("run/results.parquet").exists()  # a shard does not merge
    assert eval_cli(["merge", "run"]) == 0
    manifest = read_json("run/manifest.json")
    assert manifest["chunks"] == {"expected": 4, "merged": 4, "missing": []}
    assert manifest["data_fingerprint"] == fingerprint
    names = manifest["config"]["model_names"]
    for name in names:
        assert manifest["config"]["model_meta"][name]["class_names"] == class_names
        assert manifest["config"]["model_meta"][name]["dataset_fingerprint"] == fingerprint

    # predictions: the dataset's labels; only the correctly classified images are explained
    preds = pd.read_parquet("run/predictions.parquet")
    results = load_results("run")
    for name, folder in zip(names, ("stream", "disk")):
        mine = preds[preds.model == name].sort_values("image")
        assert mine.image.tolist() == list(range(SPLITS["test"]))
        assert mine.label.tolist() == labels.tolist()
        assert (mine.correct == (mine.pred == mine.label)).all()
        # the whole test split, so the same confusion matrix as the trainer's test of this model
        confusion = np.zeros((len(class_names),) * 2, dtype=int)
        np.add.at(confusion, (mine.label.to_numpy(), mine.pred.to_numpy()), 1)
        assert confusion.tolist() == metas[folder]["confusion_matrix"]
        explained = set(results.loc[results.model == name, "image"])
        assert explained == set(mine.loc[mine.correct, "image"])
    assert set(results.method) == {user_cam, "gradcam", "randomcam"}
    assert set(results.loc[results.method == user_cam, "layer"]) == {"stage1", "stage4"}
    assert (results.status != "error").all(), results.loc[results.status == "error", "reason"].unique()[:3]

    # the maps kept for the report: the dataset's images and exact masks, and the table's cosine
    from validation.report import load_saved_maps

    with_maps = [name for name in names if load_saved_maps(Path("run"), name) is not None]
    assert with_maps  # a model without maps classified none of the images correctly
    for name in with_maps:
        saved = load_saved_maps(Path("run"), name)
        index = torch.as_tensor(saved["images"].astype(np.int64))
        torch.testing.assert_close(torch.from_numpy(saved["gt"].astype(np.float32)), masks[index],
                                   rtol=0, atol=1e-3)
        assert saved["labels"].tolist() == labels[index.numpy()].tolist()
        configs = [str(c) for c in saved["configs"]]
        k = configs.index(f"{user_cam}@stage1")
        maps = torch.from_numpy(saved[f"map_{k}"].astype(np.float64)).flatten(1)
        gt = masks[index].double().flatten(1)
        cosine = (maps * gt).sum(1) / (maps.norm(dim=1) * gt.norm(dim=1))
        table = (results[(results.model == name) & (results.method == user_cam) & (results.layer == "stage1")
                         & (results.mix == "identity") & (results.metric == "gt_cosine")]
                 .set_index("image").loc[saved["images"].tolist(), "value"].to_numpy())
        finite = np.isfinite(table)
        assert finite.any()
        np.testing.assert_allclose(table[finite], cosine.numpy()[finite], atol=2e-3)

    # -- 4. analyze and report: the report shows the tables analyze wrote (not recomputed)
    assert eval_cli(["analyze", "run", "--n-boot", "20"]) == 0
    assert eval_cli(["report", "run"]) == 0
    html = Path("run/report/index.html").read_text()
    validity = pd.read_csv("run/analysis/a_validity.csv")
    shown = validity[validity.pearson.notna() & validity.pearson_lo.notna()]
    assert len(shown)
    for row in shown.itertuples():
        for value in (row.pearson, row.pearson_lo, row.pearson_hi):
            assert f"<td>{value:.3f}</td>" in html
    expectations = pd.read_csv("run/analysis/expectations.csv", keep_default_na=False)
    for row in expectations.itertuples():
        assert f"<td class='{row.status}'>{row.status}</td>" in html

    # -- 5. audit the user's own metric on the same run (the run's method is still registered)
    (tmp_path / "wf_metric.py").write_text(METRIC_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert eval_cli(["audit", "run", "--metric", "wf_metric:mass_inside", "--n-images", "12", "--n-boot", "20",
                     "--no-progress"]) == 0
    audited = load_results("run/audit/mass_inside")
    ours = results[(results.metric == "gt_cosine") & (results.image < 12)]
    assert set(zip(audited.model, audited.image)) == set(zip(ours.model, ours.image))
    assert Path("run/audit/mass_inside/verdict.md").read_text().startswith("# Audit of `wf_metric:mass_inside`")
    # from another folder the run's relative model paths lead nowhere: the error says which file
    # named them, not a --model flag the audit does not have
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert eval_cli(["audit", str(tmp_path / "run"), "--metric", "wf_metric:mass_inside", "--name", "moved",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "run_config.json: the run's model models/stream does not exist from" in err and "--model" not in err


# ---------------------------------------------------------------------------------------------
# training on a dataset's recipe from another folder than the one it was generated in

def test_training_stream_refuses_backgrounds_other_than_the_datasets_train_pool(tmp_path, monkeypatch):
    """A dataset's recipe keeps its background folder as given (``--backgrounds bgs``). A training
    stream (``--data`` with ``train_source: stream``) run from another folder read ``bgs`` there:
    with none, it crashed with a traceback once training had started (after writing the run
    folder); with another ``bgs`` folder it trained silently on other backgrounds than the
    dataset's train split, which could include its test backgrounds. Both are now refused before
    anything is written, naming the folder."""
    from trainers import TrainConfig, fit
    from trainers.api import plan_fit
    from trainers.data import DataError

    _generate(tmp_path / "made")
    data = tmp_path / "made" / "data"
    cfg = dict(arch="resnet18", image_size=SIZE, data=str(data), max_epochs=1, train_length=16, batch_size=16,
               curriculum_epochs=0, precision="32-true", progress_bar=False)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError, match=r"background folder bgs does not exist.*bgs relative to the folder"):
        plan_fit(TrainConfig(out=str(elsewhere / "none"), **cfg))
    assert not (elsewhere / "none").exists()

    _write_backgrounds(elsewhere / "bgs", seed=1)  # someone else's `bgs` here
    with pytest.raises(DataError, match=r"pool 'train'.*training stream.*--train-source disk"):
        plan_fit(TrainConfig(out=str(elsewhere / "other"), **cfg))
    assert not (elsewhere / "other").exists()

    # the stored images do not depend on the background files; nor does a finished run, reported
    disk = {k: v for k, v in cfg.items() if k != "train_length"}  # the stored split: no stream length
    plan_fit(TrainConfig(out=str(elsewhere / "disk"), train_source="disk", **disk))
    monkeypatch.chdir(tmp_path / "made")
    meta = fit(TrainConfig(out=str(tmp_path / "made" / "stream"), **cfg))
    assert meta["data"]["synth"]["bg_path"] == "bgs"
    monkeypatch.chdir(elsewhere)
    assert fit(TrainConfig(out=str(tmp_path / "made" / "stream"), **cfg)) == meta


def test_counterfactuals_and_card_from_another_folder_name_the_relative_background_folder(
        tmp_path, monkeypatch, capsys):
    """From another folder than generation's, the recipe's relative background folder is another
    folder (or none): said so, and not served from the pools cached under the same recipe."""
    from shapesynth.cli import main

    _generate(tmp_path / "made")
    monkeypatch.chdir(tmp_path)
    dataset = ShapesDataset(tmp_path / "made" / "data", split="test")
    with pytest.raises(ValueError, match=r"cannot rebuild its background pools.*bgs relative to the folder"):
        dataset.counterfactual(0, 3)
    capsys.readouterr()
    assert main(["card", "--data", str(tmp_path / "made" / "data")]) == 2
    assert f"bgs relative to the folder `shapesynth generate` ran in, and they are read from the current " \
           f"folder, {tmp_path}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "made")
    item = dataset.counterfactual(0, int(dataset[0]["label"]))
    torch.testing.assert_close(item["image"], dataset[0]["image"], rtol=0, atol=0)
