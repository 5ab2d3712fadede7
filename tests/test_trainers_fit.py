"""Training end to end at 32 px: run folder, safe round trip, resume, data module, precision,
CLI and every bad input the issue names."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file

from shapesynth import CLASS_NAMES, SynthConfig, dataset_fingerprint
from shapesynth.generate import generate
from shapesynth.torchdata import ShapesDataset
from trainers import load_model
from trainers import precision as prec
from trainers.api import TrainConfig, evaluate, fit
from trainers.cli import available_recipes, main
from trainers.data import DataError, EpochPermutation, ShapesDataModule, check_dataset, curriculum_config
from trainers.module import ShapeClassifierModule

BANDS = [[0.3, 0.4], [0.2, 0.25]]  # the paper's smallest band has no interior at 32 px


def _tiny_cfg(out, **kw):
    base = dict(arch="resnet18", image_size=32, out=str(out), batch_size=32, max_epochs=1, train_length=64,
                val_length=32, test_length=36, precision="32-true", num_workers=0, progress_bar=False,
                curriculum_epochs=0, log_every_n_steps=1, lr=1e-3, synth={"size_bands": BANDS})
    if kw.get("data"):  # val/test are the dataset's splits: rendered-split sizes would be refused
        del base["val_length"], base["test_length"]
    if kw.get("train_source") == "disk":  # the stored train split: a stream length would be refused
        del base["train_length"]
    base.update(kw)
    return TrainConfig(**base)


def make_tiny_dataset(tmp_path_factory, train: int, val: int, test: int):
    """A 32 px dataset on disk with the tests' size bands and the given split sizes."""
    cfg = SynthConfig(image_size=32, size_bands=tuple(map(tuple, BANDS)),
                      split_sizes={"train": train, "val": val, "test": test},
                      bg_pool_sizes={"train": 4, "val": 2, "test": 2})
    out = tmp_path_factory.mktemp("data") / "tiny32"
    generate(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory, train=64, val=24, test=30)


@pytest.fixture(scope="module")
def disk_run(tiny_data, tmp_path_factory):
    """One finished run trained from the disk train split (shared by several tests)."""
    out = tmp_path_factory.mktemp("runs") / "disk"
    meta = fit(_tiny_cfg(out, data=str(tiny_data), train_source="disk", synth={}))
    return out, meta


# --------------------------------------------------------------------------- run folder + round trip
def test_the_card_of_a_model_trained_on_a_dataset_points_to_its_recipe(disk_run):
    """No rendered recipe: the card used to print "see the dataset folder" as a JSON block."""
    out, _ = disk_run
    card = (out / "MODEL_CARD.md").read_text()
    recipe = card.split("## Data recipe", 1)[1]
    assert "```json" not in recipe and "`shapesynth.json` in the dataset folder" in recipe


def test_epoch_training_values_are_the_means_of_the_steps(disk_run):
    """metrics.csv has per-step train_loss/train_acc (this process's batches) and their epoch
    means train_loss_epoch/train_acc_epoch (the ones synced over processes under DDP)."""
    import pandas as pd

    out, _ = disk_run
    log = pd.read_csv(out / "logs/version_0/metrics.csv")
    for name in ("train_loss", "train_acc"):
        steps = log[name].dropna().to_numpy()
        assert len(steps) == 2  # 64 samples in batches of 32, log_every_n_steps=1
        epoch = log[f"{name}_epoch"].dropna().to_numpy()
        assert epoch.tolist() == pytest.approx([steps.mean()], rel=1e-6)


