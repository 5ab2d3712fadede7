"""Behaviour the mutation audit of reproduce, audit, report and the command line found untested.

Each test pins a value a user relies on against an explicit expectation (a hand-written config,
the exact argument list, a number computed here from the analysis tables):

- reproduce: steps run in the pipeline's order whatever order ``--steps`` names them in;
  ``reproduce.json`` is written after each step and keeps the previous reproduction's steps;
  the profile's eval settings (and their defaults) become the run's configuration and the
  workers' flags; bad values are refused naming their key, lower bounds are accepted; the
  accuracy gate accepts a model exactly at the minimum and refuses a minimum outside [0, 1];
  a dataset of another seed and a model of other classes are refused; a model is ready only
  with a test accuracy, a dataset only with enough images in the split; the generate step reads
  the split the run reads (an empty ``eval.split`` is the test split: it regenerated the data
  before); the analyze step uses the profile's ``n_boot``; the run step restores torch's thread
  count; ``--resume never`` is not reported as a resumed training;
- the command line: every ``run``, ``analyze``, ``audit``, ``merge`` and ``reproduce`` flag
  reaches the function it configures;
- the audit: ``lower_is_better=True`` orients a metric without the attribute; a ``**kwargs``
  metric is given the ground truth; changed weights are refused; a "mixed" trivial-map verdict
  is reported as fooling; an ``n_images`` beyond the run's range is clamped; a partial audit
  compares on its images; the verdict's band, rank and interval (oriented for lower-is-better);
- the report: every figure is embedded in its section; the tables' numbers are the analysis
  CSVs'; the ROAD-curve table lists unrefined maps only; the cost table is seconds per image;
  the qualitative grid shows unrefined maps at the shallowest layer and the Grad-CAM product
  pair; the run summary names the profile and each model's test accuracy.
"""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import test_pipeline_standins as S
from test_pipeline_reproduce import _existing_models, _profile, _with, fake_io  # noqa: F401  (fixture)
from validation import reproduce as R
from validation.cli import main


# ============================================================================ reproduce: steps
def _recording_steps(monkeypatch, calls):
    """Replace the five steps with recorders (each returns what it was)."""
    for step in R.STEPS:
        monkeypatch.setattr(R.Reproduction, step, lambda self, step=step: calls.append(step) or {"did": step})


def test_steps_run_in_the_pipelines_order_whatever_order_they_are_named_in(tmp_path, monkeypatch):
    calls = []
    _recording_steps(monkeypatch, calls)
    rec = R.reproduce(str(_profile(tmp_path)), tmp_path / "out", steps=["report", "run", "generate"], progress=False)
    assert calls == ["generate", "run", "report"]
    assert list(rec["steps"]) == ["generate", "run", "report"]


