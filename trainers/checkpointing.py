"""The best-validation checkpoint, with ties going to the later epoch; checkpoint files written
atomically in their own folder.

With a one-cycle schedule and a weight average, validation accuracy on a few hundred images
saturates near the end of training (e.g. 510 of 512 for the last nine epochs of a run), and
Lightning's ``ModelCheckpoint`` keeps the *first* of equal scores: the least annealed weights.
Among checkpoints that validation cannot tell apart, the later one has seen more of the schedule,
so it is the one to keep.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from shapesynth.schema import atomic_save

__all__ = ["AtomicCheckpointIO", "LatestBestCheckpoint", "remove_temp_checkpoints"]

# atomic_save's temp names: "." + checkpoint name + "." + mkstemp's 8 characters + ".tmp"
_TEMP = re.compile(r"\..+\.ckpt\.[a-z0-9_]{8}\.tmp")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temp file beside the checkpoint.

    Lightning's own writer stages the file in the system temp folder and moves it into place;
    where that folder is another file system (a tmpfs ``/tmp``, a node-local disk) the move is a
    copy into the checkpoint itself, so a kill during it leaves a truncated ``last.ckpt`` that
    the next run cannot resume from (and the staged file, a full checkpoint, in the temp folder).
    Here the temp file is in the checkpoint's folder, flushed to disk, then renamed over it.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))


def remove_temp_checkpoints(folder) -> None:
    """Remove the temp files of `AtomicCheckpointIO` that a killed run left in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if _TEMP.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


class LatestBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (``save_top_k=1``) that replaces the kept checkpoint on equal scores."""

    def __init__(self, **kwargs):
        if kwargs.get("save_top_k", 1) != 1:
            raise ValueError("LatestBestCheckpoint keeps exactly one checkpoint (save_top_k=1)")
        super().__init__(**kwargs)

    @property
    def state_key(self) -> str:
        # the same key as a plain ModelCheckpoint, so runs started before this class resume their
        # best score instead of starting the comparison afresh
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def check_monitor_top_k(self, trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        if not self.best_k_models:
            return True
        kept = self.best_k_models[self.kth_best_model_path]
        better_or_equal = {"min": torch.le, "max": torch.ge}[self.mode](current, kept)
        return trainer.strategy.reduce_boolean_decision(bool(better_or_equal))
