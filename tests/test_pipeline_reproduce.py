"""reproduce: profile loading, step order, reuse of data / models / chunks, accuracy gate."""

import json
import sys

import pytest
import torch
import yaml

import test_pipeline_standins as S
from shapesynth import CLASS_NAMES
from validation import reproduce as R


def _profile(tmp_path, acc=0.995, workers=1):
    prof = {
        "name": "tiny",
        "description": "test profile",
        "data": {"image_size": S.SIZE, "command": [sys.executable, "-c",
                             "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True);"
                             "(p/'made').write_text('x'); open(sys.argv[2],'a').write('gen\\n')",
                             "{data}", str(tmp_path / "calls.txt")]},
        "train": {"min_test_accuracy": 0.99,
                  "command": [sys.executable, "-c",
                              "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True);"
                              f"(p/'acc').write_text('{acc}'); (p/'model.safetensors').write_text(sys.argv[3]);"
                              "open(sys.argv[2],'a').write('train '+sys.argv[3]+'\\n')",
                              "{model_dir}", str(tmp_path / "calls.txt"), "{arch}"],
                  "models": {"alpha": None, "beta": None}},
        "eval": {"n_images": S.N_IMAGES, "methods": ["cam", "grad", "randomcam", "halfcam"],
                 "metrics": ["gt_cosine", "complexity", "road"], "layers": ["l1", "l2"],
                 "mixes": ["identity", "product"], "chunk_size": 8, "save_maps": 2, "workers": workers},
        "analyze": {"n_boot": 30},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


@pytest.fixture
def fake_io(monkeypatch):
    monkeypatch.setattr(R, "_dataset_ready", lambda data, split, n: (data / "made").exists())

    def model_ready(model_dir):
        if not (model_dir / "acc").exists():
            return False, None
        size = model_dir / "size"  # a model trained at another size says so here
        return True, {"arch": "tiny", "test_accuracy": float((model_dir / "acc").read_text()),
                      "image_size": int(size.read_text()) if size.exists() else S.SIZE,
                      "class_names": list(CLASS_NAMES)}  # the generated data's (shapesynth's)

    monkeypatch.setattr(R, "_model_ready", model_ready)


def test_builtin_profiles_load_and_are_complete():
    assert {"quick", "paper"} <= set(R.available_profiles())
    for name in ("quick", "paper"):
        p = R.load_profile(name)
        assert p["eval"]["n_images"] >= 200
        assert len(p["train"]["models"]) >= 2
        assert p["train"]["min_test_accuracy"] >= 0.99
    with pytest.raises(FileNotFoundError, match="built-in profiles"):
        R.load_profile("nope")
    # quick_resnet18 is quick with its first model only, nothing else changed
    quick, one = R.load_profile("quick"), R.load_profile("quick_resnet18")
    assert list(one["train"]["models"]) == ["resnet18"] and "resnet18" in quick["train"]["models"]
    for key in ("data", "eval", "analyze"):
        assert one[key] == quick[key], key
    assert {k: v for k, v in one["train"].items() if k != "models"} == \
        {k: v for k, v in quick["train"].items() if k != "models"}


def test_builtin_profiles_split_capped_methods_evenly_over_their_workers():
    """A method capped to the first images (method_grid max_images) must not pile onto one worker:
    the strided shards give each worker the same number of its chunks (the quick profile once
    lost ~12 of 97.5 min to 3 Score-CAM chunks over 2 workers)."""
    from validation.pipeline.shards import chunk_ranges, shard_chunks

    for name in R.available_profiles():
        ev = R.load_profile(name)["eval"]
        workers, chunks = int(ev.get("workers", 1)), chunk_ranges((0, int(ev["n_images"])), int(ev["chunk_size"]))
        for method, grid in (ev.get("method_grid") or {}).items():
            cap = grid.get("max_images")
            if cap is None or workers == 1:
                continue
            capped = [sum(1 for s, _ in shard_chunks(chunks, i, workers) if s < cap) for i in range(workers)]
            assert max(capped) == min(capped), f"{name}: {method}'s {cap} images split {capped} over {workers} workers"


def test_a_multi_worker_run_beyond_the_split_names_the_profile_setting(tmp_path, fake_io):
    """Checked before the workers start: their errors would only reach their log files."""
    path = _profile(tmp_path, workers=2)
    prof = yaml.safe_load(path.read_text())
    prof["eval"]["n_images"] = S.N_IMAGES + 10
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(ValueError, match=rf"the profile's eval.n_images \({S.N_IMAGES + 10}\) asks for more "
                                         rf"images than the test split of .* has \({S.N_IMAGES}\)"):
        R.reproduce(str(path), tmp_path / "out", progress=False, components=S.components())
    assert not list((tmp_path / "out" / "logs").glob("*shard*"))  # no worker was started


def test_reproduce_runs_all_steps_then_reuses_everything(tmp_path, fake_io):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    rec = R.reproduce(str(_profile(tmp_path)), out, progress=False, components=S.components())
    assert list(rec["steps"]) == list(R.STEPS)
    assert (out / "run" / "report" / "index.html").exists()
    assert (out / "run" / "analysis" / "tables.md").exists()
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["gen", "train alpha", "train beta"]
    assert rec["steps"]["train"]["alpha"] == {"status": "trained", "reused": False, "test_accuracy": 0.995}
    first = (out / "run" / "results.parquet").read_bytes()
    rec2 = R.reproduce(str(_profile(tmp_path)), out, progress=False, components=S.components())
    assert (tmp_path / "calls.txt").read_text().splitlines() == calls  # nothing regenerated or retrained
    assert rec2["steps"]["generate"]["reused"] and rec2["steps"]["train"]["beta"]["reused"]
    assert rec2["steps"]["run"]["chunks_computed"] == 0 and rec2["steps"]["run"]["chunks_skipped"] == 6
    assert (out / "run" / "results.parquet").read_bytes() == first
    assert json.loads((out / "reproduce.json").read_text())["profile"] == "tiny"
    assert json.loads((out / "run" / "profile.json").read_text())["name"] == "tiny"


def test_low_accuracy_model_stops_the_reproduction(tmp_path, fake_io):
    with pytest.raises(RuntimeError, match="below the profile's minimum 0.99"):
        R.reproduce(str(_profile(tmp_path, acc=0.9)), tmp_path / "out", progress=False,
                    components=S.components())
    assert not (tmp_path / "out" / "run").exists()


def test_existing_model_of_another_size_is_refused_not_reused(tmp_path, fake_io):
    out = tmp_path / "out"
    old = out / "models" / "alpha"
    old.mkdir(parents=True)
    (old / "acc").write_text("0.999")
    (old / "size").write_text("32")  # an earlier reproduction at 32 px
    with pytest.raises(ValueError, match=r"models/alpha holds a model with image_size=32 \(the profile's data: 16\); "
                                         r"use another --out or remove it"):
        R.reproduce(str(_profile(tmp_path)), out, progress=False, components=S.components())
    assert not (out / "run").exists()
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert "train alpha" not in calls


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown steps"):
        R.reproduce(str(_profile(tmp_path)), tmp_path / "o", steps=["train", "bake"])


def test_existing_dataset_of_another_size_is_refused(tmp_path, fake_io):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "shapesynth.json").write_text(json.dumps({"config": {"image_size": 128, "seed": 0}}))
    prof = _profile(tmp_path)
    p = yaml.safe_load(prof.read_text())
    p["data"]["image_size"] = 64
    prof.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match="image_size=128.*wants image_size=64"):
        R.reproduce(str(prof), out, progress=False, components=S.components())


