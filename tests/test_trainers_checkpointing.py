"""best.ckpt keeps the best validation score and, among equal scores, the later epoch."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from trainers.checkpointing import LatestBestCheckpoint


class ScriptedScores(pl.LightningModule):
    """Logs a given val_acc per epoch; one trivial training step so that epochs run."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, _):
        return (self.weight - batch[0]).pow(2).sum()

    def validation_step(self, batch, _):
        self.log("val_acc", torch.tensor(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)


def _kept_epoch(tmp_path, checkpoint_class, scores, mode="max"):
    ckpt = checkpoint_class(dirpath=tmp_path, filename="best", monitor="val_acc", mode=mode, save_top_k=1)
    trainer = pl.Trainer(max_epochs=len(scores), callbacks=[ckpt], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(ScriptedScores(scores))
    return torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["epoch"], ckpt


@pytest.mark.parametrize("scores, mode, expected", [
    ([0.5, 0.9, 0.9, 0.9, 0.8], "max", 3),   # a plateau of ties: its last epoch
    ([0.5, 0.9, 0.7, 0.9, 0.8], "max", 3),   # equal scores apart: the later one
    ([0.5, 0.9, 0.95, 0.9, 0.9], "max", 2),  # a strict best is never replaced by a lower tie
    ([0.4, 0.2, 0.2, 0.3], "min", 2),        # mode min: ties go to the later epoch too
])
def test_ties_go_to_the_later_epoch(tmp_path, scores, mode, expected):
    epoch, ckpt = _kept_epoch(tmp_path, LatestBestCheckpoint, scores, mode)
    assert epoch == expected
    assert ckpt.best_model_score.item() == pytest.approx(max(scores) if mode == "max" else min(scores))
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]  # one file, rewritten in place


def test_lightnings_own_checkpoint_keeps_the_first_tie(tmp_path):
    """The behaviour this class changes (if Lightning changes it, the class can go)."""
    epoch, _ = _kept_epoch(tmp_path, ModelCheckpoint, [0.5, 0.9, 0.9, 0.9, 0.8])
    assert epoch == 1


def test_state_key_matches_modelcheckpoint_so_older_runs_resume_their_best_score(tmp_path):
    kwargs = dict(dirpath=tmp_path, filename="best", monitor="val_acc", mode="max", save_top_k=1)
    assert LatestBestCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key


def test_only_one_checkpoint_is_kept(tmp_path):
    with pytest.raises(ValueError, match="save_top_k=1"):
        LatestBestCheckpoint(dirpath=tmp_path, monitor="val_acc", save_top_k=3)


def test_loading_a_model_leaves_the_global_random_state_alone(tmp_path):
    """The architecture's random initialisation is overwritten by the weights: load_model must
    not consume the caller's random stream."""
    from trainers import load_model
    from trainers.export import save_model
    from trainers.models import build_model

    model = build_model("resnet18", num_classes=3, image_size=32)
    save_model(model, tmp_path / "m", {"class_names": ["a", "b", "c"], "dataset_fingerprint": None,
                                       "test_accuracy": None})
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    loaded, _ = load_model(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_checkpoints_carry_the_cpu_and_cuda_generators(monkeypatch):
    """The CPU state round-trips exactly; on a GPU the CUDA generators (dropout there) travel too.
    No GPU here: torch.cuda is stubbed, which checks the plumbing, not CUDA itself."""
    from trainers.module import ShapeClassifierModule

    module = ShapeClassifierModule(arch="resnet18", image_size=32, channels_last=False)
    torch.manual_seed(11)
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    expected = torch.rand(4)
    assert "torch_cuda_rng_states" not in ckpt  # CPU run (CUDA not initialised): nothing to save
    module.on_load_checkpoint(ckpt)
    assert torch.equal(torch.rand(4), expected)

    states, restored = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["torch_cuda_rng_states"] is states
    module.on_load_checkpoint(ckpt)
    assert restored == states
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # other GPUs: per-device states do not apply
    module.on_load_checkpoint(ckpt)
    assert restored == states
