"""The `folder` source: the user's own images (any format Pillow reads, any mode).

One folder is dealt into train / val / test pools by pixel hash; or `bg_split_paths` gives a
folder per split (a missing val pool is carved out of train). Every file but hidden ones is
tried, whatever its name; unreadable files are skipped, counted and listed (an error with
``bg_strict``).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from shapesynth.backgrounds import register_source
from shapesynth.backgrounds.pools import BackgroundError, BackgroundPool, decode_candidates, pools_from_candidates
from shapesynth.config import SPLITS, SynthConfig

def list_images(folder: str | Path) -> list[Path]:
    """Every file under `folder` except hidden ones (a dot in front of the name or of a folder above).

    No suffix filter: Pillow decides what is an image, and whatever it cannot read is skipped and
    listed, so no file is left out unseen.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BackgroundError(f"background folder {folder} does not exist")
    if not folder.is_dir():
        raise BackgroundError(f"background folder {folder} is not a folder")
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise BackgroundError(f"background folder {folder} holds no files (hidden ones aside)")
    return files


def _read(folder: str | Path, strict: bool):
    return decode_candidates([(str(p), lambda p=p: Image.open(p)) for p in list_images(folder)], strict)


@register_source("folder")
def folder_pools(cfg: SynthConfig) -> dict[str, BackgroundPool]:
    if cfg.bg_split_paths:
        unknown = sorted(set(cfg.bg_split_paths) - set(SPLITS))
        if unknown or "train" not in cfg.bg_split_paths or "test" not in cfg.bg_split_paths:
            raise BackgroundError(
                f"bg_split_paths needs 'train' and 'test' folders (and optionally 'val'), got {sorted(cfg.bg_split_paths)}"
            )
        skipped, per_split = [], {}
        # in split order, not the mapping's: the skipped list (card, backgrounds.json) must not
        # change when the config is read back from shapesynth.json, whose keys are sorted
        for split in (s for s in SPLITS if s in cfg.bg_split_paths):
            folder = cfg.bg_split_paths[split]
            cands, bad = _read(folder, cfg.bg_strict)
            skipped += bad
            if not cands:
                raise BackgroundError(f"background folder {folder} ({split}) holds no readable image")
            per_split[split] = cands
        return pools_from_candidates(None, per_split, skipped, cfg, "the split folders")
    cands, skipped = _read(cfg.bg_path, cfg.bg_strict)
    if not cands:
        raise BackgroundError(f"background folder {cfg.bg_path} holds no readable image ({len(skipped)} skipped)")
    return pools_from_candidates(cands, None, skipped, cfg, str(cfg.bg_path))
