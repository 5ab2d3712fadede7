"""Post-processing shared by every method (Score-CAM's official variant swaps steps 1 and 2, as
its authors do), in this order:

1. rectify: ``relu`` where the method defines it (CAMs); nothing for pixel attributions (their
   ``reduce`` over channels sets the sign convention, e.g. ``sum_abs``) and for maps that are
   non-negative by construction (LaFAM, RELAX, baselines);
2. upsample to the input size: bilinear (``align_corners=False``, no antialiasing) by default,
   ``nearest`` (centre-aligned, ``nearest-exact``) on request. This stretches the grid over the
   image, centring cell i of a stride-S grid at pixel S i + (S - 1) / 2; given the layer's
   :class:`~validation.attributions.layers.CellGeometry` (``cell_centres="model"``), cell i is
   placed at the pixel the model centres it on instead (the same result where the two agree);
3. per-sample min-max to [0, 1]; a constant map (max == min up to float rounding) becomes all
   zeros and is flagged, as is a map with non-finite values: results are never NaN.

Upsampling before the min-max is equivalent to min-max then upsampling then min-max (what
pytorch-grad-cam does), because bilinear interpolation is affine and maps constants to constants.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

INTERPOLATIONS = {"bilinear": "bilinear", "nearest": "nearest-exact"}
RECTIFIERS = ("relu", "abs", None)

if TYPE_CHECKING:
    from .layers import CellGeometry


def rectify(maps: torch.Tensor, how: str | None) -> torch.Tensor:
    if how == "relu":
        return maps.clamp_min(0)
    if how == "abs":
        return maps.abs()
    if how is None:
        return maps
    raise ValueError(f"rectify must be one of {RECTIFIERS}, got {how!r}")


def upsample(maps: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear",
             cells: "CellGeometry | None" = None) -> torch.Tensor:
    """(B, h, w) -> (B, *size). ``cells``: where the model centres the grid's cells (None: the
    stretch-to-fit convention)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    if tuple(maps.shape[-2:]) == tuple(size):  # already at the input's resolution: no cells to place
        return maps
    if cells is not None:
        _check_grid_matches_stride(cells, maps.shape[-2:], size)
        if not _is_convention(cells, maps.shape[-2:], size):
            return _upsample_cells(maps, tuple(size), interpolation, cells)
    mode = INTERPOLATIONS[interpolation]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0]


def _check_grid_matches_stride(cells: "CellGeometry", grid, size) -> None:
    """A layer of stride S turns an image side of n pixels into floor(n / S) cells (valid
    pooling, patches) or ceil(n / S) (padded strided convolutions, Swin's padded merges). Any
    other count means the declared geometry is not this layer's (e.g. a hand-built network with
    fewer pools than its architecture's reference): placing its cells would shift the map
    without a sign, so refuse."""
    for axis, n_cells, n in zip(("height", "width"), grid, size):
        if not n // cells.stride <= n_cells <= -(-n // cells.stride):
            raise ValueError(
                f"cell_centres='model': the layer's grid {tuple(grid)} does not come from a "
                f"{tuple(size)} image at stride {cells.stride} ({axis}: {n_cells} cells, expected "
                f"{n // cells.stride} or {-(-n // cells.stride)}); the model is not built like the "
                f"reference architecture whose cell geometry was assumed: use cell_centres='stride'")


def _is_convention(cells: "CellGeometry", grid, size) -> bool:
    """Whether ``cells`` centres the grid's cells where stretching it over ``size`` does: then
    torch's own kernel gives the same sampling (and the default's result, bitwise)."""
    return (cells.first_centre == (cells.stride - 1) / 2
            and all(cells.stride * n == out for n, out in zip(grid, size)))


def _cell_axis(n_out: int, n_cells: int, cells: "CellGeometry", interpolation: str, like: torch.Tensor):
    """Per output pixel along one axis: (lower cell, upper cell, weight of the upper cell). Pixel
    y sits at s = (y - first_centre) / stride in cell units, clamped to the grid (the border
    value continues outwards, as ``align_corners=False`` upsampling does)."""
    y = torch.arange(n_out, device=like.device, dtype=like.dtype)
    s = ((y - cells.first_centre) / cells.stride).clamp(0, n_cells - 1)
    if interpolation == "nearest":
        # round half up, as ``nearest-exact``: a pixel midway between two centres takes the later cell
        nearest = torch.floor(s + 0.5).long().clamp_(max=n_cells - 1)
        return nearest, nearest, torch.zeros_like(s)
    lower = torch.floor(s).long()
    upper = (lower + 1).clamp_(max=n_cells - 1)
    return lower, upper, s - lower


def _upsample_cells(maps: torch.Tensor, size: tuple[int, int], interpolation: str,
                    cells: "CellGeometry") -> torch.Tensor:
    """Separable linear (or nearest) interpolation that samples the cell centres at the pixels
    ``cells`` puts them on: rows first, then columns, for the whole batch."""
    (h, w), (H, W) = maps.shape[-2:], size
    r0, r1, fr = _cell_axis(H, h, cells, interpolation, maps)
    c0, c1, fc = _cell_axis(W, w, cells, interpolation, maps)
    rows = maps[:, r0, :] * (1 - fr)[:, None] + maps[:, r1, :] * fr[:, None]  # (B, H, w)
    return rows[:, :, c0] * (1 - fc) + rows[:, :, c1] * fc  # (B, H, W)


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
             interpolation: str = "bilinear", normalize: bool = True, cells: "CellGeometry | None" = None):
    """Rectify, upsample to ``size`` (cells placed by ``cells``, see :func:`upsample`) and min-max
    a batch of raw maps (B, h, w).

    Returns (maps, degenerate flags). With ``normalize=False`` the flags are all False.
    """
    maps = rectify(raw, rectifier)
    if size is not None:
        maps = upsample(maps, size, interpolation, cells)
    if not normalize:
        return maps, torch.zeros(maps.shape[0], dtype=torch.bool, device=maps.device)
    return minmax(maps)