def test_run_folder_holds_everything_and_loads_safely(disk_run, tiny_data):
    out, meta = disk_run
    for name in ("model.safetensors", "model.json", "config.yaml", "MODEL_CARD.md", "test_metrics.json",
                 "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/version_0/metrics.csv"):
        assert (out / name).is_file(), name
    model, loaded = load_model(out)
    assert not model.training
    assert loaded["arch"] == "resnet18" and loaded["image_size"] == 32
    assert loaded["class_names"] == list(CLASS_NAMES)
    assert loaded["dataset_fingerprint"] == dataset_fingerprint(tiny_data)
    assert loaded["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(loaded["std"]) == 3
    assert loaded["max_epochs"] == 1 and (loaded["stopped_by"] == "the schedule's end"
                                          or loaded["stopped_by"].startswith("early stopping"))
    assert f"| epochs / steps | 1 of 1 / {loaded['global_step']} (stopped by {loaded['stopped_by']}) |" in (
        out / "MODEL_CARD.md").read_text()

    # test accuracy re-derived independently: the loaded model over the disk test split
    test_set = ShapesDataset(tiny_data, "test")
    x = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    y = torch.stack([test_set[i]["label"] for i in range(len(test_set))])
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert loaded["test_accuracy"] == pytest.approx((pred == y).float().mean().item())
    cm = torch.tensor(loaded["confusion_matrix"])
    assert cm.sum() == len(test_set)
    for c, name in enumerate(CLASS_NAMES):
        assert cm[c].tolist() == [int(((y == c) & (pred == k)).sum()) for k in range(6)]
        row = (y == c).sum().item()
        if row:
            assert loaded["per_class_accuracy"][name] == pytest.approx(cm[c, c].item() / row)

    # the exported weights are the best checkpoint's
    ckpt_model, _ = load_model(out / "checkpoints" / "best.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(ckpt_model(x), model(x))
    card = (out / "MODEL_CARD.md").read_text()
    for needle in ("resnet18", "32 px", loaded["dataset_fingerprint"], "Per-class test accuracy",
                   "Confusion matrix", "training time", "hardware"):
        assert needle in card
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["arch"] == "resnet18" and saved["data"] == str(tiny_data)


def test_test_command_reproduces_the_recorded_accuracy(disk_run, tiny_data, tmp_path):
    out, meta = disk_run
    res = evaluate(out, data=str(tiny_data), out=str(tmp_path / "res.json"))
    assert res["test_accuracy"] == pytest.approx(meta["test_accuracy"])
    assert json.loads((tmp_path / "res.json").read_text())["confusion_matrix"] == meta["confusion_matrix"]


def test_stream_run_without_data_and_auto_precision(tmp_path, monkeypatch):
    # pin the CPU's "auto" answer to bf16-mixed (native bf16, measured 3x faster), unlike the
    # "32-true" a run that ignored "auto" would train in; the cached answer is restored afterwards
    monkeypatch.setattr(prec.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: 3.0)
    prec._cpu_auto.cache_clear()
    try:
        meta = fit(_tiny_cfg(tmp_path / "s", precision="auto", curriculum_epochs=2, test_length=24))
    finally:
        prec._cpu_auto.cache_clear()
    assert meta["precision"] == "bf16-mixed"
    assert meta["config"]["precision"] == "auto"
    dm = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, test_length=24)
    assert meta["dataset_fingerprint"] == dm.fingerprint() and meta["dataset_fingerprint"].startswith("synth-")
    assert sum(map(sum, meta["confusion_matrix"])) == 24
    model, _ = load_model(tmp_path / "s" / "model.safetensors")
    assert model.image_size == 32

    # the reported test accuracy, re-derived: the saved model over the same 24 stream test images,
    # in fp32 (the test step turns the run's bf16 autocast off), channels_last as the loop ran them
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    x, y = batch["image"], batch["label"]
    assert len(y) == 24
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        pred = model(x).argmax(1)
    cm = [[int(((y == c) & (pred == k)).sum()) for k in range(6)] for c in range(6)]
    assert meta["confusion_matrix"] == cm
    assert meta["test_accuracy"] == pytest.approx((pred == y).double().mean().item())


def test_the_test_step_runs_in_fp32_under_mixed_precision():
    # the recorded test accuracy is what the 99 % gate reads: it must be the fp32 model's (as the
    # attributions and metrics run it), not the bf16 autocast's that validation may use
    module = ShapeClassifierModule(arch="resnet18", image_size=32, class_names=list(CLASS_NAMES))
    seen = []
    hook = module.model.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    batch = {"image": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             "label": torch.arange(4)}
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning):
            module.validation_step(batch, 0)  # unchanged: validation follows the run's precision
            module.test_step(batch, 0)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16, torch.float32]
    assert int(module._cm["test"].sum()) == 4


# --------------------------------------------------------------------------- resume
class _Crash(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_after_interruption_reaches_the_same_end_state(tiny_data, tmp_path):
    # disk source: the resumed epoch must also reproduce the seeded per-epoch shuffle
    kw = dict(data=str(tiny_data), train_source="disk", synth={}, max_epochs=2, batch_size=32)
    fit(_tiny_cfg(tmp_path / "a", **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_tiny_cfg(tmp_path / "b", **kw), callbacks=[_Crash(at_step=3)])  # 2 steps/epoch: mid epoch 2
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "b" / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"did not finish \(resume it with `shapesynth-train fit --config .*config.yaml`"):
        load_model(tmp_path / "b")
    assert (tmp_path / "b" / "config.yaml").is_file()  # the hint's file: the run's full config
    meta_b = fit(_tiny_cfg(tmp_path / "b", **kw))  # same command: resumes from last.ckpt
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    wa, wb = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # both sessions' logs are kept
    assert (tmp_path / "b/logs/version_0/metrics.csv").is_file() and (tmp_path / "b/logs/version_1/metrics.csv").is_file()
    assert meta_b["test_accuracy"] == json.loads((tmp_path / "a/model.json").read_text())["test_accuracy"]


def test_resume_with_dropout_continues_the_random_stream(tmp_path, monkeypatch):
    """ResNet18 draws nothing at random while training, so the test above cannot see whether the
    global RNG (dropout, stochastic depth) travels with the checkpoint; a registered tiny arch with
    dropout can: a resumed run must end bit-identical to an uninterrupted one."""
    from torch import nn

    from trainers import models

    def tiny_dropout(num_classes, image_size):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(128, num_classes))

    monkeypatch.setitem(models._BUILDERS, "tiny_dropout", tiny_dropout)
    monkeypatch.setitem(models._HEADS, "tiny_dropout", "5")
    kw = dict(arch="tiny_dropout", max_epochs=2, batch_size=16, train_length=32, val_length=16, test_length=12,
              lr=1e-2, stop_at_val_acc=None)
    fit(_tiny_cfg(tmp_path / "a", **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_tiny_cfg(tmp_path / "b", **kw), callbacks=[_Crash(at_step=3)])  # 2 steps/epoch: mid epoch 2
    fit(_tiny_cfg(tmp_path / "b", **kw))
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def _interrupted_run(tiny_data, out):
    """A disk run crashed mid epoch 2: (its config kwargs, last.ckpt path, the loaded checkpoint)."""
    kw = dict(data=str(tiny_data), train_source="disk", synth={}, max_epochs=2, batch_size=32)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_tiny_cfg(out, **kw), callbacks=[_Crash(at_step=3)])
    last = out / "checkpoints" / "last.ckpt"
    return kw, last, torch.load(last, weights_only=True)


