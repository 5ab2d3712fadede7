"""Two gaps of ``shapesynth-train``: ``fit --print-config`` took the ``synth`` / ``train_synth``
overrides (and the other data options) that ``fit`` refuses; ``test`` without ``--data`` neither
reported nor recorded the background files its rendered split skipped, as ``fit`` does."""

import json

import pytest

from test_audit_resume import background_folder
from trainers.cli import main

pytestmark = pytest.mark.usefixtures("fresh_pool_cache")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("flags, message", [
    (["--synth", "{bogus: 1}"], "unknown SynthConfig field(s): ['bogus']"),
    (["--synth", "{clutter: .nan}"], "clutter must be a finite number, got nan"),
    (["--synth", "{image_size: 32}"], "synth.image_size 32 disagrees with image_size 64"),
    (["--train-synth", "{bogus: 1}"], "train_synth {'bogus': 1}: unknown SynthConfig field(s): ['bogus']"),
    (["--train-source", "disk"], "train_source='disk' needs a dataset folder (--data)"),
    (["--train-crop", "20"], "train_crop 20 px cannot hold the largest shapes"),
])
def test_print_config_refuses_what_fit_refuses(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    base = ["fit", "--image-size", "64", "--out", str(out), *flags]
    assert main([*base, "--print-config"]) == 2
    shown = capsys.readouterr()
    assert shown.out == ""  # no config printed
    assert len(_error_lines(shown.err)) == 1 and shown.err.startswith(f"shapesynth-train: error: {message}")
    # fit itself refuses it with the very same line, before anything is built or written
    assert main(base) == 2
    assert capsys.readouterr().err == shown.err
    assert not out.exists()


def test_train_config_checks_the_synth_overrides():
    from trainers.api import TrainConfig

    with pytest.raises(ValueError, match=r"unknown SynthConfig field\(s\): \['bogus'\]"):
        TrainConfig(image_size=64, synth={"bogus": 1})
    with pytest.raises(ValueError, match="clutter must be a finite number"):
        TrainConfig(image_size=64, train_synth={"clutter": float("nan")})
    # what fit accepts still resolves, and prints
    cfg = TrainConfig(image_size=64, synth={"clutter": 0.4}, train_synth={"size_band_weights": [1, 2, 3]})
    assert cfg.synth == {"clutter": 0.4}


def _model_with_folder_recipe(root, save_untrained_model, bg_path):
    synth = {"background": "folder", "bg_path": str(bg_path), "size_bands": [[0.3, 0.4], [0.2, 0.25]],
             "image_size": 32}
    return save_untrained_model(root / "model", data={"synth": synth})


def test_test_without_data_reports_and_lists_skipped_background_files(tmp_path, capsys, save_untrained_model):
    bg = background_folder(tmp_path / "bg", broken=True)
    model = _model_with_folder_recipe(tmp_path, save_untrained_model, bg)
    results = tmp_path / "results.json"
    with pytest.warns(UserWarning, match=r"1 background file\(s\) skipped \(e.g. .*broken.png: .*\); the "
                                         r"results list them \(skipped_backgrounds\)"):
        assert main(["test", "--model", str(model), "--length", "6", "--batch-size", "6",
                     "--out", str(results)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [name for name, _ in printed["skipped_backgrounds"]] == [str(bg / "broken.png")]
    assert "UnidentifiedImageError" in printed["skipped_backgrounds"][0][1]
    assert json.loads(results.read_text())["skipped_backgrounds"] == printed["skipped_backgrounds"]
    assert printed["test_images"] == 6


def test_test_without_data_and_clean_backgrounds_lists_nothing(tmp_path, capsys, save_untrained_model):
    from trainers.api import evaluate

    bg = background_folder(tmp_path / "bg", broken=False)
    model = _model_with_folder_recipe(tmp_path, save_untrained_model, bg)
    res = evaluate(model, length=6, batch_size=6)
    assert "skipped_backgrounds" not in res and res["test_images"] == 6


def test_test_without_data_and_a_missing_background_folder_is_one_line(tmp_path, capfd, monkeypatch,
                                                                        save_untrained_model):
    import pytorch_lightning as pl

    def no_trainer(*args, **kwargs):  # its banner ("GPU available: ...") went to stderr ahead of the error
        raise AssertionError("a Trainer was built before the background folder was checked")

    missing = tmp_path / "gone"
    model = _model_with_folder_recipe(tmp_path, save_untrained_model, missing)
    monkeypatch.setattr(pl, "Trainer", no_trainer)
    assert main(["test", "--model", str(model), "--length", "6", "--batch-size", "6"]) == 2
    shown = capfd.readouterr()
    assert shown.out == ""
    assert _error_lines(shown.err) == [f"shapesynth-train: error: background folder {missing} does not exist"]
