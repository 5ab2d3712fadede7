"""Read back any format `shapesynth generate` writes: samples, metadata and two fingerprints
(`dataset_fingerprint` of the files, `samples_fingerprint` of the samples they store)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shapesynth.config import SPLITS
from shapesynth.schema import META_COLUMNS, decode_image, decode_mask
from shapesynth.writers import MANIFEST, WORK_DIR, OutputError, detect_format, read_manifest


class SplitRecords:
    """Random access to the samples of one split: (image, mask, region, label, index)."""

    def __init__(self, table: pa.Table | None, files: list[dict] | None, where: str):
        self.table = table
        self.files = files
        self.where = where
        if table is not None:
            self._labels = table.column("label").to_numpy()
            self._index = table.column("index").to_numpy()

    def __len__(self) -> int:
        return self.table.num_rows if self.table is not None else len(self.files)

    def __getitem__(self, i: int):
        where = f"{self.where}[{i}]"
        if self.table is not None:
            row = {k: self.table.column(k)[i].as_py() for k in ("image", "mask", "region")}
            return (
                decode_image(row["image"]["bytes"], where),
                decode_mask(row["mask"]["bytes"], where),
                decode_mask(row["region"]["bytes"], where),
                int(self._labels[i]),
                int(self._index[i]),
            )
        rec = self.files[i]
        return (
            decode_image(Path(rec["file_name"]).read_bytes(), where),
            decode_mask(Path(rec["mask_file_name"]).read_bytes(), where),
            decode_mask(Path(rec["region_file_name"]).read_bytes(), where),
            int(rec["label"]),
            int(rec["index"]),
        )

    def metadata(self, i: int) -> dict:
        if self.table is not None:
            return {k: self.table.column(k)[i].as_py() for k in ["label", *META_COLUMNS]}
        rec = self.files[i]
        return {k: rec[k] for k in ["label", *META_COLUMNS]}


def _arrow_data_files(split_dir: Path) -> list[Path]:
    """The data files a `save_to_disk` split lists in its state.json.

    `datasets` writes the cache files of `map`/`filter` on a `load_from_disk` dataset beside
    them (``cache-*.arrow``, other columns or an indices table): they are not this split's rows.
    """
    state = split_dir / "state.json"
    if not state.is_file():
        return []
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise OutputError(f"{state} is damaged ({type(err).__name__}: {err})") from None
    return [split_dir / name for name in names]


def _split_files(out: Path, fmt: str, split: str) -> list[Path]:
    if fmt == "hub":
        return sorted((out / "data").glob(f"{split}-*-of-*.parquet"))
    if fmt == "arrow":
        return _arrow_data_files(out / split)
    return sorted((out / split).glob("*/metadata.jsonl"))


def _arrow_table(files: list[Path]) -> pa.Table:
    tables = []
    for f in files:
        with _damaged_file(f), pa.memory_map(str(f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def _parquet_table(files: list[Path], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for f in files:
        with _damaged_file(f):
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables)


@contextlib.contextmanager
def _damaged_file(path: Path):
    """pyarrow's error about a truncated or foreign data file, as an OutputError naming the file."""
    try:
        yield
    except pa.ArrowException as err:  # ArrowInvalid (a ValueError), ArrowIOError, ...
        raise OutputError(f"{path}: damaged data file ({' '.join(str(err).split())}); restore it, or delete it and "
                          "finish the dataset with `shapesynth generate --resume`") from None


def expected_size(path: str | Path, split: str) -> int | None:
    """The number of samples the dataset's recipe asks for in a split (None: no recipe)."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return None
    return int(read_manifest(path, "config")["config"].get("split_sizes", {}).get(split, 0))


def check_complete(path: str | Path, split: str, found: int) -> None:
    """Refuse a split that holds fewer (or more) samples than its recipe: unfinished shards."""
    expected = expected_size(path, split)
    if expected is not None and found != expected:
        raise OutputError(
            f"{path} is incomplete: split {split!r} holds {found} of the {expected} samples its recipe "
            "asks for (shards missing: finish with `shapesynth generate --resume`, or copy in the "
            f"folders of the other `--shard i/n` runs, then run `shapesynth card --data {path}`)"
        )


def open_split(path: str | Path, split: str, allow_incomplete: bool = False) -> SplitRecords:
    """A split's samples; a split with shards missing is refused unless `allow_incomplete`."""
    out = Path(path)
    if not out.exists():
        raise FileNotFoundError(f"dataset folder {out} does not exist")
    fmt = detect_format(out)
    files = _split_files(out, fmt, split)
    if not files:
        if not allow_incomplete:
            check_complete(out, split, 0)  # the recipe asks for samples: unfinished, not absent
        raise OutputError(f"{out} ({fmt} format) has no {split!r} split")
    where = f"{out}:{split}"
    if fmt == "hub":
        records = SplitRecords(_parquet_table(files), None, where)
    elif fmt == "arrow":
        records = SplitRecords(_arrow_table(files), None, where)
    else:
        recs = []
        for meta in files:
            for line in meta.read_text().splitlines():
                rec = json.loads(line)
                for key in ("file_name", "mask_file_name", "region_file_name"):
                    rec[key] = str(meta.parent / rec[key])
                recs.append(rec)
        records = SplitRecords(None, recs, where)
    if not allow_incomplete:
        check_complete(out, split, len(records))
    return records


