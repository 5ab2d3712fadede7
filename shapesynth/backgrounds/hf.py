"""The `hf` source: a Hugging Face image dataset as backgrounds.

`bg_path` is a local `save_to_disk` folder, a local imagefolder, or (online) a Hub dataset name;
the network is touched only in `_load_from_hub`. Dataset splits named train / validation (or
val) / test become the pools; otherwise (or with `bg_hf_split`) the images are dealt into pools
by pixel hash like a folder.
"""

from __future__ import annotations

from pathlib import Path

from shapesynth.backgrounds import register_source
from shapesynth.backgrounds.pools import BackgroundError, BackgroundPool, decode_candidates, pools_from_candidates
from shapesynth.config import SynthConfig

_SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


def _load_from_hub(name: str):
    """The one network call of this source (tests replace it)."""
    import datasets

    return datasets.load_dataset(name)


def load_hf(path_or_name: str):
    """A DatasetDict (or Dataset) from a local save_to_disk / imagefolder path or a Hub name."""
    import datasets

    path = Path(path_or_name)
    if path.exists():
        if not path.is_dir():
            raise BackgroundError(f"HF background path {path} is not a folder")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        except Exception as err:  # noqa: BLE001
            raise BackgroundError(f"cannot load {path} as an imagefolder dataset: {err}") from err
    try:
        return _load_from_hub(path_or_name)
    except Exception as err:  # noqa: BLE001
        raise BackgroundError(
            f"HF background {path_or_name!r} is no local folder and could not be loaded from the Hub: {err}. "
            f"Without the Hub: on a machine with it, run `datasets.load_dataset({path_or_name!r}).save_to_disk(DIR)`, "
            "copy DIR here and pass it as --backgrounds (bg_path; or load it online once: with HF_HUB_OFFLINE=1 "
            "datasets then reads its own cache)"
        ) from err


def _image_column(ds, wanted: str | None, where: str) -> str:
    import datasets

    if wanted is not None:
        if wanted not in ds.features:
            raise BackgroundError(f"{where} has no column {wanted!r} (columns: {list(ds.features)})")
        return wanted
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise BackgroundError(f"{where} has no Image column (columns: {list(ds.features)}); set bg_image_column")


def _rows(ds, column: str, label: str, where: str):
    """(name, opener) pairs; decoding happens in decode_candidates so failures are counted."""
    import datasets

    try:
        raw = ds.cast_column(column, datasets.Image(decode=False))
    except Exception as err:  # noqa: BLE001 - arrow's message names neither the column nor the dataset
        raise BackgroundError(f"{where}: column {column!r} ({ds.features[column]}) cannot be read as images "
                              f"({type(err).__name__}: {err}); set bg_image_column to an Image column") from err
    return ((f"{label}[{k}]", _opener(row[column])) for k, row in enumerate(raw))


def _opener(value):
    def opener():
        import io

        from PIL import Image

        if value is None or (value.get("bytes") is None and value.get("path") is None):
            raise ValueError("no image in this row (empty cell)")
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])

    return opener


@register_source("hf")
def hf_pools(cfg: SynthConfig) -> dict[str, BackgroundPool]:
    import datasets

    where = str(cfg.bg_path)
    loaded = load_hf(cfg.bg_path)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({cfg.bg_hf_split or "train": loaded})
    if cfg.bg_hf_split is not None:
        if cfg.bg_hf_split not in loaded:
            raise BackgroundError(f"{where} has no split {cfg.bg_hf_split!r} (splits: {list(loaded)})")
        loaded = datasets.DatasetDict({cfg.bg_hf_split: loaded[cfg.bg_hf_split]})
    skipped = []
    mapped = {name: _SPLIT_NAMES.get(name) for name in loaded}
    use_splits = cfg.bg_hf_split is None and "train" in mapped.values() and "test" in mapped.values()
    if use_splits:
        per_split = {}
        for name, ds in loaded.items():
            if mapped[name] is None:
                skipped.append((f"{where}:{name}", f"split not used ({len(ds)} rows): the dataset's own "
                                "train/validation/test splits are the pools; bg_hf_split picks one split"))
                continue
            col = _image_column(ds, cfg.bg_image_column, f"{where}[{name}]")
            cands, bad = decode_candidates(_rows(ds, col, f"{where}:{name}", f"{where}[{name}]"), cfg.bg_strict)
            skipped += bad
            per_split[mapped[name]] = per_split.get(mapped[name], []) + cands
        return pools_from_candidates(None, per_split, skipped, cfg, where)
    cands = []
    for name, ds in loaded.items():
        col = _image_column(ds, cfg.bg_image_column, f"{where}[{name}]")
        got, bad = decode_candidates(_rows(ds, col, f"{where}:{name}", f"{where}[{name}]"), cfg.bg_strict)
        cands += got
        skipped += bad
    if not cands:
        raise BackgroundError(f"HF background {where} holds no readable image ({len(skipped)} skipped)")
    return pools_from_candidates(cands, None, skipped, cfg, where)
