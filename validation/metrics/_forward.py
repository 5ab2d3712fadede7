"""Batched, no-grad class probabilities: the only place metrics run the model."""
from __future__ import annotations

import contextlib

import torch

from .._layout import fast_layout
from .._model_input import check_logits, raise_for_failed_forward
from ._checks import check_int, check_num_classes, eval_forward


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

    images: (N, C, H, W) in [0, 1] (the model normalises); target: (N,) long. The model returns
    logits (N, K); the softmax is taken here, in float32 even when ``bf16=True`` runs the forward
    under bfloat16 autocast.
    ``sample_target`` (B,): the callers' per-sample targets when the rows repeat samples, so that
    a class outside the model's range names the sample, not the row.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    out, predictions = [], []
    autocast = (torch.autocast(device_type=images.device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    with eval_forward(model), torch.no_grad(), autocast:
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            try:
                output = model(fast_layout(chunk))
            except RuntimeError as error:
                raise_for_failed_forward(model, images, error)
                raise
            check_logits(output, chunk.shape[0])
            if start == 0:
                check_num_classes(target if sample_target is None else sample_target, output.shape[1])
                raise_if_probabilities(output)
            logits = output.float()
            probs = torch.softmax(logits, dim=1)
            out.append(probs.gather(1, target[start:start + batch_size, None])[:, 0])
            predictions.append(probs.argmax(1))
    if not out:
        return images.new_zeros(0), target.new_zeros(0)
    return torch.cat(out), torch.cat(predictions)


def raise_if_probabilities(output: torch.Tensor) -> None:
    """ValueError when the model's outputs are already probabilities (every row positive and
    summing to 1 to the output dtype's rounding): the softmax taken on top of them compresses
    every p_c towards 1/K, and Average Drop, ROAD and p_c(X) would come out silently wrong.
    Logits pass almost surely; log-probabilities are fine (their softmax is the probabilities)."""
    classes = output.shape[1]
    if classes < 2 or not output.is_floating_point() or not output.shape[0]:
        return
    p = output.detach() if output.dtype == torch.float64 else output.detach().float()  # no float64 on MPS
    tol = min(1e-3, 4 * classes * torch.finfo(output.dtype).eps)
    if bool(((p > 0) & (p <= 1)).all() and ((p.sum(1) - 1).abs() <= tol).all()):
        raise ValueError("the model's outputs are probabilities (every row positive and summing to 1), but the "
                         "metrics take the softmax of the model's output themselves: pass a model that returns "
                         "logits (drop its final softmax; log-probabilities are fine)")
