"""Safe model files: ``model.safetensors`` (tensors only) + ``model.json`` (metadata).

Loading never unpickles: safetensors holds raw tensors, the JSON holds plain values, and a
Lightning ``.ckpt`` is read with ``torch.load(weights_only=True)``, which refuses any object
that could run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from shapesynth.schema import atomic_save, atomic_write
from trainers.models import ShapeClassifier, build_model

WEIGHTS = "model.safetensors"
META = "model.json"
META_KEYS = ("arch", "image_size", "mean", "std", "class_names", "dataset_fingerprint",
             "dataset_samples_fingerprint", "test_accuracy")
# keys save_model fills in when the caller has none: the dataset's samples fingerprint is newer than
# the other keys (model.json files written before it lack it, and read as before)
META_DEFAULTS = {"dataset_samples_fingerprint": None}


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically; the temp file's name is unique, so concurrent writers cannot
    clobber each other's half-written file."""
    atomic_write(path, text)


def save_model(model: ShapeClassifier, folder, meta: dict) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json`` atomically; returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    full = {"arch": model.arch, "image_size": model.image_size, "num_classes": model.num_classes,
            "mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist(),
            **META_DEFAULTS, **meta}
    missing = [k for k in META_KEYS if k not in full]
    if missing:
        raise ValueError(f"save_model: metadata lacks {missing}")
    atomic_save(folder / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(folder / META, full)
    return folder / WEIGHTS


def _resolve(path: Path) -> tuple[Path, Path | None]:
    """(weights file, metadata file or None) for a run folder, a .safetensors or a .ckpt."""
    if path.is_dir():
        if (path / WEIGHTS).is_file():
            return path / WEIGHTS, path / META
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}: training did not finish (resume it with "
                                f"`shapesynth-train fit --config {path / 'config.yaml'}`), or this is not a run folder")
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if path.suffix == ".safetensors":
        for meta in (path.with_suffix(".json"), path.parent / META):
            if meta.is_file():
                return path, meta
        raise FileNotFoundError(f"{path}: no metadata next to it ({path.with_suffix('.json').name} or {META})")
    if path.suffix == ".ckpt":
        return path, None
    raise ValueError(f"{path}: expected a run folder, a .safetensors file or a Lightning .ckpt")


def _from_ckpt(path: Path) -> tuple[dict, dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - refuse anything that is not plain tensors/values
        raise ValueError(f"{path}: not a plain-tensor checkpoint (refused by weights_only=True): {err}") from err
    hp = ckpt.get("hyper_parameters") or {}
    if "arch" not in hp:
        raise ValueError(f"{path}: no trainer hyper-parameters (arch) in this checkpoint")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    # the training data's description and fingerprints are in the hyper-parameters of checkpoints
    # written since they were recorded there (`trainers.api.plan_fit`); older checkpoints have none
    meta = {"arch": hp["arch"], "image_size": int(hp["image_size"]), "class_names": list(hp["class_names"]),
            "num_classes": len(hp["class_names"]), "dataset_fingerprint": hp.get("dataset_fingerprint"),
            "dataset_samples_fingerprint": hp.get("dataset_samples_fingerprint"), "test_accuracy": None}
    if isinstance(hp.get("data"), dict):  # what it was trained on, as model.json's "data" records it
        meta["data"] = hp["data"]
    return state, meta


def load_model(path, map_location="cpu", image_size: int | None = None):
    """(model in eval mode, metadata) from a run folder, ``model.safetensors`` or a ``.ckpt``.

    Metadata: arch, image_size, num_classes, mean, std, class_names, dataset_fingerprint,
    dataset_samples_fingerprint (absent from model.json files written before it was recorded),
    test_accuracy (plus per-class accuracy and training details when the run folder has them).
    ``image_size`` given and different from the checkpoint's: ValueError.
    """
    weights, meta_file = _resolve(Path(path))
    if weights.suffix == ".ckpt":
        state, meta = _from_ckpt(weights)
    else:
        meta = json.loads(meta_file.read_text())
        state = load_file(str(weights), device="cpu")
    for key in ("arch", "image_size", "class_names"):
        if key not in meta:
            raise ValueError(f"{meta_file or weights}: metadata lacks {key!r}")
    if image_size is not None and int(image_size) != int(meta["image_size"]):
        raise ValueError(f"{path}: the model was trained at {meta['image_size']} px, not {image_size} px")
    # the initialisation's draws are overwritten by the weights: they must not move the caller's
    # random state either (loading a model is not a random event)
    with torch.random.fork_rng(devices=[]):
        model = build_model(meta["arch"], num_classes=len(meta["class_names"]), image_size=int(meta["image_size"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights}: weights do not fit {meta['arch']} at {meta['image_size']} px: {err}") from err
    meta.setdefault("mean", model.normalize.mean.flatten().tolist())
    meta.setdefault("std", model.normalize.std.flatten().tolist())
    return model.to(map_location).eval(), meta