def test_training_time_survives_an_interruption(tiny_data, tmp_path):
    kw, last, ckpt = _interrupted_run(tiny_data, tmp_path / "r")
    (key,) = [k for k in ckpt["callbacks"] if "TrainClock" in k]
    assert ckpt["callbacks"][key]["seconds"] > 0
    # pretend the first session had trained for ten hours before it was killed
    ckpt["callbacks"][key]["seconds"] = 36000.0
    torch.save(ckpt, last)
    meta = fit(_tiny_cfg(tmp_path / "r", **kw))
    assert 36000.0 < meta["train_seconds"] < 36000.0 + 600 and meta["train_seconds_complete"] is True
    assert json.loads((tmp_path / "r" / "train_time.json").read_text())["seconds"] == pytest.approx(meta["train_seconds"], abs=0.2)


def test_resume_from_a_checkpoint_without_a_clock_counts_this_session(tiny_data, tmp_path):
    # checkpoints written before the clock existed still resume; only this session is counted
    kw, last, ckpt = _interrupted_run(tiny_data, tmp_path / "o")
    ckpt["callbacks"] = {k: v for k, v in ckpt["callbacks"].items() if "TrainClock" not in k}
    torch.save(ckpt, last)
    meta = fit(_tiny_cfg(tmp_path / "o", **kw))
    assert 0 < meta["train_seconds"] < 600 and meta["global_step"] == 4
    assert meta["train_seconds_complete"] is False
    assert "last session only" in (tmp_path / "o" / "MODEL_CARD.md").read_text()


def test_resume_refuses_another_arch(tiny_data, disk_run):
    out, _ = disk_run
    cfg = _tiny_cfg(out, arch="vgg11", data=str(tiny_data), train_source="disk", synth={})
    with pytest.raises(ValueError, match="cannot resume"):
        fit(cfg)
    # the same arch at another image size is refused too, naming both sizes
    with pytest.raises(ValueError, match=r"holds a resnet18 run at 32 px; cannot resume it as resnet18 at 64 px"):
        fit(_tiny_cfg(out, image_size=64))


