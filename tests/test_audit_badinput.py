"""Bad-input audit: damaged dataset files reach the `shapesynth` CLI as one error line (exit 2),
integer options of the metrics and of `ShapeSynth` are checked and named instead of truncated,
ignored or failing deep in torch/numpy, and explanations refuse non-finite images."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shapesynth import ShapeSynth, SynthConfig
from shapesynth.cli import main
from shapesynth.config import PAPER_SIZE_BANDS
from test_shapesynth_inputs import _refused
from validation import metrics as M

ARGS = ["--image-size", "32", "--size-bands", "0.31-0.39,0.16-0.19", "--train-size", "2", "--val-size", "1",
        "--test-size", "1", "--pool-sizes", "1,1,1", "--no-progress", "--num-proc", "1"]
CFG = SynthConfig(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 12, "val": 6, "test": 6},
                  bg_pool_sizes={"train": 1, "val": 1, "test": 1})


pytestmark = pytest.mark.usefixtures("fresh_pool_cache")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "ds"
    assert main(["generate", "--out", str(out), *ARGS]) == 0
    return out


def _copy(dataset: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


# ------------------------------------------------------------------ damaged dataset files, CLI
@pytest.mark.parametrize("text", ["", "[1]"])
def test_preview_and_resume_name_a_damaged_manifest(dataset, tmp_path, capsys, text):
    """An empty or foreign shapesynth.json escaped as a JSONDecodeError / TypeError traceback (exit 1)."""
    out = _copy(dataset, tmp_path)
    (out / "shapesynth.json").write_text(text)
    _refused(capsys, ["preview", "--data", str(out), "--out", str(tmp_path / "p.png")], "shapesynth.json is damaged")
    assert not (tmp_path / "p.png").exists()
    _refused(capsys, ["generate", "--out", str(out), "--resume", *ARGS], "shapesynth.json is damaged")


def test_a_manifest_without_its_format_is_named(dataset, tmp_path, capsys):
    """KeyError: 'format' traceback."""
    out = _copy(dataset, tmp_path)
    (out / "shapesynth.json").write_text('{"config": {}}')
    _refused(capsys, ["preview", "--data", str(out), "--out", str(tmp_path / "p.png")],
             "shapesynth.json is damaged: not a JSON object holding 'format'")


@pytest.mark.parametrize("command", ["preview", "card"])
def test_a_truncated_parquet_shard_is_named(dataset, tmp_path, capsys, command):
    """pyarrow's ArrowInvalid escaped as a traceback from `card` and `preview`."""
    out = _copy(dataset, tmp_path)
    shard = out / "data" / "train-00000-of-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    argv = ["preview", "--data", str(out), "--out", str(tmp_path / "p.png")] if command == "preview" else \
        ["card", "--data", str(out)]
    _refused(capsys, argv, str(shard), "damaged data file", "--resume")


def test_the_advice_for_a_truncated_shard_restores_the_dataset(dataset, tmp_path, capsys):
    out = _copy(dataset, tmp_path)
    before = (out / "data" / "train-00000-of-00001.parquet").read_bytes()
    (out / "data" / "train-00000-of-00001.parquet").unlink()
    assert main(["generate", "--out", str(out), "--resume", *ARGS]) == 0
    assert (out / "data" / "train-00000-of-00001.parquet").read_bytes() == before


# ------------------------------------------------------------------ metrics: integer options
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _batch():
    g = torch.Generator().manual_seed(0)
    return _Net(), torch.rand(2, 3, 8, 8, generator=g), torch.tensor([0, 1]), torch.rand(2, 8, 8, generator=g)


@pytest.mark.parametrize("value", [float("nan"), 2.5])
def test_road_refuses_a_non_integer_impute_batch_size(value):
    """NaN passed `< 1` and 2.5 ran: both silently accepted."""
    model, x, t, maps = _batch()
    with pytest.raises(ValueError, match=r"impute_batch_size must be an integer, got (nan|2\.5)"):
        M.road(model, x, t, maps, fractions=(0.25, 0.75), impute_batch_size=value)


@pytest.mark.parametrize("value", [2.5, float("nan"), True])
def test_batch_size_is_named(value):
    """2.5 and NaN failed inside range() naming nothing; True ran as a batch of 1."""
    model, x, t, maps = _batch()
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        M.average_drop(model, x, t, maps, batch_size=value)


@pytest.mark.parametrize("name", ["seed", "tie_seed"])
def test_road_seeds_are_named(name):
    """A fractional seed reached torch's `manual_seed expected a long` RuntimeError."""
    model, x, t, maps = _batch()
    with pytest.raises(ValueError, match=f"^{name} must be an integer, got 0.5"):
        M.road(model, x, t, maps, fractions=(0.25, 0.75), **{name: 0.5})
    with pytest.raises(ValueError, match="tie_seed must be an integer"):
        M.removal_masks(maps, (0.5,), tie_seed=0.5)


