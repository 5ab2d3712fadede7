"""Reduction of pixel attributions (B, C, H, W) to a map (B, H, W).

Default "sum_abs" = |sum over colour channels|, what the RefineCAM paper's code did for every
captum method and for Guided Grad-CAM (sum over channels, then absolute value)."""

from __future__ import annotations

import torch

REDUCTIONS = {
    "sum_abs": lambda a: a.sum(dim=1).abs(),
    "sum_relu": lambda a: a.sum(dim=1).clamp_min(0),
    "sum": lambda a: a.sum(dim=1),
    "abs_sum": lambda a: a.abs().sum(dim=1),
    "max_abs": lambda a: a.abs().amax(dim=1),
}


def check_reduction(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {sorted(REDUCTIONS)}, got {reduce!r}")
    return reduce


def reduce_channels(attr: torch.Tensor, reduce: str = "sum_abs") -> torch.Tensor:
    return REDUCTIONS[check_reduction(reduce)](attr)
