"""The `hf` source: a Hugging Face image dataset as backgrounds.

`bg_path` is a local folder (a `save_to_disk` folder, a downloaded dataset repo such as
`hf download --repo-type dataset NAME --local-dir DIR` gives, or an imagefolder) or
(online) a Hub dataset name; the network is touched only in `_load_from_hub`. Dataset splits
named train / validation (or val) / test become the pools; otherwise (or with `bg_hf_split`) the
images are dealt into pools by pixel hash like a folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shapesynth.backgrounds import register_source
from shapesynth.backgrounds.pools import BackgroundError, BackgroundPool, decode_candidates, pools_from_candidates
from shapesynth.config import SynthConfig

_SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "test": "test"}


def _load_from_hub(name: str):
    """The one network call of this source (tests replace it)."""
    import datasets

    return datasets.load_dataset(name)


def load_hf(path_or_name: str, image_column: str | None = None):
    """A DatasetDict (or Dataset) from a local folder (see `_read_local_folder`) or a Hub name."""
    import datasets

    path = Path(path_or_name)
    if path.exists():
        if not path.is_dir():
            raise BackgroundError(f"HF background path {path} is not a folder")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return datasets.load_from_disk(str(path))
        return _read_local_folder(path, image_column)
    try:
        return _load_from_hub(path_or_name)
    except Exception as err:  # noqa: BLE001
        raise BackgroundError(
            f"HF background {path_or_name!r} is no local folder and could not be loaded from the Hub: {err}. "
            f"Without the Hub: on a machine with it, run `datasets.load_dataset({path_or_name!r}).save_to_disk(DIR)` "
            f"(or `hf download --repo-type dataset {path_or_name} --local-dir DIR`), "
            "copy DIR here and pass it as --backgrounds (bg_path; or load it online once: with HF_HUB_OFFLINE=1 "
            "datasets then reads its own cache)"
        ) from err


def _read_local_folder(path: Path, image_column: str | None):
    """A local folder that is no save_to_disk folder, read by `datasets` itself, offline.

    First as `datasets.load_dataset(folder)` reads a downloaded dataset repo, as the Hub would:
    the card's `configs` (README.md YAML) when it declares them, else the packaged builder of the
    most common data file type (parquet, arrow, csv, json, images, ...). A folder whose card
    declares no configs and that this reading gives no image column (images with caption .txt
    files beside them read as text) or cannot read is read as an imagefolder, as before.

    Every load builds in a throwaway cache: `datasets` caches a folder with configs under its
    name rather than its files, so files replaced in place (a newer download) would otherwise
    come back as the old images.
    """
    import datasets

    tried = []
    with tempfile.TemporaryDirectory(prefix="shapesynth-hf-", ignore_cleanup_errors=True) as cache:
        folder = str(path.resolve())  # datasets names the dataset after the folder: "." has no name
        attempts = [("datasets.load_dataset(folder)", dict(path=folder))]
        if not _card_declares_configs(path):
            attempts.append(("an imagefolder", dict(path="imagefolder", data_dir=folder)))
        first_loaded = None
        for how, args in attempts:
            try:
                # in memory: the tables must outlive the throwaway cache
                loaded = datasets.load_dataset(cache_dir=cache, keep_in_memory=True, **args)
            except Exception as err:  # noqa: BLE001 - datasets raises many kinds; all mean "cannot read"
                tried.append(f"as {how}: {type(err).__name__}: {err}")
                continue
            if _offers_images(loaded, image_column):
                return loaded
            if first_loaded is None:
                first_loaded = loaded
    if first_loaded is not None:
        return first_loaded  # no reading gave images: hf_pools names the columns of the first
    raise BackgroundError(f"cannot read the HF background folder {path} with datasets (tried " + "; ".join(tried)
                          + "): a save_to_disk folder, a downloaded dataset repo (README.md configs or data "
                          "files datasets reads) or an imagefolder is needed")


def _card_declares_configs(path: Path) -> bool:
    """Whether the folder declares `configs` (the author's layout, which datasets follows) in its
    README.md YAML or its standalone .huggingface.yaml, the two places datasets reads them from."""
    import yaml
    from huggingface_hub import DatasetCard

    try:
        card = DatasetCard.load(path / "README.md").data.to_dict() if (path / "README.md").is_file() else {}
        standalone = path / ".huggingface.yaml"
        extra = yaml.safe_load(standalone.read_text(encoding="utf-8")) if standalone.is_file() else {}
    except Exception:  # noqa: BLE001 - a card datasets cannot parse declares nothing it could follow
        return False
    return bool(card.get("configs") or (isinstance(extra, dict) and extra.get("configs")))


def _offers_images(loaded, image_column: str | None) -> bool:
    """Whether any split of a DatasetDict has the chosen column, or else an Image column."""
    import datasets

    if image_column is not None:
        return any(image_column in ds.features for ds in loaded.values())
    return any(isinstance(f, datasets.Image) for ds in loaded.values() for f in ds.features.values())


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
    loaded = load_hf(cfg.bg_path, cfg.bg_image_column)
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
