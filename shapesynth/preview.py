"""A PNG grid of samples with their mask contours, for people who would rather look."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from shapesynth import CLASS_NAMES
from shapesynth.config import ConfigError
from shapesynth.readers import open_split
from shapesynth.schema import atomic_write
from shapesynth.writers import OutputError


def draw_tile(image: np.ndarray, mask: np.ndarray, label: int, scale: int = 2) -> np.ndarray:
    """The image upscaled, with the mask's alpha = 0.5 contour and the class name."""
    h, w = mask.shape
    big = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    m = cv2.resize((mask >= 0.5).astype(np.uint8), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(big, contours, -1, (0, 0, 0), 3)
    cv2.drawContours(big, contours, -1, (255, 255, 255), 1)
    text = CLASS_NAMES[label].replace("_", " ")
    font_scale = 0.35 * scale * w / 128
    cv2.putText(big, text, (4, 14 * scale * w // 256 + 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(big, text, (4, 14 * scale * w // 256 + 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA)
    return big


def grid(tiles: list[np.ndarray], columns: int, pad: int = 4) -> np.ndarray:
    th, tw = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    out = np.full((rows * (th + pad) + pad, columns * (tw + pad) + pad, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        out[pad + r * (th + pad) : pad + r * (th + pad) + th, pad + c * (tw + pad) : pad + c * (tw + pad) + tw] = tile
    return out


def preview_array(data: str | Path, split: str = "train", per_class: int = 3, scale: int = 2) -> np.ndarray:
    """per_class samples of every class (the first ones of the split), one row per class."""
    for name, value in (("per_class", per_class), ("scale", scale)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} ({flag}) must be an int >= 1, got {value!r}")
    records = open_split(data, split, allow_incomplete=True)  # a preview may look at a run in progress
    picked: dict[int, list[int]] = {k: [] for k in range(len(CLASS_NAMES))}
    labels = records._labels if records.table is not None else [r["label"] for r in records.files]
    for i, label in enumerate(labels):
        if len(picked[int(label)]) < per_class:
            picked[int(label)].append(i)
        if all(len(v) >= per_class for v in picked.values()):
            break
    rows = []
    for label in range(len(CLASS_NAMES)):
        row = []
        for i in picked[label]:
            image, mask, _, lab, _ = records[i]
            row.append(draw_tile(image, mask, lab, scale))
        rows.append(row)
    drawn = [tile for row in rows for tile in row]
    if not drawn:
        raise OutputError(f"split {split!r} of {data} is empty: nothing to preview")
    # a class with fewer samples keeps its row: blank tiles fill it up
    blank = np.full_like(drawn[0], 255)
    return grid([tile for row in rows for tile in row + [blank] * (per_class - len(row))], columns=per_class)


def write_preview(data: str | Path, out: str | Path, split: str = "train", per_class: int = 3, scale: int = 2) -> Path:
    arr = preview_array(data, split, per_class, scale)
    ok, buf = cv2.imencode(".png", arr[..., ::-1])
    if not ok:  # pragma: no cover
        raise ValueError("cannot encode the preview")
    atomic_write(out, buf.tobytes())
    return Path(out)
