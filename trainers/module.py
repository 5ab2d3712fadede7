"""`ShapeClassifierModule`: the research code (model, loss, optimiser, schedule, metrics).

Accuracy is computed from a confusion matrix accumulated over the epoch (summed across
processes under DDP), so per-class accuracy and the matrix itself come for free at test time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytorch_lightning as pl

from shapesynth import CLASS_NAMES

from trainers.models import build_model


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Recall per true class (diag / row sum); NaN for a class with no samples."""
    cm = cm.double()
    return cm.diagonal() / cm.sum(1)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on weights, none on biases, norms, Swin's position
    tables and ConvNeXt's layer scales (shaped (C, 1, 1) in torchvision, so ndim alone misses them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or "relative_position" in name or name.endswith("layer_scale")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ShapeClassifierModule(pl.LightningModule):
    def __init__(self, arch: str = "resnet18", image_size: int = 128, class_names=CLASS_NAMES,
                 pretrained: bool = False, weights_path: str | None = None, lr: float = 2e-3,
                 weight_decay: float = 0.05, pct_start: float = 0.15, label_smoothing: float = 0.0,
                 channels_last: bool = True, scheduler: str = "onecycle",
                 stochastic_depth: float | None = None, train_crop: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = tuple(class_names)
        self.model = build_model(arch, num_classes=len(self.class_names), image_size=image_size,
                                 pretrained=pretrained, weights_path=weights_path,
                                 stochastic_depth=stochastic_depth)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._cm = {}

    # ------------------------------------------------------------------ forward and loss
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _check_batch(self, x: torch.Tensor, training: bool = False) -> None:
        size = self.hparams.image_size
        crop = self.hparams.get("train_crop") if training else None
        if x.shape[-2:] != (size, size) and (crop is None or x.shape[-2:] != (crop, crop)):
            also = f" (or {crop} x {crop} training crops)" if crop else ""
            raise ValueError(f"batch has {tuple(x.shape[-2:])} px images but the model expects {size} x {size}{also}")

    def training_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        self._check_batch(x, training=True)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == y).float().mean()
        # step values are this process's batch (no per-step all-reduce); epoch values are synced
        # over the processes at the epoch's end, so under DDP they are not rank 0's alone
        for name, value in (("train_loss", loss), ("train_acc", acc)):
            self.log(name, value, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
            self.log(f"{name}_epoch", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, stage: str):
        x, y = batch["image"], batch["label"]
        self._check_batch(x)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        cm = confusion_matrix(logits.argmax(1), y, len(self.class_names))
        self._cm[stage] = self._cm.get(stage, 0) + cm

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        # the recorded test accuracy (what the 99 % gate reads) is the fp32 model's, as the
        # attributions and metrics run it; mixed-precision training only speeds up the rest
        with torch.autocast(self.device.type, enabled=False):
            self._eval_step(batch, "test")

    def _epoch_cm(self, stage: str) -> torch.Tensor:
        n = len(self.class_names)
        cm = self._cm.pop(stage, torch.zeros(n, n, dtype=torch.long, device=self.device))
        return self.trainer.strategy.reduce(cm, reduce_op="sum") if self.trainer.world_size > 1 else cm

    def on_validation_epoch_end(self):
        cm = self._epoch_cm("val")
        # the matrix is summed over the processes already, so every rank holds the same value and
        # sync_dist's mean leaves it as it is; without it Lightning warns it may be rank 0's alone
        self.log("val_acc", cm.diagonal().sum().float() / cm.sum().clamp_min(1), prog_bar=True, sync_dist=True)

    def on_test_epoch_end(self):
        cm = self._epoch_cm("test")
        self.test_confusion = cm.cpu()
        self.log("test_acc", cm.diagonal().sum().float() / cm.sum().clamp_min(1), sync_dist=True)
        for name, acc in zip(self.class_names, per_class_accuracy(cm).tolist()):
            self.log(f"test_acc/{name}", acc, sync_dist=True)

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    # global RNG (dropout, stochastic depth) travels with the checkpoint, so a resumed run
    # continues exactly where the interrupted one stopped; on a GPU those draws come from the CUDA
    # generators. Only the saving process's states are kept (rank 0 under DDP, as for the CPU's)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA for this
            checkpoint["torch_cuda_rng_states"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        cuda_states = checkpoint.get("torch_cuda_rng_states")
        # same GPU count only: the states are per device (set lazily, so no context is created here)
        if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        # fused: one kernel over all parameters; 3x faster on VGG's 120M-parameter head on CPU
        opt = torch.optim.AdamW(weight_decay_groups(self.model, hp.weight_decay), lr=hp.lr, fused=True)
        if hp.scheduler == "constant":
            return opt
        if hp.scheduler != "onecycle":
            raise ValueError(f"scheduler must be 'onecycle' or 'constant', got {hp.scheduler!r}")
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=max(total, 1),
                                                    pct_start=hp.pct_start, anneal_strategy="cos")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
