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
    gt = check_maps(gt, "gt", shape=maps.shape, device=maps.device)
    # row sums in float32 (check_maps turns half maps into float32; float64 maps stay), then
    # float64 for the (B,) ratio: no float64 copies of the maps (the sums have no cancellation:
    # all terms are >= 0). Each row is divided by its maximum first (the cosine is scale-free;
    # exact for min-max'd maps and masks, whose maximum is 1), so the squares of a map of tiny
    # values cannot underflow to 0
    dtype = torch.promote_types(maps.dtype, gt.dtype)
    a, b = (_unit_max(t.flatten(1).to(dtype)) for t in (maps, gt))
    dot = torch.linalg.vecdot(a, b).double()
    na, nb = torch.linalg.vecdot(a, a).double().sqrt(), torch.linalg.vecdot(b, b).double().sqrt()
    value = dot / (na * nb).where((na > 0) & (nb > 0), torch.ones_like(na))
    return finish(value.clamp(0, 1).to(maps.dtype), [(EMPTY_MASK, nb <= 0), (ZERO_MAP, na <= 0)], return_reasons)


def _unit_max(flat: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative values divided by their maximum (all-zero rows stay zero)."""
    return flat / flat.amax(1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
