"""`ShapeSynth`: render sample i of a split as a pure function of (config, split, i, epoch).

``image = background * (1 - alpha) + colour * alpha`` with ``alpha`` the anti-aliased shape
coverage quantised to k/255; that alpha IS the ground-truth mask, so it can be stored losslessly
as 8-bit and the image can be recomposed from (background, colour, mask) to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from shapesynth import CLASS_NAMES
from shapesynth.backgrounds import BackgroundPool, build_pools, draw_background
from shapesynth.config import SynthConfig
from shapesynth.shapes import circumradius, class_geometry, coverage
from shapesynth.streams import SampleDraws, as_int, balanced_labels, check_count, uniform_int

_MAX_CONTRAST = 255.0 * math.sqrt(3.0)


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # float32 (H, W): the compositing alpha, the ground truth (stroke for empty shapes)
    region: np.ndarray  # float32 (H, W): the filled region, interior included
    label: int
    meta: dict
    background: np.ndarray = field(repr=False)  # uint8 (H, W, 3): the background alone
    colour: tuple[int, int, int] = (0, 0, 0)

    @property
    def binary_mask(self) -> np.ndarray:
        """The mask thresholded at alpha >= 0.5 (bool)."""
        return self.mask >= 0.5

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


@dataclass(frozen=True)
class Placement:
    """Everything drawn for a sample except its class and colour."""

    split: str
    index: int
    epoch: int
    label: int
    band: int
    size: int
    angle: float
    cx: float
    cy: float
    background: np.ndarray
    bg_meta: dict
    draws: SampleDraws = field(repr=False, compare=False)


def colour_contrast(colour: np.ndarray, background: np.ndarray, alpha: np.ndarray) -> float:
    """Alpha-weighted mean RGB distance of the colour to the background under it, in [0, 1]."""
    diff = background.astype(np.float32) - colour.astype(np.float32)
    dist = np.sqrt((diff * diff).sum(axis=2))
    total = float(alpha.sum())
    return float((dist * alpha).sum() / (total * _MAX_CONTRAST)) if total > 0 else 0.0


class ShapeSynth:
    """The generator.

    Background pools are built on first use and memoised per pool-relevant config (see
    `shapesynth.backgrounds.build_pools`), so instances with the same recipe share them.
    """

    def __init__(self, config: SynthConfig | None = None, pools: dict[str, BackgroundPool] | None = None):
        if config is not None and not isinstance(config, SynthConfig):  # a dict failed later, in an attribute
            raise TypeError(f"config must be a SynthConfig (e.g. SynthConfig.from_dict(...)), "
                            f"got {type(config).__name__}")
        self.config = config if config is not None else SynthConfig()
        if pools is not None:
            self.__dict__["pools"] = pools
        self._labels: dict[tuple[str, int, int], np.ndarray] = {}

    @cached_property
    def pools(self) -> dict[str, BackgroundPool]:
        return build_pools(self.config)

    # ------------------------------------------------------------------ draws
    def labels(self, split: str, epoch: int = 0, n: int | None = None) -> np.ndarray:
        """The balanced, shuffled labels of a split of n samples (default: its configured size)."""
        # checked, not int()-ed: int(2.5) made a split of 2, n = -1 failed inside numpy, NaN named nothing
        n = self.config.split_size(split) if n is None else check_count("n", n)
        key = (split, check_count("epoch", epoch), n)
        if key not in self._labels:
            self._labels[key] = balanced_labels(self.config.seed, split, epoch, n, len(CLASS_NAMES))
        return self._labels[key]

    def placement(self, split: str, i: int, epoch: int = 0, n: int | None = None) -> Placement:
        cfg = self.config
        labels = self.labels(split, epoch, n)
        i = as_int("i", i)
        if not 0 <= i < len(labels):
            raise IndexError(f"sample {i} is outside split {split!r} of {len(labels)} samples")
        draws = SampleDraws(cfg.seed, split, epoch, i)
        band = cfg.draw_band(float(draws.uniforms("band")[0]))
        lo, hi = cfg.band_px(band)
        size = uniform_int(draws.uniforms("size")[0], lo, hi + 1)
        angle = float(draws.uniforms("angle")[0]) * 360.0
        # the keep-inside radius is the same for every class, so position cannot leak the label
        r = circumradius(size) + cfg.margin_px
        cx, cy = (r + draws.uniforms("position") * (cfg.image_size - 2 * r)).tolist()
        background, bg_meta = draw_background(self.pools[split], draws.uniforms("background"), cfg)
        return Placement(split, i, epoch, int(labels[i]), band, size, angle, cx, cy, background, bg_meta, draws)

    # ------------------------------------------------------------------ rendering
    def render(self, p: Placement, label: int | None = None, colour: tuple[int, int, int] | None = None) -> Sample:
        """Render a placement as its own class (or `label`), drawing (or reusing) the colour."""
        cfg = self.config
        label = p.label if label is None else as_int("label", label)  # int(1.7) would render class 1
        if not 0 <= label < len(CLASS_NAMES):
            raise ValueError(f"label {label} is not in 0..{len(CLASS_NAMES) - 1}")
        if colour is not None:  # out-of-range channels wrapped around in the uint8 image, (v,) broadcast as grey
            values = np.asarray(colour)
            if values.shape != (3,) or values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
                raise ValueError(f"colour must be three integers (R, G, B) in 0..255, got {colour!r}")
        stroke = cfg.stroke_px(p.size)
        (y0, y1, x0, x1), alpha, region = coverage(label, p.size, p.angle, p.cx, p.cy, cfg.image_size, stroke)
        bg_box = p.background[y0:y1, x0:x1]

        if colour is None:
            colour_arr, contrast, tries = self._pick_colour(p.draws, bg_box, alpha)
        else:
            colour_arr, tries = np.asarray(colour, dtype=np.int64), 0
            contrast = colour_contrast(colour_arr, bg_box, alpha)

        image = p.background.copy()
        a = alpha[..., None]
        box = bg_box.astype(np.float32) * (1.0 - a) + colour_arr.astype(np.float32) * a
        image[y0:y1, x0:x1] = np.rint(box).astype(np.uint8)
        s = cfg.image_size
        mask = np.zeros((s, s), np.float32)
        mask[y0:y1, x0:x1] = alpha
        full_region = np.zeros((s, s), np.float32)
        full_region[y0:y1, x0:x1] = region

        rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
        bbox = [int(cols[0]) + x0, int(rows[0]) + y0, int(cols[-1]) + x0 + 1, int(rows[-1]) + y0 + 1]
        kind, filled = class_geometry(label)
        meta = {
            "split": p.split,
            "index": p.index,
            "epoch": p.epoch,
            "seed": cfg.seed,
            "label": label,
            "class_name": CLASS_NAMES[label],
            "shape": kind,
            "filled": filled,
            "size_band": p.band,
            "size_px": p.size,
            "stroke_px": stroke if not filled else 0,
            "angle": p.angle,
            "center": [p.cx, p.cy],
            "bbox": bbox,
            "colour": [int(v) for v in colour_arr],
            "contrast": contrast,
            "contrast_met": bool(contrast >= cfg.min_contrast),
            "colour_tries": tries,
            "mask_area": float(alpha.sum()) / (s * s),
            "region_area": float(region.sum()) / (s * s),
            **p.bg_meta,
        }
        return Sample(
            image=image,
            mask=mask,
            region=full_region,
            label=label,
            meta=meta,
            background=p.background,
            colour=tuple(int(v) for v in colour_arr),
        )

    def _pick_colour(self, draws: SampleDraws, bg_box: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, float, int]:
        """The first candidate colour that meets min_contrast (else the best of max tries).

        Candidates are scored in growing batches (1, 3, 12, ...) over the shape's bounding box
        (alpha-weighted); the result is the same as trying them one by one.
        """
        cfg = self.config
        weights = (alpha / np.float32(alpha.sum() * _MAX_CONTRAST)).reshape(-1)
        under = bg_box.astype(np.float32)  # (h, w, 3); pixels outside the shape weigh 0
        candidates = draws.colours()
        best, best_contrast, tried = None, -1.0, 0
        while tried < cfg.max_colour_tries:
            k = min(1 if tried == 0 else 3 if tried == 1 else 12, cfg.max_colour_tries - tried)  # most pass at once
            batch = np.stack([next(candidates) for _ in range(k)])
            diff = under[None] - batch[:, None, None, :].astype(np.float32)  # (k, h, w, 3)
            diff *= diff
            dist = np.sqrt(diff[..., 0] + diff[..., 1] + diff[..., 2]).reshape(k, -1)
            contrasts = dist @ weights
            met = np.flatnonzero(contrasts >= cfg.min_contrast)
            if met.size:
                j = int(met[0])
                return batch[j], float(contrasts[j]), tried + j + 1
            j = int(np.argmax(contrasts))
            if contrasts[j] > best_contrast:
                best, best_contrast = batch[j], float(contrasts[j])
            tried += k
        return best, best_contrast, tried

    def sample(self, split: str, i: int, epoch: int = 0, n: int | None = None) -> Sample:
        """Sample i of a split (of n samples; default the configured split size)."""
        return self.render(self.placement(split, i, epoch, n))

    # ------------------------------------------------------------------ counterfactuals
    def background_only(self, split: str, i: int, epoch: int = 0, n: int | None = None) -> np.ndarray:
        """The exact background sample i was composited on (uint8 H x W x 3)."""
        return self.placement(split, i, epoch, n).background.copy()

    def counterfactual(self, split: str, i: int, label: int, epoch: int = 0, n: int | None = None) -> Sample:
        """Sample i re-rendered as class `label`: same background, size, angle, centre and colour."""
        p = self.placement(split, i, epoch, n)
        original = self.render(p)
        cf = self.render(p, label=label, colour=original.colour)
        cf.meta["counterfactual_of"] = original.meta["label"]
        return cf
