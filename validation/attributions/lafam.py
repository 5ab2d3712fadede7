"""LaFAM (Karjauv et al. 2024): M = Up(N(mean_k A_k)) at the chosen layer. One forward pass, no
labels, no gradients, no ReLU; the forward pass stops after the deepest requested layer. Unlike
the other methods, a module that runs twice is not refused: its first output is used, also when
several layers are requested. (Our pipeline upsamples then min-maxes, which equals
N(Up(N(mean A))); with nearest upsampling it is exactly Up(N(mean A)).)"""

from __future__ import annotations

import torch

from .base import LayerExplainer, to_nchw
from .registry import register


@register("lafam")
class LaFAM(LayerExplainer):
    rectifier = None

    def _layer_maps(self, x, target, layers, guard):
        capture = guard.capture(layers, stop_early=True)
        with torch.no_grad():
            capture.forward(self.model, x)
        maps = [to_nchw(a, layer, x.shape[-2:]).mean(dim=1) for a, layer in zip(capture.raw(), layers)]
        return maps, target, capture.depth_rank()
