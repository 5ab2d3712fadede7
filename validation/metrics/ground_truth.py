"""Ground-truth score: cosine similarity between the flattened map and the (soft) mask."""
from __future__ import annotations

import torch

from ._checks import EMPTY_MASK, ZERO_MAP, check_maps, finish

__all__ = ["gt_cosine"]


def gt_cosine(maps: torch.Tensor, gt: torch.Tensor, *, return_reasons: bool = False):
    """cos(L, G) per sample, in [0, 1] for maps and masks in [0, 1]; G is the alpha mask as given.

    NaN with reason ``zero_map`` for an all-zero map and ``empty_mask`` for an all-zero mask.
    """
    maps = check_maps(maps)
    gt = check_maps(gt, "gt", shape=maps.shape)
    a, b = maps.flatten(1).double(), gt.flatten(1).double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    value = (a * b).sum(1) / (na * nb).where((na > 0) & (nb > 0), torch.ones_like(na))
    return finish(value.clamp(0, 1).to(maps.dtype), [(EMPTY_MASK, nb <= 0), (ZERO_MAP, na <= 0)], return_reasons)