def test_reproduce_json_keeps_the_previous_steps_and_is_written_after_each_step(tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    _recording_steps(monkeypatch, calls)
    first = R.reproduce(str(_profile(tmp_path)), out, steps=["generate", "train"], progress=False)
    on_disk = json.loads((out / "reproduce.json").read_text())
    assert on_disk["profile"] == "tiny" and on_disk["steps"] == first["steps"]
    assert {k: v["did"] for k, v in on_disk["steps"].items()} == {"generate": "generate", "train": "train"}
    assert all(v["seconds"] >= 0 for v in on_disk["steps"].values()) and on_disk["total_seconds"] >= 0
    assert "previous" not in on_disk

    # a second reproduction whose run step fails: the file says what was done before it failed,
    # and what the previous reproduction did
    def failing_run(self):
        raise RuntimeError("run failed")

    monkeypatch.setattr(R.Reproduction, "run", failing_run)
    with pytest.raises(RuntimeError, match="run failed"):
        R.reproduce(str(_profile(tmp_path)), out, steps=["generate", "run"], progress=False)
    on_disk = json.loads((out / "reproduce.json").read_text())
    assert list(on_disk["steps"]) == ["generate"]
    assert on_disk["previous"] == first["steps"]


# ======================================================================= reproduce: the profile
def _reproduction(path, out):
    return R.Reproduction(R.load_profile(str(path)), out, progress=False)


def test_the_profiles_eval_settings_become_the_run_config(tmp_path):
    path = _with(_profile(tmp_path), "eval", seed=7, split="val", save_maps=0, chunk_size=1, device="cuda:1",
                 refine_layers=["l1"], fold=False, method_options={"cam": {"k": 3}},
                 metric_options={"road": {"fractions": [0.1]}}, method_grid={"cam": {"max_images": 4}})
    out = tmp_path / "out"
    cfg = _reproduction(path, out).run_config()
    assert (cfg.seed, cfg.split, cfg.save_maps, cfg.chunk_size, cfg.device, cfg.fold) == (7, "val", 0, 1, "cuda:1", False)
    assert cfg.image_range == (0, S.N_IMAGES) and cfg.data == str(out / "data")
    assert cfg.models == [str(out / "models" / "alpha"), str(out / "models" / "beta")]
    assert cfg.methods == ["cam", "grad", "randomcam", "halfcam"] and cfg.metrics == ["gt_cosine", "complexity", "road"]
    assert cfg.layers == ["l1", "l2"] and cfg.mixes == ["identity", "product"] and cfg.refine_layers == ["l1"]
    assert cfg.method_options == {"cam": {"k": 3}} and cfg.metric_options == {"road": {"fractions": [0.1]}}
    assert cfg.method_grid == {"cam": {"max_images": 4}}


def test_an_eval_section_without_settings_takes_the_documented_defaults(tmp_path):
    from validation.cli import all_methods
    from validation.pipeline.run import DEFAULT_METRICS

    path = _profile(tmp_path)
    prof = yaml.safe_load(path.read_text())
    prof["eval"] = {}
    path.write_text(yaml.safe_dump(prof))
    cfg = _reproduction(path, tmp_path / "out").run_config()
    assert cfg.methods == all_methods() and cfg.metrics == list(DEFAULT_METRICS)
    assert cfg.layers == cfg.refine_layers == ["stage1", "stage2", "stage3", "stage4"]
    assert cfg.mixes == ["identity", "product", "geomean", "invexp"]
    assert (cfg.image_range, cfg.split, cfg.chunk_size, cfg.seed, cfg.save_maps, cfg.device, cfg.fold) == \
        ((0, 200), "test", 16, 0, 8, "cpu", True)
    assert cfg.method_options == cfg.metric_options == cfg.method_grid == {}


@pytest.mark.parametrize("key, value, message", [
    ("chunk_size", True, "expected an integer, got True"),  # bool is an int in Python: not a count
    ("chunk_size", 0, "must be >= 1, got 0"),
    ("save_maps", -1, "must be >= 0, got -1"),
    ("fold", "false", "expected true or false, got 'false'"),  # bool("false") is True
    ("layers", {"l1": 1}, "expected a list of names, got {'l1': 1}"),
    ("method_grid", ["cam"], "expected a mapping, got ['cam']"),
])
def test_a_bad_eval_value_is_refused_naming_its_key(tmp_path, key, value, message):
    path = _with(_profile(tmp_path), "eval", **{key: value})
    with pytest.raises(R.ProfileValueError, match="^" + re.escape(f"eval.{key} in profile {path}: {message}")):
        _reproduction(path, tmp_path / "out").run_config()


def test_integer_settings_accept_their_lower_bound_and_digit_strings(tmp_path):
    path = _with(_profile(tmp_path), "eval", chunk_size=1, save_maps=0, n_images="3", seed=-2)
    cfg = _reproduction(path, tmp_path / "out").run_config()
    assert (cfg.chunk_size, cfg.save_maps, cfg.image_range, cfg.seed) == (1, 0, (0, 3), -2)
    assert isinstance(cfg.image_range[1], int)


def test_the_workers_are_given_every_setting_of_the_run_config(tmp_path):
    """The flags of `run --shard i/n`, exactly: a dropped one would give the workers its default."""
    from validation.pipeline.run import RunConfig

    out = tmp_path / "out"
    r = _reproduction(_profile(tmp_path), out)
    config = RunConfig(data="d", models=["m"], methods=["cam", "grad"], metrics=["road"], layers=["l1", "l2"],
                       mixes=["identity", "product"], refine_layers=["l2"], image_range=(0, 12), split="val",
                       chunk_size=3, seed=5, save_maps=2, device="cuda", fold=True,
                       method_options={"cam": {"k": 1}}, metric_options={"road": {"n": 2}},
                       method_grid={"grad": {"max_images": 4}})
    opts = out / "run" / "options"
    assert r._worker_flags(config, 4) == [
        ("--methods", "cam,grad"), ("--metrics", "road"), ("--layers", "l1,l2"), ("--refine-layers", "l2"),
        ("--mix", "identity,product"), ("--images", "0:12"), ("--split", "val"), ("--chunk-size", "3"),
        ("--seed", "5"), ("--method-options", str(opts / "method_options.json")),
        ("--metric-options", str(opts / "metric_options.json")),
        ("--method-grid", str(opts / "method_grid.json")), ("--save-maps", "2"), ("--threads", "4"),
        ("--device", "cuda")]
    assert json.loads((opts / "method_options.json").read_text()) == {"cam": {"k": 1}}
    assert json.loads((opts / "metric_options.json").read_text()) == {"road": {"n": 2}}
    assert json.loads((opts / "method_grid.json").read_text()) == {"grad": {"max_images": 4}}


def test_a_profile_that_extends_without_a_name_is_named_after_its_file(tmp_path):
    child = tmp_path / "my_child.yaml"
    child.write_text("extends: quick\neval: {n_images: 32}\n")
    assert R.load_profile(str(child))["name"] == "my_child"


# ====================================================================== reproduce: data, models
def test_a_model_exactly_at_the_minimum_accuracy_passes(tmp_path, fake_io):  # noqa: F811
    path = _profile(tmp_path, acc=0.99)  # min_test_accuracy: 0.99
    rec = R.reproduce(str(path), tmp_path / "out", steps=["generate", "train"], progress=False)
    assert rec["steps"]["train"]["alpha"]["test_accuracy"] == 0.99


@pytest.mark.parametrize("minimum", [99, -0.1, True, "high"])
def test_a_minimum_accuracy_outside_zero_to_one_is_refused(tmp_path, fake_io, minimum):  # noqa: F811
    """``min_test_accuracy: 99`` (a percentage) would refuse every model, and True passes for 1."""
    path = _with(_profile(tmp_path), "train", min_test_accuracy=minimum)
    with pytest.raises(R.ProfileValueError, match=rf"^train.min_test_accuracy in profile {path}: expected a number "
                                                  rf"in \[0, 1\], got {minimum!r}"):
        R.reproduce(str(path), tmp_path / "out", steps=["generate", "train"], progress=False)


def test_an_existing_dataset_of_another_seed_is_refused(tmp_path, fake_io):  # noqa: F811
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "shapesynth.json").write_text(json.dumps({"config": {"image_size": S.SIZE, "seed": 3}}))
    path = _with(_profile(tmp_path), "data", seed=0)
    with pytest.raises(ValueError, match=r"holds a dataset with seed=3, the profile 'tiny' wants seed=0"):
        R.reproduce(str(path), out, steps=["generate"], progress=False)
    assert not (tmp_path / "calls.txt").exists()  # nothing generated over it


