"""trainers: Lightning reference classifiers for shapesynth data.

``build_model(arch, ...)`` builds a classifier that takes [0, 1] images (normalisation inside),
``load_model(path)`` loads a trained one safely, ``fit(TrainConfig(...))`` trains one.
Lightning-heavy pieces are imported lazily, so ``from trainers import build_model`` stays light.
"""

from trainers.export import load_model, save_model
from trainers.models import available_archs, build_model

__all__ = ["available_archs", "build_model", "load_model", "save_model", "fit", "evaluate", "TrainConfig"]


def __getattr__(name):
    if name in ("fit", "evaluate", "TrainConfig"):
        from trainers import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
