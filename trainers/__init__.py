"""trainers: Lightning reference classifiers for shapesynth data."""

from trainers.checkpoint import load_model, save_model
from trainers.models import available_archs, build_model

__all__ = ["available_archs", "build_model", "load_model", "save_model"]
