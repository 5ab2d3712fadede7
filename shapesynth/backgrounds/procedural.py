"""Built-in procedural clutter: dense, colourful, multi-scale, and free of clean shapes.

A base background is layered from a smooth multi-octave colour field, irregular blobs (polygons
of 40+ vertices whose radius wobbles with random low harmonics, so never a circle, square or
triangle), curved spline strokes, warped stripe textures inside blob-shaped windows, and pixel
noise. Knobs (all in `SynthConfig`): ``clutter`` (element count), ``clutter_scale`` (element
size), ``clutter_contrast`` (strength of elements and noise over the smooth field), ``clutter_saturation``,
``clutter_blur`` and ``clutter_noise``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from shapesynth.config import SynthConfig
from shapesynth.streams import named_stream

_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_ONE = 1 << _SHIFT


def _colour_field(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth multi-octave colour noise in [0, 255], float32 (side, side, 3)."""
    field = np.zeros((side, side, 3), np.float32)
    amp = 1.0
    for cells in (2, 4, 8, 16):
        coarse = rng.random((cells + 1, cells + 1, 3), dtype=np.float32)
        field += amp * cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC)
        amp *= 0.55
    lo, hi = field.min(axis=(0, 1)), field.max(axis=(0, 1))
    return (field - lo) / np.maximum(hi - lo, 1e-6) * 255.0


def _random_colours(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    return [tuple(c) for c in rng.integers(0, 256, (n, 3)).tolist()]


def _wobbly_blobs(rng: np.random.Generator, n: int, side: float, r_lo: float, r_hi: float) -> list[np.ndarray]:
    """n irregular blobs: 48-vertex polygons whose radius wobbles with harmonics 2-6.

    The harmonic amplitudes keep them far from circles, the stretch and rotation from any
    regular polygon.
    """
    if n <= 0:
        return []
    k = 48
    t = np.linspace(0.0, 2 * math.pi, k, endpoint=False)
    harmonics = np.arange(2, 7)
    amp = rng.uniform(0.12, 0.35, (n, harmonics.size)) / np.sqrt(harmonics)
    phase = rng.uniform(0, 2 * math.pi, (n, harmonics.size))
    r = 1.0 + (amp[:, :, None] * np.cos(harmonics[None, :, None] * t + phase[:, :, None])).sum(1)
    r *= rng.uniform(r_lo, r_hi, (n, 1))
    stretch = rng.uniform(0.45, 1.0, (n, 1))
    rot = rng.uniform(0, 2 * math.pi, (n, 1))
    cx, cy = rng.uniform(-0.05 * side, 1.05 * side, (2, n, 1))
    u, v = r * np.cos(t), stretch * r * np.sin(t)
    x = cx + u * np.cos(rot) - v * np.sin(rot)
    y = cy + u * np.sin(rot) + v * np.cos(rot)
    pts = np.round(np.stack([x, y], axis=2) * _ONE).astype(np.int32)
    return list(pts)


def _splines(rng: np.random.Generator, n: int, side: float, l_lo: float, l_hi: float) -> list[np.ndarray]:
    """n Catmull-Rom curves through 5 wandering control points (no straight segments)."""
    if n <= 0:
        return []
    k = 5
    length = rng.uniform(l_lo, l_hi, (n, 1))
    turns = rng.uniform(0.4, 1.3, (n, k - 1)) * rng.choice([-1.0, 1.0], (n, k - 1))
    heading = rng.uniform(0, 2 * math.pi, (n, 1)) + np.cumsum(turns, axis=1)
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=2) * (length / (k - 1))[:, :, None]
    start = rng.uniform(0, side, (n, 1, 2))
    ctrl = np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1)  # (n, k, 2)
    p = np.concatenate([ctrl[:, :1], ctrl, ctrl[:, -1:]], axis=1)
    s = np.linspace(0, 1, 10, endpoint=False)[None, None, :, None]
    p0, p1, p2, p3 = p[:, :-3, None], p[:, 1:-2, None], p[:, 2:-1, None], p[:, 3:, None]
    curve = 0.5 * (
        2 * p1
        + (-p0 + p2) * s
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
        + (-p0 + 3 * p1 - 3 * p2 + p3) * s**3
    )
    return list(np.round(curve.reshape(n, -1, 2) * _ONE).astype(np.int32))


def _stripes(rng: np.random.Generator, side: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A warped stripe texture in [0, 1], float32, over the box (x, y, w, h) of a side x side canvas."""
    x, y, w, h = box
    yy, xx = np.mgrid[y : y + h, x : x + w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    freq = rng.uniform(0.25, 0.9)
    warp = cv2.resize(rng.random((5, 5), dtype=np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) * freq + warp[y : y + h, x : x + w] * rng.uniform(3, 9)
    return 0.5 + 0.5 * np.sin(phase)


def render_base(cfg: SynthConfig, split: str, index: int, side: int) -> np.ndarray:
    """One base background (side x side x 3, uint8), a pure function of (cfg, split, index)."""
    rng = named_stream(cfg.seed, "procedural", split, index)
    smooth = _colour_field(rng, side)
    canvas = smooth.copy()
    area_scale = (side / 128.0) ** 2 * cfg.clutter
    size_scale = side / 128.0 * cfg.clutter_scale

    # textures: warped stripes shown through a few blob-shaped windows
    for blob in _wobbly_blobs(rng, int(round(rng.uniform(1, 3) * area_scale)), side, 12 * size_scale, 30 * size_scale):
        window = np.zeros((side, side), np.uint8)
        cv2.fillPoly(window, [blob], 255, cv2.LINE_AA, _SHIFT)
        x, y, w, h = box = cv2.boundingRect(window)
        tex = _stripes(rng, side, box)[..., None]
        c0, c1 = np.array(_random_colours(rng, 2), np.float32)
        if w == 0 or h == 0:
            continue
        a = window[y : y + h, x : x + w, None].astype(np.float32) / 255.0
        region = canvas[y : y + h, x : x + w]
        canvas[y : y + h, x : x + w] = region * (1 - a) + (c0 * tex + c1 * (1 - tex)) * a

    layer = np.clip(canvas, 0, 255).astype(np.uint8)
    # blobs at two scales, large first
    for lo, hi, count in ((14, 28, 5), (6, 13, 10)):
        n = int(round(count * area_scale))
        for blob, colour in zip(_wobbly_blobs(rng, n, side, lo * size_scale, hi * size_scale), _random_colours(rng, n)):
            cv2.fillPoly(layer, [blob], colour, cv2.LINE_AA, _SHIFT)
    # curved strokes: long thick ones, then short squiggles for the fine scale
    for lo, hi, count, t_max in ((30, 90, 12, 4), (6, 16, 24, 2)):
        n = int(round(count * area_scale))
        curves = _splines(rng, n, side, lo * size_scale, hi * size_scale)
        widths = rng.integers(1, max(1, round(t_max * size_scale)) + 1, max(n, 1)).tolist()
        for curve, colour, width in zip(curves, _random_colours(rng, n), widths):
            cv2.polylines(layer, [curve], False, colour, int(width), cv2.LINE_AA, _SHIFT)

    out = layer.astype(np.float32)
    if cfg.clutter_noise > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(255.0 * cfg.clutter_noise)
    if cfg.clutter_contrast < 1:
        out = smooth + cfg.clutter_contrast * (out - smooth)
    if cfg.clutter_saturation < 1:
        grey = out.mean(axis=2, keepdims=True)
        out = grey + cfg.clutter_saturation * (out - grey)
    if cfg.clutter_blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), cfg.clutter_blur)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