def test_the_generate_step_asks_for_the_profiles_split_and_image_count(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(R, "_dataset_ready", lambda data, split, n: asked.append((split, n)) or True)
    path = _with(_profile(tmp_path), "eval", split="val", n_images=7)
    assert R.reproduce(str(path), tmp_path / "out", steps=["generate"], progress=False)["steps"]["generate"]["reused"]
    assert asked == [("val", 7)]


def test_the_generate_step_reads_an_empty_split_as_the_run_does(tmp_path, monkeypatch):
    """`eval.split: ""` is the test split to the run step; the generate step asked for split ''
    (which no dataset has), so it regenerated the data on every reproduction and then failed with
    "generation finished but the  split does not hold 20 images"."""
    asked = []
    monkeypatch.setattr(R, "_dataset_ready", lambda data, split, n: asked.append((split, n)) or True)
    path = _with(_profile(tmp_path), "eval", split="")
    assert _reproduction(path, tmp_path / "out").run_config().split == "test"
    assert R.reproduce(str(path), tmp_path / "out", steps=["generate"], progress=False)["steps"]["generate"]["reused"]
    assert asked == [("test", S.N_IMAGES)] and not (tmp_path / "calls.txt").exists()  # nothing regenerated


def test_a_training_that_never_resumes_is_not_recorded_as_resumed(tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / "checkpoints").mkdir(parents=True)
    (model_dir / "checkpoints" / "last.ckpt").write_text("x")
    assert R._resumes(["python", "-m", "trainers", "fit"], model_dir)
    assert not R._resumes(["python", "-m", "trainers", "fit", "--resume", "never"], model_dir)
    assert not R._resumes(["python", "-m", "trainers", "fit", "--resume=never"], model_dir)
    assert not R._resumes(["python", "-m", "trainers", "fit"], tmp_path / "other")


def test_a_folder_from_before_profile_json_is_checked_against_its_reproduce_json(tmp_path):
    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "reproduce.json").write_text(json.dumps({"profile": "quick", "steps": {}}))
    with pytest.raises(ValueError, match=r"holds a run built with profile 'quick', not 'tiny'"):
        R.reproduce(str(_profile(tmp_path)), out, steps=["report"], progress=False)


