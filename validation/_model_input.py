"""Clear errors about a model's input and output, shared by methods and metrics: images with
NaN or Inf, after a failed forward (images of one dtype meeting a model of another, images too
small for the model), and an output that is not one row of logits per image."""
from __future__ import annotations

import torch


def nonfinite_samples(values: torch.Tensor) -> list[int]:
    """Indices of the samples (first dim) holding NaN or Inf; [] when all are finite. One aminmax
    pass (NaN and Inf reach the extremes) is ~10x cheaper than isfinite on every value, which runs
    only to name the samples."""
    if not values.numel() or bool(torch.isfinite(torch.stack(values.aminmax())).all()):
        return []
    return (~torch.isfinite(values.flatten(1)).all(1)).nonzero().flatten().tolist()


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


# torch's own words when a pooling or convolution layer runs out of pixels
_TOO_SMALL = ("Output size is too small", "Kernel size can't be greater than actual input size")


def raise_for_failed_forward(model: torch.nn.Module, images: torch.Tensor, error: RuntimeError) -> None:
    """After a failed forward: the dtype check above, then a ValueError naming the images' size
    when a layer of the model ran out of pixels (torch's message names a layer's input, not ours)."""
    raise_if_dtype_mismatch(model, images, error)
    if any(words in str(error) for words in _TOO_SMALL):
        h, w = images.shape[-2:]
        raise ValueError(f"images of {h}x{w} px are too small for {type(model).__name__}: one of its layers "
                         f"ran out of pixels ({' '.join(str(error).split())}); use larger images") from error


def check_logits(output, rows: int) -> torch.Tensor:
    """``output`` if it is an (N, K) tensor, one row per image; ValueError naming what it is else."""
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != rows:
        got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"the model must return a logits tensor (N, num_classes), one row per image; for {rows} "
                         f"images it returned {got} (wrap a model that returns a tuple, a dict or extra "
                         "dimensions so that it returns the logits tensor)")
    return output
