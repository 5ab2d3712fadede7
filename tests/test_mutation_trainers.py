"""Behaviour of trainers/ that the mutation audit found untested (each test names the faults it
catches): which checkpoint is tested and exported when val_acc is not monotone (best, ties to the
later epoch); which split each phase reads; the normalisation model.json records; the seed's reach
(weights, disk order, crop windows); the max_time cap and the resume of a capped run; evaluate's
split and default recipe; each arch's class count and head; the rendered test set's fingerprint;
label smoothing and the one-cycle warm-up; the CPU bf16 flag check; strict weight loading; no earlier
export left in a folder that a `resume: never` run is retraining."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file

from shapesynth import CLASS_NAMES, ShapeSynth, SynthConfig
from shapesynth.torchdata import ShapesDataset
from test_trainers_fit import BANDS, _tiny_cfg, make_tiny_dataset
from trainers import build_model, load_model
from trainers.api import evaluate, fit, plan_fit
from trainers.data import ShapesDataModule
from trainers.models import IMAGENET_MEAN, IMAGENET_STD, _HEADS, available_archs
from trainers.module import ShapeClassifierModule

# val_acc per epoch, scripted: epochs 0 and 1 tie, epoch 2 is worse. The kept checkpoint must be
# epoch 1 (the later of the equal best scores): not epoch 0 (first tie), not epoch 2 (last)
SCRIPTED_VAL_ACC = [0.75, 0.75, 0.5]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory, train=32, val=12, test=18)


def _split_images(data, split):
    ds = ShapesDataset(data, split)
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), torch.stack([ds[i]["label"] for i in range(len(ds))])


class _Recorder(Callback):
    """Every image each phase saw (sanity checks left out) and the weights at each epoch's end."""

    def __init__(self):
        self.train, self.val, self.test, self.weights = {}, {}, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.train.setdefault(trainer.current_epoch, []).append(batch["image"].detach().clone())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.setdefault(trainer.current_epoch, []).append(batch["image"].detach().clone())

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.test.append(batch["image"].detach().clone())

    def on_train_epoch_end(self, trainer, module):
        self.weights.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})


@pytest.fixture(scope="module")
def scripted_run(tiny_data, tmp_path_factory):
    """A 3-epoch disk run whose val_acc is SCRIPTED_VAL_ACC: (folder, meta, recorder)."""

    def scripted_val_acc(self):
        self._epoch_cm("val")  # consumed as the real hook does
        if not self.trainer.sanity_checking:
            self.log("val_acc", torch.tensor(SCRIPTED_VAL_ACC[self.current_epoch]), sync_dist=True)

    out = tmp_path_factory.mktemp("runs") / "scripted"
    record = _Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShapeClassifierModule, "on_validation_epoch_end", scripted_val_acc)
        meta = fit(_tiny_cfg(out, data=str(tiny_data), train_source="disk", synth={}, max_epochs=3, batch_size=16,
                             stop_at_val_acc=None), callbacks=[record])
    return out, meta, record


def test_the_later_of_equal_best_scores_is_tested_and_exported(scripted_run, tiny_data):
    """Kills: best checkpoint replaced by last.ckpt; ties kept at the first epoch (>= as >); mode min;
    the export or the test run on the last epoch's weights instead of the best's."""
    out, meta, record = scripted_run
    assert len(record.weights) == 3
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 1
    assert meta["best_val_accuracy"] == pytest.approx(0.75)
    assert meta["checkpoint"] == str(out / "checkpoints" / "best.ckpt")
    exported = load_file(str(out / "model.safetensors"))
    kept, last = record.weights[1], record.weights[2]
    for name, value in exported.items():
        assert torch.equal(value, kept[name]), name
    assert any(not torch.equal(exported[k], last[k]) for k in exported)  # epoch 2 did change the weights

    # the recorded test numbers are those of epoch 1's weights, re-derived on the disk test split
    x, y = _split_images(tiny_data, "test")
    model = build_model("resnet18", image_size=32)
    model.load_state_dict(kept)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    cm = [[int(((y == c) & (pred == k)).sum()) for k in range(6)] for c in range(6)]
    assert meta["confusion_matrix"] == cm and meta["test_images"] == len(y) == 18
    assert meta["test_accuracy"] == pytest.approx((pred == y).double().mean().item())


