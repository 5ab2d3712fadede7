"""Row schema shared by the writers and readers, PNG codecs and atomic file writes."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from shapesynth import CLASS_NAMES

# fast zlib level, Huffman-only and fast filters: 2-3x faster than the defaults on noisy clutter, same size
PNG_PARAMS = [
    cv2.IMWRITE_PNG_COMPRESSION, 1,
    cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
    cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FAST_FILTERS,
]

# metadata columns: name -> arrow value type; "type[n]" is a fixed-length list
META_COLUMNS: dict[str, str] = {
    "index": "int64",
    "class_name": "string",
    "shape": "string",
    "filled": "bool",
    "size_band": "int32",
    "size_px": "int32",
    "stroke_px": "int32",
    "angle": "float64",
    "center_x": "float64",
    "center_y": "float64",
    "bbox": "int32[4]",
    "colour": "int32[3]",
    "contrast": "float64",
    "contrast_met": "bool",
    "colour_tries": "int32",
    "mask_area": "float64",
    "region_area": "float64",
    "bg_pool": "string",
    "bg_id": "int32",
    "bg_name": "string",
    "bg_crop": "int32[2]",
    "bg_flip": "bool[2]",
    "bg_channels": "int32[3]",
    "bg_jitter": "float64[3]",
    "seed": "int64",
}


def features():
    """The `datasets.Features` of a row: image, mask and region as Image, label as ClassLabel."""
    import datasets

    feats = {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "region": datasets.Image(),
        "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
    }
    for name, kind in META_COLUMNS.items():
        if "[" in kind:
            dtype, n = kind[:-1].split("[")
            feats[name] = datasets.Sequence(datasets.Value(dtype), length=int(n))
        else:
            feats[name] = datasets.Value(kind)
    return datasets.Features(feats)


def meta_row(meta: dict) -> dict:
    """The metadata columns of one sample (flattening its centre)."""
    row = {k: meta[k] for k in META_COLUMNS if k in meta}
    row["center_x"], row["center_y"] = meta["center"]
    return row


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image or of a [0,1] float mask (stored as k/255, lossless)."""
    if array.dtype != np.uint8:
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.ndim == 3:
        array = array[..., ::-1]  # cv2 writes BGR
    ok, buf = cv2.imencode(".png", array, PNG_PARAMS)
    if not ok:  # pragma: no cover - cv2 only fails on unsupported shapes
        raise ValueError(f"cannot encode an array of shape {array.shape} as PNG")
    return buf.tobytes()


def decode_image(data: bytes, where: str = "") -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ValueError(f"cannot decode image {where}")
    return arr[..., ::-1].copy()


def decode_mask(data: bytes, where: str = "") -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.ndim != 2:
        raise ValueError(f"cannot decode mask {where}")
    return arr.astype(np.float32) / 255.0


def process_umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux's /proc);
    elsewhere it can only be read by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~process_umask()

# mkstemp's names: "." + target name + "." + 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def is_temp_file(path: str | Path) -> bool:
    """Whether `path` is a temp file of `atomic_write` (left behind only by a killed process)."""
    path = Path(path)
    return _TEMP_NAME.fullmatch(path.name) is not None and path.is_file()


def _temp_file(path: Path, write: Callable[[str], object]) -> str:
    """A temp file beside `path` filled by ``write(temp_path)``, flushed to disk and given the
    umask's mode; removed again on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # else a power cut soon after the rename can leave an empty file
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; datasets, models and runs are meant to be shared
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _data_writer(data: bytes | str) -> Callable[[str], object]:
    return lambda tmp: Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_save(path: str | Path, write: Callable[[str], object]) -> None:
    """``write(temp_path)`` into a temp file beside `path` (".<name>.<8 chars>.tmp"), flushed to
    disk, then renamed over `path`: for writers that take a file name (torch.save, safetensors).

    A crash (of the process or the machine) leaves either the old file or no file, never a
    partial one under the final name.
    """
    path = Path(path)
    tmp = _temp_file(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """`atomic_save` of `data` (str as UTF-8)."""
    atomic_save(path, _data_writer(data))


def atomic_create(path: str | Path, data: bytes | str) -> bool:
    """`atomic_write`, but only if `path` does not exist yet; False (nothing written) if it does.

    The check and the creation are one step (a hard link of the complete temp file), so of two
    processes creating the same file at once exactly one succeeds and the other sees its file.
    On a file system without hard links the file is replaced as by `atomic_write`.
    """
    path = Path(path)
    tmp = _temp_file(path, _data_writer(data))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FUSE file systems)
        os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True
