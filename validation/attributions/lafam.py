"""LaFAM (Karjauv et al. 2024): M = Up(N(mean_k A_k)) at the chosen layer. One forward pass, no
labels, no gradients, no ReLU. (Our pipeline upsamples then min-maxes, which equals
N(Up(N(mean A))); with nearest upsampling it is exactly Up(N(mean A)).)"""

from __future__ import annotations

import torch

from .base import LayerExplainer, check_logits, to_nchw
from .registry import register


@register("lafam")
class LaFAM(LayerExplainer):
    rectifier = None

    def _layer_maps(self, x, target, layers, guard):
        capture = guard.capture(layers)
        with torch.no_grad():
            check_logits(self.model(x), x.shape[0])
        maps = [to_nchw(a, layer).mean(dim=1) for a, layer in zip(capture.raw(), layers)]
        return maps, target, capture.depth_rank()
