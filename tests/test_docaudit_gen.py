"""Doc-audit regressions (gendoc): behaviour the docs state that the code did not have."""

import pytest

from shapesynth import SynthConfig
from shapesynth.backgrounds import build_pools
from shapesynth.card import _backgrounds


def _augmentation_words(**knobs) -> str:
    cfg = SynthConfig(image_size=32, size_bands=((0.3, 0.4),), bg_pool_sizes={"train": 1, "val": 1, "test": 1},
                      **knobs)
    text, _ = _backgrounds(cfg, build_pools(cfg))
    return text.split("each sample takes one base with ", 1)[1].split(".", 1)[0]


def test_card_names_only_the_background_augmentations_the_config_applies():
    """The card said every sample had flips, a channel permutation and colour jitter, also for a
    config that turns them off (bg_flip, bg_channel_shuffle false, bg_jitter 0), whose metadata
    then records no flip, the identity permutation and jitter 1.0 for every sample."""
    assert _augmentation_words() == "a random crop, flips, channel permutation and colour jitter"  # unchanged
    assert _augmentation_words(bg_flip=False, bg_channel_shuffle=False, bg_jitter=0.0) == "a random crop"
    assert _augmentation_words(bg_flip=False) == "a random crop, channel permutation and colour jitter"


@pytest.mark.parametrize("field, value", [("train_length", 100), ("curriculum_start", 0.7)])
def test_stream_only_options_are_refused_with_the_disk_source(field, value):
    """docs/trainers.md: options the data source would ignore are a ValueError naming the field.
    With train_source 'disk', train_length and curriculum_start were accepted and silently ignored
    (the epoch is the stored train split; no curriculum runs)."""
    from trainers.api import TrainConfig

    with pytest.raises(ValueError, match=rf"^{field} {value} applies to the rendered stream only"):
        TrainConfig(data="d", train_source="disk", **{field: value})
    TrainConfig(data="d", train_source="disk")  # the defaults are no request
    TrainConfig(data="d", train_source="stream", **{field: value})  # the stream uses them


def test_missing_background_files_of_synth_are_refused_before_anything_is_written(tmp_path):
    """docs/trainers.md: `plan_fit` runs every check and writes nothing; bad input is a ValueError
    there, which the CLI prints as one line with exit code 2. A `synth` recipe whose background
    folder is missing passed `plan_fit`; the fit then wrote the run folder and died with a
    traceback (exit 1) when the training stream built its pools."""
    import numpy as np
    from PIL import Image

    from shapesynth.backgrounds import BackgroundError
    from trainers.api import TrainConfig, plan_fit

    common = dict(image_size=32, max_epochs=1, progress_bar=False, precision="32-true",
                  curriculum_epochs=0, train_length=8, val_length=6, test_length=6)
    bands = {"size_bands": [[0.3, 0.4]]}
    with pytest.raises(BackgroundError, match="does not exist"):
        plan_fit(TrainConfig(out=str(tmp_path / "run"), **common,
                             synth={**bands, "background": "folder", "bg_path": str(tmp_path / "missing")}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(BackgroundError, match="does not exist"):  # the training stream's own overrides too
        plan_fit(TrainConfig(out=str(tmp_path / "run2"), **common, synth=bands,
                             train_synth={"background": "folder", "bg_path": str(tmp_path / "missing")}))
    assert not (tmp_path / "run2").exists()
    # a usable folder still plans
    rng = np.random.default_rng(0)
    (tmp_path / "bgs").mkdir()
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "bgs" / f"{k}.png")
    plan_fit(TrainConfig(out=str(tmp_path / "run3"), **common,
                         synth={**bands, "background": "folder", "bg_path": str(tmp_path / "bgs")}))
