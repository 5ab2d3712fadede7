"""Independent, seeded random streams.

Every random attribute of a sample has its own stream keyed by (seed, split, epoch, index,
attribute), so changing how one attribute is drawn (or how often the colour is resampled) can
never shift another, and sample i is a pure function of its key whatever the process or shard
that renders it. Nothing here touches global random state.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
ATTRIBUTES = ("labels", "band", "size", "angle", "position", "colour", "background", "pool")
_ATTR_CODES = {name: k + 1 for k, name in enumerate(ATTRIBUTES)}


def split_code(split: str) -> int:
    try:
        return _SPLIT_CODES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r} (known: {tuple(_SPLIT_CODES)})") from None


def stream(seed: int, split: str, epoch: int, index: int, attribute: str) -> np.random.Generator:
    """The generator of one attribute of one sample (index -1 for per-split draws)."""
    key = (_ATTR_CODES[attribute], split_code(split), int(epoch), int(index) + 1)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=key)))


def named_stream(seed: int, *names: str | int) -> np.random.Generator:
    """A stream keyed by arbitrary names (e.g. procedural background bases)."""
    digest = hashlib.sha256("/".join(map(str, names)).encode()).digest()
    key = tuple(int.from_bytes(digest[k : k + 4], "little") for k in range(0, 16, 4))
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=key)))


def balanced_labels(seed: int, split: str, epoch: int, n: int, num_classes: int) -> np.ndarray:
    """Exactly balanced labels (counts differ by at most one) in a seeded random order.

    When n is not a multiple of the class count, which classes get the extra sample is also
    drawn at random, so no class is systematically favoured.
    """
    rng = stream(seed, split, epoch, -1, "labels")
    base = np.arange(n, dtype=np.int64) % num_classes
    remainder = n % num_classes
    if remainder:
        extra = rng.permutation(num_classes)[:remainder]
        base[n - remainder :] = extra
    return rng.permutation(base)
