"""Independent, seeded random streams.

Every random attribute of a sample draws from its own stream keyed by (seed, split, epoch,
index, attribute) (`SampleDraws`), so changing how one attribute is drawn (or how often the
colour is resampled) can never shift another, and sample i is a pure function of its key
whatever the process or shard that renders it. Per-split draws (the label order) and
procedural background bases have streams of their own. Nothing here touches global random
state.
"""

from __future__ import annotations

import hashlib
import operator

import numpy as np

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
# per-split streams; code 0 of the spawn key is taken by the per-sample draws
_SPLIT_STREAM_CODES = {"labels": 1}


def split_code(split: str) -> int:
    try:
        return _SPLIT_CODES[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r} (known: {tuple(_SPLIT_CODES)})") from None


def as_int(name: str, value) -> int:
    """`value` as an int (Python, numpy or torch integer), else an error naming the argument."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def check_count(name: str, value) -> int:
    """`value` as an int >= 0 (an epoch or a sample index), else an error naming the argument."""
    value = as_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def split_stream(seed: int, split: str, epoch: int, purpose: str) -> np.random.Generator:
    """The generator of one per-split draw (e.g. the label order of an epoch)."""
    key = (_SPLIT_STREAM_CODES[purpose], split_code(split), check_count("epoch", epoch), 0)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=key)))


# Fixed word slots of each per-sample attribute: changing how many words one attribute uses
# (e.g. more colour retries) never moves another attribute's slots.
SLOTS: dict[str, slice] = {
    "band": slice(0, 1),
    "size": slice(1, 2),
    "angle": slice(2, 3),
    "position": slice(3, 5),
    "background": slice(5, 16),
    "colour": slice(16, 28),  # the first four colour tries (3 words each)
    "colour_more": slice(28, 29),  # seed of a stream for any further tries
}
_N_WORDS = 29


class SampleDraws:
    """The random draws of one sample: independent uniform streams, one slot range per attribute.

    One SeedSequence hash of (seed, split, epoch, index) yields 29 64-bit words (hash outputs,
    independent of one another); each attribute reads only its own slots, and the colour, which
    may need any number of retries, continues in its own PCG64 stream seeded from its last slot.
    This costs one hash per sample instead of one generator per attribute.
    """

    def __init__(self, seed: int, split: str, epoch: int, index: int):
        key = (0, split_code(split), check_count("epoch", epoch), check_count("index", index) + 1)
        ss = np.random.SeedSequence(int(seed), spawn_key=key)
        self.words = ss.generate_state(_N_WORDS, np.uint64)

    def uniforms(self, attribute: str) -> np.ndarray:
        """The attribute's words as float64 uniforms in [0, 1) (53 random bits each)."""
        return (self.words[SLOTS[attribute]] >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def colours(self):
        """Candidate RGB colours (uniform over 0..255 per channel), endless, always the same order."""
        first = (self.words[SLOTS["colour"]] >> np.uint64(56)).astype(np.int64).reshape(-1, 3)
        yield from first
        more = np.random.Generator(np.random.PCG64(int(self.words[SLOTS["colour_more"]][0])))
        while True:
            yield more.integers(0, 256, 3)


def uniform_int(u: float, low: int, high: int) -> int:
    """An integer in [low, high) from a uniform in [0, 1) (bias below 2**-40 for any small range)."""
    return low + min(int(u * (high - low)), high - low - 1)


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
    rng = split_stream(seed, split, epoch, "labels")
    base = np.arange(n, dtype=np.int64) % num_classes
    remainder = n % num_classes
    if remainder:
        extra = rng.permutation(num_classes)[:remainder]
        base[n - remainder :] = extra
    return rng.permutation(base)
