"""ShapleyCAM (Cai et al. 2025): w_k = mean_ij(g - 1/2 (H A)), L = ReLU(sum_k w_k A_k), with H A the
real Hessian-vector product d(g . A)/dA taken by double backward. (The RefineCAM paper's code
lost this term; for a head that is piecewise linear in A, H A = 0 and ShapleyCAM = Grad-CAM.)"""

from __future__ import annotations

import torch

from .base import to_nchw
from .cam import GradientCAM
from .registry import register


def hessian_vector_product(grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """H A at one layer: d(grad . A)/dA with A held fixed as the vector (grad built with create_graph)."""
    if not grad.requires_grad:  # the gradient does not depend on A: the Hessian is zero
        return torch.zeros_like(act)
    (hvp,) = torch.autograd.grad(grad, act, grad_outputs=act.detach(), retain_graph=True, allow_unused=True)
    return torch.zeros_like(act) if hvp is None else hvp


@register("shapleycam")
class ShapleyCAM(GradientCAM):
    """Explains ShapleyCAM's ReST score (logit + log-softmax) by default, as its authors do: the
    logit of a ReLU network is piecewise linear in A, so with ``score="logit"`` H A = 0 and the
    method is Grad-CAM."""

    create_graph = True

    def __init__(self, model, layer="stage1", *, score: str = "rest", **options):
        super().__init__(model, layer, score=score, **options)

    @staticmethod
    def weights(g: torch.Tensor, hvp: torch.Tensor) -> torch.Tensor:
        return (g - 0.5 * hvp).mean(dim=(2, 3), keepdim=True)

    def _layer_maps(self, x, target, layers, guard):
        with torch.enable_grad():
            acts, grads, target, rank = self.forward_backward(x, target, layers, guard)
            # one double backward per layer: a joint call would add cross-layer terms
            hvps = [hessian_vector_product(g, a) for g, a in zip(grads, acts)]
        maps = []
        for a, g, h, layer in zip(acts, grads, hvps, layers):
            A, G, H = (to_nchw(t.detach(), layer, x.shape[-2:]) for t in (a, g, h))
            maps.append((self.weights(G, H) * A).sum(dim=1))
        return maps, target, rank
