"""shapesynth: synthetic shapes over cluttered backgrounds with pixel-exact explanation ground truth.

Imports point one way: ``shapesynth`` <- ``trainers`` <- ``validation``. This package knows
nothing of models or metrics.
"""

CLASS_NAMES: tuple[str, ...] = (
    "filled_circle",
    "filled_square",
    "filled_triangle",
    "empty_circle",
    "empty_square",
    "empty_triangle",
)
NUM_CLASSES = len(CLASS_NAMES)

__all__ = ["CLASS_NAMES", "NUM_CLASSES"]

from shapesynth.config import SPLITS, ConfigError, SynthConfig  # noqa: E402
from shapesynth.render import Sample, ShapeSynth  # noqa: E402


def dataset_fingerprint(path) -> str:
    """A short hash of a generated dataset's data files (see `shapesynth.readers`)."""
    from shapesynth.readers import dataset_fingerprint as _fingerprint

    return _fingerprint(path)


def samples_fingerprint(path) -> str:
    """A short hash of the samples a generated dataset stores, the same whichever format stores
    them (see `shapesynth.readers`)."""
    from shapesynth.readers import samples_fingerprint as _fingerprint

    return _fingerprint(path)


__all__ += ["SPLITS", "ConfigError", "Sample", "ShapeSynth", "SynthConfig", "dataset_fingerprint",
            "samples_fingerprint"]
