"""The pipeline on the real project modules: generated data, real attributions and metrics.

The model is a fixed random-init ResNet18 from the trainers registry (loaded through an injected
loader, so the test does not need a trained checkpoint); everything else is the real thing.
"""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from validation.analyze import TABLES
from validation.pipeline.run import DEFAULT_METRICS, Components, RunConfig, run_eval
from validation.pipeline.table import load_predictions, load_results
from validation.report import write_report

SIZE = 32
BANDS = "0.31-0.39,0.16-0.19"  # the paper's smallest band has no triangle hole at 32 px


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "data"
    done = subprocess.run([sys.executable, "-m", "shapesynth", "generate", "--out", str(out), "--image-size",
                           str(SIZE), "--size-bands", BANDS, "--train-size", "12", "--val-size", "6", "--test-size", "48",
                           "--no-progress"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _load(path):
    from shapesynth import CLASS_NAMES
    from trainers.models import build_model

    torch.manual_seed(sum(str(path).encode()) % 1000)
    return build_model("resnet18", num_classes=6, image_size=SIZE).eval(), {
        "arch": "resnet18", "test_accuracy": None, "image_size": SIZE, "class_names": list(CLASS_NAMES)}


def _config(data, tmp_path, methods, **kw):
    model = tmp_path / "resnet18.ckpt"
    model.write_bytes(b"random init, see _load")
    return RunConfig(data=str(data), models=[str(model)], methods=methods, metrics=list(DEFAULT_METRICS),
                     layers=["stage1", "stage4"], mixes=["identity", "product"], image_range=(0, 48),
                     chunk_size=16, save_maps=48, **kw)


def test_real_modules_every_metric_no_errors(data, tmp_path):
    torch.set_num_threads(1)
    cfg = _config(data, tmp_path, ["gradcampp", "lafam", "inputxgradient", "halfcam", "randomcam", "all1scam", "oracle"])
    run_eval(cfg, tmp_path / "run", components=Components(load_model=_load), progress=False)
    res, pred = load_results(tmp_path / "run"), load_predictions(tmp_path / "run")
    assert pred.correct.sum() >= 2, "too few correct images for a meaningful smoke test"
    assert (res.status != "error").all(), res[res.status == "error"].reason.unique()[:3]
    assert set(DEFAULT_METRICS) <= set(res.metric)
    assert {"road_morf@0.2", "road_lerf@0.8"} <= set(res.metric)
    # the oracle map is the ground truth: its cosine with the ground truth is 1
    oracle = res[(res.method == "oracle") & (res.metric == "gt_cosine")]
    assert len(oracle) and (oracle.value > 0.999).all()
    # NaNs carry the metric's own reason
    assert (res[res.status == "nan"].reason != "").all()
    page = write_report(tmp_path / "run", n_boot=50)
    assert page.exists()
    for name in TABLES:
        assert (tmp_path / "run" / "analysis" / f"{name}.csv").exists()
    exp = pd.read_csv(tmp_path / "run" / "analysis" / "expectations.csv")
    assert len(exp) >= 5


@pytest.mark.slow
def test_every_registered_method_runs(data, tmp_path):
    from validation.cli import all_methods

    torch.set_num_threads(1)
    cfg = _config(data, tmp_path, all_methods(),
                  method_options={"lime": {"n_samples": 16, "superpixels": "grid"},
                                  "kernelshap": {"n_samples": 16, "superpixels": "grid"},
                                  "relax": {"n_masks": 32}, "integratedgradients": {"n_steps": 4}},
                  refine_layers=["stage1", "stage2", "stage3", "stage4"])
    run_eval(cfg, tmp_path / "run", components=Components(load_model=_load), progress=False)
    res = load_results(tmp_path / "run")
    assert (res.status != "error").all(), res[res.status == "error"].reason.unique()[:3]
    assert set(all_methods()) <= set(res.method)


@pytest.mark.slow
def test_reproduce_with_real_generator_methods_and_metrics(tmp_path, monkeypatch):
    """reproduce end to end except training: the real generator CLI, attribution methods and
    metrics; the 'training' command writes a marker and the model is a random-init ResNet18."""
    import yaml

    from validation import reproduce as R

    from shapesynth import CLASS_NAMES

    monkeypatch.setattr(R, "_model_ready", lambda p: (p.exists(), {"arch": "resnet18", "test_accuracy": 1.0,
                                                                   "image_size": SIZE, "class_names": list(CLASS_NAMES)}))
    profile = {
        "name": "e2e", "description": "tiny real run",
        "data": {"image_size": SIZE, "args": ["generate", "--out", "{data}", "--image-size", str(SIZE), "--size-bands", BANDS, "--train-size", "12",
                          "--val-size", "6", "--test-size", "32", "--no-progress"]},
        "train": {"min_test_accuracy": 0.99, "models": {"resnet18": None},
                  "command": [sys.executable, "-c", "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True); "
                              "(p/'model.safetensors').write_text('random init, see _load')",
                              "{model_dir}"]},
        "eval": {"n_images": 32, "methods": ["gradcampp", "lafam", "halfcam", "randomcam", "all1scam"],
                 "metrics": "all", "layers": ["stage1", "stage4"], "refine_layers": ["stage1", "stage2", "stage3", "stage4"],
                 "mixes": ["identity", "product", "geomean"], "chunk_size": 16, "save_maps": 32},
        "analyze": {"n_boot": 50},
    }
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(profile))
    torch.set_num_threads(1)
    rec = R.reproduce(str(path), tmp_path / "out", progress=False, components=Components(load_model=_load))
    assert not rec["steps"]["generate"]["reused"]
    page = (tmp_path / "out" / "run" / "report" / "index.html").read_text()
    assert "e2e" in page and "data:image/png;base64," in page
    res = load_results(tmp_path / "out" / "run")
    assert (res.status != "error").all()
    rec2 = R.reproduce(str(path), tmp_path / "out", progress=False, components=Components(load_model=_load))
    assert rec2["steps"]["generate"]["reused"] and rec2["steps"]["run"]["chunks_computed"] == 0
