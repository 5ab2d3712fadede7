"""The best-validation checkpoint, with ties going to the later epoch.

With a one-cycle schedule and a weight average, validation accuracy on a few hundred images
saturates near the end of training (e.g. 510 of 512 for the last nine epochs of a run), and
Lightning's ``ModelCheckpoint`` keeps the *first* of equal scores: the least annealed weights.
Among checkpoints that validation cannot tell apart, the later one has seen more of the schedule,
so it is the one to keep.
"""
from __future__ import annotations

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["LatestBestCheckpoint"]


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
