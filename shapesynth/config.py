"""`SynthConfig`: every knob of the generator in one serialisable dataclass.

A sample is a pure function of (config, split, i, epoch), so the config is also the recipe: it
is written next to every generated dataset and into its card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shapesynth.shapes import KINDS, hole_px
from shapesynth.streams import uniform_int

SPLITS: tuple[str, ...] = ("train", "val", "test")

# An empty shape's hole must be at least this wide (px) or, under anti-aliasing, the outline
# renders like the filled shape and the label is noise.
MIN_HOLE_PX = 1.0

# The paper's bands on a 256 px canvas: 80-99, 40-49 and 20-24 px.
PAPER_SIZE_BANDS: tuple[tuple[float, float], ...] = (
    (80 / 256, 99 / 256),
    (40 / 256, 49 / 256),
    (20 / 256, 24 / 256),
)


# Procedural clutter knobs at the two ends of the difficulty scale; `SynthConfig.with_difficulty`
# interpolates between them. The defaults are the midpoint ("medium"): dense and colourful, yet
# learnable from scratch at 128 px in minutes.
EASY_CLUTTER: dict[str, float] = {
    "clutter": 0.3,
    "clutter_contrast": 0.5,
    "clutter_saturation": 0.6,
    "clutter_noise": 0.02,
    "min_contrast": 0.35,
}
HARD_CLUTTER: dict[str, float] = {
    "clutter": 1.0,
    "clutter_contrast": 1.0,
    "clutter_saturation": 1.0,
    "clutter_noise": 0.04,
    "min_contrast": 0.25,
}
DIFFICULTY_PRESETS: dict[str, float] = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


class ConfigError(ValueError):
    """A configuration that cannot produce a valid dataset (the message names the field)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_list(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


_INT_FIELDS = ("image_size", "seed", "min_stroke_px", "max_colour_tries")
_FLOAT_FIELDS = (
    "stroke_fraction", "margin_px", "min_contrast", "bg_base_scale", "bg_jitter", "clutter",
    "clutter_contrast", "clutter_saturation", "clutter_blur", "clutter_noise", "clutter_scale",
)
_BOOL_FIELDS = ("bg_strict", "bg_flip", "bg_channel_shuffle")
_STR_FIELDS = ("background", "bg_small")
_OPTIONAL_STR_FIELDS = ("bg_path", "bg_hf_split", "bg_image_column")
_MAPPING_FIELDS = ("split_sizes", "bg_pool_sizes", "bg_pool_fractions")


def difficulty_knobs(level: float | str) -> dict[str, float]:
    """The clutter knobs of a difficulty in [0, 1] or a preset name (see `SynthConfig.with_difficulty`)."""
    if isinstance(level, str):
        try:
            level = DIFFICULTY_PRESETS[level]
        except KeyError:
            raise ConfigError(f"unknown difficulty {level!r} (known: {sorted(DIFFICULTY_PRESETS)})") from None
    if not _is_number(level) or not 0.0 <= float(level) <= 1.0:
        raise ConfigError(f"difficulty must be in [0, 1], got {level!r}")
    t = float(level)
    return {k: round(EASY_CLUTTER[k] + t * (HARD_CLUTTER[k] - EASY_CLUTTER[k]), 6) for k in EASY_CLUTTER}


def read_config_text(path, expected: str) -> str:
    """The text of the config file ``path``; a folder (described against ``expected``, what the
    file should be) or a file that cannot be read as text is a ConfigError naming it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder, not {expected}")
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} cannot be read as text ({err})") from None


MAX_IMAGE_SIZE = 4096  # px; the papers use 224


def _default_split_sizes() -> dict[str, int]:
    return {"train": 4096, "val": 256, "test": 600}


def _default_pool_sizes() -> dict[str, int]:
    return {"train": 256, "val": 32, "test": 64}


def _default_pool_fractions() -> dict[str, float]:
    return {"train": 0.8, "val": 0.05, "test": 0.15}


@dataclass
class SynthConfig:
    """Generator configuration.

    Shapes: ``size_bands`` are (low, high) fractions of ``image_size``; a size in pixels is drawn
    uniformly from the integers of the chosen band. Empty shapes draw an inward stroke of width
    ``max(min_stroke_px, floor(size * stroke_fraction))`` (the paper's ``size // 5``).
    ``size_band_weights`` (one non-negative weight per band, None: equal) sets how often each band
    is drawn, e.g. to over-sample the small band in training while testing on equal bands.

    Backgrounds: ``background`` names the source (``procedural``, ``folder``, ``hf``); see
    ``docs/shapesynth.md``. The ``clutter_*`` knobs set the difficulty of the procedural source.
    """

    image_size: int = 128
    seed: int = 0
    split_sizes: dict[str, int] = field(default_factory=_default_split_sizes)

    # shapes
    size_bands: tuple[tuple[float, float], ...] = PAPER_SIZE_BANDS
    size_band_weights: tuple[float, ...] | None = None
    stroke_fraction: float = 0.2
    min_stroke_px: int = 1
    margin_px: float = 1.0  # free pixels between the shape's circumcircle and the border
    min_contrast: float = 0.3  # mean normalised RGB distance of the colour to the background under it
    max_colour_tries: int = 64

    # backgrounds (all sources)
    background: str = "procedural"
    bg_path: str | None = None  # folder / HF dataset path or Hub name
    bg_split_paths: dict[str, str] | None = None  # {"train": dir, "test": dir, ...} instead of bg_path
    bg_hf_split: str | None = None  # HF split to draw from (None: the dataset's train/val/test splits
    # as the pools when it has train and test, else all splits pooled and dealt by hash)
    bg_image_column: str | None = None  # HF image column (None: the first Image feature)
    bg_pool_sizes: dict[str, int] = field(default_factory=_default_pool_sizes)
    bg_pool_fractions: dict[str, float] = field(default_factory=_default_pool_fractions)
    bg_small: str = "refuse"  # backgrounds smaller than the crop: "refuse" or "upscale"
    bg_strict: bool = False  # corrupt background files: error instead of skip-and-count
    bg_base_scale: float = 1.25  # procedural bases are this much larger than the image (crop room)
    bg_flip: bool = True
    bg_jitter: float = 0.2  # brightness / contrast / saturation jitter amplitude per sample
    bg_channel_shuffle: bool = True  # random RGB channel permutation per sample

    # procedural clutter difficulty
    # (defaults: difficulty 0.5, "medium"; see `with_difficulty`)
    clutter: float = 0.65  # element density multiplier (0: smooth colour field and noise only)
    clutter_contrast: float = 0.75  # 0..1: strength of the clutter (and noise) over its smooth field; 0: the field alone
    clutter_saturation: float = 0.8  # 0: a grey base (smooth field included), 1: full colour
    clutter_blur: float = 0.0  # Gaussian blur sigma in pixels of the finished base
    clutter_noise: float = 0.03  # per-pixel noise sigma (fraction of 255), scaled by clutter_contrast
    clutter_scale: float = 1.0  # element size multiplier

    def __post_init__(self) -> None:
        self._check_types()  # the conversions below must not fail on a wrongly typed field
        # numpy scalars and paths are accepted, but stored as the plain values JSON can hold
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), np.generic):
                setattr(self, f.name, getattr(self, f.name).item())
        if self.bg_path is not None:
            self.bg_path = os.fspath(self.bg_path)
        if self.bg_split_paths is not None:
            self.bg_split_paths = {split: os.fspath(p) for split, p in self.bg_split_paths.items()}
        self.size_bands = tuple(tuple(float(v) for v in band) for band in self.size_bands)
        if self.size_band_weights is not None:
            self.size_band_weights = tuple(float(w) for w in self.size_band_weights)
        # numpy integer counts are stored as ints (JSON); anything else is left for validate()
        self.split_sizes = {k: int(v) if _is_int(v) else v for k, v in dict(self.split_sizes).items()}
        self.bg_pool_sizes = {k: int(v) if _is_int(v) else v for k, v in dict(self.bg_pool_sizes).items()}
        self.bg_pool_fractions = dict(self.bg_pool_fractions)
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """Refuse wrongly typed, non-finite or misshapen fields before any check computes with them."""
        for knob in _INT_FIELDS:
            if not _is_int(getattr(self, knob)):
                raise ConfigError(f"{knob} must be an int, got {getattr(self, knob)!r}")
        for knob in _FLOAT_FIELDS:
            if not _is_finite(getattr(self, knob)):
                raise ConfigError(f"{knob} must be a finite number, got {getattr(self, knob)!r}")
        for knob in _BOOL_FIELDS:
            if not isinstance(getattr(self, knob), (bool, np.bool_)):
                raise ConfigError(f"{knob} must be true or false, got {getattr(self, knob)!r}")
        for knob in _STR_FIELDS:
            if not isinstance(getattr(self, knob), str):
                raise ConfigError(f"{knob} must be a string, got {getattr(self, knob)!r}")
        for knob in _OPTIONAL_STR_FIELDS:
            value = getattr(self, knob)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{knob} must be a string or null, got {value!r}")
        for knob in _MAPPING_FIELDS:
            if not isinstance(getattr(self, knob), Mapping):
                raise ConfigError(f"{knob} must map split names to values, got {getattr(self, knob)!r}")
        for name, value in self.bg_pool_fractions.items():
            if not _is_finite(value):
                raise ConfigError(f"bg_pool_fractions[{name!r}] must be a finite number, got {value!r}")
        paths = self.bg_split_paths
        if paths is not None and (
            not isinstance(paths, Mapping) or not all(isinstance(p, (str, os.PathLike)) for p in paths.values())
        ):
            raise ConfigError(f"bg_split_paths must map split names to folders (or be null), got {paths!r}")
        bands = self.size_bands
        if not _is_list(bands) or not all(_is_list(b) and len(b) == 2 and all(map(_is_finite, b)) for b in bands):
            raise ConfigError(f"size_bands must be a list of [low, high] pairs of finite fractions, got {bands!r}")
        weights = self.size_band_weights
        if weights is not None and (not _is_list(weights) or not all(map(_is_finite, weights))):
            raise ConfigError(f"size_band_weights must be a list of finite numbers (or null), got {weights!r}")

    def validate(self) -> None:
        self._check_types()
        # the upper bound keeps a mistyped size from a MemoryError deep inside rendering
        if not 16 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size must be an int in [16, {MAX_IMAGE_SIZE}], got {self.image_size!r}")
        for name, n in self.split_sizes.items():
            if name not in SPLITS:
                raise ConfigError(f"split_sizes: unknown split {name!r} (known: {SPLITS})")
            if not _is_int(n) or n < 0:
                raise ConfigError(f"split_sizes[{name!r}] must be an int >= 0, got {n!r}")
        if sum(self.split_sizes.values()) == 0:
            raise ConfigError(f"split_sizes {self.split_sizes} hold no sample: give at least one split a size >= 1")
        if not self.size_bands:
            raise ConfigError("size_bands is empty")
        # the shape checks below compute with these
        for knob in ("min_stroke_px", "max_colour_tries"):
            if getattr(self, knob) < 1:
                raise ConfigError(f"{knob} must be an int >= 1, got {getattr(self, knob)!r}")
        if not 0.0 <= self.stroke_fraction < 1.0:
            raise ConfigError(f"stroke_fraction must be in [0, 1), got {self.stroke_fraction}")
        if self.margin_px < 0:
            raise ConfigError(f"margin_px must be >= 0, got {self.margin_px}")
        for k in range(len(self.size_bands)):
            lo, hi = self.band_px(k)
            if lo > hi:
                raise ConfigError(
                    f"size_bands[{k}] = {self.size_bands[k]} holds no integer size at image_size "
                    f"{self.image_size} (pixels {self.size_bands[k][0] * self.image_size:.2f}-"
                    f"{self.size_bands[k][1] * self.image_size:.2f})"
                )
            if lo < 3:
                raise ConfigError(
                    f"size_bands[{k}] gives shapes of {lo} px at image_size {self.image_size}: "
                    "shapes need at least 3 px"
                )
            need = 2 * (hi / math.sqrt(2) + self.margin_px)
            if need > self.image_size:
                raise ConfigError(
                    f"shapes cannot fit: size_bands[{k}] allows {hi} px shapes whose rotations need "
                    f"{need:.1f} px but image_size is {self.image_size}"
                )
            for size in range(lo, hi + 1):
                stroke = self.stroke_px(size)
                hole, kind = min((hole_px(kind, size, stroke), kind) for kind in KINDS)
                if hole < MIN_HOLE_PX:
                    raise ConfigError(
                        f"size_bands[{k}]: a {size} px empty {kind} with a {stroke} px stroke has "
                        f"no interior ({hole:.2f} px across, needs >= {MIN_HOLE_PX:g}) at image_size "
                        f"{self.image_size}; lower stroke_fraction/min_stroke_px, raise the band "
                        "or the image size"
                    )
        weights = self.size_band_weights
        if weights is not None and (
            len(weights) != len(self.size_bands) or min(weights) < 0 or not math.isfinite(sum(weights))
            or sum(weights) <= 0
        ):
            raise ConfigError(
                f"size_band_weights {list(weights)} must hold one finite weight >= 0 per size band "
                f"({len(self.size_bands)} bands), not all zero"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        for name, fraction in self.bg_pool_fractions.items():
            if name not in SPLITS or not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"bg_pool_fractions[{name!r}] must be in [0, 1] for a known split {SPLITS}, "
                                  f"got {fraction!r}")
        if not 0.0 <= self.min_contrast < 1.0:
            raise ConfigError(f"min_contrast must be in [0, 1), got {self.min_contrast}")
        if self.background not in ("procedural", "folder", "hf"):
            raise ConfigError(
                f"background must be 'procedural', 'folder' or 'hf', got {self.background!r}"
            )
        if self.bg_path and self.bg_split_paths:
            raise ConfigError(
                f"bg_path ({self.bg_path!r}) and bg_split_paths ({self.bg_split_paths}) exclude each other: give "
                "one folder to deal into pools (--backgrounds) or one folder per split (--backgrounds-train/-val/-test)"
            )
        if self.background == "procedural" and (self.bg_path or self.bg_split_paths):
            raise ConfigError(
                f"background='procedural' reads no files, yet bg_path/bg_split_paths is set "
                f"({self.bg_path or self.bg_split_paths}); use background 'folder' or 'hf' (--backgrounds-source)"
            )
        if self.background == "hf" and not self.bg_path:
            raise ConfigError(
                "background='hf' needs bg_path (--backgrounds: a save_to_disk folder, a downloaded dataset repo, "
                "an imagefolder or a Hub dataset name); folders per split (bg_split_paths, --backgrounds-train/-val/-test) are for "
                "background='folder'"
            )
        if self.background == "folder" and not (self.bg_path or self.bg_split_paths):
            raise ConfigError(f"background={self.background!r} needs bg_path or bg_split_paths")
        if self.bg_small not in ("refuse", "upscale"):
            raise ConfigError(f"bg_small must be 'refuse' or 'upscale', got {self.bg_small!r}")
        for name, n in self.bg_pool_sizes.items():
            if name not in SPLITS or not _is_int(n) or n < 1:
                raise ConfigError(f"bg_pool_sizes[{name!r}] must be an int >= 1 for a known split, got {n!r}")
        # a split left out used to get one procedural base, not its default pool
        missing = [split for split in SPLITS if split not in self.bg_pool_sizes]
        if missing:
            raise ConfigError(f"bg_pool_sizes must give every split {SPLITS} a size; missing {missing} "
                              f"(defaults: {_default_pool_sizes()})")
        if self.bg_base_scale < 1.0:
            raise ConfigError(f"bg_base_scale must be >= 1, got {self.bg_base_scale}")
        for knob in ("clutter", "clutter_scale", "clutter_blur", "clutter_noise"):
            if getattr(self, knob) < 0:
                raise ConfigError(f"{knob} must be >= 0, got {getattr(self, knob)}")
        # the jitter multipliers are 1 +- bg_jitter: above 1 they turn negative and invert colours
        if not 0.0 <= self.bg_jitter <= 1.0:
            raise ConfigError(f"bg_jitter must be in [0, 1], got {self.bg_jitter}")
        for knob in ("clutter_contrast", "clutter_saturation"):
            if not 0.0 <= getattr(self, knob) <= 1.0:
                raise ConfigError(f"{knob} must be in [0, 1], got {getattr(self, knob)}")

    # ------------------------------------------------------------------ derived sizes
    def band_px(self, band: int) -> tuple[int, int]:
        lo, hi = self.size_bands[band]
        return math.ceil(lo * self.image_size - 1e-9), math.floor(hi * self.image_size + 1e-9)

    def draw_band(self, u: float) -> int:
        """The size band for a uniform ``u`` in [0, 1): equal odds, or by ``size_band_weights``."""
        if self.size_band_weights is None:
            return uniform_int(u, 0, len(self.size_bands))
        cumulative = np.cumsum(self.size_band_weights) / sum(self.size_band_weights)
        return min(int(np.searchsorted(cumulative, u, side="right")), len(self.size_bands) - 1)

    def stroke_px(self, size: int) -> int:
        return max(self.min_stroke_px, int(size * self.stroke_fraction))

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r} (known: {SPLITS})")
        return int(self.split_sizes.get(split, 0))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size_bands"] = [list(b) for b in self.size_bands]
        if self.size_band_weights is None:
            del d["size_band_weights"]  # so recipes without it keep their fingerprints
        else:
            d["size_band_weights"] = list(self.size_band_weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown SynthConfig field(s): {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    def replace(self, **changes: Any) -> SynthConfig:
        return dataclasses.replace(self, **changes)

    def with_difficulty(self, level: float | str) -> SynthConfig:
        """This config with the clutter knobs set for a difficulty in [0, 1] (or a preset name).

        0 ("easy"): sparse, faded, desaturated clutter and a higher minimum shape contrast;
        0.5 ("medium"): the defaults; 1 ("hard"): full density, contrast and colour. Levels in between interpolate every knob linearly, so a
        curriculum is ``cfg.with_difficulty(min(1, epoch / 5))``. Only backgrounds and the
        colour rule change; shapes, splits and seeds stay.
        """
        return self.replace(**difficulty_knobs(level))
