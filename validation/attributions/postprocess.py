"""Post-processing shared by every method (Score-CAM's official variant swaps steps 1 and 2, as
its authors do), in this order:

1. rectify: ``relu`` where the method defines it (CAMs); nothing for pixel attributions (their
   ``reduce`` over channels sets the sign convention, e.g. ``sum_abs``) and for maps that are
   non-negative by construction (LaFAM, RELAX, baselines);
2. upsample to the input size: bilinear (``align_corners=False``, no antialiasing) by default,
   ``nearest`` (centre-aligned, ``nearest-exact``) on request;
3. per-sample min-max to [0, 1]; a constant map (max == min up to float rounding) becomes all
   zeros and is flagged, as is a map with non-finite values: results are never NaN.

Upsampling before the min-max is equivalent to min-max then upsampling then min-max (what
pytorch-grad-cam does), because bilinear interpolation is affine and maps constants to constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INTERPOLATIONS = {"bilinear": "bilinear", "nearest": "nearest-exact"}
RECTIFIERS = ("relu", "abs", None)


def rectify(maps: torch.Tensor, how: str | None) -> torch.Tensor:
    if how == "relu":
        return maps.clamp_min(0)
    if how == "abs":
        return maps.abs()
    if how is None:
        return maps
    raise ValueError(f"rectify must be one of {RECTIFIERS}, got {how!r}")


def upsample(maps: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """(B, h, w) -> (B, *size)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    mode = INTERPOLATIONS[interpolation]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0]


def minmax(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample min-max over the last two dims. Returns (maps in [0, 1], degenerate flags (B,)).

    Degenerate = constant (span within a few ulps of the magnitude) or containing NaN/inf;
    those maps are returned as zeros.
    """
    flat = maps.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    safe = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    lo = safe.amin(dim=1)
    hi = safe.amax(dim=1)
    span = hi - lo
    scale = torch.maximum(lo.abs(), hi.abs())
    tiny = torch.finfo(maps.dtype).eps if maps.dtype.is_floating_point else 0.0
    constant = span <= 4 * tiny * scale
    degenerate = constant | ~finite
    denom = torch.where(degenerate, torch.ones_like(span), span)
    out = (safe - lo[:, None]) / denom[:, None]
    out = torch.where(degenerate[:, None], torch.zeros_like(out), out).clamp_(0, 1)
    return out.view_as(maps), degenerate


def finalize(raw: torch.Tensor, size, *, rectifier: str | None = "relu",
             interpolation: str = "bilinear", normalize: bool = True):
    """Rectify, upsample to ``size`` and min-max a batch of raw maps (B, h, w).

    Returns (maps, degenerate flags). With ``normalize=False`` the flags are all False.
    """
    maps = rectify(raw, rectifier)
    if size is not None:
        maps = upsample(maps, size, interpolation)
    if not normalize:
        return maps, torch.zeros(maps.shape[0], dtype=torch.bool, device=maps.device)
    return minmax(maps)
