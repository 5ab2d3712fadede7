"""Bad training options are refused up front: a one-line error naming the option (exit code 2 from
the CLI) before anything is written, and options the chosen data source would ignore are refused."""

import pytest
import yaml

from trainers.api import TrainConfig
from trainers.cli import main

SMALL = ["--image-size", "32", "--synth", "{size_bands: [[0.3, 0.4]]}", "--precision", "32-true",
         "--num-workers", "0", "--progress-bar", "false"]


@pytest.mark.parametrize("flags, names", [
    (["--batch-size", "0"], "batch_size"),
    (["--pct-start", "2"], "pct_start"),
    (["--label-smoothing", "2"], "label_smoothing"),
    (["--train-length", "0"], "train_length"),
    (["--val-length", "0"], "val_length"),
    (["--curriculum-start", "3"], "curriculum_start"),
    (["--max-epochs", "-1"], "max_epochs"),
    (["--threads", "-1"], "threads"),
    (["--devices", "abc"], "devices"),
    (["--lr", "0"], "lr"),
    # inf passed `> 0` and reached the optimiser
    (["--lr", "inf"], "lr must be a finite number"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number"),
    (["--seed", "-1"], "seed"),
    (["--limit-train-batches", "0"], "limit_train_batches"),
    (["--limit-val-batches", "1.5"], "limit_val_batches"),
    (["--accelerator", "quantum"], "accelerator"),
    # Lightning takes a zero cap: the fit stopped before its first step and died on a missing checkpoint
    (["--max-time", "00:00:00:00"], "--max-time 00:00:00:00: a zero wall-clock cap stops training"),
    # a known accelerator that this machine lacks: Lightning's own check, before anything is written
    (["--accelerator", "tpu"], "accelerator 'tpu'"),
    # options the data source would ignore
    (["--train-crop-epochs", "3"], "train_crop_epochs"),
])
def test_bad_values_are_one_line_errors_before_anything_is_written(tmp_path, capsys, flags, names):
    out = tmp_path / "run"
    assert main(["fit", "--out", str(out), *SMALL, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth-train: error:") and names in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("text, says", [("{bad", "not valid YAML"), ("[1, 2]", "expected a mapping")])
def test_synth_that_is_not_a_yaml_mapping_is_an_argparse_error(tmp_path, capsys, text, says):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--out", str(tmp_path / "run"), "--synth", text])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "argument --synth:" in last and says in last
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path, capsys):
    # PyYAML reads 1e-3 as the string '1e-3'; AdamW would fail on it only once training started
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nema_decay: 2e-3\nlimit_val_batches: 1\n")
    assert main(["fit", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["lr"] == 0.001 and cfg["ema_decay"] == 0.002
    assert cfg["limit_val_batches"] == 1 and isinstance(cfg["limit_val_batches"], int)  # one batch, not 100 %
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    assert main(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "lr must be a number or null, got 'fast'" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("lr: [1\n")
    assert main(["fit", "--config", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml is not valid YAML" in err and len(err.splitlines()) == 1


def test_types_are_checked_from_the_type_hints():
    for field, bad in (("batch_size", 64.5), ("pretrained", "yes"), ("image_size", True), ("synth", [1, 2])):
        with pytest.raises(ValueError, match=rf"^{field} must be"):
            TrainConfig(**{field: bad})
    assert TrainConfig(devices=2).devices == "2" and TrainConfig(synth=None).synth == {}


def test_options_the_data_source_would_ignore_are_refused():
    with pytest.raises(ValueError, match="train_crop_epochs 3 needs train_crop"):
        TrainConfig(train_crop_epochs=3)
    with pytest.raises(ValueError, match="curriculum_epochs 2 applies to the rendered stream only"):
        TrainConfig(data="d", train_source="disk", curriculum_epochs=2)
    for name in ("val_length", "test_length"):
        with pytest.raises(ValueError, match=f"{name} 100 sizes rendered splits"):
            TrainConfig(data="d", **{name: 100})
    # the defaults, and a curriculum turned off, are not a request
    TrainConfig(data="d", train_source="disk")
    TrainConfig(data="d", train_source="disk", curriculum_epochs=0)
    TrainConfig(train_crop=80, train_crop_epochs=3)


def test_help_explains_every_flag_and_shows_real_defaults(capsys):
    import argparse

    from trainers.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("fit", "test"):
        for action in commands[command]._actions:  # every option says what it is for
            assert action.help and "None" not in action.help, action.option_strings
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        if command == "fit":
            for part in ("--pretrained [BOOL] start from torchvision's ImageNet weights",
                         "--channels-last [BOOL] train with", "--deterministic [BOOL] Lightning's deterministic",
                         "--progress-bar [BOOL] show Lightning's progress bar", "(default true)",
                         "images per validation/test batch (default none: --batch-size)",
                         "--data DATA a generated dataset folder", "--config and --recipe set their own values"):
                assert part in text, part
        else:
            for part in ("--model MODEL a run folder", "--data DATA a generated dataset folder",
                         "(default test)", "images per batch (default 128)", "(default 600)"):
                assert part in text, part


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`shapesynth-train fit --print-config | head -3`: no BrokenPipeError traceback once head exits."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the write itself fails, not only the flush at exit
    procs = []
    for extra_env in ({}, env):  # both at once: each spends its seconds importing torch
        proc = subprocess.Popen([sys.executable, "-m", "trainers", "fit", "--print-config"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=extra_env or None, cwd=tmp_path)
        proc.stdout.close()  # the reader is gone before anything is written
        procs.append(proc)
    for proc in procs:
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) in (0, 141)
        assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("command, flag", [
    ("fit", "--out"), ("fit", "--data"), ("fit", "--init-from"), ("fit", "--config"), ("fit", "--recipe"),
    ("test", "--data"), ("test", "--out"),
])
def test_an_empty_path_or_word_is_refused_naming_its_flag(tmp_path, capsys, monkeypatch, command, flag):
    """`fit --out ''` trained into the current folder; `--data ''`, `--init-from ''`, `--config ''` and
    `--recipe ''` were dropped silently (rendered splits, no warm start, the default recipe)."""
    import trainers.api

    monkeypatch.chdir(tmp_path)
    for work in ("plan_fit", "evaluate"):  # the old code went on to train or evaluate
        monkeypatch.setattr(trainers.api, work, lambda *a, **k: pytest.fail("the empty value was accepted"))
    argv = {"fit": ["fit", "--out", str(tmp_path / "run")], "test": ["test", "--model", str(tmp_path / "m")]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, flag, ""])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"shapesynth-train {command}: error: argument {flag}: an empty value names nothing")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["", "run"])
def test_a_run_folder_that_is_or_lies_below_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch, below):
    """`--out FILE` got past every check and failed only once the model and data were built."""
    import trainers.api

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / below if below else tmp_path / "file"
    monkeypatch.setattr(trainers.api, "plan_fit", lambda cfg: pytest.fail("planned a run in a file"))
    assert main(["fit", "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err == f"shapesynth-train: error: out {out}: {tmp_path / 'file'} is a file, not a folder\n"


@pytest.mark.parametrize("where", ["test", "plan"])
def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, where):
    """Ctrl+C in `test` or while the data is built (before training) printed a traceback."""
    import trainers.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainers.api, {"test": "evaluate", "plan": "plan_fit"}[where], interrupted)
    argv = ["test", "--model", str(tmp_path / "m")] if where == "test" else ["fit", "--out", str(tmp_path / "r"), *SMALL]
    try:
        code = main(argv)
    except KeyboardInterrupt:  # not raised on: it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped main() (a traceback for the user)")
    assert code == 130 and capsys.readouterr().err == "shapesynth-train: interrupted\n"


@pytest.mark.parametrize("kind, says", [("folder", "is a folder, not a YAML file"),
                                        ("binary", "cannot be read as text")])
def test_a_config_that_is_a_folder_or_not_text_is_named(tmp_path, capsys, kind, says):
    """A folder was called missing; a binary file gave a decode error naming no file."""
    config = tmp_path / "cfg"
    if kind == "folder":
        config.mkdir()
    else:
        config.write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and says in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_zero_time_cap_from_a_config_file_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text('max_time: "00:00:00:00"\n')
    out = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"max_time (from config {config}) 00:00:00:00: a zero wall-clock cap" in err and len(err.splitlines()) == 1
    assert not out.exists()
    # a flag wins over the file: no cap, or a positive one, is accepted
    for flag in ("none", "00:00:00:01"):
        assert main(["fit", "--config", str(config), "--max-time", flag, "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["max_time"] == (None if flag == "none" else flag)


def test_patience_zero_stops_at_the_first_epoch_without_a_better_val_acc_as_the_help_says(capsys):
    """--patience 0 is legitimate: Lightning's EarlyStopping (as fit builds it) stops at the first
    epoch whose val_acc is not above the best, exactly as with patience 1; the help says so."""
    import torch
    from pytorch_lightning.callbacks import EarlyStopping

    def stop_epoch(patience, accs):
        stop = EarlyStopping(monitor="val_acc", mode="max", patience=patience)
        for epoch, acc in enumerate(accs):
            if stop._evaluate_stopping_criteria(torch.tensor(acc))[0]:
                return epoch
        return None

    accs = [0.5, 0.6, 0.6, 0.7, 0.65, 0.8]
    assert stop_epoch(0, accs) == stop_epoch(1, accs) == 2  # the first epoch not above the best
    assert stop_epoch(2, accs) is None  # never two in a row
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "without a better val_acc before training stops (0 stops at the first one, as 1 does)" in text
    assert main(["fit", "--patience", "-1", "--print-config"]) == 2  # only negatives are refused
    assert "patience must be >= 0, got -1" in capsys.readouterr().err


def test_a_zero_time_cap_is_refused_by_the_python_api_too():
    """`fit(max_time="00:00:00:00")` passed TrainConfig's check and ended in a missing last.ckpt
    traceback after Lightning stopped before the first step."""
    from trainers.api import TrainConfig

    with pytest.raises(ValueError, match=r"max_time 00:00:00:00: a zero wall-clock cap"):
        TrainConfig(arch="resnet18", max_time="00:00:00:00")
    assert TrainConfig(arch="resnet18", max_time="00:00:00:01").max_time == "00:00:00:01"