def test_each_phase_reads_its_own_split(scripted_run, tiny_data):
    """Kills: validation on the test split (or the reverse); training on val/test; the disk train
    order not reshuffled per epoch."""
    _, _, record = scripted_run
    train_x, _ = _split_images(tiny_data, "train")
    val_x, _ = _split_images(tiny_data, "val")
    test_x, _ = _split_images(tiny_data, "test")
    orders = []
    for epoch in range(3):
        seen = torch.cat(record.train[epoch])
        assert seen.shape[0] == 32
        # every training image is one train image, each exactly once (a permutation of the split)
        match = (seen.flatten(1)[:, None, :] == train_x.flatten(1)[None, :, :]).all(-1)
        assert match.sum(1).tolist() == [1] * 32 and match.sum(0).tolist() == [1] * 32
        orders.append(match.float().argmax(1).tolist())
        assert torch.equal(torch.cat(record.val[epoch]), val_x)  # the val split, in order
    assert len({tuple(o) for o in orders}) == 3  # a new order per epoch
    assert torch.equal(torch.cat(record.test), test_x)


def test_model_json_records_the_normalisation_the_model_applies(scripted_run):
    """Kills: a wrong mean or std recorded in model.json / the card (the model itself still applies
    ImageNet's): a loader that normalises outside the model would use the recorded values; a fresh,
    uninterrupted run's training time called incomplete."""
    out, meta, _ = scripted_run
    saved = json.loads((out / "model.json").read_text())
    model, loaded = load_model(out)
    for key, want in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        buffer = getattr(model.normalize, key).flatten().tolist()
        assert saved[key] == pytest.approx(list(want)) == buffer
        assert meta[key] == saved[key] == loaded[key]
        assert meta["data"][key] == pytest.approx(list(want))
    card = (out / "MODEL_CARD.md").read_text()
    assert f"normalisation inside the model (mean {saved['mean']}, std {saved['std']})" in card
    assert saved["num_classes"] == len(CLASS_NAMES) and saved["class_names"] == list(CLASS_NAMES)
    assert saved["arch"] == "resnet18" and saved["image_size"] == 32 and saved["max_epochs"] == 3
    assert saved["epochs"] == 3 and saved["global_step"] == 6 and saved["stopped_by"] == "the schedule's end"
    # one uninterrupted session: its clock is the whole training time
    assert saved["train_seconds_complete"] is True and "last session only" not in card


# --------------------------------------------------------------------------- seeds
def _disk_plan(tiny_data, tmp_path, seed):
    return plan_fit(_tiny_cfg(tmp_path / f"d{seed}", data=str(tiny_data), train_source="disk", synth={}, seed=seed))


def _order(plan, epoch):
    dm = plan.datamodule
    dm.setup("fit")
    dm.set_epoch(epoch)
    return [int(i) for batch in dm.train_dataloader() for i in batch["index"]]


def test_the_seed_reaches_the_weights_the_disk_order_and_the_crop_windows(tiny_data, tmp_path):
    """Kills: seed_everything with a fixed seed; the data module's seed dropped; the disk sampler or
    the crop windows seeded with a constant."""
    a, again, b = (_disk_plan(tiny_data, tmp_path, s) for s in (0, 0, 1))
    wa, wb = a.module.model.state_dict(), b.module.model.state_dict()
    assert all(torch.equal(v, again.module.model.state_dict()[k]) for k, v in wa.items())
    assert not torch.equal(wa["backbone.conv1.weight"], wb["backbone.conv1.weight"])
    assert _order(a, 0) == _order(again, 0) and sorted(_order(a, 0)) == list(range(32))
    assert _order(a, 0) != _order(b, 0) and _order(a, 1) != _order(b, 1)

    def crops(seed):
        plan = plan_fit(_tiny_cfg(tmp_path / f"c{seed}", image_size=64, seed=seed, train_length=8, train_crop=40))
        plan.datamodule.setup("fit")
        return torch.stack([plan.datamodule.train_set[i]["image"] for i in range(8)])

    c0 = crops(0)
    assert c0.shape[-1] == 40
    assert not torch.equal(c0, crops(1))  # the same rendered images, other windows


