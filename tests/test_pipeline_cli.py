"""shapesynth-eval command line: subcommands exist, bad input gives one clear line and exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_pipeline_standins as S
from validation.cli import build_parser, main
from validation.pipeline.run import run_eval


def test_every_subcommand_has_help():
    for cmd in ("run", "merge", "analyze", "audit", "report", "reproduce"):
        done = subprocess.run([sys.executable, "-m", "validation", cmd, "--help"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


def test_run_arguments_parse_into_lists():
    args = build_parser().parse_args(["run", "--data", "d", "--model", "a", "--model", "b", "--methods",
                                      "gradcam,lime", "--n-images", "10", "--shard", "1/2", "--out", "o"])
    assert args.models == ["a", "b"] and args.n_images == 10 and args.shard == "1/2"


def _run_config(monkeypatch, argv):
    """The RunConfig `run` builds from ``argv`` (run_eval replaced by a recorder)."""
    import validation.pipeline.run as run_module

    seen = {}

    def record(config, out, **kwargs):
        seen.update(config=config, out=out, **kwargs)
        return {}

    monkeypatch.setattr(run_module, "run_eval", record)
    assert main(["run", "--data", "d", "--model", "a", "--out", "o", "--no-progress"] + argv) == 0
    return seen


def test_run_comma_lists_and_all_become_the_run_config(monkeypatch, capsys):
    from validation.attributions import available_methods
    from validation.pipeline.run import DEFAULT_METRICS

    seen = _run_config(monkeypatch, ["--methods", "gradcam, lime,,", "--metrics", "gt_cosine,road",
                                     "--layers", "stage1,stage4", "--mix", "identity,product",
                                     "--refine-layers", "stage1,stage2,stage4", "--images", "10:30",
                                     "--shard", "1/2"])
    cfg = seen["config"]
    assert cfg.methods == ["gradcam", "lime"] and cfg.metrics == ["gt_cosine", "road"]
    assert cfg.layers == ["stage1", "stage4"] and cfg.mixes == ["identity", "product"]
    assert cfg.refine_layers == ["stage1", "stage2", "stage4"] and cfg.image_range == (10, 30)
    assert seen["shard"] == (1, 2) and seen["progress"] is False and seen["overwrite"] is False
    # defaults: "all" methods (refinecam only through --mix), every metric, four stages, four mixes
    seen = _run_config(monkeypatch, ["--overwrite"])
    cfg = seen["config"]
    assert seen["overwrite"] is True and seen["shard"] == (0, 1)
    methods = [m for m in available_methods() if m != "refinecam"]
    assert cfg.methods == methods and len(methods) > 5 and "gradcam" in methods
    assert cfg.metrics == list(DEFAULT_METRICS) and "gt_cosine" in cfg.metrics
    assert cfg.layers == cfg.refine_layers == ["stage1", "stage2", "stage3", "stage4"]
    assert cfg.mixes == ["identity", "product", "geomean", "invexp"] and cfg.image_range == (0, 200)
    explicit = _run_config(monkeypatch, ["--methods", "all", "--metrics", "all"])
    assert explicit["config"].methods == methods and explicit["config"].metrics == list(DEFAULT_METRICS)


def test_bad_shard_and_missing_model_are_one_line_errors(tmp_path, capsys):
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "m"), "--methods", "gradcam",
                 "--metrics", "gt_cosine", "--shard", "2/2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "--shard" in capsys.readouterr().err
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "missing.ckpt"), "--methods",
                 "gradcam", "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "missing.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n-images", "0"], "--n-images must be >= 1, got 0"),
    (["--images", "5:5"], "--images '5:5': need 0 <= start < stop"),
    (["--images", "5-9"], "--images must look like start:stop (e.g. 0:200), got '5-9'"),
])
def test_an_empty_or_malformed_image_range_is_refused_naming_its_flag(tmp_path, capsys, flags, message):
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "m"), "--methods", "gradcam",
                 "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress"] + flags)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--metric-options", "{bad", "--metric-options '{bad': neither a file nor valid JSON"),
    ("--method-grid", "[1]", "--method-grid '[1]': expected a mapping, got list"),
    ("--method-options", "FILE", "--method-options 'FILE': cannot read the file as JSON or YAML"),
])
def test_unreadable_options_are_refused_naming_their_flag(tmp_path, capsys, flag, value, message):
    """Options that were neither JSON nor a mapping ended the command with exit status 1 and
    "options '{bad': ...", naming none of the three option flags (nor the command)."""
    if value == "FILE":
        value = str(tmp_path / "options.yaml")
        Path(value).write_text("lime: {n_samples: [1, 2}\n")
        message = message.replace("FILE", value)
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "m"), "--methods", "gradcam",
                 "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress", flag, value])
    assert code == 2 and f"shapesynth-eval run: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_merge_command_after_shards(tmp_path, capsys):
    models = S.make_models(tmp_path)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    for i in range(2):
        run_eval(S.config(models, methods=["cam"]), out, shard=(i, 2), components=S.components(), progress=False)
    assert main(["merge", str(out)]) == 0
    assert "merged 10/10 chunks" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_cli_run_on_a_saved_model_two_shards_equal_one_process(tmp_path, save_untrained_model):
    """The real path end to end: generator CLI, trainers.save_model/load_model, attribution
    methods, metrics, `run --shard` in two processes, `merge`: byte-identical tables."""
    data = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "shapesynth", "generate", "--out", str(data), "--image-size", "32",
                           "--size-bands", "0.31-0.39,0.16-0.19", "--train-size", "8", "--val-size", "8", "--test-size", "32", "--no-progress"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    save_untrained_model(tmp_path / "model", seed=3, test_accuracy=0.2)
    args = [sys.executable, "-m", "validation", "run", "--data", str(data), "--model", str(tmp_path / "model"),
            "--methods", "gradcampp,lafam,halfcam", "--metrics", "all", "--layers", "stage1,stage4",
            "--mix", "identity,product", "--n-images", "32", "--threads", "1", "--no-progress"]
    single = subprocess.run(args + ["--out", str(tmp_path / "one")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    procs = [subprocess.Popen(args + ["--out", str(tmp_path / "two"), "--shard", f"{i}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert main(["merge", str(tmp_path / "two")]) == 0
    for name in ("results.parquet", "results.csv", "predictions.csv"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_analyze_of_a_partial_merge_warns(tmp_path, capsys):
    from validation.pipeline.table import merge_run

    models = S.make_models(tmp_path)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam", "halfcam"], metrics=["gt_cosine", "complexity"]), out, shard=(0, 2),
             components=S.components(), progress=False)
    merge_run(out, allow_partial=True)
    assert main(["analyze", str(out), "--n-boot", "10"]) == 0
    err = capsys.readouterr().err
    assert "warning: partial run: 4 of 10 chunks were not merged" in err


@pytest.mark.parametrize("n_boot", ["0", "-5"])
def test_analyze_refuses_a_bootstrap_count_below_one_naming_the_flag(tmp_path, capsys, n_boot):
    models = S.make_models(tmp_path)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_eval(S.config(models, methods=["cam", "halfcam"], metrics=["gt_cosine", "complexity"]), out,
             components=S.components(), progress=False)
    assert main(["analyze", str(out), "--n-boot", n_boot]) == 2
    assert f"--n-boot (bootstrap replicates) must be >= 1, got {n_boot}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
    (["--save-maps", "-1"], "--save-maps must be >= 0, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),  # 0 was silently ignored
    (["--threads", "-2"], "--threads must be >= 1, got -2"),
])
def test_bad_run_counts_are_refused_naming_their_flag_before_any_work(tmp_path, capsys, flags, message):
    threads = torch.get_num_threads()
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "m"), "--methods", "gradcam",
                 "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress"] + flags)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and torch.get_num_threads() == threads


def _run_on_standins(monkeypatch, tmp_path, capsys, flags):
    """`run` on the stand-in models and 20-image dataset; returns (exit code, stderr)."""
    import validation.pipeline.run as run_module

    real = run_module.run_eval
    monkeypatch.setattr(run_module, "run_eval",
                        lambda config, out, **kw: real(config, out, components=S.components(), **kw))
    models = S.make_models(tmp_path)
    code = main(["run", "--data", "tiny", "--model", models[0], "--methods", "cam", "--layers", "l1",
                 "--mix", "identity", "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress"] + flags)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    ([], "--n-images 200 (its default: neither --n-images nor --images was given) asks for more images "
         "than the test split of tiny has (20)"),
    (["--n-images", "30"], "--n-images 30 asks for more images than the test split of tiny has (20)"),
    (["--images", "10:30"], "--images 10:30 asks for more images than the test split of tiny has (20)"),
])
def test_a_range_beyond_the_split_names_the_flag_that_set_it(monkeypatch, tmp_path, capsys, flags, message):
    """The default --n-images 200 was reported as '--images 0:200', a flag the user never gave."""
    code, err = _run_on_standins(monkeypatch, tmp_path, capsys, flags)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def _main_not_interrupted(argv):
    try:
        return main(argv)
    except KeyboardInterrupt:  # not raised on: it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")


@pytest.mark.parametrize("command, argv, hint", [
    ("run", ["run", "--data", "d", "--model", "m", "--out", "o", "--no-progress"],
     "; rerun the same command to resume from the finished chunks"),
    ("reproduce", ["reproduce", "--out", "o", "--no-progress"],
     "; rerun the same command to resume: the data, finished models and finished chunks are reused"),
    ("merge", ["merge", "o"], ""),
    # rerun as it was, --overwrite would recompute what is finished
    ("run", ["run", "--data", "d", "--model", "m", "--out", "o", "--no-progress", "--overwrite"],
     "; rerun the same command without --overwrite to resume from the finished chunks"),
])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, command, argv, hint):
    """Ctrl-C printed a ~60-line traceback; now one line that says how to resume."""
    import validation.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert _main_not_interrupted(argv) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"shapesynth-eval {command}: interrupted{hint}"  # one line, no traceback


def test_ctrl_c_during_a_run_resumes_from_its_finished_chunks(monkeypatch, tmp_path, capsys):
    """The real path: interrupted inside the chunk loop (tqdm closed, finished chunks kept)."""
    import validation.pipeline.run as run_module

    real = run_module.run_eval
    monkeypatch.setattr(run_module, "run_eval", lambda config, out, **kw: real(
        config, out, components=S.components(interrupt_after=2), **kw))
    models = S.make_models(tmp_path)
    argv = ["run", "--data", "tiny", "--model", models[0], "--methods", "cam", "--layers", "l1", "--mix",
            "identity", "--metrics", "gt_cosine", "--n-images", "20", "--chunk-size", "4",
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert _main_not_interrupted(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume from the finished chunks" in err and "Traceback" not in err
    monkeypatch.setattr(run_module, "run_eval", lambda config, out, **kw: real(
        config, out, components=S.components(), **kw))
    assert main(argv) == 0
    assert '"chunks_skipped": 2' in capsys.readouterr().out


def _help(capsys, command):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_the_defaults(capsys):
    text = _help(capsys, "run")
    for expected in ("--layers LAYERS comma list, shallow to deep (default: stage1,stage2,stage3,stage4)",
                     "(default: identity,product,geomean,invexp)", "--split SPLIT", "(default: test)",
                     "images per batch and per resumable chunk (part of the run's identity) (default: 16)",
                     "(default: 0)", "for the report (default: 8)", "(default: 200, unless --images is given)",
                     "(default: cpu)"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--n-boot N_BOOT bootstrap replicates (>= 1) (default: 1000)" in _help(capsys, "audit")
    text = _help(capsys, "analyze")
    assert "(default: 1000)" in text and "seed of the bootstrap (default: 0)" in text
    text = _help(capsys, "reproduce")
    assert "(default: quick)" in text
    from validation.reproduce import available_profiles  # every bundled profile is named (quick_resnet18 was not)
    assert " | ".join(available_profiles()) + " | path to a profile YAML" in " ".join(text.split())


@pytest.mark.parametrize("steps", ["", ","])
def test_steps_that_name_no_step_are_refused_not_read_as_all(monkeypatch, tmp_path, capsys, steps):
    """`reproduce --steps ''` started the whole profile: generate, train, run, analyze, report."""
    import validation.reproduce

    monkeypatch.setattr(validation.reproduce, "reproduce", lambda *a, **k: pytest.fail("reproduce started"))
    assert main(["reproduce", "--out", str(tmp_path / "o"), "--steps", steps, "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"shapesynth-eval reproduce: error: --steps {steps!r} names no step: give a "
                                       "subset of generate,train,run,analyze,report, or leave --steps out for all\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["merge", "FILE"], ["reproduce", "--out", "FILE", "--steps", "report", "--no-progress"]])
def test_a_file_where_a_folder_belongs_is_a_one_line_error(tmp_path, capsys, argv):
    """A file given as the run folder ended in a NotADirectoryError / FileExistsError traceback."""
    (tmp_path / "file").write_text("x")
    argv = [str(tmp_path / "file") if a == "FILE" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shapesynth-eval {argv[0]}: error:") and str(tmp_path / "file") in err
    assert len(err.splitlines()) == 1 and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("argv, flag", [
    (["run", "--data", "d", "--model", "m", "--out", ""], "--out"),
    (["reproduce", "--out", "", "--steps", "report"], "--out"),
])
def test_an_empty_path_is_refused_naming_its_flag(tmp_path, capsys, monkeypatch, argv, flag):
    """`run --out ''` and `reproduce --out ''` worked in the current folder."""
    import validation.cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(cli.COMMANDS, argv[0], lambda args: pytest.fail("the empty value was accepted"))
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"shapesynth-eval {argv[0]}: error: argument {flag}: an empty value names nothing")
    assert list(tmp_path.iterdir()) == []