def test_fit_refusals_are_one_line_errors_with_exit_2(tiny_data, disk_run, tmp_path, capsys):
    out, _ = disk_run
    common = ["--image-size", "32", "--precision", "32-true", "--num-workers", "0", "--progress-bar", "false"]
    # resuming a run folder as another arch (_check_resume_compatible)
    assert main(["fit", "--arch", "vgg11", "--data", str(tiny_data), "--train-source", "disk", "--out", str(out),
                 *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth-train: error:") and "cannot resume" in err and len(err.splitlines()) == 1
    # warm start from a model of another arch (warm_start)
    assert main(["fit", "--arch", "convnext_tiny", "--init-from", str(out), "--out", str(tmp_path / "w"),
                 "--synth", "{size_bands: [[0.3, 0.4]]}", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth-train: error:") and "cannot initialise convnext_tiny" in err
    assert len(err.splitlines()) == 1
    # options the trainer or the model would only reject once training starts
    for flags, says in ((["--precision", "bf17"], "bf17"), (["--scheduler", "cosine"], "scheduler")):
        assert main(["fit", "--out", str(tmp_path / "p"), "--synth", "{size_bands: [[0.3, 0.4]]}", *common,
                     *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("shapesynth-train: error:") and says in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()  # nothing written before the checks pass
    assert main(["fit", "--recipe", "quick_resnet19", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth-train: error: unknown recipe 'quick_resnet19'; bundled:") and "quick_resnet18" in err
    # the help says what evaluate() does without --data: the model's own training recipe
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert "the recipe the model was trained with" in " ".join(capsys.readouterr().out.split())


def test_an_error_during_training_keeps_its_traceback(tmp_path, monkeypatch):
    # a fault after the checks (here a ValueError from a training step) is not reported as bad input
    from trainers.module import ShapeClassifierModule

    def broken_step(self, batch, batch_idx):
        raise ValueError("fault inside training")

    monkeypatch.setattr(ShapeClassifierModule, "training_step", broken_step)
    with pytest.raises(ValueError, match="fault inside training"):
        main(["fit", "--out", str(tmp_path / "f"), "--image-size", "32", "--precision", "32-true",
              "--num-workers", "0", "--progress-bar", "false", "--train-length", "32", "--val-length", "8",
              "--synth", "{size_bands: [[0.3, 0.4]]}"])


# --------------------------------------------------------------------------- data module
def test_stream_draws_change_per_epoch_and_repeat_exactly(tmp_path):
    dm = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, train_length=8, batch_size=8)
    dm.setup("fit")
    first = next(iter(dm.train_dataloader()))["image"]
    dm.set_epoch(1)
    second = next(iter(dm.train_dataloader()))["image"]
    dm.set_epoch(0)
    again = next(iter(dm.train_dataloader()))["image"]
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_curriculum_moves_from_easy_to_the_target_recipe():
    target = SynthConfig(image_size=32, size_bands=tuple(map(tuple, BANDS)))
    easy = target.with_difficulty(0.0)
    assert curriculum_config(target, 0.0, 0.0).clutter == pytest.approx(easy.clutter)
    assert curriculum_config(target, 1.0, 0.0) == target
    half = curriculum_config(target, 0.5, 0.0)
    assert half.clutter == pytest.approx((easy.clutter + target.clutter) / 2)
    assert half.size_bands == target.size_bands and half.seed == target.seed
    dm = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, train_length=4, curriculum_epochs=4)
    dm.setup("fit")
    dm.set_epoch(2)
    assert dm.train_set.config.clutter == pytest.approx(half.clutter) and dm.train_set.epoch == 2
    dm.set_epoch(7)
    assert dm.train_set.config == dm.synth_config


def test_train_synth_changes_the_training_stream_only():
    dm = ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, train_length=4, curriculum_epochs=2,
                          train_synth={"size_band_weights": [0.0, 1.0]})
    dm.setup()
    dm.set_epoch(5)  # past the curriculum: the train target itself
    assert dm.train_set.config.size_band_weights == (0.0, 1.0)
    assert dm.val_set.config.size_band_weights is None and dm.test_set.config == dm.synth_config
    assert {dm.train_set.sample(i).meta["size_band"] for i in range(4)} == {1}
    assert dm.fingerprint() == ShapesDataModule(image_size=32, synth={"size_bands": BANDS}).fingerprint()
    assert dm.describe()["train_synth"] == {"size_band_weights": [0.0, 1.0]}
    with pytest.raises(DataError, match="image_size"):
        ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, train_synth={"image_size": 64})
    with pytest.raises(DataError, match="size_band_weights"):
        ShapesDataModule(image_size=32, synth={"size_bands": BANDS}, train_synth={"size_band_weights": [1.0]})


# (decayed, exempt) parameter counts, worked out by hand from torchvision's layer lists:
# - resnet18: 20 bias-free convs (stem + 8 BasicBlocks x 2 + 3 downsample) + fc.weight = 21 decayed;
#   20 BatchNorm2d x (weight, bias) + fc.bias = 41 exempt.
# - convnext_tiny: stem conv + 18 CNBlocks x (depthwise conv + 2 Linear) + 3 downsample convs + head
#   Linear = 59 decayed; their 59 biases + 18 block LayerNorms x 2 + 18 layer_scales
#   + 5 LayerNorm2d (stem, 3 downsample, head) x 2 = 123 exempt.
# - swin_t: patch conv + 12 blocks x (qkv, proj, 2 MLP Linear) + 3 bias-free merging Linear + head
#   = 53 decayed; 1 + 12 x 4 + 1 biases + 12 relative_position_bias_tables + (1 + 24 + 3 + 1) LayerNorms
#   x 2 = 120 exempt.
_DECAY_COUNTS = {"resnet18": (21, 41), "convnext_tiny": (59, 123), "swin_t": (53, 120)}


def _expected_decay_split(model):
    """Classify every parameter by the module that owns it, independently of trainers.module's rule:
    Conv/Linear weights are decayed; norm parameters, every bias, ConvNeXt's layer_scale and Swin's
    relative_position_bias_table are not. A parameter of any other kind fails the test."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm)  # torchvision's LayerNorm2d subclasses LayerNorm
    decayed, exempt = set(), set()
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and pname == "weight":
                decayed.add(id(p))
            elif isinstance(mod, norms) or pname == "bias":
                exempt.add(id(p))
            elif isinstance(mod, CNBlock) and pname == "layer_scale":
                exempt.add(id(p))
            elif isinstance(mod, ShiftedWindowAttention) and pname == "relative_position_bias_table":
                exempt.add(id(p))
            else:
                raise AssertionError(f"unclassified parameter {full} of {type(mod).__name__}")
    return decayed, exempt


@pytest.mark.parametrize("arch", ["convnext_tiny", "swin_t", "resnet18"])
def test_weight_decay_skips_biases_norms_and_scales(arch):
    from trainers.module import ShapeClassifierModule

    module = ShapeClassifierModule(arch=arch, image_size=32, scheduler="constant", channels_last=False)
    groups = module.configure_optimizers().param_groups
    assert [g["weight_decay"] for g in groups] == [module.hparams.weight_decay, 0.0]
    decayed, kept = (set(map(id, g["params"])) for g in groups)
    exp_decayed, exp_kept = _expected_decay_split(module.model)
    assert (len(exp_decayed), len(exp_kept)) == _DECAY_COUNTS[arch]  # the classification itself is sound
    assert (len(decayed), len(kept)) == _DECAY_COUNTS[arch]
    assert decayed == exp_decayed and kept == exp_kept
    assert any(name.endswith("layer_scale") for name, _ in module.model.named_parameters()) == (
        arch == "convnext_tiny")


def test_epoch_permutation_is_seeded():
    s = EpochPermutation(10, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    s.set_epoch(0)
    assert list(s) == e0


# --------------------------------------------------------------------------- precision
def test_precision_auto_falls_back_without_native_bf16(monkeypatch):
    monkeypatch.setattr(prec.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: 3.0)
    prec._cpu_auto.cache_clear()
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("auto") == "32-true"
    prec._cpu_auto.cache_clear()
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.resolve_precision("auto") == "bf16-mixed"
    prec._cpu_auto.cache_clear()
    monkeypatch.setattr(prec, "cpu_bf16_speedup", lambda: 1.0)  # native but measured slow
    assert prec.resolve_precision("auto") == "32-true"
    prec._cpu_auto.cache_clear()
    assert prec.resolve_precision("32-true") == "32-true" and prec.resolve_precision("bf16-mixed") == "bf16-mixed"


def test_precision_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(prec.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(prec.torch.cuda, "is_bf16_supported", lambda: False)
    assert prec.resolve_precision("auto") == "16-mixed"
    monkeypatch.setattr(prec.torch.cuda, "is_bf16_supported", lambda: True)
    assert prec.resolve_precision("auto") == "bf16-mixed"
    # the CPU's own answer, which differs from the CUDA one: an ignored accelerator would fail
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    prec._cpu_auto.cache_clear()
    try:
        assert prec.resolve_precision("auto", accelerator="cpu") == "32-true"
    finally:
        prec._cpu_auto.cache_clear()


def test_bf16_probe_is_fp32_time_over_bf16_time(monkeypatch):
    """The probe times the same step with and without bf16 autocast and returns fp32 / bf16: a
    fake clock that charges 3 s per fp32 step and 1 s per bf16 step must give exactly 3."""
    now = [0.0]
    monkeypatch.setattr(prec.time, "perf_counter", lambda: now[0])
    real_autocast = torch.autocast

    class ChargingAutocast(real_autocast):
        def __enter__(self):
            now[0] += 1.0 if self._enabled else 3.0
            return super().__enter__()

    monkeypatch.setattr(prec.torch, "autocast", ChargingAutocast)
    assert prec.cpu_bf16_speedup(reps=2) == pytest.approx(3.0)


# --------------------------------------------------------------------------- bad input, before any work
def test_missing_dataset_errors_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError, match="does not exist"):
        fit(_tiny_cfg(out, data=str(tmp_path / "nope"), synth={}))
    assert not out.exists()


def test_empty_split_errors(tmp_path):
    cfg = SynthConfig(image_size=32, size_bands=tuple(map(tuple, BANDS)), split_sizes={"train": 6, "val": 0, "test": 6},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    generate(cfg, tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="'val'"):
        check_dataset(tmp_path / "d", "val", 32)


def test_image_size_disagreeing_with_the_dataset(tiny_data, tmp_path):
    with pytest.raises(DataError, match="32 px images but the model expects 64"):
        fit(_tiny_cfg(tmp_path / "r", image_size=64, data=str(tiny_data), synth={}))


def test_image_size_disagreeing_with_a_checkpoint(disk_run):
    out, _ = disk_run
    with pytest.raises(ValueError, match="trained at 32 px, not 64"):
        load_model(out, image_size=64)


def test_classes_disagreeing_with_the_model(tiny_data, disk_run, tmp_path):
    with pytest.raises(DataError, match="classes"):
        check_dataset(tiny_data, "test", 32, class_names=("a", "b", "c"))
    # a model trained on other classes, tested on this dataset
    out, _ = disk_run
    other = tmp_path / "other"
    other.mkdir()
    meta = json.loads((out / "model.json").read_text())
    meta["class_names"] = [f"c{i}" for i in range(6)]
    (other / "model.json").write_text(json.dumps(meta))
    (other / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(DataError, match="classes"):
        evaluate(other, data=str(tiny_data))


def test_unknown_arch_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown arch 'resnet19'"):
        TrainConfig(arch="resnet19")
    assert main(["fit", "--arch", "resnet19", "--out", str(tmp_path / "r")]) == 2
    assert "unknown arch" in capsys.readouterr().err


def test_test_command_with_a_missing_model_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["test", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "shapesynth-train: error:" in err and str(missing) in err


def test_checkpoint_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "resnet18"}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- CLI
def test_cli_recipe_and_flags(capsys, tmp_path):
    assert {"quick_resnet18", "quick_vgg11_bn", "resnet18_128"} <= set(available_recipes())
    for name in available_recipes():  # every bundled recipe is a valid config
        assert main(["fit", "--recipe", name, "--print-config"]) == 0
    capsys.readouterr()
    assert main(["train", "--recipe", "quick_resnet18", "--lr", "0.01", "--pretrained", "--synth", "{clutter: 0.2}",
                 "--max-time", "none", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["arch"] == "resnet18" and cfg["image_size"] == 64 and cfg["lr"] == 0.01
    assert cfg["pretrained"] is True and cfg["synth"] == {"clutter": 0.2} and cfg["max_time"] is None
    (tmp_path / "c.yaml").write_text("arch: swin_t\nimage_size: 96\n")
    assert main(["fit", "--config", str(tmp_path / "c.yaml"), "--image-size", "64", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["arch"] == "swin_t" and cfg["image_size"] == 64
    (tmp_path / "bad.yaml").write_text("arch: resnet18\nlearning_rate: 1\n")
    assert main(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["archs"]) == 0 and "convnext_tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(tmp_path):
    """Lightning DDP on two CPU processes (gloo): the confusion matrices of both ranks are summed."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "trainers", "fit", "--arch", "resnet18", "--image-size", "32",
           "--synth", json.dumps({"size_bands": BANDS}), "--train-length", "64", "--val-length", "32",
           "--test-length", "36", "--batch-size", "16", "--max-epochs", "1", "--precision", "32-true",
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--num-workers", "0",
           "--progress-bar", "false", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _, meta = load_model(out)
    assert sum(map(sum, meta["confusion_matrix"])) == 36  # 18 per rank, summed
    # epoch-level training values are synced over the ranks: Lightning warns about any that is not
    assert "sync_dist=True" not in done.stderr, done.stderr[-3000:]


def test_lr_defaults_per_arch(capsys):
    assert main(["fit", "--arch", "vgg11", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 5e-4
    assert TrainConfig(arch="resnet18").lr == 2e-3 and TrainConfig(arch="resnet18", lr=0.1).lr == 0.1


def test_early_stopping_stops_when_val_acc_reaches_the_target(tmp_path):
    from pytorch_lightning.callbacks import EarlyStopping

    from trainers.api import _trainer

    trainer, _ = _trainer(_tiny_cfg(tmp_path, stop_at_val_acc=1.0, patience=3), tmp_path, logger=False)
    stop = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    assert stop.patience == 3
    assert stop._evaluate_stopping_criteria(torch.tensor(0.99))[0] is False
    assert stop._evaluate_stopping_criteria(torch.tensor(1.0))[0] is True


# --------------------------------------------------------------------------- warm start (progressive resizing)
def test_warm_start_copies_weights_across_image_sizes(disk_run, tmp_path):
    from trainers.api import warm_start
    from trainers.models import build_model

    out, _ = disk_run
    donor, _ = load_model(out)
    model = build_model("resnet18", image_size=64)
    warm_start(model, out, "resnet18")
    for (name, a), b in zip(model.state_dict().items(), donor.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="resnet18 model cannot initialise vgg11_bn"):
        warm_start(build_model("vgg11_bn", image_size=32), out, "vgg11_bn")
    from trainers.api import plan_fit, run_plan

    plan = plan_fit(_tiny_cfg(tmp_path / "warm", image_size=64, init_from=str(out), synth={"size_bands": BANDS}))
    # the run starts from the donor's weights (not only the card saying so)
    donor_state = donor.state_dict()
    for name, value in plan.module.model.state_dict().items():
        assert torch.equal(value, donor_state[name]), name
    meta = run_plan(plan)
    assert meta["init_from"] == str(out) and meta["image_size"] == 64
    assert "warm-started from" in (tmp_path / "warm" / "MODEL_CARD.md").read_text()


def test_weights_path_alone_is_recorded_as_pretrained(tmp_path):
    """--weights-path FILE loads ImageNet weights without --pretrained (build_model): the card and
    model.json must not call that model trained from scratch."""
    from torchvision import models as tvm

    from trainers.models import build_model

    torch.manual_seed(4)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    # the run really starts from the file: the module's model has its weights before training
    assert torch.equal(build_model("resnet18", image_size=32, weights_path=path).backbone.conv1.weight,
                       torch.load(path, weights_only=True)["conv1.weight"])
    out = tmp_path / "ft"

    class RemoveWeightsAfterTraining(Callback):
        """The checkpoint holds every weight: testing and exporting it must not need the file again."""

        def on_train_end(self, trainer, pl_module):
            path.unlink()

    meta = fit(_tiny_cfg(out, weights_path=str(path), train_length=32, limit_val_batches=0),
               callbacks=[RemoveWeightsAfterTraining()])
    assert not path.exists()
    assert meta["config"]["pretrained"] is False and meta["pretrained"] is True
    assert json.loads((out / "model.json").read_text())["pretrained"] is True
    card = (out / "MODEL_CARD.md").read_text()
    assert "ImageNet-pretrained, fine-tuned" in card and "trained from scratch" not in card


def test_resuming_a_run_started_from_imagenet_weights_does_not_need_the_file(tmp_path):
    """The checkpoint holds every weight: a resumed session used to load the ImageNet file again
    before the checkpoint overwrote it, and failed where the file had gone meanwhile."""
    from torchvision import models as tvm

    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    out = tmp_path / "ft"
    kw = dict(weights_path=str(path), train_length=32, limit_val_batches=0, scheduler="constant")
    fit(_tiny_cfg(out, **kw))
    (out / "model.json").unlink()  # as if killed before the end: resume auto continues last.ckpt
    path.unlink()
    meta = fit(_tiny_cfg(out, max_epochs=2, **kw))
    assert meta["epochs"] == 2 and meta["pretrained"] is True
    hp = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hp["weights_path"] == str(path)  # the checkpoints still record where the run started


# --------------------------------------------------------------------------- weight averaging (EMA)
class _RecordWeights(Callback):
    """The raw weights after every optimiser step (float64 copies)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps.append({k: v.detach().double().clone() for k, v in pl_module.model.state_dict().items()})


def test_ema_model_is_the_moving_average_of_the_steps(tiny_data, tmp_path):
    decay = 0.6
    kw = dict(data=str(tiny_data), train_source="disk", synth={}, max_epochs=2, batch_size=16, ema_decay=decay)
    rec = _RecordWeights()
    meta = fit(_tiny_cfg(tmp_path / "ema", **kw), callbacks=[rec])
    assert len(rec.steps) == 8  # 64 images / 16, two epochs

    def moving_average(steps):
        # torch's AveragedModel: the first update copies, then ema <- decay * ema + (1 - decay) * w
        ema = dict(steps[0])
        for w in steps[1:]:
            ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
        return ema

    ema = moving_average(rec.steps)
    steps_at_best = torch.load(tmp_path / "ema/checkpoints/best.ckpt", weights_only=True)["global_step"]
    ema_at_best = moving_average(rec.steps[:steps_at_best])
    exported = load_file(str(tmp_path / "ema/model.safetensors"))
    raw = rec.steps[steps_at_best - 1]
    moved = 0
    for k, v in exported.items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.allclose(v.double(), ema_at_best[k], rtol=1e-5, atol=1e-6), k
        moved += not torch.allclose(v.double(), raw[k], rtol=1e-5, atol=1e-6)
    assert moved > len(exported) // 2  # the average is not the raw weights
    last = torch.load(tmp_path / "ema/checkpoints/last.ckpt", weights_only=True)
    for k, v in last["state_dict"].items():
        if k.startswith("model.") and not k.endswith("num_batches_tracked"):
            assert torch.allclose(v.double(), ema[k[len("model."):]], rtol=1e-5, atol=1e-6), k
    # the recorded accuracy is the average's, re-derived from the exported model
    model, _ = load_model(tmp_path / "ema")
    test_set = ShapesDataset(tiny_data, "test")
    x = torch.stack([test_set[i]["image"] for i in range(len(test_set))])
    y = torch.stack([test_set[i]["label"] for i in range(len(test_set))])
    with torch.no_grad():
        assert meta["test_accuracy"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())


def test_ema_run_resumes_to_the_same_end_state(tiny_data, tmp_path):
    kw = dict(data=str(tiny_data), train_source="disk", synth={}, max_epochs=2, batch_size=32, ema_decay=0.5)
    fit(_tiny_cfg(tmp_path / "a", **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_tiny_cfg(tmp_path / "b", **kw), callbacks=[_Crash(at_step=3)])
    fit(_tiny_cfg(tmp_path / "b", **kw))
    a = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    for part in ("state_dict", "current_model_state"):  # the average and the raw weights
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_ema_decay_must_lie_in_the_open_unit_interval(tmp_path):
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            _tiny_cfg(tmp_path, ema_decay=bad)


def test_num_workers_auto_is_inline_on_cpu_and_a_few_beside_a_gpu(monkeypatch, capsys):
    from trainers.data import resolve_num_workers

    assert resolve_num_workers("auto", "cpu") == 0
    assert resolve_num_workers(3, "cpu") == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_num_workers("auto", "auto") == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert resolve_num_workers("auto", "auto") == 4
    assert resolve_num_workers("auto", "cpu") == 0  # asked for the CPU although a GPU exists
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert resolve_num_workers("auto", "gpu") == 1
    for bad in ("many", -1, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            TrainConfig(num_workers=bad)
    # the CLI takes a count or the word, and names a bad word
    assert main(["fit", "--recipe", "resnet18_128", "--num-workers", "2", "--print-config"]) == 0
    assert "num_workers: 2" in capsys.readouterr().out
    assert main(["fit", "--recipe", "resnet18_128", "--num-workers", "auto", "--print-config"]) == 0
    assert "num_workers: auto" in capsys.readouterr().out
    assert main(["fit", "--recipe", "resnet18_128", "--num-workers", "some", "--print-config"]) == 2
    assert "num_workers" in capsys.readouterr().err


def test_loader_workers_see_each_epochs_draws_in_a_fit(tmp_path):
    """Workers (what num_workers 'auto' gives beside a GPU) fork after the epoch's set_epoch, so a fit
    trains on exactly the batches an inline (0-worker) fit does, new ones every epoch."""
    class FirstBatches(Callback):
        def __init__(self):
            self.sums = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 0:
                self.sums.append(batch["image"].double().sum().item())

    seen = {}
    for workers in (0, 2):
        record = FirstBatches()
        fit(_tiny_cfg(tmp_path / f"w{workers}", num_workers=workers, max_epochs=3, train_length=16,
                      batch_size=8, curriculum_epochs=2, stop_at_val_acc=None), callbacks=[record])
        seen[workers] = record.sums
    assert len(seen[0]) == 3 and len(set(seen[0])) == 3
    assert seen[2] == seen[0]


# --------------------------------------------------------------------------- random state, threads, run folder
def test_precision_auto_probe_leaves_the_global_rng_alone(monkeypatch):
    # the probe runs once per process after seeding: had it drawn, only a process's first fit would
    # see the shifted stream
    monkeypatch.setattr(prec.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    prec._cpu_auto.cache_clear()
    try:
        torch.manual_seed(3)
        before = torch.get_rng_state()
        prec.resolve_precision("auto", accelerator="cpu")  # the real probe: builds and times a conv stack
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        prec._cpu_auto.cache_clear()


def test_evaluate_leaves_the_global_rng_alone(save_untrained_model, tmp_path):
    folder = save_untrained_model(tmp_path / "m")
    torch.manual_seed(7)
    before = torch.get_rng_state()
    res = evaluate(folder, synth={"size_bands": BANDS}, length=12, batch_size=12)
    assert res["test_images"] == 12
    assert torch.equal(torch.get_rng_state(), before)


class _Threads(Callback):
    def on_train_start(self, trainer, module):
        self.seen = torch.get_num_threads()


def test_threads_apply_to_the_run_only(tmp_path):
    from trainers.api import plan_fit, run_plan

    before = torch.get_num_threads()
    record = _Threads()
    plan = plan_fit(_tiny_cfg(tmp_path / "t", threads=before + 1), callbacks=[record])
    assert torch.get_num_threads() == before  # planning changes nothing
    run_plan(plan)
    assert record.seen == before + 1 and torch.get_num_threads() == before


def test_only_global_rank_zero_writes_the_run_files(tmp_path, monkeypatch):
    # under DDP every process runs run_plan: the others must not race rank 0 on config.yaml & co.
    import pytorch_lightning as pl

    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    out = tmp_path / "r1"
    assert fit(_tiny_cfg(out)) == {}
    for name in ("config.yaml", "config.json", "train_time.json", "model.json", "MODEL_CARD.md"):
        assert not (out / name).exists(), name


def test_without_validation_the_last_checkpoint_is_tested(tmp_path):
    out = tmp_path / "noval"
    meta = fit(_tiny_cfg(out, limit_val_batches=0))
    assert meta["best_val_accuracy"] is None and meta["checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert "(last checkpoint: no validation ran)" in (out / "MODEL_CARD.md").read_text()


def test_resume_never_starts_over_and_clears_the_old_checkpoints(tmp_path):
    out = tmp_path / "r"
    fit(_tiny_cfg(out))
    fit(_tiny_cfg(out, image_size=64, resume="never"))
    # no best-v1.ckpt / last-v1.ckpt beside the old run's files: the old last.ckpt is gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    for name in ("best.ckpt", "last.ckpt"):
        assert torch.load(out / "checkpoints" / name, weights_only=True)["hyper_parameters"]["image_size"] == 64
    # the resume check reads the checkpoint itself, not config.yaml (rewritten by any session)
    (out / "model.json").unlink()  # an unfinished run, which resume: auto would continue
    saved = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "image_size": 32}))
    with pytest.raises(ValueError, match=r"last.ckpt holds a resnet18 run at 64 px; cannot resume it as resnet18 at 32 px"):
        fit(_tiny_cfg(out))


def test_rerunning_a_finished_run_trains_nothing(disk_run, tiny_data, capsys):
    out, meta = disk_run
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = fit(_tiny_cfg(out, data=str(tiny_data), train_source="disk", synth={}))
    assert again["test_accuracy"] == meta["test_accuracy"] and again["global_step"] == meta["global_step"]
    # the docs' rerun: the same command, or its config.yaml
    assert main(["fit", "--config", str(out / "config.yaml"), "--progress-bar", "false"]) == 0
    assert "finished earlier, not retrained" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == files  # nothing trained or rewritten
    # another config into the finished folder is a mistake, not a silent reuse
    with pytest.raises(ValueError, match=r"holds a finished run whose config differs in lr: .*--resume never"):
        fit(_tiny_cfg(out, data=str(tiny_data), train_source="disk", synth={}, lr=5e-4))


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    # Lightning turns Ctrl+C into SystemExit(1) and leaves SIGINT ignored; the CLI says how to resume
    import signal

    from trainers.module import ShapeClassifierModule

    original = ShapeClassifierModule.training_step

    def interrupted_step(self, batch, batch_idx):
        if self.global_step == 2:  # epoch 1's first step: last.ckpt of epoch 0 exists
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ShapeClassifierModule, "training_step", interrupted_step)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "c"
    code = main(["fit", "--out", str(out), "--image-size", "32", "--precision", "32-true", "--num-workers", "0",
                 "--progress-bar", "false", "--train-length", "64", "--batch-size", "32", "--val-length", "8",
                 "--max-epochs", "2", "--synth", "{size_bands: [[0.3, 0.4]]}"])
    assert code == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"shapesynth-train: training interrupted; rerun the same command to resume from {out}/checkpoints/last.ckpt"
    assert signal.getsignal(signal.SIGINT) is handler


def test_cli_recipe_with_data_drops_the_rendered_split_settings(tiny_data, tmp_path, capsys):
    """`--recipe quick_resnet18 --data DIR` trains: the recipe's synth / val_length / test_length are for
    rendered splits and are dropped with a note; the same values given as flags stay an error."""
    out = tmp_path / "r"
    tiny = ["--image-size", "32", "--train-length", "32", "--batch-size", "32", "--max-epochs", "1",
            "--curriculum-epochs", "0", "--precision", "32-true", "--num-workers", "0", "--progress-bar", "false",
            "--log-every-n-steps", "1"]
    assert main(["fit", "--recipe", "quick_resnet18", "--data", str(tiny_data), "--out", str(out), *tiny]) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "note:" in line]
    assert len(note) == 1 and "dropped synth, val_length of recipe quick_resnet18" in note[0]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["synth"] == {} and cfg["val_length"] == 512 and cfg["data"] == str(tiny_data)
    assert (out / "model.json").is_file()
    # a recipe whose rendered-split settings are the defaults: nothing to say
    assert main(["fit", "--recipe", "resnet18_128", "--data", str(tiny_data), "--print-config"]) == 0
    assert "note:" not in capsys.readouterr().err
    # explicit flags beside --data are still refused, naming the field
    for flags, says in ((["--val-length", "1024"], "val_length 1024"), (["--synth", "{clutter: 0.3}"], "synth")):
        assert main(["fit", "--recipe", "quick_resnet18", "--data", str(tiny_data), "--out", str(tmp_path / "x"),
                     *tiny, *flags]) == 2
        assert says in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists()
    # without --data on the command line nothing is dropped
    assert main(["fit", "--recipe", "quick_resnet18", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["val_length"] == 1024


def test_cli_test_size_mismatch_advises_what_test_accepts(tiny_data, tmp_path, capsys, save_untrained_model):
    """`test` has no --image-size: a 64 px model on 32 px data is fixed by other data or another model."""
    model = save_untrained_model(tmp_path / "m64", image_size=64)
    assert main(["test", "--model", str(model), "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert "32 px images but the model expects 64 px" in err and "--image-size 32" not in err
    assert "shapesynth generate --out DIR --image-size 64" in err and "a model trained at 32 px" in err
    # fit chooses the size: there --image-size is the advice
    with pytest.raises(DataError, match=r"set --image-size 32"):
        fit(_tiny_cfg(tmp_path / "r", image_size=64, data=str(tiny_data), synth={}))
