"""The `folder` source: the user's own images (any format Pillow reads, any mode).

One folder is dealt into train / val / test pools by pixel hash; or `bg_split_paths` gives a
folder per split (a missing val pool is carved out of train). Every file but hidden ones is
tried, whatever its name, in its subfolders too (links to folders included); unreadable files
and subfolders are skipped, counted and listed (an error with ``bg_strict``).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from shapesynth.backgrounds import register_source
from shapesynth.backgrounds.pools import BackgroundError, BackgroundPool, decode_candidates, pools_from_candidates
from shapesynth.config import SPLITS, SynthConfig

def list_images(folder: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under `folder` except hidden ones (a dot in front of the name or of a folder
    above), and what under it cannot be tried, as (name, reason).

    No suffix filter: Pillow decides what is an image, and whatever it cannot read is skipped and
    listed, so no file is left out unseen. For the same reason links to folders are walked like
    folders (a link back to a folder above is not walked twice), and a subfolder that cannot be
    listed (no permission), a link to nothing and a pipe or socket are returned as unreadable
    rather than passed over.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BackgroundError(f"background folder {folder} does not exist")
    if not folder.is_dir():
        raise BackgroundError(f"background folder {folder} is not a folder")
    files: list[Path] = []
    unreadable: list[tuple[str, str]] = []

    def cannot_list(err: OSError) -> None:
        unreadable.append((str(err.filename), f"folder not readable ({type(err).__name__}: {err})"))

    # the real paths of the folders above each walked folder: a link to one of them is a loop
    above: dict[str, frozenset[str]] = {os.fspath(folder): frozenset()}
    for root, dirs, names in os.walk(folder, onerror=cannot_list, followlinks=True):
        chain = above.pop(root) | {os.path.realpath(root)}
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")
                   and os.path.realpath(os.path.join(root, d)) not in chain]
        above.update({os.path.join(root, d): chain for d in dirs})
        for name in (n for n in names if not n.startswith(".")):
            path = Path(root, name)
            try:
                if path.is_file():
                    files.append(path)
                    continue
                if path.is_symlink() and not path.exists():
                    reason = f"link to nothing ({os.readlink(path)})"
                else:
                    reason = "not a regular file (a pipe, socket or device)"
            except OSError as err:  # e.g. no permission to look at it
                reason = f"{type(err).__name__}: {err}"
            unreadable.append((str(path), reason))
    for name, reason in unreadable:
        if name == os.fspath(folder):
            raise BackgroundError(f"background folder {folder} cannot be read: {reason}")
    if not files and not unreadable:
        raise BackgroundError(f"background folder {folder} holds no files (hidden ones aside)")
    return sorted(files), sorted(unreadable)


def _read(folder: str | Path, strict: bool):
    files, unreadable = list_images(folder)
    if unreadable and strict:
        name, reason = unreadable[0]
        raise BackgroundError(f"cannot read background {name}: {reason}")
    cands, skipped = decode_candidates([(str(p), lambda p=p: Image.open(p)) for p in files], strict)
    return cands, skipped + unreadable


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
