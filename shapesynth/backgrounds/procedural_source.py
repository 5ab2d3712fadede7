"""The built-in `procedural` source: pools of seeded clutter bases, distinct per split."""

from __future__ import annotations

import math

from shapesynth.backgrounds import register_source
from shapesynth.backgrounds.pools import BackgroundPool, pixel_hash
from shapesynth.backgrounds.procedural import render_base
from shapesynth.config import SPLITS, SynthConfig


def base_side(cfg: SynthConfig) -> int:
    return max(cfg.image_size, math.ceil(cfg.image_size * cfg.bg_base_scale))


def _render(args: tuple[SynthConfig, str, int, int]):
    return render_base(*args)


@register_source("procedural")
def procedural_pools(cfg: SynthConfig, num_proc: int = 1) -> dict[str, BackgroundPool]:
    side = base_side(cfg)
    jobs = {split: [(cfg, split, j, side) for j in range(cfg.bg_pool_sizes.get(split, 1))] for split in SPLITS}
    if num_proc > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(num_proc) as workers:
            rendered = {split: workers.map(_render, todo, chunksize=8) for split, todo in jobs.items()}
    else:
        rendered = {split: [_render(job) for job in todo] for split, todo in jobs.items()}
    pools = {}
    for split in SPLITS:
        images = rendered[split]
        n = len(images)
        pools[split] = BackgroundPool(
            split=split,
            images=images,
            names=[f"procedural:{split}:{j}" for j in range(n)],
            hashes=[pixel_hash(im) for im in images],
        )
    return pools