def test_an_existing_model_of_other_classes_is_refused_not_reused(tmp_path, fake_io, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    _existing_models(out, 0.995)
    monkeypatch.setattr(R, "_model_ready", lambda d: (True, {"test_accuracy": 0.995, "image_size": S.SIZE,
                                                            "class_names": ["a", "b"]}))
    with pytest.raises(ValueError, match=r"models/alpha holds a model with classes \['a', 'b'\] \(the data's: "):
        R.reproduce(str(_profile(tmp_path)), out, steps=["train"], progress=False)


def test_a_model_is_ready_only_when_it_loads_and_has_a_test_accuracy(tmp_path, monkeypatch):
    import trainers

    checkpoint = tmp_path / "model"
    assert R._model_ready(checkpoint) == (False, None)  # absent
    checkpoint.mkdir()
    metas = {"finished": {"test_accuracy": 0.9}, "intermediate": {"test_accuracy": None}}

    def load_model(path):
        if path.endswith("broken"):
            raise RuntimeError("partial file")
        return None, metas[checkpoint.name]

    monkeypatch.setattr(trainers, "load_model", load_model)
    for name, ready in (("finished", True), ("intermediate", False), ("broken", False)):
        checkpoint = tmp_path / name
        checkpoint.mkdir()
        assert R._model_ready(checkpoint)[0] is ready, name


def test_a_dataset_is_ready_when_its_split_holds_enough_images(tmp_path, monkeypatch):
    import shapesynth.torchdata

    class Split:
        def __init__(self, path, split):
            if split != "test":
                raise FileNotFoundError(split)

        def __len__(self):
            return 5

    monkeypatch.setattr(shapesynth.torchdata, "ShapesDataset", Split)
    assert not R._dataset_ready(tmp_path / "absent", "test", 1)
    assert not R._dataset_ready(tmp_path, "test", 5)  # no card: its generation was cut short
    (tmp_path / "README.md").write_text("the card, which generate writes last")
    assert R._dataset_ready(tmp_path, "test", 5) and not R._dataset_ready(tmp_path, "test", 6)
    assert not R._dataset_ready(tmp_path, "val", 1)  # unreadable: regenerate


# ==================================================================== reproduce: analyze, run
def test_the_analyze_step_uses_the_profiles_bootstrap_count(tmp_path, monkeypatch):
    from validation import analyze as A

    seen = []
    monkeypatch.setattr(A, "analyze_run", lambda run_dir, *a, **kw: seen.append((run_dir, kw.get("n_boot"))))
    r = _reproduction(_profile(tmp_path), tmp_path / "out")  # analyze: {n_boot: 30}
    assert r.analyze() == {"tables": str(tmp_path / "out" / "run" / "analysis")}
    assert seen == [(tmp_path / "out" / "run", 30)]


def test_the_run_step_uses_the_profiles_threads_then_restores_torchs(tmp_path, monkeypatch):
    import validation.pipeline.run as run_module

    seen = {}

    def recording_run_eval(config, out, **kw):
        seen.update(config=config, out=out, threads=torch.get_num_threads(), **kw)
        return {"rows": 0, "manifest": {"big": 1}}

    monkeypatch.setattr(run_module, "run_eval", recording_run_eval)
    r = _reproduction(_with(_profile(tmp_path), "eval", threads=1), tmp_path / "out")
    r.models_checked = True
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = r.run()
        assert seen["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert summary == {"rows": 0}  # the manifest is not copied into reproduce.json
    assert seen["out"] == tmp_path / "out" / "run" and seen["config"] == r.run_config()
    assert seen["progress"] is False
    assert json.loads((tmp_path / "out" / "run" / "profile.json").read_text()) == \
        {"name": "tiny", "description": "test profile", "budget_notes": None}


# ================================================================================ command line
def _recorder(monkeypatch, module, name, result=None):
    seen = {}

    def record(*args, **kwargs):
        seen.update(args=args, **kwargs)
        return result

    monkeypatch.setattr(module, name, record)
    return seen


def test_every_run_flag_reaches_the_run_config(monkeypatch, tmp_path, capsys):
    import validation.pipeline.run as run_module

    seen = _recorder(monkeypatch, run_module, "run_eval", {})
    grid = tmp_path / "grid.yaml"
    grid.write_text("cam: {max_images: 4}\n")
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["run", "--data", "d", "--model", "a", "--out", "o", "--no-progress", "--seed", "9",
                 "--split", "val", "--chunk-size", "5", "--save-maps", "0", "--device", "cuda:1", "--no-fold",
                 "--method-options", '{"lime": {"n_samples": 100}}', "--metric-options", '{"road": {"n": 2}}',
                 "--method-grid", str(grid), "--threads", "3", "--n-images", "7"]) == 0
    cfg = seen["args"][0]
    assert (cfg.seed, cfg.split, cfg.chunk_size, cfg.save_maps, cfg.device, cfg.fold) == (9, "val", 5, 0, "cuda:1", False)
    assert cfg.method_options == {"lime": {"n_samples": 100}} and cfg.metric_options == {"road": {"n": 2}}
    assert cfg.method_grid == {"cam": {"max_images": 4}} and cfg.image_range == (0, 7)
    assert threads == [3] and seen["range_source"] == "--n-images 7"
    # without the flags: the defaults, folded, refine layers = layers
    main(["run", "--data", "d", "--model", "a", "--out", "o", "--no-progress", "--layers", "l1,l2"])
    cfg = seen["args"][0]
    assert (cfg.seed, cfg.split, cfg.chunk_size, cfg.save_maps, cfg.device, cfg.fold) == (0, "test", 16, 8, "cpu", True)
    assert cfg.refine_layers == ["l1", "l2"] and threads == [3]


def test_analyze_flags_reach_analyze_run(monkeypatch, tmp_path, capsys):
    import validation.analyze as analyze_module

    seen = _recorder(monkeypatch, analyze_module, "analyze_run", {})
    assert main(["analyze", str(tmp_path / "r"), "--out", str(tmp_path / "tables"), "--n-boot", "17",
                 "--seed", "4"]) == 0
    assert seen["args"] == (str(tmp_path / "r"), tmp_path / "tables") and (seen["n_boot"], seen["seed"]) == (17, 4)
    assert main(["analyze", str(tmp_path / "r")]) == 0
    assert seen["args"] == (str(tmp_path / "r"), tmp_path / "r" / "analysis") and (seen["n_boot"], seen["seed"]) == (1000, 0)


def test_audit_flags_reach_audit_run(monkeypatch, capsys):
    import validation.audit as audit_module

    seen = _recorder(monkeypatch, audit_module, "audit_run", {"verdict": "v", "out_dir": "o"})
    assert main(["audit", "r", "--metric", "m:f", "--name", "mine", "--n-images", "12", "--lower-is-better",
                 "--n-boot", "33", "--overwrite", "--no-progress"]) == 0
    assert seen["args"] == ("r", "m:f")
    assert {k: seen[k] for k in ("name", "n_images", "n_boot", "progress", "lower_is_better", "overwrite")} == \
        {"name": "mine", "n_images": 12, "n_boot": 33, "progress": False, "lower_is_better": True, "overwrite": True}
    assert main(["audit", "r", "--metric", "m:f"]) == 0  # without the flag: the function's own attribute decides
    assert {k: seen[k] for k in ("name", "n_images", "n_boot", "progress", "lower_is_better", "overwrite")} == \
        {"name": None, "n_images": None, "n_boot": 1000, "progress": True, "lower_is_better": None, "overwrite": False}


def test_merge_and_reproduce_flags_reach_their_functions(monkeypatch, capsys):
    import validation.pipeline.table as table_module

    seen = _recorder(monkeypatch, table_module, "merge_run", {"chunks": {"merged": 1, "expected": 2}, "rows": 3})
    assert main(["merge", "r", "--allow-partial"]) == 0 and seen["allow_partial"] is True
    assert main(["merge", "r"]) == 0 and seen["allow_partial"] is False
    seen = _recorder(monkeypatch, R, "reproduce", {"steps": {}})
    assert main(["reproduce", "--profile", "paper", "--out", "o", "--steps", "run, report", "--no-progress"]) == 0
    assert seen["args"] == ("paper", "o") and seen["steps"] == ["run", "report"] and seen["progress"] is False
    assert main(["reproduce", "--out", "o"]) == 0
    assert seen["args"] == ("quick", "o") and seen["steps"] is None and seen["progress"] is True


# ====================================================================================== audit
AUDIT_MODULE = '''
import torch

def _cosine(maps, gt):
    return torch.nn.functional.cosine_similarity(maps.flatten(1), gt.flatten(1), dim=1)

def plain_distance(model, x, target, maps, gt=None):
    """1 - cosine, without a lower_is_better attribute: only the caller can say it is lower-better."""
    return 1 - _cosine(maps, gt)

def gt_through_kwargs(model, x, target, maps, **kwargs):
    """The ground truth reaches a metric that takes **kwargs."""
    return _cosine(maps, kwargs["gt"])

def map_mean(model, x, target, maps):
    return maps.flatten(1).mean(1)
'''


@pytest.fixture(scope="module")
def audit_run_dir(tmp_path_factory):
    """A stand-in run of 20 images with ROAD (one of the metrics the audit compares with)."""
    import sys

    from validation.pipeline.run import run_eval

    tmp = tmp_path_factory.mktemp("mutation_audit")
    (tmp / "mutation_audit_metrics.py").write_text(textwrap.dedent(AUDIT_MODULE))
    sys.path.insert(0, str(tmp))
    models = S.make_models(tmp)
    torch.set_num_threads(1)
    run_eval(S.config(models, methods=["cam", "grad", "randomcam", "halfcam"], metrics=["gt_cosine", "road"],
                      mixes=["identity"], save_maps=0), tmp / "run", components=S.components(), progress=False)
    yield tmp / "run"
    sys.path.remove(str(tmp))


def _pairs_row(table, metric):
    return table.set_index(["model", "metric", "level"]).loc[("mean+-std", metric, "pairs")]


def test_the_callers_lower_is_better_orients_a_metric_without_the_attribute(audit_run_dir):
    from validation.audit import audit_run

    res = audit_run(audit_run_dir, "mutation_audit_metrics:plain_distance", n_boot=10, lower_is_better=True,
                    components=S.components(), progress=False)
    a = res["tables"]["a_validity"]
    assert _pairs_row(a, "plain_distance")["pearson"] == pytest.approx(-1.0, abs=1e-9)
    assert set(a.loc[a.metric == "plain_distance", "better"]) == {"lower"}
    assert "plain_distance tracks the ground truth: Pearson r = 1.00 (oriented: lower is better" in res["verdict"]


def test_a_metric_that_takes_kwargs_is_given_the_ground_truth(audit_run_dir):
    from validation.audit import audit_run

    res = audit_run(audit_run_dir, "mutation_audit_metrics:gt_through_kwargs", n_boot=10,
                    components=S.components(), progress=False)
    assert _pairs_row(res["tables"]["a_validity"], "gt_through_kwargs")["pearson"] == pytest.approx(1.0, abs=1e-9)
    # a copy of the ground truth ranks first of the metrics with a correlation (itself and ROAD)
    assert "rank 1 of 2 metrics" in res["verdict"]


def test_an_n_images_beyond_the_run_is_clamped_and_a_partial_audit_compares_on_its_images(audit_run_dir):
    from validation import analyze as A
    from validation.audit import audit_run
    from validation.pipeline.table import load_results, read_json

    res = audit_run(audit_run_dir, "mutation_audit_metrics:map_mean", name="map_mean_all", n_images=500, n_boot=10,
                    components=S.components(), progress=False)
    out = audit_run_dir / "audit" / "map_mean_all"
    assert read_json(out / "run_config.json")["image_range"] == [0, S.N_IMAGES]
    assert set(load_results(out).image) == set(load_results(audit_run_dir).image)
    # 8 images: ROAD's correlation in the audit's table a is the one over those 8 images
    res = audit_run(audit_run_dir, "mutation_audit_metrics:map_mean", name="map_mean_8", n_images=8, n_boot=10,
                    components=S.components(), progress=False)
    base = load_results(audit_run_dir)
    first8 = base[(base.image < 8) & base.metric.isin(["road", "gt_cosine"])]
    expected = A.table_validity(first8, n_boot=10)
    assert _pairs_row(res["tables"]["a_validity"], "road")["pearson"] == \
        pytest.approx(_pairs_row(expected, "road")["pearson"], abs=1e-12)
    assert _pairs_row(res["tables"]["a_validity"], "road")["n"] == _pairs_row(expected, "road")["n"]


def test_the_audit_refuses_a_model_whose_weights_changed_since_the_run(audit_run_dir, tmp_path):
    """The maps are recomputed: other weights would judge the metric on maps the run never had."""
    import shutil
    from pathlib import Path

    from validation.audit import audit_run

    run = tmp_path / "run"
    shutil.copytree(audit_run_dir, run, ignore=shutil.ignore_patterns("audit"))
    cfg = json.loads((run / "run_config.json").read_text())
    cfg["models"] = [str(shutil.copy(p, tmp_path / Path(p).name)) for p in cfg["models"]]  # the same bytes
    (run / "run_config.json").write_text(json.dumps(cfg))
    Path(cfg["models"][1]).write_bytes(b"retrained")
    with pytest.raises(ValueError, match=re.escape(f"{cfg['models'][1]}: the weights of model 'beta' changed since "
                                                   f"the run {run} was computed")):
        audit_run(run, "mutation_audit_metrics:map_mean", n_boot=10, components=S.components(), progress=False)
    assert not (run / "audit").exists()


def _synthetic_validity(seed, mine):
    """The results of 2 models x 15 images x 4 methods with gt_cosine, ARCC (noisy) and ``mine(gt, rng)``."""
    from validation.pipeline.table import make_results_frame

    rng = np.random.default_rng(seed)
    rows = []
    for model in ("m1", "m2"):
        for img in range(15):
            for k in range(4):
                gt = rng.random() + 0.3 * k  # methods differ in their mean
                vals = {"gt_cosine": gt, "arcc": gt + 0.8 * rng.normal(), "mine": mine(gt, rng)}
                rows += [dict(image=img, model=model, method=f"meth{k}", layer="-", mix="identity", metric=m, value=v)
                         for m, v in vals.items()]
    return make_results_frame(rows)


def test_a_lower_is_better_verdict_orients_its_interval_and_its_method_ranking():
    from validation import analyze as A
    from validation.audit import verdict_text

    df = _synthetic_validity(2, lambda gt, rng: 1 - gt + 0.2 * rng.normal())
    validity = A.table_validity(df, n_boot=50, lower_is_better={"mine"})
    row = _pairs_row(validity, "mine")
    assert row["pearson_hi"] < 0  # table a keeps the metric's own sign
    text = verdict_text("mine", validity, pd.DataFrame(), {"mine"})
    # oriented: the sign flips and the interval's ends swap, so that it still reads low to high
    assert (f"Pearson r = {-row['pearson']:.2f} (oriented: lower is better, sign flipped) (95% CI "
            f"{-row['pearson_hi']:.2f} to {-row['pearson_lo']:.2f})") in text
    assert "rank 1 of 2 metrics" in text and "It is better than the best of our metrics here (arcc)." in text
    means = validity.set_index(["model", "metric", "level"]).loc[("mean+-std", "mine", "method_means"), "spearman"]
    assert means == pytest.approx(-1.0)
    assert "Ranking methods by their mean score: Spearman rho = 1.00 with the ground-truth ranking." in text


def test_a_metric_ranked_below_ours_is_said_so():
    from validation import analyze as A
    from validation.audit import verdict_text

    df = _synthetic_validity(3, lambda gt, rng: gt + 3.0 * rng.normal())  # noisier than ARCC
    text = verdict_text("mine", A.table_validity(df, n_boot=10), pd.DataFrame())
    assert "rank 2 of 2 metrics" in text and "It is not better than the best of our metrics here (arcc)." in text


def test_a_mixed_trivial_map_verdict_is_reported_as_fooling():
    from validation import analyze as A
    from validation.audit import verdict_text

    validity = A.table_validity(_synthetic_validity(4, lambda gt, rng: gt), n_boot=10)
    verdicts = pd.DataFrame({"metric": "mine", "trivial": ["randomcam", "halfcam", "all1scam"],
                             "verdict": ["mixed (1/2 models fooled)", "not fooled", "fooled"]})
    lines = verdict_text("mine", validity, verdicts).splitlines()
    assert "Trivial maps that fool it: randomcam (mixed (1/2 models fooled)), all1scam (fooled) (a trivial map " \
           "scores at least as well as the worst real method)." in lines
    assert "Not fooled by: halfcam." in lines


# ===================================================================================== report
@pytest.fixture(scope="module")
def report_run_dir(tmp_path_factory):
    """A stand-in run (two models, refined and unrefined maps, ROAD curves) with its analysis."""
    from validation.analyze import analyze_run
    from validation.pipeline.run import run_eval

    tmp = tmp_path_factory.mktemp("mutation_report")
    models = S.make_models(tmp)
    torch.set_num_threads(1)
    run_eval(S.config(models, methods=["cam", "grad", "randomcam", "halfcam", "oracle"],
                      metrics=["gt_cosine", "complexity", "road"]), tmp / "run", components=S.components(),
             progress=False)
    analyze_run(tmp / "run", n_boot=20)
    return tmp / "run"


def _copy(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def _section(page, name):
    """The report's section ``<h2>name...`` up to the next heading."""
    start = page.index(f"<h2>{name}")
    end = page.find("<h2>", start + 4)
    return page[start:end if end > 0 else len(page)]


def _cells(section):
    import re

    return re.findall(r"<tr>\s*(.*?)\s*</tr>", section, flags=re.S)  # the body's rows (the header's <tr> has a style)


def test_the_report_shows_every_figure_and_the_analysis_csvs_numbers(report_run_dir, tmp_path):
    import re

    from validation.report import FIGURES, write_report

    run = _copy(report_run_dir, tmp_path)
    # the report reads the tables analyze wrote (newer than the merge), not a recomputation of them
    validity = pd.read_csv(run / "analysis" / "a_validity.csv")
    validity.loc[0, "pearson"] = 0.123456
    validity.to_csv(run / "analysis" / "a_validity.csv", index=False)
    page = write_report(run, n_boot=20).read_text()
    # each figure once, in its section: correlation with table a, trivial maps with table b, ...
    assert sorted(re.findall(r'<img alt="([^"]*)"', page)) == sorted(FIGURES.values())
    for table, figure in (("a_validity", "correlation"), ("b_trivial_verdict", "trivial"),
                          ("c_refinecam", "refinecam"), ("f_road_curves", "road_curves")):
        assert f'<img alt="{FIGURES[figure]}"' in _section(page, table), table
    section = _section(page, "a_validity")
    assert "<td>0.123</td>" in section
    for row in validity.itertuples():
        for value in (row.pearson, row.spearman):
            if np.isfinite(value):
                assert f"<td>{value:.3f}</td>" in section
    assert len(_cells(section)) == len(validity)  # every row
    for row in pd.read_csv(run / "analysis" / "expectations.csv", keep_default_na=False).itertuples():
        assert f"<td class='{row.status}'>{row.status}</td>" in page


def test_the_road_curve_table_lists_every_unrefined_row_and_no_refined_one(report_run_dir, tmp_path):
    from validation.report import write_report

    run = _copy(report_run_dir, tmp_path)
    curves = pd.read_csv(run / "analysis" / "f_road_curves.csv")
    unrefined = curves[curves["mix"] == "identity"]
    assert len(unrefined) > 40 and len(unrefined) < len(curves)  # the run has refined curves too
    section = _section(write_report(run, n_boot=20).read_text(), "f_road_curves")
    assert len(_cells(section)) == len(unrefined) and "product" not in section


def test_the_cost_table_is_seconds_per_image(report_run_dir, tmp_path):
    from validation.report import write_report

    run = _copy(report_run_dir, tmp_path)
    (run / "timing.csv").write_text("model,config,seconds,images\nalpha,cam@l1,3.0,4\nbeta,cam@l1,1.5,0\n"
                                    "alpha,grad,0.5,2\nbeta,grad,0.9,3\n")
    section = _section(write_report(run, n_boot=20).read_text(), "Cost per configuration")
    rows = [" ".join(r.split()) for r in _cells(section) if "<td>" in r]
    # alpha 3.0 s / 4 images; beta: no image evaluated (0), its time counted over one
    assert len(rows) == 2 and rows[0].endswith("<td>cam@l1</td> <td>0.750</td> <td>1.500</td>")
    assert rows[1].endswith("<td>grad</td> <td>0.250</td> <td>0.300</td>")


def test_the_run_summary_names_the_profile_and_each_models_accuracy(report_run_dir, tmp_path):
    import html

    from validation.report import write_report

    run = _copy(report_run_dir, tmp_path)
    profile = {"name": "tiny", "description": "a <b>test</b>", "budget_notes": None}
    (run / "profile.json").write_text(json.dumps(profile))
    page = write_report(run, n_boot=20).read_text()
    assert f"<tr><th>profile</th><td>{html.escape(json.dumps(profile, sort_keys=True))}</td></tr>" in page
    for model in ("alpha", "beta"):  # the stand-in loader's metadata: test accuracy 0.5
        assert f"<li><b>{model}</b>: arch tiny, test accuracy 0.5000;" in page


def _maps_chunk(folder, name, images, configs, size=4):
    n = len(images)
    maps = {f"map_{i}": np.full((n, size, size), 0.1 * i, np.float32) for i in range(len(configs))}
    np.savez(folder / name, images=np.asarray(images), x=np.zeros((n, 3, size, size), np.float16),
             gt=np.zeros((n, size, size), np.float16), labels=np.zeros(n, int), configs=np.asarray(configs), **maps)


def test_the_grid_shows_unrefined_maps_at_the_shallowest_layer_and_the_product_pair(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from validation.report import figures as F
    from validation.report import grid_maps, make_figures

    (tmp_path / "chunks" / "alpha").mkdir(parents=True)
    (tmp_path / "run_config.json").write_text(json.dumps({"layers": ["stage1", "stage4"], "model_names": ["alpha"]}))
    configs = ["gradcam@stage4", "gradcam@stage1", "gradcam@stage1+product", "gradcam@stage4+product", "lime",
               "layercam@stage4", "layercam@stage1+product", "layercam@stage1"]
    _maps_chunk(tmp_path / "chunks" / "alpha", "c0-2.maps.npz", [0, 1], configs)
    drawn = {}
    monkeypatch.setattr(F, "qualitative_grid", lambda saved, columns, pair: drawn.update(columns=columns, pair=pair) or Figure())
    monkeypatch.setattr(F, "road_curves", lambda curves, layer: drawn.update(road_layer=layer) or Figure())
    made = make_figures(tmp_path, {"f_road_curves": pd.DataFrame({"x": [1]})}, tmp_path / "figs",
                        grid_maps(tmp_path, ["alpha"]))
    assert set(made) == {"qualitative", "road_curves"}
    assert drawn["columns"] == ["gradcam@stage1", "lime", "layercam@stage1"]
    assert drawn["pair"] == ("gradcam@stage1", "gradcam@stage1+product")  # Grad-CAM first of the bases
    assert drawn["road_layer"] == "stage1"


def test_the_qualitative_grid_shows_at_most_four_images():
    from validation.report import figures as F

    saved = {"x": np.zeros((6, 3, 4, 4)), "gt": np.zeros((6, 4, 4)), "configs": ["a", "b"],
             "map_0": np.zeros((6, 4, 4)), "map_1": np.zeros((6, 4, 4))}
    assert len(F.qualitative_grid(saved, ["a", "b"]).axes) == 4 * (2 + 2)
    assert len(F.qualitative_grid(saved, ["a"], max_images=2).axes) == 2 * (2 + 1)


def test_the_road_curve_figure_draws_unrefined_maps_at_the_given_layer_and_layer_free_ones():
    from validation.report import figures as F

    # the unrefined curves at 0.5 (MoRF) and 0.25 (LeRF); refined ones and layer l2 elsewhere
    rows = [dict(model="alpha", method=m, layer=lay, mix=mix, order=o, fraction=f,
                 prob=(0.5 if o == "MORF" else 0.25) if mix == "identity" and lay != "l2" else 0.9)
            for m, lay in (("cam", "l1"), ("cam", "l2"), ("grad", "-")) for mix in ("identity", "product")
            for o in ("MORF", "LERF") for f in (0.0, 0.5)]
    ax = F.road_curves(pd.DataFrame(rows), "l1").axes[0]
    assert ax.get_legend_handles_labels()[1] == ["cam@l1", "grad"]
    lines = ax.get_lines()  # MoRF then LeRF of cam@l1, then of grad
    assert [list(line.get_xdata()) for line in lines] == [[0.0, 0.5]] * 4
    assert [list(line.get_ydata()) for line in lines] == [[0.5, 0.5], [0.25, 0.25]] * 2


def _pearson_error_bars(ax):
    """The segments of the first bar series' error bars (Pearson's), in bar order."""
    from matplotlib.container import ErrorbarContainer

    first = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
    return first.lines[2][0].get_segments()


def test_the_correlation_figure_orders_metrics_by_their_pearson_r():
    from validation.report import figures as F

    validity = pd.DataFrame({"model": "mean+-std", "metric": ["road", "arcc", "adcc"], "level": "pairs",
                             "n_models": 1, "models_nan": "", "pearson": [0.2, 0.7, -0.1], "spearman": 0.5,
                             "pearson_lo": -0.2, "pearson_hi": 0.8, "spearman_lo": 0.3, "spearman_hi": 0.6,
                             "pearson_std": 0.1, "spearman_std": 0.1})
    ax = F.correlation_bars(validity).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["arcc", "road", "adcc"]
    # one model: Pearson's error bars are its bootstrap interval, from pearson_lo to pearson_hi
    np.testing.assert_allclose([sorted(seg[:, 1]) for seg in _pearson_error_bars(ax)], [[-0.2, 0.8]] * 3)
    # several models: +- the std over models around the mean
    fig = F.correlation_bars(validity.assign(n_models=2))
    np.testing.assert_allclose([sorted(seg[:, 1]) for seg in _pearson_error_bars(fig.axes[0])],
                               [[0.6, 0.8], [0.1, 0.3], [-0.2, 0.0]], atol=1e-12)
    assert fig._suptitle.get_text() == "Metric validity (error bars: +- std over models)"


@pytest.mark.parametrize("r, kind", [
    (0.6, "tracks the ground truth"), (0.5, "tracks the ground truth"),
    (0.3, "tracks the ground truth only weakly"), (0.2, "tracks the ground truth only weakly"),
    (0.1, "does not track the ground truth"), (-0.1, "does not track the ground truth"),
    (-0.2, "runs AGAINST the ground truth"), (-0.6, "runs AGAINST the ground truth"),
])
def test_the_verdict_names_the_documented_band_of_the_correlation(r, kind):
    from validation.audit import verdict_text

    validity = pd.DataFrame({"model": "mean+-std", "level": "pairs", "metric": ["mine", "arcc"], "pearson": [r, 0.4],
                             "spearman": [r, 0.4], "pearson_lo": [r - 0.1, 0.3], "pearson_hi": [r + 0.1, 0.5],
                             "n_models": 2})
    first = verdict_text("mine", validity, pd.DataFrame()).splitlines()[0]
    assert first.startswith(f"mine {kind}: Pearson r = {r:.2f} (95% CI {r - 0.1:.2f} to {r + 0.1:.2f})"), first


def test_a_doubled_minus_sign_is_refused_naming_its_key(tmp_path):
    """'--5' passed the integer check (it stripped every leading minus), then int() raised a
    ValueError that named neither the key nor the file."""
    path = _with(_profile(tmp_path), "eval", chunk_size="--5")
    with pytest.raises(R.ProfileValueError, match=r"eval\.chunk_size.*expected an integer"):
        _reproduction(path, tmp_path / "out").run_config()


def test_extends_reads_a_relative_file_from_the_naming_profiles_folder(tmp_path, monkeypatch):
    """A profile and the one it extends, side by side in a folder, load from any working
    directory (the relative path was read from the current one)."""
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(yaml.safe_load(_profile(tmp_path).read_text())))
    (folder / "child.yaml").write_text("extends: base.yaml\nname: child\neval: {n_images: 7}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    profile = R.load_profile(str(folder / "child.yaml"))
    assert profile["name"] == "child" and profile["eval"]["n_images"] == 7
    assert profile["_sources"]["eval.n_images"] == str(folder / "child.yaml")
    assert profile["_sources"]["data"] == str(folder / "base.yaml")
    (folder / "child.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "missing.yaml"))):
        R.load_profile(str(folder / "child.yaml"))
