"""Read back any format `shapesynth generate` writes: samples, metadata and a fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shapesynth.schema import META_COLUMNS, decode_image, decode_mask
from shapesynth.writers import MANIFEST, WORK_DIR, OutputError, detect_format


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
        with pa.memory_map(str(f)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables)


def expected_size(path: str | Path, split: str) -> int | None:
    """The number of samples the dataset's recipe asks for in a split (None: no recipe)."""
    manifest = Path(path) / MANIFEST
    if not manifest.exists():
        return None
    return int(json.loads(manifest.read_text())["config"].get("split_sizes", {}).get(split, 0))


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
        records = SplitRecords(pa.concat_tables([pq.read_table(f) for f in files]), None, where)
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
    return SynthConfig.from_dict(json.loads(manifest.read_text())["config"])


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
        table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pandas()
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


__all__ = ["SplitRecords", "check_complete", "data_file_list", "dataset_fingerprint", "load_metadata", "open_split"]
