"""Safe model files: weights in safetensors (cannot run code) plus a JSON metadata sidecar."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainers.models import build_model

WEIGHTS, META = "model.safetensors", "model.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model, run_dir, **meta) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (arch, image size, normalisation, ...) atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {
        "arch": model.arch, "image_size": model.image_size, "num_classes": model.num_classes,
        "mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist(),
        **meta,
    }
    _atomic_write(run_dir / WEIGHTS, lambda p: save_file(state, p))
    _atomic_write(run_dir / META, lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    return run_dir / WEIGHTS


def load_model(path, map_location="cpu"):
    """Load a run folder (or its ``model.safetensors``) -> (model in eval mode, metadata dict).

    Nothing in the files is executed: tensors come from safetensors, metadata from JSON.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    weights, meta_file = run_dir / WEIGHTS, run_dir / META
    for f in (weights, meta_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: not a trainers run folder (expected {WEIGHTS} and {META})")
    meta = json.loads(meta_file.read_text())
    for key in ("arch", "image_size", "num_classes"):
        if key not in meta:
            raise ValueError(f"{meta_file}: metadata lacks {key!r}")
    model = build_model(meta["arch"], num_classes=meta["num_classes"], image_size=meta["image_size"])
    state = load_file(str(weights), device=str(map_location))
    model.load_state_dict(state)
    model.eval()
    meta.setdefault("class_names", None)
    meta.setdefault("dataset_fingerprint", None)
    meta.setdefault("test_accuracy", None)
    return model.to(map_location), meta