# --------------------------------------------------------------------------- time cap
def test_a_capped_run_stops_records_the_cap_and_resumes(tmp_path):
    """Kills: max_time not given to the Trainer; a capped run taken as finished by a rerun."""

    class SlowFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                time.sleep(1.5)  # past the 1 s cap: the cap stops the run in epoch 1

    out = tmp_path / "capped"
    kw = dict(max_epochs=4, train_length=32, batch_size=16, val_length=8, test_length=12, stop_at_val_acc=None,
              max_time="00:00:00:01")
    meta = fit(_tiny_cfg(out, **kw), callbacks=[SlowFirstEpoch()])
    assert meta["stopped_by"] == "the max_time cap (00:00:00:01), before the schedule's end"
    assert meta["epochs"] < 4 and meta["global_step"] < 8
    assert "stopped by the max_time cap" in (out / "MODEL_CARD.md").read_text()
    # the same command with a larger cap continues the checkpoint instead of reporting a finished run
    plan = plan_fit(_tiny_cfg(out, **{**kw, "max_time": "00:01:00:00"}))
    assert plan.finished is None and plan.resumed_from == str(out / "checkpoints" / "last.ckpt")


# --------------------------------------------------------------------------- evaluate
def _hand_confusion(model, x, y):
    with torch.no_grad():
        pred = model(x).argmax(1)
    return [[int(((y == c) & (pred == k)).sum()) for k in range(6)] for c in range(6)]


def test_evaluate_reads_the_split_it_is_asked_for(tiny_data, tmp_path, save_untrained_model):
    """Kills: split='val' evaluating the test split, in evaluate or in the CLI's `test --split`."""
    from trainers.cli import main

    folder = save_untrained_model(tmp_path / "m", seed=2)
    model, _ = load_model(folder)
    for split, n in (("val", 12), ("test", 18)):
        written = tmp_path / f"{split}.json"
        assert main(["test", "--model", str(folder), "--data", str(tiny_data), "--split", split,
                     "--out", str(written)]) == 0
        res = json.loads(written.read_text())
        x, y = _split_images(tiny_data, split)
        assert res["test_images"] == n and res["split"] == split
        assert res["confusion_matrix"] == _hand_confusion(model, x, y)


def test_evaluate_without_data_renders_the_models_own_recipe(tmp_path, save_untrained_model):
    """Kills: the recorded training recipe ignored (shapesynth's default recipe rendered instead)."""
    recipe = SynthConfig(image_size=32, size_bands=tuple(map(tuple, BANDS)), clutter=0.0).to_dict()
    folder = save_untrained_model(tmp_path / "m", seed=3, data={"synth": recipe})
    model, _ = load_model(folder)
    res = evaluate(folder, length=12, batch_size=12)
    synth = ShapeSynth(SynthConfig.from_dict(recipe))
    samples = [synth.sample("test", i, epoch=0, n=12) for i in range(12)]
    x = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
    y = torch.tensor([s.label for s in samples])
    assert res["confusion_matrix"] == _hand_confusion(model, x, y)
    assert res["dataset_fingerprint"] == ShapesDataModule(image_size=32, synth=recipe, test_length=12).fingerprint()


# --------------------------------------------------------------------------- data identity
def test_the_rendered_test_set_fingerprint_follows_test_length_only(tmp_path):
    """Kills: the fingerprint built from another split's length (a test score recorded for one test
    set would match another)."""
    synth = {"size_bands": BANDS}
    base = ShapesDataModule(image_size=32, synth=synth, test_length=24, val_length=16).fingerprint()
    assert ShapesDataModule(image_size=32, synth=synth, test_length=24, val_length=40).fingerprint() == base
    assert ShapesDataModule(image_size=32, synth=synth, test_length=25, val_length=16).fingerprint() != base


def test_rendered_splits_come_from_their_own_generator_split():
    """Kills: the train stream rendered from the val/test split (their background pools), or a
    rendered val/test set drawn from another split."""
    synth = {"size_bands": BANDS, "bg_pool_sizes": {"train": 3, "val": 2, "test": 2}}
    dm = ShapesDataModule(image_size=32, synth=synth, train_length=6, val_length=6, test_length=6)
    dm.setup()
    dm.set_epoch(1)
    reference = ShapeSynth(SynthConfig.from_dict({**synth, "image_size": 32}))
    for split, ds, epoch in (("train", dm.train_set, 1), ("val", dm.val_set, 0), ("test", dm.test_set, 0)):
        for i in range(6):
            want = reference.sample(split, i, epoch=epoch, n=6)
            got = ds[i]
            assert torch.equal(got["image"], torch.from_numpy(want.image).permute(2, 0, 1).float() / 255), (split, i)
            assert int(got["label"]) == want.label