def test_integer_options_of_other_types_give_the_same_values():
    model, x, t, maps = _batch()
    ref = M.road(model, x, t, maps, fractions=(0.5,), seed=3, tie_seed=1, batch_size=2, impute_batch_size=2)
    same = M.road(model, x, t, maps, fractions=(0.5,), seed=np.int64(3), tie_seed=1.0, batch_size=torch.tensor(2),
                  impute_batch_size=np.int32(2))
    assert torch.equal(ref, same)


@pytest.mark.parametrize("k", [float("nan"), float("inf")])
def test_topk_non_finite_k_is_named(k):
    """int(NaN) / int(inf) raised `cannot convert float NaN to integer`, naming no argument."""
    _, _, _, maps = _batch()
    gt = (maps > 0.5).float()
    with pytest.raises(ValueError, match="k must be an integer"):
        M.topk_intersection(maps, gt, k=k)
    assert M.topk_intersection(maps, gt, k=3.0).tolist() == M.topk_intersection(maps, gt, k=3).tolist()


# ------------------------------------------------------------------ ShapeSynth arguments
def test_split_length_n_is_checked_not_truncated():
    synth = ShapeSynth(CFG)
    with pytest.raises(TypeError, match="n must be an int, got 2.5"):  # int(2.5) made a split of 2
        synth.labels("train", n=2.5)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):  # numpy's "could not broadcast"
        synth.sample("train", 0, n=-1)
    with pytest.raises(TypeError, match="epoch must be an int, got nan"):  # "cannot convert float NaN"
        synth.sample("train", 0, epoch=float("nan"))
    assert synth.labels("train", n=np.int64(6)).tolist() == synth.labels("train", n=6).tolist()


def test_counterfactual_label_and_colour_are_checked():
    synth = ShapeSynth(CFG)
    with pytest.raises(TypeError, match="label must be an int, got 1.7"):  # rendered class 1
        synth.counterfactual("train", 0, 1.7)
    p = synth.placement("train", 0)
    for colour in [(300, -5, 0), (3,), (0.5, 0.5, 0.5)]:  # wrapped around in uint8 / broadcast as grey
        with pytest.raises(ValueError, match="colour must be three integers"):
            synth.render(p, colour=colour)
    assert synth.render(p, colour=np.array([10, 20, 30])).colour == (10, 20, 30)
    with pytest.raises(TypeError, match="config must be a SynthConfig"):  # AttributeError 'split_size'
        ShapeSynth({"image_size": 32})


# ------------------------------------------------------------------ attributions
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_explain_refuses_non_finite_images(bad):
    """NaN/Inf pixels gave all-zero maps (flagged degenerate only in the Explanation)."""
    from validation.attributions import explain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(3, 3, 8, 8)
    x[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"x: image\(s\) \[1\] contain NaN or Inf"):
        explain(model, x, 0, method="inputxgradient")
    assert explain(model, x[[0, 2]], 0, method="inputxgradient").shape == (2, 8, 8)


# ------------------------------------------------------------------ errors that named no argument
@pytest.mark.parametrize("target", ["a", [0, None]])
def test_a_target_of_non_numbers_is_named(target):
    """torch.as_tensor's `new(): invalid data type 'str'` / `Could not infer dtype of NoneType`."""
    from validation.attributions import explain

    model, x, _, maps = _batch()
    with pytest.raises(TypeError, match="target must"):
        M.average_drop(model, x, target, maps)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        explain(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                x, target, method="inputxgradient")


def test_maps_without_pixels_or_complex_maps_are_named():
    with pytest.raises(ValueError, match=r"maps has no pixels: shape \(2, 0, 4\)"):  # torch's aminmax IndexError
        M.complexity(torch.rand(2, 0, 4))
    with pytest.raises(TypeError, match="maps must be real-valued"):  # ran on the real part, with a warning
        M.complexity(torch.rand(2, 4, 4, dtype=torch.complex64))
    assert M.complexity(torch.rand(0, 4, 4)).shape == (0,)  # an empty batch stays fine


@pytest.mark.parametrize("value", [None, "0.5"])
def test_threshold_and_noise_of_other_types_are_named(value):
    """Python's "'<' not supported between instances of 'int' and 'NoneType'" named neither."""
    model, x, t, maps = _batch()
    with pytest.raises(ValueError, match="threshold must be in"):
        M.pointing_game(maps, (maps > 0.5).float(), threshold=value)
    with pytest.raises(ValueError, match="noise must be a finite number"):
        M.road(model, x, t, maps, fractions=(0.5,), noise=value)


def test_evaluate_names_metrics_none():
    _, x, t, maps = _batch()
    with pytest.raises(TypeError, match="metrics must be a metric name or a sequence"):  # tuple(None)
        M.evaluate(None, x, t, maps, metrics=None)
