"""Shape geometry and anti-aliased coverage.

Each shape is a signed distance field ``sd`` (negative inside; polygons use the max of their
edge half-plane distances, which keeps corners sharp). Pixels whose centre is farther than
sqrt(1/2) + 1/8 px from the boundary are fully in or out; the boundary pixels are supersampled
4 x 4, each sub-sample with a box ramp ``clip(0.5 - 4 sd, 0, 1)`` of a quarter pixel. The
result is the pixel's area coverage to within a few thousandths of a pixel per corner, so the
alpha of a circle or square sums to its analytic area (tests: within 1 %). Empty shapes are
the difference of the outer coverage and the coverage of the shape shrunk by the stroke width
(an inward stroke).

Only the shape's bounding box is evaluated, and only its boundary pixels are supersampled.
"""

from __future__ import annotations

import math

import numpy as np

from shapesynth import CLASS_NAMES

KINDS: tuple[str, ...] = ("circle", "square", "triangle")


def class_geometry(label: int) -> tuple[str, bool]:
    """(kind, filled) of a class index."""
    name = CLASS_NAMES[label]
    filled, kind = name.split("_")
    return kind, filled == "filled"


def circumradius(size: float) -> float:
    """Radius around the centre that holds every class of this size at any rotation.

    Circle: size/2; square: half-diagonal size/sqrt(2); triangle (base = height = size, rotated
    about the centre of its bounding box): base corners at size/sqrt(2).
    """
    return size / math.sqrt(2.0)


def hole_px(kind: str, size: float, stroke: float) -> float:
    """Width across the hole of an empty shape: the diameter of the circle inscribed in it.

    The inward stroke shrinks a circle or square to one of side ``size - 2 stroke`` and the
    triangle (base = height = size, inradius size / (1 + sqrt 5) ~ 0.31 size) to a similar
    triangle of inradius ``inradius - stroke``; zero or less means the empty shape is drawn
    exactly like the filled one.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown shape kind {kind!r} (known: {KINDS})")
    inradius = size / (1.0 + math.sqrt(5.0)) if kind == "triangle" else size / 2.0
    return 2.0 * (inradius - stroke)


def _triangle_local(size: float) -> np.ndarray:
    h = size / 2.0
    return np.array([[0.0, -h], [h, h], [-h, h]])  # apex, base right, base left (clockwise in y-down)


def polygon_vertices(kind: str, size: float, angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """Vertices (N, 2) as (x, y) in pixel coordinates, for drawing outlines and tests."""
    if kind == "square":
        h = size / 2.0
        local = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif kind == "triangle":
        local = _triangle_local(size)
    else:
        raise ValueError(f"{kind!r} is not a polygon")
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.array([cx, cy])


def _signed_distance(kind: str, size: float, angle_deg: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) at offsets (dx, dy) from the centre."""
    if kind == "circle":
        return np.sqrt(dx * dx + dy * dy) - np.float32(size / 2.0)
    t = math.radians(angle_deg)
    c, s = np.float32(math.cos(t)), np.float32(math.sin(t))
    if kind == "square":
        u = dx * c + dy * s
        v = dy * c - dx * s
        return np.maximum(np.abs(u), np.abs(v)) - np.float32(size / 2.0)
    if kind == "triangle":
        verts = _triangle_local(size)
        sd = None
        for k in range(3):
            (x0, y0), (x1, y1) = verts[k], verts[(k + 1) % 3]
            ex, ey = x1 - x0, y1 - y0
            norm = math.hypot(ex, ey)
            # outward normal of a clockwise (y-down) polygon edge, then rotated with the shape
            nx, ny = ey / norm, -ex / norm
            off = nx * x0 + ny * y0
            rnx, rny = np.float32(nx * c - ny * s), np.float32(nx * s + ny * c)
            d = dx * rnx + dy * rny - np.float32(off)
            sd = d if sd is None else np.maximum(sd, d)
        return sd
    raise ValueError(f"unknown shape kind {kind!r} (known: {KINDS})")


_SUPERSAMPLE = 4  # sub-samples per axis on boundary pixels
_SUB_OFFSETS = ((np.arange(_SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE - 0.5).astype(np.float32)
_EDGE = np.float32(math.sqrt(0.5) + 0.5 / _SUPERSAMPLE + 1e-3)


def quantize_alpha(alpha: np.ndarray) -> np.ndarray:
    """Round alpha to multiples of 1/255 so that its 8-bit storage is lossless."""
    return (np.rint(alpha * np.float32(255.0)) / np.float32(255.0)).astype(np.float32)


def coverage(
    label: int,
    size: int,
    angle_deg: float,
    cx: float,
    cy: float,
    image_size: int,
    stroke: int,
) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """Anti-aliased coverage of one shape inside its bounding box.

    Returns ``(y0, y1, x0, x1)``, ``mask`` (the ground-truth alpha: the stroke for empty shapes)
    and ``region`` (the filled region, interior included), both float32 quantised to k/255.
    """
    kind, filled = class_geometry(label)
    r = circumradius(size) + 1.0
    x0, x1 = max(0, int(math.floor(cx - r))), min(image_size, int(math.ceil(cx + r)))
    y0, y1 = max(0, int(math.floor(cy - r))), min(image_size, int(math.ceil(cy + r)))
    dx = np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx)
    dy = np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy)
    sd = _signed_distance(kind, size, angle_deg, dx[None, :], dy[:, None])
    offsets = [0.0] if filled else [0.0, float(stroke)]  # outer boundary, inner boundary
    # pixels away from every boundary are fully in or out (sd is 1-Lipschitz, so a pixel the
    # boundary or a sub-sample ramp touches has |sd + offset| <= EDGE at its centre)
    edge = np.zeros(sd.shape, bool)
    for off in offsets:
        edge |= np.abs(sd + np.float32(off)) <= _EDGE
    ys, xs = np.nonzero(edge)
    sub = _SUB_OFFSETS
    sd_sub = _signed_distance(
        kind, size, angle_deg, dx[xs][:, None, None] + sub[None, None, :], dy[ys][:, None, None] + sub[None, :, None]
    )
    covs = []
    for off in offsets:
        cov = (sd + np.float32(off) < 0).astype(np.float32)
        ramp = np.clip(np.float32(0.5) - (sd_sub + np.float32(off)) * np.float32(_SUPERSAMPLE), 0.0, 1.0)
        cov[ys, xs] = ramp.mean(axis=(1, 2))
        covs.append(quantize_alpha(cov))
    region = covs[0]
    mask = region if filled else quantize_alpha(region - covs[1])  # both on the k/255 grid
    return (y0, y1, x0, x1), mask, region
