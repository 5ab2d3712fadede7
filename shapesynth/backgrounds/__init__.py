"""Background sources: a registry name -> function(cfg) -> {split: BackgroundPool}.

Every source's pools go through `check_disjoint`, so no background (by decoded pixels) can sit
in two splits whatever the source.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable

from shapesynth.backgrounds.pools import (
    BackgroundError,
    BackgroundOverlapError,
    BackgroundPool,
    check_disjoint,
    draw_background,
    pixel_hash,
)
from shapesynth.config import SPLITS, SynthConfig

PoolBuilder = Callable[[SynthConfig], dict[str, BackgroundPool]]
_SOURCES: dict[str, PoolBuilder] = {}


def register_source(name: str) -> Callable[[PoolBuilder], PoolBuilder]:
    def deco(fn: PoolBuilder) -> PoolBuilder:
        _SOURCES[name] = fn
        return fn

    return deco


def available_sources() -> tuple[str, ...]:
    return tuple(sorted(_SOURCES))


# config fields that do not change the pools (shape, split-size and per-sample knobs)
_NOT_POOL_FIELDS = {
    "split_sizes", "size_bands", "stroke_fraction", "min_stroke_px", "margin_px", "min_contrast",
    "max_colour_tries", "bg_jitter",
}  # bg_flip and bg_channel_shuffle decide which files are one background (pools.augmentation_hash)


def _pool_key(cfg: SynthConfig) -> str:
    key = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_POOL_FIELDS}
    paths = [cfg.bg_path, *(cfg.bg_split_paths or {}).values()]
    if cfg.background != "procedural" and any(p and not os.path.isabs(p) for p in paths):
        key["read_from"] = os.getcwd()  # a relative folder read from another current folder is another folder
    return json.dumps(key, sort_keys=True)


def build_pools(cfg: SynthConfig, num_proc: int = 1) -> dict[str, BackgroundPool]:
    """Build and check the pools of every split for the configured source.

    Pools are memoised on the pool-relevant config fields (a few at most), so a train and a val
    stream of the same config share one set; `clear_pool_cache()` forgets them (e.g. after the
    files of a folder source changed). `num_proc` > 1 renders procedural bases in parallel
    (the result is the same).
    """
    key = _pool_key(cfg)
    if key not in _POOL_CACHE:
        _POOL_CACHE[key] = _build_pools(cfg, num_proc)
        while len(_POOL_CACHE) > _POOL_CACHE_SIZE:
            _POOL_CACHE.popitem(last=False)
    _POOL_CACHE.move_to_end(key)
    return dict(_POOL_CACHE[key])


_POOL_CACHE: collections.OrderedDict[str, dict[str, BackgroundPool]] = collections.OrderedDict()
_POOL_CACHE_SIZE = 4


def clear_pool_cache() -> None:
    _POOL_CACHE.clear()


def _build_pools(cfg: SynthConfig, num_proc: int) -> dict[str, BackgroundPool]:
    try:
        builder = _SOURCES[cfg.background]
    except KeyError:
        raise BackgroundError(
            f"unknown background source {cfg.background!r} (known: {available_sources()})"
        ) from None
    pools = builder(cfg, num_proc=num_proc) if cfg.background == "procedural" else builder(cfg)
    missing = [s for s in SPLITS if s not in pools]
    if missing:
        raise BackgroundError(f"background source {cfg.background!r} gave no pool for {missing}")
    for split, pool in pools.items():
        if len(pool) == 0:
            raise BackgroundError(f"background pool {split!r} is empty")
    check_disjoint(pools, cfg.bg_flip, cfg.bg_channel_shuffle)
    return pools


def relative_folders_hint(cfg: SynthConfig) -> str:
    """Where a recipe's relative background folders are looked for: the current folder, not the one
    `shapesynth generate` ran in (the recipe keeps the paths as they were given)."""
    if cfg.background != "folder":
        return ""
    folders = [cfg.bg_path] if cfg.bg_path else list((cfg.bg_split_paths or {}).values())
    relative = [f for f in folders if f and not os.path.isabs(f)]
    if not relative:
        return ""
    return (f"; its recipe names the background folder(s) {', '.join(relative)} relative to the folder "
            f"`shapesynth generate` ran in, and they are read from the current folder, {os.getcwd()}: "
            f"run from that folder")


# sources register themselves on import
from shapesynth.backgrounds import folder as _folder  # noqa: E402,F401
from shapesynth.backgrounds import hf as _hf  # noqa: E402,F401
from shapesynth.backgrounds import procedural_source as _procedural  # noqa: E402,F401

__all__ = [
    "BackgroundError",
    "BackgroundOverlapError",
    "BackgroundPool",
    "available_sources",
    "build_pools",
    "check_disjoint",
    "clear_pool_cache",
    "draw_background",
    "pixel_hash",
    "register_source",
    "relative_folders_hint",
]
