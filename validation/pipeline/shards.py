"""Fixed image chunks and their split over processes or machines.

Chunks depend only on the run's image range and chunk size, never on the number of
processes, so every split computes the same chunks with the same batch composition and the
merged table is bit-identical to a single-process run.
"""

from __future__ import annotations


def chunk_ranges(image_range, chunk_size: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` into consecutive chunks of ``chunk_size`` images (last may be short)."""
    start, stop = (int(v) for v in image_range)
    if start < 0 or stop < start:
        raise ValueError(f"image range must satisfy 0 <= start <= stop, got [{start}, {stop})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(a, min(a + chunk_size, stop)) for a in range(start, stop, chunk_size)]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ``None`` -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def parse_range(text: str) -> tuple[int, int]:
    """``--images "a:b"`` -> (a, b), the half-open image index range (at least one image)."""
    try:
        a, b = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--images must look like start:stop (e.g. 0:200), got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--images {text!r}: need 0 <= start < stop")
    return a, b


def shard_chunks(chunks: list, index: int, count: int) -> list:
    """The chunks that shard ``index`` of ``count`` computes: every ``count``-th, from ``index``.

    Strided, not contiguous, because costs are not uniform along the range: a profile's
    ``method_grid`` caps the expensive methods to the first images (e.g. Score-CAM on the first
    48), and contiguous blocks would load all of them onto shard 0.
    """
    return chunks[index::count]