def load_config(path: str | Path):
    """The `SynthConfig` a dataset folder was generated with (from its ``shapesynth.json``)."""
    from shapesynth.config import SynthConfig

    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        raise OutputError(f"{path} has no {MANIFEST}: the recipe of this dataset is unknown")
    return SynthConfig.from_dict(read_manifest(path, "config")["config"])


def load_metadata(path: str | Path, split: str, allow_incomplete: bool = False) -> pd.DataFrame:
    """The label and metadata columns of a split (no pixels decoded); like `open_split`, a split
    with shards missing is refused unless `allow_incomplete`."""
    out = Path(path)
    fmt = detect_format(out)
    files = _split_files(out, fmt, split)
    cols = ["label", *META_COLUMNS]
    if not files:
        table = pd.DataFrame(columns=cols)
    elif fmt == "hub":
        table = _parquet_table(files, cols).to_pandas()
    elif fmt == "arrow":
        table = _arrow_table(files).select(cols).to_pandas()
    else:
        table = pd.DataFrame([json.loads(line) for f in files for line in f.read_text().splitlines()])[cols]
    if not allow_incomplete:
        check_complete(out, split, len(table))
    return table


def data_file_list(path: str | Path) -> list[Path]:
    """The data files of a dataset folder (no card, preview, manifest or work files, nor the cache
    files `datasets` writes beside the splits of a `load_from_disk` dataset it maps or filters)."""
    out = Path(path)
    skip = {"README.md", MANIFEST, "examples.png", "backgrounds.json"}
    arrow_cache = set()  # `datasets` cache files beside a save_to_disk split's own data files
    if (out / "dataset_dict.json").is_file():
        for split_dir in (p for p in out.iterdir() if (p / "state.json").is_file()):
            arrow_cache.update(set(split_dir.glob("*.arrow")) - set(_arrow_data_files(split_dir)))
    files = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not p.is_file() or rel.parts[0] in (WORK_DIR,) or any(part.startswith(".") for part in rel.parts):
            continue
        if (len(rel.parts) == 1 and rel.name in skip) or p in arrow_cache:
            continue
        files.append(p)
    return files


def dataset_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) over the relative paths and bytes of the data files."""
    out = Path(path)
    files = data_file_list(out)
    if not files:
        raise OutputError(f"{out} holds no data files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(out)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


_SAMPLE_COLUMNS = ("label", *META_COLUMNS)


def _sample_digest(pngs, row: dict) -> bytes:
    """sha256 of one sample: its image, mask and region PNG bytes and its label and metadata
    (as JSON holds them, so a parquet row and an imagefolder metadata line give the same text)."""
    h = hashlib.sha256()
    for png in pngs:
        h.update(hashlib.sha256(png).digest())
    h.update(json.dumps([row[k] for k in _SAMPLE_COLUMNS], separators=(",", ":")).encode())
    return h.digest()


def _table_digests(table: pa.Table) -> list[tuple[int, bytes]]:
    cols = {k: table.column(k).to_pylist() for k in ("image", "mask", "region", *_SAMPLE_COLUMNS)}
    return [(cols["index"][i],
             _sample_digest([cols[k][i]["bytes"] for k in ("image", "mask", "region")],
                            {k: cols[k][i] for k in _SAMPLE_COLUMNS}))
            for i in range(table.num_rows)]


def _imagefolder_digests(metadata_file: Path) -> list[tuple[int, bytes]]:
    digests = []
    for line in metadata_file.read_text().splitlines():
        rec = json.loads(line)
        pngs = [(metadata_file.parent / rec[k]).read_bytes()
                for k in ("file_name", "mask_file_name", "region_file_name")]
        digests.append((rec["index"], _sample_digest(pngs, rec)))
    return digests


def _file_digests(fmt: str, data_file: Path) -> list[tuple[int, bytes]]:
    if fmt == "hub":
        return _table_digests(_parquet_table([data_file]))
    if fmt == "arrow":
        return _table_digests(_arrow_table([data_file]))
    return _imagefolder_digests(data_file)


def samples_fingerprint(path: str | Path) -> str:
    """sha256 (first 16 hex digits) over the samples a dataset folder stores, whatever its format:
    per split and sample (by index), the image, mask and region PNG bytes, label and metadata.

    `shapesynth generate` stores the same PNG bytes and metadata in every format, so one recipe
    written as hub, imagefolder or arrow has one samples fingerprint, while `dataset_fingerprint`
    (the files' names and bytes) differs per format. Any changed sample (pixels, label, metadata,
    a sample added or removed) changes it; so do images re-encoded to other PNG bytes.
    """
    out = Path(path)
    if not out.exists():
        raise FileNotFoundError(f"dataset folder {out} does not exist")
    fmt = detect_format(out)
    h, samples = hashlib.sha256(), 0
    for split in SPLITS:
        digests = sorted(d for f in _split_files(out, fmt, split) for d in _file_digests(fmt, f))
        if not digests:
            continue
        samples += len(digests)
        h.update(f"{split}\0{len(digests)}\0".encode())
        for index, digest in digests:
            h.update(f"{index}\0".encode() + digest)
    if not samples:
        raise OutputError(f"{out} holds no samples to fingerprint")
    return h.hexdigest()[:16]


__all__ = ["SplitRecords", "check_complete", "data_file_list", "dataset_fingerprint", "load_metadata", "open_split",
           "samples_fingerprint"]