def test_profile_extends_merges_sections_one_level_deep(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: quick\nname: child\neval: {n_images: 32}\ntrain: {models: {vgg11_bn: null}}\n")
    quick, p = R.load_profile("quick"), R.load_profile(str(child))
    assert p["name"] == "child" and "description" not in p
    assert p["eval"]["n_images"] == 32 and p["eval"]["methods"] == quick["eval"]["methods"]
    assert list(p["train"]["models"]) == ["vgg11_bn"]  # a key given replaces the base's whole
    assert p["train"]["args"] == quick["train"]["args"] and p["data"] == quick["data"]
    (tmp_path / "bad.yaml").write_text("extends: nope\n")
    with pytest.raises(FileNotFoundError, match="built-in profiles"):
        R.load_profile(str(tmp_path / "bad.yaml"))


def test_sigterm_stops_the_reproduction_and_the_step_it_is_running(tmp_path):
    """`kill <pid>` of `reproduce` must not orphan its child (here a generate step that would run
    for a minute): the child is terminated and reaped, and the command exits 128 + SIGTERM."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    prof = yaml.safe_load(_profile(tmp_path).read_text())
    prof["data"]["command"] = [sys.executable, "-c",
                               "import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(60)",
                               str(pid_file)]
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(prof))
    parent = subprocess.Popen([sys.executable, "-m", "validation", "reproduce", "--profile", str(tmp_path / "slow.yaml"),
                               "--out", str(tmp_path / "out"), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            assert parent.poll() is None, parent.stderr.read()
            time.sleep(0.2)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, not running on and not left a zombie


def _legacy_unfolded_run(tmp_path, out):
    """A run folder as the main job left it before folding existed: unfolded chunks, no ``fold``
    in its config. Returns (profile without eval.fold, profile with eval.fold: false, config path)."""
    prof = _profile(tmp_path)
    unfolded = yaml.safe_load(prof.read_text())
    unfolded["eval"]["fold"] = False
    prof_unfolded = tmp_path / "unfolded.yaml"
    prof_unfolded.write_text(yaml.safe_dump(unfolded))
    R.reproduce(str(prof_unfolded), out, progress=False, components=S.components(),
                steps=["generate", "train", "run"])
    cfg_path = out / "run" / "run_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["fold"]
    cfg_path.write_text(json.dumps(cfg))
    return prof, prof_unfolded, cfg_path


def test_a_run_from_before_folding_is_resumed_unfolded_not_refused(tmp_path, fake_io, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    prof, _, cfg_path = _legacy_unfolded_run(tmp_path, out)
    cfg = json.loads(cfg_path.read_text())
    rec = R.reproduce(str(prof), out, progress=False, components=S.components())
    assert rec["steps"]["run"]["chunks_computed"] == 0 and rec["steps"]["run"]["chunks_skipped"] == 6
    assert "from before models were folded for inference; resuming it unfolded" in capsys.readouterr().out
    cfg_path.write_text(json.dumps({**cfg, "fold": False}))  # started unfolded on purpose: resumes so, quietly
    rec = R.reproduce(str(prof), out, progress=False, components=S.components())
    assert rec["steps"]["run"]["chunks_computed"] == 0
    assert "resuming it unfolded" not in capsys.readouterr().out
    # a new folder folds
    R.reproduce(str(prof), tmp_path / "new", progress=False, components=S.components(), steps=["generate", "train", "run"])
    assert json.loads((tmp_path / "new" / "run" / "run_config.json").read_text())["fold"] is True


def test_a_profile_that_sets_fold_is_obeyed_without_asking_the_run_folder(tmp_path, fake_io, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    _, prof_unfolded, _ = _legacy_unfolded_run(tmp_path, out)
    capsys.readouterr()
    rec = R.reproduce(str(prof_unfolded), out, progress=False, components=S.components(), steps=["run"])
    assert rec["steps"]["run"]["chunks_computed"] == 0
    assert "resuming it unfolded" not in capsys.readouterr().out  # the profile decided, no note


@pytest.mark.parametrize("text, message", [
    ("", r"expected a mapping with sections data, train, eval; got NoneType"),
    ("- data\n- train\n", r"expected a mapping with sections data, train, eval; got list"),
    ("data: [unclosed\n", r"not valid YAML"),
])
def test_a_profile_that_is_not_a_mapping_is_a_clear_error(tmp_path, capsys, text, message):
    from validation.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"profile {path}: {message}"):
        R.load_profile(str(path))
    assert main(["reproduce", "--profile", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"shapesynth-eval reproduce: error: profile {path}" in capsys.readouterr().err


def _existing_models(out, acc):
    """A reproduction folder holding the data and both models (as a train step left them)."""
    (out / "data").mkdir(parents=True)
    (out / "data" / "made").write_text("x")
    for arch in ("alpha", "beta"):
        (out / "models" / arch).mkdir(parents=True)
        (out / "models" / arch / "acc").write_text(str(acc))
        (out / "models" / arch / "model.safetensors").write_text(arch)


def test_steps_without_train_still_apply_the_accuracy_gate(tmp_path, fake_io, capsys):
    """`--steps run,analyze,report` (as the docs show) evaluated an 18.75 % model to exit 0:
    min_test_accuracy and the model-fit checks ran only inside the train step."""
    from validation.cli import main

    out = tmp_path / "out"
    _existing_models(out, 0.1875)
    prof = str(_profile(tmp_path))
    with pytest.raises(RuntimeError, match=r"alpha: test accuracy 0.1875 is below the profile's minimum 0.99"):
        R.reproduce(prof, out, steps=["run", "analyze", "report"], progress=False, components=S.components())
    assert not (out / "run").exists()
    assert main(["reproduce", "--profile", prof, "--out", str(out), "--steps", "run,analyze,report",
                 "--no-progress"]) == 2
    assert "test accuracy 0.1875 is below the profile's minimum 0.99" in capsys.readouterr().err
    assert not (out / "run").exists() and not (tmp_path / "calls.txt").exists()  # nothing trained either
    (out / "models" / "beta" / "size").write_text("32")  # the fit check too
    (out / "models" / "alpha" / "acc").write_text("0.995")
    with pytest.raises(ValueError, match=r"models/beta holds a model with image_size=32"):
        R.reproduce(prof, out, steps=["run"], progress=False, components=S.components())
    assert not (out / "run").exists()


def test_steps_without_train_and_without_models_is_a_clear_error(tmp_path, fake_io):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "made").write_text("x")
    with pytest.raises(RuntimeError, match=r"models/alpha: no finished alpha model for the run step; include the "
                                           r"train step \(e.g. --steps train,run,analyze,report, or no --steps\)"):
        R.reproduce(str(_profile(tmp_path)), out, steps=["run", "analyze"], progress=False, components=S.components())
    assert not (out / "run").exists()


def test_steps_without_train_run_on_good_models(tmp_path, fake_io):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    _existing_models(out, 0.995)
    rec = R.reproduce(str(_profile(tmp_path)), out, steps=["run"], progress=False, components=S.components())
    assert rec["steps"]["run"]["models"]["alpha"] == {"status": "reused", "reused": True, "test_accuracy": 0.995}
    assert rec["steps"]["run"]["chunks_computed"] == 6


def test_a_resumed_training_is_recorded_as_resumed(tmp_path, fake_io):
    """reproduce.json said "reused": false for a training that continued from its last.ckpt,
    as for one that started afresh."""
    out = tmp_path / "out"
    (out / "models" / "alpha" / "checkpoints").mkdir(parents=True)
    (out / "models" / "alpha" / "checkpoints" / "last.ckpt").write_text("interrupted")
    rec = R.reproduce(str(_profile(tmp_path)), out, steps=["generate", "train"], progress=False)
    assert {arch: rec["steps"]["train"][arch]["status"] for arch in ("alpha", "beta")} == \
        {"alpha": "resumed", "beta": "trained"}
    assert not rec["steps"]["train"]["alpha"]["reused"]
    rec = R.reproduce(str(_profile(tmp_path)), out, steps=["train"], progress=False)
    assert {rec["steps"]["train"][arch]["status"] for arch in ("alpha", "beta")} == {"reused"}
    assert json.loads((out / "reproduce.json").read_text())["steps"]["train"]["alpha"]["status"] == "reused"


def test_analyze_of_a_folder_built_with_another_profile_is_refused(tmp_path, capsys):
    """--steps analyze with another profile re-analysed the folder's run and recorded it under
    the new profile's name."""
    from validation.cli import main

    out = tmp_path / "out"
    (out / "run").mkdir(parents=True)
    (out / "run" / "profile.json").write_text(json.dumps({"name": "quick"}))
    (out / "reproduce.json").write_text(json.dumps({"profile": "quick", "steps": {}}))
    for steps in (["analyze"], ["analyze", "report"], ["report"]):
        with pytest.raises(ValueError, match=rf"{out} holds a run built with profile 'quick', not 'tiny': --steps "
                                             rf"{','.join(steps)} would {' and '.join(steps)} it under profile 'tiny'; use "
                                             r"profile 'quick' \(--profile\), include the run step"):
            R.reproduce(str(_profile(tmp_path)), out, steps=steps, progress=False)
    assert main(["reproduce", "--profile", str(_profile(tmp_path)), "--out", str(out), "--steps", "analyze",
                 "--no-progress"]) == 2
    assert "holds a run built with profile 'quick', not 'tiny'" in capsys.readouterr().err
    assert json.loads((out / "reproduce.json").read_text())["profile"] == "quick"  # not rewritten
    # the same profile passes the check (and reaches analyze: nothing merged here)
    (out / "run" / "profile.json").write_text(json.dumps({"name": "tiny"}))
    with pytest.raises(FileNotFoundError, match="not merged yet|not a run directory"):
        R.reproduce(str(_profile(tmp_path)), out, steps=["analyze"], progress=False)


def test_report_step_without_the_analyze_step_uses_the_profiles_n_boot(tmp_path, fake_io, monkeypatch):
    """`--steps run,report`: the report computes the missing tables itself, with the profile's
    `analyze.n_boot` (30 here), not write_report's default of 1000 replicates."""
    from validation import analyze as A

    torch.set_num_threads(1)
    out = tmp_path / "out"
    _existing_models(out, 0.995)
    seen, real = [], A.analyze_run
    monkeypatch.setattr(A, "analyze_run", lambda *a, **kw: seen.append(kw.get("n_boot")) or real(*a, **kw))
    R.reproduce(str(_profile(tmp_path)), out, steps=["run", "report"], progress=False, components=S.components())
    assert seen == [30] and (out / "run" / "report" / "index.html").exists()


def test_profile_arguments_keep_braces_that_are_not_placeholders(tmp_path, fake_io, capsys):
    """A YAML mapping among a profile's arguments (``--synth '{size_bands: [[0.31, 0.39]]}'``, the way
    the trainers take SynthConfig overrides) went through ``str.format``: the reproduction died with
    ``KeyError: 'size_bands'`` and a traceback. Only the placeholders are filled now; an unknown one
    is refused naming it, in one line."""
    from validation.cli import main

    path = _profile(tmp_path)
    prof = yaml.safe_load(path.read_text())
    synth = "{size_bands: [[0.31, 0.39]], bg_pool_sizes: {train: 4, val: 1, test: 1}}"
    prof["train"]["command"] = [
        sys.executable, "-c",
        "import json,pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True);"
        "(p/'acc').write_text('0.995'); (p/'model.safetensors').write_text('x');"
        "(p/'argv.json').write_text(json.dumps(sys.argv[1:]))",
        "{model_dir}", "--synth", synth, "--arch", "{arch}"]
    path.write_text(yaml.safe_dump(prof))
    R.reproduce(str(path), tmp_path / "out", steps=["generate", "train"], progress=False)
    for arch in ("alpha", "beta"):
        model_dir = tmp_path / "out" / "models" / arch
        assert json.loads((model_dir / "argv.json").read_text()) == [str(model_dir), "--synth", synth, "--arch", arch]

    prof["train"]["command"][-1] = "{archh}"
    path.write_text(yaml.safe_dump(prof))
    assert main(["reproduce", "--profile", str(path), "--out", str(tmp_path / "other"), "--steps", "generate,train"]) == 2
    assert "unknown placeholder {archh} in '{archh}'; placeholders: {arch}, {data}," in capsys.readouterr().err


def test_the_data_image_size_is_the_generated_datasets_when_the_profile_does_not_repeat_it(tmp_path, fake_io):
    """A profile whose data args generate 32 px images but that has no ``data.image_size`` (the
    docs list none) had its models refused: "holds a model with image_size=32 (the profile's data:
    128)", and ``{image_size}`` in the train args was 128. The generated dataset's size is used."""
    path = _profile(tmp_path)
    prof = yaml.safe_load(path.read_text())
    del prof["data"]["image_size"]
    prof["data"]["command"] = [
        sys.executable, "-c",
        "import json,pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True);"
        "(p/'made').write_text('x'); (p/'shapesynth.json').write_text(json.dumps(dict(config=dict(image_size=int(sys.argv[2])))))",
        "{data}", str(S.SIZE)]
    prof["train"]["command"] = [
        sys.executable, "-c",
        "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True);"
        "(p/'acc').write_text('0.995'); (p/'model.safetensors').write_text('x'); (p/'size_arg').write_text(sys.argv[2])",
        "{model_dir}", "{image_size}"]
    path.write_text(yaml.safe_dump(prof))
    rec = R.reproduce(str(path), tmp_path / "out", steps=["generate", "train"], progress=False)
    assert rec["steps"]["train"]["alpha"]["status"] == "trained"
    assert (tmp_path / "out" / "models" / "alpha" / "size_arg").read_text() == str(S.SIZE)


def _with(path, section, **values):
    """The profile file at ``path`` with ``values`` set in ``section``."""
    prof = yaml.safe_load(path.read_text())
    prof[section].update(values)
    path.write_text(yaml.safe_dump(prof))
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_eval_value_names_the_profile_key_and_file_in_both_paths(tmp_path, fake_io, capsys, workers):
    """The run's checks name its flags: a profile's `mixes: [identity, prodct]` was reported as
    "unknown --mix ['prodct']" by a single-worker run, and by a two-worker run as "2 shard
    process(es) failed" after both workers had started. Both now name eval.mixes and the file."""
    from validation.cli import main

    path = _with(_profile(tmp_path, workers=workers), "eval", mixes=["identity", "prodct"])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"^eval.mixes in profile {path}: unknown --mix \['prodct'\]; choose from"):
        R.reproduce(str(path), out, progress=False, components=S.components())
    assert not list((out / "logs").glob("*shard*")) and not (out / "run" / "chunks").exists()
    # a value the profile gives in the wrong form is named too, before any step runs
    _with(path, "eval", mixes=["identity"], chunk_size="eight")
    assert main(["reproduce", "--profile", str(path), "--out", str(out), "--no-progress"]) == 2
    assert (f"reproduce: error: eval.chunk_size in profile {path}: expected an integer, got 'eight'"
            in capsys.readouterr().err)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_unknown_layer_names_eval_layers_and_the_file_in_both_paths(tmp_path, fake_io, workers):
    """The layer check (the project's explainer, models loaded) said "unknown layer 'stage9'
    (--layers)"; with two workers it only reached their logs."""
    from validation.pipeline.run import Components

    components = Components(load_model=S.load_model, dataset=lambda path, split: S.TinyDataset(),
                            fingerprint=lambda path: "tiny-fingerprint")  # the project's explainer and evaluate
    path = _with(_profile(tmp_path, workers=workers), "eval", methods=["gradcam"], metrics=["gt_cosine"],
                 layers=["stage9"], mixes=["identity"])
    with pytest.raises(ValueError, match=rf"^eval.layers in profile {path}: --model \S+/models/alpha: unknown "
                                         r"layer 'stage9' \(--layers\)"):
        R.reproduce(str(path), tmp_path / "out", progress=False, components=components)
    assert not list((tmp_path / "out" / "logs").glob("*shard*"))


