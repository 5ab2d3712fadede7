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
