"""Batched, no-grad class probabilities: the only place metrics run the model."""
from __future__ import annotations

import contextlib

import torch

from .._layout import fast_layout
from .._model_input import raise_if_dtype_mismatch
from ._checks import check_num_classes, eval_forward


def class_probabilities(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                        batch_size: int = 64, bf16: bool = False,
                        sample_target: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(model(images))[i, target[i]] for every row; see ``probabilities_and_predictions``."""
    return probabilities_and_predictions(model, images, target, batch_size=batch_size, bf16=bf16,
                                         sample_target=sample_target)[0]


def probabilities_and_predictions(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                                  batch_size: int = 64, bf16: bool = False,
                                  sample_target: torch.Tensor | None = None):
    """(p_c, argmax class) per row: softmax(model(images))[i, target[i]], in chunks of ``batch_size``.

    images: (N, C, H, W) in [0, 1] (the model normalises); target: (N,) long. The softmax is
    taken in float32 even when ``bf16=True`` runs the forward under bfloat16 autocast.
    ``sample_target`` (B,): the callers' per-sample targets when the rows repeat samples, so that
    a class outside the model's range names the sample, not the row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out, predictions = [], []
    autocast = (torch.autocast(device_type=images.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    with eval_forward(model), torch.no_grad(), autocast:
        for start in range(0, images.shape[0], batch_size):
            try:
                logits = model(fast_layout(images[start:start + batch_size])).float()
            except RuntimeError as error:
                raise_if_dtype_mismatch(model, images, error)
                raise
            if start == 0:
                check_num_classes(target if sample_target is None else sample_target, logits.shape[1])
            probs = torch.softmax(logits, dim=1)
            out.append(probs.gather(1, target[start:start + batch_size, None])[:, 0])
            predictions.append(probs.argmax(1))
    if not out:
        return images.new_zeros(0), target.new_zeros(0)
    return torch.cat(out), torch.cat(predictions)
