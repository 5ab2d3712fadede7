"""The long-format result table: schema, atomic storage, per-chunk files and deterministic merge.

One row per (model, image, method, layer, mix, metric). ``mix`` is the RefineCAM aggregator;
``identity`` means the base method, unrefined. Methods without a layer use ``layer = "-"``.
A row whose value could not be computed keeps ``value = NaN`` and says why:
``status`` is ``ok`` (finite value), ``nan`` (the metric itself returned NaN, e.g. a constant
map for a localisation metric) or ``error`` (the method or metric raised; ``reason`` holds the
exception). Nothing is dropped silently.

A run directory looks like::

    RUN_DIR/run_config.json            what was asked (written once, checked on resume)
    RUN_DIR/chunks/<model>/c<start>-<stop>.results.parquet
    RUN_DIR/chunks/<model>/c<start>-<stop>.predictions.parquet
    RUN_DIR/chunks/<model>/c<start>-<stop>.maps.npz    the first images' maps (``save_maps``)
    RUN_DIR/chunks/<model>/c<start>-<stop>.done.json   completion marker, written last
    RUN_DIR/results.parquet, results.csv           merged (``merge``)
    RUN_DIR/predictions.parquet, predictions.csv, misclassified.csv
    RUN_DIR/timing.csv                 seconds per model and configuration
    RUN_DIR/manifest.json              versions, config, data fingerprint, models, table hash, markers merged

Chunks are fixed image ranges defined by the run config, not by the process that computes
them, so a run split over processes or machines produces exactly the same chunk files as a
single process, and the merge (sorted by key) is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from shapesynth.schema import atomic_write
from validation.pipeline.shards import chunk_ranges

COLUMNS = ["image", "model", "method", "layer", "mix", "metric", "value", "status", "reason"]
KEY_COLUMNS = ["model", "image", "method", "layer", "mix", "metric"]
PREDICTION_COLUMNS = ["model", "image", "label", "pred", "prob", "correct"]
NO_LAYER = "-"
IDENTITY = "identity"
STATUSES = ("ok", "nan", "error")

_STR_COLS = ["model", "method", "layer", "mix", "metric", "status", "reason"]


# ----------------------------------------------------------------------------- JSON files (written atomically)
def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False, engine="pyarrow", compression="zstd")
    return buf.getvalue()


def write_frame(df: pd.DataFrame, path: str | os.PathLike, csv: bool = False) -> None:
    """Atomically write ``df`` as parquet at ``path`` (``.parquet``) and optionally a CSV beside it.

    The CSV writes floats with 17 significant digits so that it round-trips exactly.
    """
    path = Path(path)
    atomic_write(path, _parquet_bytes(df))
    if csv:
        text = df.to_csv(index=False, float_format="%.17g", lineterminator="\n")
        atomic_write(path.with_suffix(".csv"), text)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(config: Mapping) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# run_config.json keys that may differ between the processes of one run or between its resumes
VOLATILE_KEYS = ("shard", "progress", "threads", "model_meta", "data_fingerprint")


# run_config.json keys added after run folders existed, with the value those older runs had
# implicitly: at that value a key is left out of the identity, so older run folders resume
LEGACY_DEFAULTS = {"fold": False}


def stable_config(config: Mapping) -> dict:
    """The keys that must match for chunks to belong to one run (see ``run_identity``)."""
    return {k: v for k, v in config.items()
            if k not in VOLATILE_KEYS and not (k in LEGACY_DEFAULTS and v == LEGACY_DEFAULTS[k])}


def run_identity(config: Mapping) -> str:
    """What a chunk belongs to: the run's configuration (less its volatile keys) and dataset.

    Every chunk marker records it, so chunks left from another configuration or dataset (e.g.
    other shards' chunks after one shard reran with ``--overwrite``) are recomputed on resume
    and never merged."""
    return config_hash({**stable_config(config), "data_fingerprint": config.get("data_fingerprint")})


# ----------------------------------------------------------------------------- schema
def make_results_frame(records: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    """Build a result frame with the canonical columns, dtypes and status/value consistency.

    Missing ``status`` is derived from the value (finite -> ok, NaN -> nan); missing ``reason``
    is the empty string.
    """
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    missing = [c for c in ("image", "model", "method", "metric", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"result rows lack required columns {missing}; have {list(df.columns)}")
    if "layer" not in df.columns:
        df["layer"] = NO_LAYER
    if "mix" not in df.columns:
        df["mix"] = IDENTITY
    df["value"] = pd.to_numeric(df["value"], errors="raise").astype("float64")
    if "status" not in df.columns:
        df["status"] = np.where(np.isfinite(df["value"].to_numpy()), "ok", "nan")
    if "reason" not in df.columns:
        df["reason"] = ""
    df["image"] = df["image"].astype("int64")
    for col in _STR_COLS:
        df[col] = df[col].fillna("").astype(str)
    bad = sorted(set(df["status"]) - set(STATUSES))
    if bad:
        raise ValueError(f"unknown status values {bad}; allowed {STATUSES}")
    finite = np.isfinite(df["value"].to_numpy())
    if (df["status"].eq("ok").to_numpy() & ~finite).any():
        raise ValueError("rows with status 'ok' must have a finite value")
    return df[COLUMNS].reset_index(drop=True)


def make_predictions_frame(records: Iterable[Mapping] | pd.DataFrame) -> pd.DataFrame:
    df = records.copy() if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records))
    if df.empty:
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in PREDICTION_COLUMNS})
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"prediction rows lack required columns {missing}; have {list(df.columns)}")
    df["model"] = df["model"].astype(str)
    for col in ("image", "label", "pred"):
        df[col] = df[col].astype("int64")
    df["prob"] = df["prob"].astype("float64")
    df["correct"] = df["correct"].astype(bool)
    return df[PREDICTION_COLUMNS].reset_index(drop=True)


def sort_results(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical row order: by key, strings compared as plain strings (locale-independent)."""
    return df.sort_values(KEY_COLUMNS, kind="mergesort").reset_index(drop=True)


# ----------------------------------------------------------------------------- chunks
def chunk_stem(run_dir: str | os.PathLike, model: str, start: int, stop: int) -> Path:
    return Path(run_dir) / "chunks" / model / f"c{start:07d}-{stop:07d}"


def read_marker(path: str | os.PathLike) -> dict:
    """A chunk's ``.done.json`` marker; an error naming the file if it is not a JSON object."""
    info = read_json(path)
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise ValueError(f"{path}: not a chunk marker (a JSON object), got {type(info).__name__}; "
                         f"delete it to recompute its chunk")
    return info


def chunk_is_done(run_dir, model: str, start: int, stop: int, run_id: str) -> bool:
    """The chunk's marker exists and belongs to the run identity ``run_id``."""
    marker = Path(f"{chunk_stem(run_dir, model, start, stop)}.done.json")
    return marker.exists() and read_marker(marker).get("run_id") == run_id


def write_chunk(run_dir, model: str, start: int, stop: int, results: pd.DataFrame,
                predictions: pd.DataFrame, info: Mapping) -> None:
    """Write one finished chunk; the ``.done.json`` marker goes last, so a chunk is either
    complete or recomputed on resume."""
    stem = chunk_stem(run_dir, model, start, stop)
    write_frame(sort_results(make_results_frame(results)), f"{stem}.results.parquet")
    write_frame(make_predictions_frame(predictions), f"{stem}.predictions.parquet")
    write_json(f"{stem}.done.json", {"model": model, "start": start, "stop": stop, **info})


def read_chunk_markers(run_dir) -> dict[tuple[str, int, int], dict]:
    """(model, start, stop) -> the ``.done.json`` marker of every finished chunk, read once."""
    out = {}
    for marker in sorted((Path(run_dir) / "chunks").glob("*/c*.done.json")):
        try:
            start, stop = (int(v) for v in marker.name[1:-len(".done.json")].split("-"))
        except ValueError:
            raise ValueError(f"{marker}: not a chunk marker name (c<start>-<stop>.done.json); "
                             f"move it out of {marker.parent}") from None
        out[(marker.parent.name, start, stop)] = read_marker(marker)
    return out


def _read_chunk_frame(stem: Path, kind: str) -> pd.DataFrame:
    """A finished chunk's ``results`` or ``predictions`` file, checked against the schema; an
    error naming the file (and what to do) if it is missing, unreadable or of another schema."""
    path = Path(f"{stem}.{kind}.parquet")
    make = make_results_frame if kind == "results" else make_predictions_frame
    try:
        return make(pd.read_parquet(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing, though its marker {stem.name}.done.json says the chunk "
                                f"is finished; delete the marker to recompute the chunk") from None
    except (ValueError, TypeError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a {kind} chunk of shapesynth-eval ({err}); delete it and its "
                         f"marker {stem.name}.done.json to recompute the chunk") from None


# ----------------------------------------------------------------------------- merge / load
def package_versions() -> dict:
    from importlib import metadata

    names = ["shapesynth", "torch", "torchvision", "numpy", "scipy", "pandas", "pyarrow",
             "captum", "scikit-image", "matplotlib", "pytorch-lightning"]
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def config_label(method: str, layer: str, mix: str) -> str:
    """The label ``run`` gives a configuration (``gradcam@stage1+product``)."""
    text = method if layer == NO_LAYER else f"{method}@{layer}"
    return text if mix == IDENTITY else f"{text}+{mix}"


def expected_chunks(config: Mapping) -> list[tuple[str, int, int]]:
    """All (model, start, stop) chunks a run config asks for."""
    ranges = chunk_ranges(config["image_range"], config["chunk_size"])
    return [(name, a, b) for name in config["model_names"] for a, b in ranges]


def marker_digests(run_dir) -> dict[str, str]:
    """Relative path -> sha256 of every chunk marker (``.done.json``) of a run."""
    run_dir = Path(run_dir)
    return {m.relative_to(run_dir).as_posix(): sha256_file(m)
            for m in sorted((run_dir / "chunks").glob("*/c*.done.json"))}


# what `merge_run` writes from the chunks; results.parquet first: without it a run is not merged
MERGED_FILES = ("results.parquet", "results.csv", "predictions.parquet", "predictions.csv",
                "misclassified.csv", "timing.csv", "manifest.json")


def merge_run(run_dir: str | os.PathLike, allow_partial: bool = False) -> dict:
    """Merge every finished chunk of ``run_dir`` into the run's tables and manifest.

    Raises when chunks the run config asks for are missing, unless ``allow_partial`` (then the
    manifest lists them). Returns the manifest.
    """
    run_dir = Path(run_dir)
    config = read_json(run_dir / "run_config.json")
    if not isinstance(config, dict) or not {"image_range", "chunk_size", "model_names"} <= set(config):
        raise ValueError(f"{run_dir / 'run_config.json'}: not the run config of a `shapesynth-eval run` "
                         f"(a JSON object with image_range, chunk_size, model_names)")
    wanted = expected_chunks(config)
    weights = config.get("model_weights") or {}
    seen = marker_digests(run_dir)  # before reading: a chunk finishing during the merge counts as newer
    markers, run_id = read_chunk_markers(run_dir), run_identity(config)
    done = {c for c, info in markers.items() if info.get("run_id") == run_id}
    missing = [c for c in wanted if c not in done]
    stale = [c for c in missing if c in markers]  # finished, for another run
    for model, a, b in stale:
        info, stem = markers[(model, a, b)], chunk_stem(run_dir, model, a, b)
        if info.get("model_weights") and weights.get(model) and info["model_weights"] != weights[model]:
            raise ValueError(f"{stem}.done.json: chunk computed with other weights of model {model!r} "
                             f"({info['model_weights']}) than the run's ({weights[model]}); "
                             f"recompute it (delete the chunk) or merge it into its own run")
    if missing and not allow_partial:
        shown = ", ".join(f"{m}[{a}:{b}]" for m, a, b in missing[:8])
        why = (f"; {len(stale)} of them were computed for another configuration or dataset (e.g. "
               f"before a shard reran with --overwrite): rerun their shards" if stale else "")
        raise RuntimeError(
            f"{run_dir}: {len(missing)} of {len(wanted)} chunks are not finished ({shown}"
            f"{' ...' if len(missing) > 8 else ''}){why}; run the missing shards or pass --allow-partial")
    present = [c for c in wanted if c in done]
    results, preds, timings = [], [], []
    for model, a, b in present:
        stem = chunk_stem(run_dir, model, a, b)
        chunk = _read_chunk_frame(stem, "results")
        results.append(chunk)
        preds.append(_read_chunk_frame(stem, "predictions"))
        info = markers[(model, a, b)]
        per_config = info.get("images")
        if per_config is None:  # chunks written before the count was recorded: images with rows
            per_config = (chunk.assign(config=[config_label(*k) for k in zip(chunk["method"], chunk["layer"],
                                                                                chunk["mix"])])
                          .groupby("config")["image"].nunique().to_dict())
        for cfg, seconds in info.get("seconds", {}).items():
            timings.append({"model": model, "config": cfg, "seconds": seconds,
                            "images": int(per_config.get(cfg, 0))})
    res = sort_results(make_results_frame(pd.concat(results) if results else []))
    pred = make_predictions_frame(pd.concat(preds) if preds else [])
    pred = pred.sort_values(["model", "image"], kind="mergesort").reset_index(drop=True)
    write_frame(res, run_dir / "results.parquet", csv=True)
    write_frame(pred, run_dir / "predictions.parquet", csv=True)
    mis = pred[~pred["correct"]]
    atomic_write(run_dir / "misclassified.csv",
                 mis.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    timing = pd.DataFrame(timings, columns=["model", "config", "seconds", "images"])
    if len(timing):
        timing = timing.groupby(["model", "config"], sort=True).sum().reset_index()
    atomic_write(run_dir / "timing.csv", timing.to_csv(index=False, lineterminator="\n"))
    counts = res.groupby("status").size().to_dict()
    manifest = {
        "config": config,
        "config_hash": config_hash(config),
        "versions": package_versions(),
        "data_fingerprint": config.get("data_fingerprint"),
        "models": config.get("model_meta", {}),
        "chunks": {"expected": len(wanted), "merged": len(present),
                   "missing": [list(c) for c in missing]},
        "rows": int(len(res)),
        "status_counts": {k: int(v) for k, v in counts.items()},
        "images": {
            m: {"evaluated": int(g["correct"].sum()), "misclassified": int((~g["correct"]).sum()),
                "misclassified_images": g.loc[~g["correct"], "image"].astype(int).tolist()}
            for m, g in pred.groupby("model", sort=True)
        },
        "sha256": {"results.parquet": sha256_file(run_dir / "results.parquet"),
                   "results.csv": sha256_file(run_dir / "results.csv")},
        "compute_seconds": float(timing["seconds"].sum()) if len(timing) else 0.0,
        "chunk_markers": seen,
    }
    write_json(run_dir / "manifest.json", manifest)
    return manifest


def check_merge_current(run_dir: str | os.PathLike) -> None:
    """Raise if chunks finished (or were recomputed) after ``results.parquet`` was merged: the
    merged table would silently miss or contradict them. No-op when nothing is merged yet."""
    run_dir = Path(run_dir)
    path = run_dir / "results.parquet"
    if not path.exists():
        return
    merged = path.stat().st_mtime_ns
    # by time, and (file systems with coarse timestamps: a chunk finished in the merge's tick) by
    # the markers the merge recorded: one it did not see, or one rewritten since, is newer too
    manifest = run_dir / "manifest.json"  # written after the tables: absent if the merge was cut short
    recorded = (read_json(manifest) or {}).get("chunk_markers") if manifest.exists() else {}
    current = marker_digests(run_dir) if recorded is not None else {}
    newer = sorted(m for m in (run_dir / "chunks").glob("*/c*.done.json")
                   if m.stat().st_mtime_ns > merged
                   or (recorded is not None and recorded.get(m.relative_to(run_dir).as_posix())
                       != current.get(m.relative_to(run_dir).as_posix())))
    if newer:
        raise RuntimeError(
            f"{run_dir}: {len(newer)} chunk(s) finished after results.parquet was merged (e.g. "
            f"{newer[0].relative_to(run_dir)}); run `shapesynth-eval merge {run_dir}` "
            f"(with --allow-partial if chunks are still missing)")


def load_results(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The merged long table of a run directory. Never merges itself: raises if the run is not
    merged yet, or if chunks finished after the last merge (see :func:`check_merge_current`)."""
    run_dir = Path(run_dir)
    path = run_dir / "results.parquet"
    if not path.exists():
        if (run_dir / "run_config.json").exists():
            raise FileNotFoundError(
                f"{run_dir}: not merged yet (no results.parquet); run `shapesynth-eval merge {run_dir}`")
        raise FileNotFoundError(f"{run_dir}: not a run directory (no results.parquet, no run_config.json)")
    check_merge_current(run_dir)
    return _read_merged(path, make_results_frame)


def load_predictions(run_dir: str | os.PathLike) -> pd.DataFrame:
    path = Path(run_dir) / "predictions.parquet"
    if not path.exists():
        return make_predictions_frame([])
    return _read_merged(path, make_predictions_frame)


def _read_merged(path: Path, make) -> pd.DataFrame:
    """A merged table checked against its schema; an error naming the file if it is not one."""
    try:
        return make(pd.read_parquet(path))
    except (ValueError, TypeError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a table merged by shapesynth-eval ({err}); run "
                         f"`shapesynth-eval merge {path.parent}` to rebuild it") from None
