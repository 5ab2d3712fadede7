"""Guided backpropagation (Springenberg et al.) and Guided Grad-CAM (Selvaraju et al.), on whole
batches. Every ``nn.ReLU`` is swapped, for the duration of the call, for a stateless guided ReLU
(backward passes gradient only where both the input and the incoming gradient are positive);
this stays correct when one ReLU module is reused (torchvision ResNet blocks). Functional
``F.relu`` calls and other activations (GELU) are not guided; guided backpropagation reports the
count of guided modules in ``extras["guided_relus"]``, and a model with none gets a RuntimeWarning
(its result is the plain gradient)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._model_input import check_logits
from .base import Explainer, ModelGuard, check_score, class_score, compute_dtype, resolve_target
from .cam import GradCAM
from .pixel import check_reduction, reduce_channels
from .postprocess import rectify, upsample
from .registry import register


class _GuidedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x > 0) & (grad > 0)).to(grad.dtype)


class GuidedReLU(nn.Module):
    def forward(self, x):
        return _GuidedReLUFunction.apply(x)


def swap_relus(model: nn.Module, guard: ModelGuard) -> int:
    """Replace every nn.ReLU child by a GuidedReLU through ``guard`` (restored on exit)."""
    # `_modules`, not `named_children()`, which lists a ReLU registered twice under one parent
    # once: called through its second name, it stayed unguided
    slots = [(parent, name) for parent in model.modules()
             for name, child in parent._modules.items() if isinstance(child, nn.ReLU)]
    for parent, name in slots:
        guard.swap(parent, name, GuidedReLU())
    return len(slots)


def guided_gradients(model: nn.Module, x: torch.Tensor, target, guard: ModelGuard, score: str = "logit"):
    """d score / d x with guided ReLUs: (B, C, H, W), target, number of guided ReLUs."""
    n = swap_relus(model, guard)
    if n == 0:  # GELU models (ConvNeXt, Swin): the result is silently the plain gradient otherwise
        warnings.warn(f"{type(model).__name__} has no nn.ReLU module to guide: guided backpropagation here is "
                      "the plain input gradient", RuntimeWarning, stacklevel=2)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = check_logits(model(x_in), x.shape[0])
        target = resolve_target(target, logits)
        s = class_score(logits, target, score)
        if not s.requires_grad:
            raise RuntimeError("the model output has no gradient path to the input")
        (grad,) = torch.autograd.grad(s.sum(), x_in)
    return grad.to(compute_dtype(grad.dtype)), target, n


@register("guidedbackprop")
class GuidedBackprop(Explainer):
    rectifier = None
    needs_gradients = True

    def __init__(self, model, *, reduce: str = "sum_abs", score: str = "logit", **options):
        super().__init__(model, **options)
        self.reduce = check_reduction(reduce)
        self.score = check_score(score)

    def _explain_raw(self, x, target, guard):
        grad, target, n = guided_gradients(self.model, x, target, guard, self.score)
        return reduce_channels(grad, self.reduce), target, {"guided_relus": n}


@register("guidedgradcam")
class GuidedGradCAM(GradCAM):
    """Guided backprop times the upsampled ReLU'd Grad-CAM of the layer, per colour channel,
    then reduced to a map (default |sum over channels|, as the paper's code via captum)."""

    rectifier = None

    def __init__(self, model, layer="stage1", *, reduce: str = "sum_abs", **options):
        super().__init__(model, layer, **options)
        self.reduce = check_reduction(reduce)

    def _layer_maps(self, x, target, layers, guard):
        cams, target, rank = super()._layer_maps(x, target, layers, guard)
        grad, target, _ = guided_gradients(self.model, x, target, guard, self.score)
        size = tuple(x.shape[-2:])
        maps = []
        for cam, layer in zip(cams, layers):
            up = upsample(rectify(cam, "relu"), size, self.interpolation, self.cells(layer))
            maps.append(reduce_channels(grad * up[:, None], self.reduce))
        return maps, target, rank