def test_a_key_inherited_with_extends_names_the_file_that_set_it(tmp_path, fake_io):
    base = _with(_profile(tmp_path), "eval", save_maps=-1)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base}\nname: child\neval: {{mixes: [identity, prodct]}}\n")
    with pytest.raises(ValueError, match=rf"^eval.save_maps in profile {base}: must be >= 0, got -1"):
        R.reproduce(str(child), tmp_path / "out", progress=False, components=S.components())
    _with(base, "eval", save_maps=2)
    with pytest.raises(ValueError, match=rf"^eval.mixes in profile {child}: unknown --mix"):
        R.reproduce(str(child), tmp_path / "out", progress=False, components=S.components())


def test_a_failed_training_command_names_its_profile_key_and_file(tmp_path, fake_io):
    path = _profile(tmp_path)
    prof = yaml.safe_load(path.read_text())
    prof["train"]["models"]["beta"] = {"command": [sys.executable, "-c", "import sys; sys.exit('bad --lr')"]}
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(RuntimeError, match=rf"^train.models.beta.command in profile {path}: command failed \(exit 1\)"):
        R.reproduce(str(path), tmp_path / "out", steps=["generate", "train"], progress=False)
    prof["train"]["command"] = [sys.executable, "-c", "import sys; sys.exit(2)"]
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(RuntimeError, match=rf"^train.command in profile {path}: command failed \(exit 2\)"):
        R.reproduce(str(path), tmp_path / "other", steps=["generate", "train"], progress=False)
    prof["train"]["command"][-1] = "{archh}"
    path.write_text(yaml.safe_dump(prof))
    with pytest.raises(ValueError, match=rf"^train.command in profile {path}: unknown placeholder {{archh}}"):
        R.reproduce(str(path), tmp_path / "third", steps=["generate", "train"], progress=False)


