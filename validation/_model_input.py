"""A clear error when images of one dtype meet a model of another (shared by methods and metrics)."""
from __future__ import annotations

import torch


def raise_if_dtype_mismatch(model: torch.nn.Module, images: torch.Tensor, error: RuntimeError) -> None:
    """After a failed forward: raise a ValueError naming both dtypes and the fix when the images'
    dtype is not the model's (torch's own message names neither the argument nor the fix).
    Checked only on failure: a model may cast its input itself."""
    weight = next((t for t in model.parameters() if t.is_floating_point()), None)
    if weight is None:
        weight = next((t for t in model.buffers() if t.is_floating_point()), None)
    if weight is not None and images.is_floating_point() and images.dtype != weight.dtype:
        raise ValueError(f"images x are {images.dtype} but the model's weights are {weight.dtype}: pass "
                         f"x.to({weight.dtype}) or convert the model") from error
