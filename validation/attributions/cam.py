"""Gradient CAMs (A = activations B x C x h x w, g = dY_c/dA), all layers from one forward and
one backward pass. Each method is its equation."""

from __future__ import annotations

import torch

from .._model_input import check_logits
from .base import LayerExplainer, check_score, class_score, layer_gradients, resolve_target, to_nchw
from .registry import register


class GradientCAM(LayerExplainer):
    """Shared pass: capture A at every requested layer, backpropagate the class score once to
    all of them (parameter gradients are never computed), then ``cam(A, g)`` per layer.

    ``score``: what is explained: "logit" (default, as pytorch-grad-cam), "softmax",
    "log_softmax" or "rest" (logit minus cross-entropy, ShapleyCAM's suggestion).
    """

    create_graph = False
    needs_gradients = True

    def __init__(self, model, layer="stage1", *, score: str = "logit", **options):
        super().__init__(model, layer, **options)
        self.score = check_score(score)

    @staticmethod
    def cam(A: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_backward(self, x, target, layers, guard):
        """(activations, gradients, target, depth ranks): activations and gradients in the layers'
        own layout (``to_nchw`` makes them NCHW), gradients with a graph if ``create_graph``."""
        capture = guard.capture(layers)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)  # a gradient path even if parameters are frozen
            logits = check_logits(self.model(x_in), x.shape[0])
            target = resolve_target(target, logits)
            score = class_score(logits, target, self.score)
            acts = capture.raw()
            capture.enabled = False  # later passes (guided backprop) must not be recorded
            grads = layer_gradients(score, acts, layers, create_graph=self.create_graph)
        rank = capture.depth_rank()
        # the backward stops at the layers, so the graph below them keeps its saved activations
        # for as long as ``acts`` live: the capture (held by its hooks until the guard closes)
        # lets go of them here, so that they go with the caller's ``acts`` and not only when
        # the call returns (Guided Grad-CAM runs its guided pass inside the same guard)
        capture.reset()
        return acts, grads, target, rank

    def _layer_maps(self, x, target, layers, guard):
        acts, grads, target, rank = self.forward_backward(x, target, layers, guard)
        size = x.shape[-2:]
        maps = [self.cam(to_nchw(a.detach(), l, size), to_nchw(g.detach(), l, size))
                for a, g, l in zip(acts, grads, layers)]
        return maps, target, rank


@register("gradcam")
class GradCAM(GradientCAM):
    """w_k = mean_ij g; L = ReLU(sum_k w_k A_k)."""

    @staticmethod
    def cam(A, g):
        w = g.mean(dim=(2, 3), keepdim=True)
        return (w * A).sum(dim=1)


@register("gradcampp", "gradcam++", "gradcamplusplus")
class GradCAMPlusPlus(GradientCAM):
    """alpha = g^2 / (2 g^2 + sum_ij(A) g^3), 0 where g = 0; w_k = sum_ij ReLU(g) alpha.

    ``eps`` = 1e-6 in the denominator, as pytorch-grad-cam, keeps the division finite where
    g != 0 but 2 g^2 + sum_ij(A) g^3 vanishes (g^2 underflowing, or sum_ij(A) g = -2). It is not
    negligible where g^2 is not large against 1e-6 (|g| ~ 1e-3 and below, common at shallow
    layers): alpha is then pulled towards 0, more so for smaller |g|, so the map
    departs from the formula and depends on the scale of the score (docs/attributions.md)."""

    eps = 1e-6

    @classmethod
    def cam(cls, A, g):
        g2 = g * g
        sum_a = A.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g2 * g + cls.eps)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (g.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
        return (w * A).sum(dim=1)


@register("layercam")
class LayerCAM(GradientCAM):
    """L = ReLU(sum_k ReLU(g) * A)."""

    @staticmethod
    def cam(A, g):
        return (g.clamp_min(0) * A).sum(dim=1)