def test_a_list_given_as_text_is_a_comma_list_as_on_the_command_line(tmp_path, fake_io):
    """`layers: l1,l2` (or `layers: l2`) was read letter by letter: layers 'l', '1', ',', ..."""
    torch.set_num_threads(1)
    path = _with(_profile(tmp_path), "eval", layers="l1, l2", mixes="identity,product")
    R.reproduce(str(path), tmp_path / "out", steps=["generate", "train", "run"], progress=False,
                components=S.components())
    cfg = json.loads((tmp_path / "out" / "run" / "run_config.json").read_text())
    assert cfg["layers"] == ["l1", "l2"] and cfg["mixes"] == ["identity", "product"]


def test_a_run_folder_of_other_settings_is_refused_with_what_reproduce_can_do(tmp_path, fake_io):
    """The run's hint said "use another --out or --overwrite": reproduce has no --overwrite."""
    torch.set_num_threads(1)
    path, out = _profile(tmp_path), tmp_path / "out"
    R.reproduce(str(path), out, steps=["generate", "train", "run"], progress=False, components=S.components())
    _with(path, "eval", layers=["l1"])
    with pytest.raises(ValueError, match=rf"^profile {path}: .*differs in \[.*'layers', 'refine_layers'\]\); use another "
                                         rf"--out, or remove {out / 'run'} to compute the run again$"):
        R.reproduce(str(path), out, steps=["run"], progress=False, components=S.components())