# --------------------------------------------------------------------------- model registry
@pytest.mark.parametrize("arch", sorted(available_archs()))
def test_every_arch_has_the_asked_class_count_and_its_head_is_the_registered_layer(arch):
    """Kills: a builder that ignores num_classes; a head prefix that names another layer (pretrained
    loading would then copy ImageNet's 1000-class head or skip a trained layer)."""
    model = build_model(arch, num_classes=3, image_size=32).eval()
    head = model.backbone.get_submodule(_HEADS[arch])
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    # the head is the last layer: its output is the logits
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = head.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    assert torch.equal(seen[0], logits) and model.num_classes == 3


# --------------------------------------------------------------------------- optimisation
def test_the_training_loss_applies_label_smoothing():
    """Kills: label smoothing dropped from the training loss."""
    eps = 0.2
    module = ShapeClassifierModule(arch="resnet18", image_size=32, label_smoothing=eps, channels_last=False).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 1])
    with torch.no_grad(), pytest.warns(UserWarning):  # self.log without a trainer
        loss = module.training_step({"image": x, "label": y}, 0)
        logp = module(x).double().log_softmax(1)
    # (1 - eps) * NLL + eps * the mean over classes of -log p, by hand in float64
    want = ((1 - eps) * -logp[torch.arange(4), y] - eps * logp.mean(1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(want.item() - F.cross_entropy(logp, y).item()) > 1e-3  # the smoothing matters here


def test_the_one_cycle_schedule_peaks_after_pct_start_of_the_steps():
    """Kills: pct_start not passed to the schedule."""
    module = ShapeClassifierModule(arch="resnet18", image_size=32, lr=1e-2, pct_start=0.25, channels_last=False)
    module.trainer = SimpleNamespace(estimated_stepping_batches=40)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up over 0.25 * 40 = 10 steps: lr/25 at step 0, the peak lr at step 9
    assert lrs[0] == pytest.approx(1e-2 / 25) and max(lrs) == pytest.approx(1e-2)
    assert lrs.index(max(lrs)) == 9
    assert lrs[5] == pytest.approx(1e-2 / 25 + (1e-2 - 1e-2 / 25) * (1 - math.cos(math.pi * 5 / 9)) / 2)


# --------------------------------------------------------------------------- precision
@pytest.mark.parametrize("flags, native", [("fpu sse avx512f avx512_bf16 avx512_vnni", True),
                                           ("fpu sse amx_tile amx_bf16", True),
                                           ("fpu sse avx2 avx512f avx512_vnni", False)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    """Kills: another flag name taken as native bf16 (emulated bf16 is slower than fp32)."""
    from trainers import precision as prec

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    monkeypatch.setattr(prec, "Path", lambda _: cpuinfo)
    assert prec.cpu_has_native_bf16() is native


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_weights_file_that_does_not_fit_the_model_is_refused(tmp_path, save_untrained_model, change):
    """Kills: non-strict loading (a missing tensor left at its random initialisation, or a stray
    one ignored, in a model reported as loaded)."""
    from safetensors.torch import save_file

    folder = save_untrained_model(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    if change == "missing":
        del state["backbone.fc.weight"]
    else:
        state["backbone.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="weights do not fit resnet18 at 32 px"):
        load_model(folder)


def test_a_run_started_over_and_killed_leaves_no_earlier_export_behind(tmp_path):
    """Kills: the earlier run's model.json kept while a `resume: never` run trains (a kill would
    leave the folder marked finished, and a rerun would report the old model without training)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("model.safetensors", "model.json", "test_metrics.json", "MODEL_CARD.md"):
        (out / name).write_text("{}")  # an earlier run's export

    class Killed(Callback):
        def on_train_batch_start(self, trainer, *args):
            raise RuntimeError("killed")

    kw = dict(train_length=16, batch_size=16, val_length=6, test_length=6)
    with pytest.raises(RuntimeError, match="killed"):
        fit(_tiny_cfg(out, resume="never", **kw), callbacks=[Killed()])
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".md", ".safetensors")) == ["config.json"]
    assert plan_fit(_tiny_cfg(out, **kw)).finished is None
