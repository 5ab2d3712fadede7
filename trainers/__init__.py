"""trainers: Lightning reference classifiers for shapesynth data."""