def test_a_failed_shard_worker_says_why(tmp_path, fake_io):
    """A worker's own error (here: the workers' real registry does not know the stand-in methods
    the in-process checks accept) is in the reproduction's error, not only in the worker's log;
    the log of an earlier failure is not."""
    path = _profile(tmp_path, workers=2)
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "run_shard1.log").write_text("shapesynth-eval run: error: an earlier failure\n")
    with pytest.raises(RuntimeError) as err:
        R.reproduce(str(path), out, progress=False, components=S.components())
    text = str(err.value)
    assert text.startswith(f"2 shard process(es) failed: profile {path}: unknown method 'cam'; available: ")
    assert "an earlier failure" not in text and f"(see {out / 'logs'}/run_shard*.log)" in text


def test_every_worker_flag_has_its_profile_key(tmp_path):
    """The mapping used to name keys covers every flag the workers are given."""
    from validation.pipeline.run import RunConfig

    r = R.Reproduction(R.load_profile(str(_profile(tmp_path))), tmp_path / "out")
    config = RunConfig(data="d", models=["m"], methods=["cam"], metrics=["road"], fold=False)
    flags = [flag for flag, _ in r._worker_flags(config, 1)]
    assert "--no-fold" in flags and set(flags) <= set(R.RUN_FLAG_KEYS)
    # the eval keys docs/evaluation.md lists
    documented = ("n_images methods metrics layers refine_layers mixes split seed method_options metric_options "
                  "method_grid chunk_size save_maps device fold workers threads").split()
    assert set(R.RUN_FLAG_KEYS.values()) <= {f"eval.{k}" for k in documented}
