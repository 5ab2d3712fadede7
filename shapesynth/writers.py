"""Writers: the Hub parquet layout (default), imagefolder and arrow (`save_to_disk`).

Generation is cut into shards of `samples_per_shard` consecutive indices per split. A shard is
a pure function of (config, split, shard number), so the output is byte-identical for any
number of processes and for any `--shard i/n` spread (machine i writes shards k with
k % n == i). Every file is written under a temp name and renamed; a shard counts as done when
its final file exists, which is how `--resume` skips finished work.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from shapesynth.config import SPLITS, SynthConfig
from shapesynth.render import ShapeSynth
from shapesynth.schema import META_COLUMNS, atomic_create, atomic_write, encode_png, features, is_temp_file, meta_row

MANIFEST = "shapesynth.json"
WORK_DIR = ".shapesynth"
FORMAT_VERSION = 1


class OutputError(RuntimeError):
    """The output folder cannot be written as asked (the message says why and what to pass)."""


@dataclass(frozen=True)
class Shard:
    split: str
    number: int
    count: int  # shards in this split
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.number:05d}-of-{self.count:05d}"


def shard_plan(cfg: SynthConfig, samples_per_shard: int) -> list[Shard]:
    if not isinstance(samples_per_shard, int) or isinstance(samples_per_shard, bool) or samples_per_shard < 1:
        raise OutputError(f"samples_per_shard (--samples-per-shard) must be an int >= 1, got {samples_per_shard!r}")
    plan = []
    for split in SPLITS:
        n = cfg.split_size(split)
        count = math.ceil(n / samples_per_shard)
        plan += [
            Shard(split, j, count, j * samples_per_shard, min(n, (j + 1) * samples_per_shard)) for j in range(count)
        ]
    return plan


# ---------------------------------------------------------------------- rows
def render_rows(synth: ShapeSynth, shard: Shard) -> dict[str, list]:
    """Columns of one shard: encoded image, mask and region PNGs, label and metadata."""
    cols: dict[str, list] = {"image": [], "mask": [], "region": [], "label": []}
    cols.update({k: [] for k in META_COLUMNS})
    for i in range(shard.start, shard.stop):
        s = synth.sample(shard.split, i)
        cols["image"].append(encode_png(s.image))
        mask_png = encode_png(s.mask)
        cols["mask"].append(mask_png)
        cols["region"].append(mask_png if s.meta["filled"] else encode_png(s.region))  # same array
        cols["label"].append(s.label)
        for k, v in meta_row(s.meta).items():
            cols[k].append(v)
    return cols


def rows_to_table(cols: dict[str, list]) -> pa.Table:
    data = dict(cols)
    for k in ("image", "mask", "region"):
        data[k] = [{"bytes": b, "path": None} for b in cols[k]]
    return pa.Table.from_pydict(data, schema=features().arrow_schema)


# ---------------------------------------------------------------------- formats
class HubParquet:
    """`data/{split}-NNNNN-of-NNNNN.parquet` plus README.md: `datasets.load_dataset(DIR)`."""

    name = "hub"

    def shard_path(self, out: Path, shard: Shard) -> Path:
        return out / "data" / f"{shard.stem}.parquet"

    def done(self, out: Path, shard: Shard) -> bool:
        return self.shard_path(out, shard).exists()

    def write(self, out: Path, shard: Shard, cols: dict[str, list]) -> None:
        buf = io.BytesIO()
        pq.write_table(rows_to_table(cols), buf, row_group_size=256)
        atomic_write(self.shard_path(out, shard), buf.getvalue())

    def finalize(self, out: Path, cfg: SynthConfig, plan: list[Shard], progress: bool = True) -> None:
        pass

    def data_files(self, split: str) -> str:
        return f"data/{split}-*.parquet"


class ImageFolder:
    """`{split}/{shard}/{images,masks,regions}/NNNNNN.png` plus one metadata.jsonl per shard.

    Loadable with ``load_dataset("imagefolder", data_dir=DIR)``: the `mask_file_name` and
    `region_file_name` columns become Image columns. The metadata file is written last, so a
    shard is done when it exists.
    """

    name = "imagefolder"

    def shard_dir(self, out: Path, shard: Shard) -> Path:
        return out / shard.split / f"{shard.number:05d}"

    def done(self, out: Path, shard: Shard) -> bool:
        return (self.shard_dir(out, shard) / "metadata.jsonl").exists()

    def write(self, out: Path, shard: Shard, cols: dict[str, list]) -> None:
        d = self.shard_dir(out, shard)
        lines = []
        for k, index in enumerate(cols["index"]):
            stem = f"{index:06d}.png"
            for kind, folder in (("image", "images"), ("mask", "masks"), ("region", "regions")):
                atomic_write(d / folder / stem, cols[kind][k])
            row = {"file_name": f"images/{stem}", "mask_file_name": f"masks/{stem}", "region_file_name": f"regions/{stem}"}
            row["label"] = cols["label"][k]
            row.update({c: cols[c][k] for c in META_COLUMNS})
            lines.append(json.dumps(row, sort_keys=True))
        atomic_write(d / "metadata.jsonl", "\n".join(lines) + "\n")

    def finalize(self, out: Path, cfg: SynthConfig, plan: list[Shard], progress: bool = True) -> None:
        pass

    def data_files(self, split: str) -> str:
        return f"{split}/**"


class Arrow:
    """`save_to_disk` layout (`datasets.load_from_disk(DIR)`).

    Shards are first written as parquet under `.shapesynth/` (so interrupted runs resume);
    the last step converts them, with a fingerprint derived from the data so the output is
    deterministic, and removes the work files.
    """

    name = "arrow"
    _parquet = HubParquet()

    def _work(self, out: Path) -> Path:
        return out / WORK_DIR / "parquet"

    def done(self, out: Path, shard: Shard) -> bool:
        return (out / "dataset_dict.json").exists() or self._parquet.done(self._work(out), shard)

    def write(self, out: Path, shard: Shard, cols: dict[str, list]) -> None:
        self._parquet.write(self._work(out), shard, cols)

    @staticmethod
    def _converted(out: Path) -> bool:
        if not (out / "dataset_dict.json").exists():
            return False
        # a run killed between the last move and the cleanup of `_convert` left the work files,
        # which nothing reads any more
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        return True

    def finalize(self, out: Path, cfg: SynthConfig, plan: list[Shard], progress: bool = True) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): shard runs there must not finish at the same time
            fcntl = None
        if self._converted(out):
            return
        # --shard runs in a shared folder that finish at the same time would convert into the same
        # work folder at once, each removing the other's files: one converts, the others wait
        # for it here and then find the dataset converted
        try:
            lock = open(out / WORK_DIR / "finalize.lock", "a")
        except FileNotFoundError:  # another run converted it (and removed the work folder) since
            if self._converted(out):
                return
            raise
        with lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not self._converted(out):
                self._convert(out, plan, progress)

    def _convert(self, out: Path, plan: list[Shard], progress: bool) -> None:
        import hashlib

        import datasets

        work = self._work(out)
        splits = {}
        for split in SPLITS:
            files = [self._parquet.shard_path(work, s) for s in plan if s.split == split]
            if not files:
                continue
            table = pa.concat_tables([pq.read_table(f) for f in files])
            digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()[:16]
            info = datasets.DatasetInfo(features=features())
            splits[split] = datasets.Dataset(table, info=info, split=split, fingerprint=digest)
        dd = datasets.DatasetDict(splits)
        tmp = out / WORK_DIR / "arrow"
        if tmp.exists():
            shutil.rmtree(tmp)
        bars_were_on = datasets.is_progress_bar_enabled()
        if not progress:  # datasets' own "Saving the dataset" bars, process-wide: restored below
            datasets.disable_progress_bars()
        try:
            dd.save_to_disk(str(tmp))
        finally:
            if bars_were_on and not progress:
                datasets.enable_progress_bars()
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "dataset_dict.json"):
            target = out / entry.name
            if target.is_dir():  # left by an interrupted finalize (no dataset_dict.json yet)
                shutil.rmtree(target)
            entry.replace(target)  # dataset_dict.json last: it marks completion
        shutil.rmtree(out / WORK_DIR)

    def data_files(self, split: str) -> str:
        # save_to_disk's own files only: datasets writes cache-*.arrow beside them (map, filter)
        return f"{split}/data-*.arrow"


FORMATS: dict[str, object] = {f.name: f for f in (HubParquet(), ImageFolder(), Arrow())}


def get_format(name: str):
    try:
        return FORMATS[name]
    except KeyError:
        raise OutputError(f"unknown format {name!r} (known: {sorted(FORMATS)})") from None


def read_manifest(out: str | Path, *keys: str) -> dict:
    """The ``shapesynth.json`` of a dataset folder; an OutputError naming the file when it is not
    a JSON object holding ``keys`` (an empty or truncated file from a full disk or a killed copy
    escaped as a JSONDecodeError or KeyError traceback)."""
    path = Path(out) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OutputError(f"{path} is damaged ({type(err).__name__}: {err}); restore it or regenerate the "
                          "dataset") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        holding = f" holding {', '.join(map(repr, keys))}" if keys else ""
        raise OutputError(f"{path} is damaged: not a JSON object{holding} as `shapesynth generate` writes it; "
                          "restore it or regenerate the dataset")
    return data


def detect_format(out: str | Path) -> str:
    out = Path(out)
    manifest = out / MANIFEST
    if manifest.exists():
        return read_manifest(out, "format")["format"]
    if (out / "dataset_dict.json").exists():
        return "arrow"
    if list((out / "data").glob("*.parquet")):
        return "hub"
    if list(out.glob("*/*/metadata.jsonl")):
        return "imagefolder"
    raise OutputError(f"{out} holds no shapesynth dataset (no {MANIFEST}, data/*.parquet, dataset_dict.json or metadata.jsonl)")


# ---------------------------------------------------------------------- output folder policy
_UNSAFE = {Path("/"), Path.home()}


def _flat(d: dict, prefix: str = "") -> dict:
    """{"config": {"split_sizes": {"test": 50}}} -> {"config.split_sizes.test": 50}."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def recipe_differences(old: dict, new: dict) -> list[str]:
    """Each field of the recipe `new` that the earlier `old` differs in, as 'config.seed 0 -> 3'.

    The pool digests are left out: a config difference already explains them (see
    `_background_note` for a same config and other pools).
    """
    keys = [k for k in new if k != "backgrounds"]
    before = _flat({k: old.get(k) for k in keys})
    after = _flat(json.loads(json.dumps({k: new[k] for k in keys})))
    missing = object()
    return [
        f"{k} {'(absent)' if before.get(k, missing) is missing else _show(before[k])} -> "
        f"{'(absent)' if after.get(k, missing) is missing else _show(after[k])}"
        for k in sorted(set(before) | set(after))
        if before.get(k, missing) != after.get(k, missing)
    ]


def _background_note(old: dict, new: dict) -> tuple[str, str] | None:
    """(why, what to do) when the pools differ under the same config; None: they do not, or
    cannot be compared."""
    if "backgrounds" not in new or old.get("backgrounds") == new["backgrounds"]:
        return None
    if "backgrounds" not in old:
        return ("it was written before shapesynth.json recorded its background files, so they "
                "cannot be checked", "")
    changed = ", ".join(sorted(s for s in new["backgrounds"] if old["backgrounds"].get(s) != new["backgrounds"][s]))
    if new.get("config", {}).get("background") == "procedural":
        return (f"its procedural background pools differ from those this shapesynth version renders "
                f"(pools: {changed})", "use the shapesynth version that wrote it")
    return (f"its background files differ from those found now (pools: {changed})",
            "restore the files it was generated from")


def prepare_output(
    out: Path, manifest: dict, overwrite: bool, resume: bool, clean_temp: bool = False, sharded: bool = False
) -> None:
    """Refuse a folder that holds data unless --overwrite (wipe) or --resume (same recipe).

    With `clean_temp`, resuming also removes the temp files (`atomic_write`'s naming only) that a
    killed run left behind; no other run may be writing to the folder then. `sharded`: a
    `--shard i/n` run, which joins the folder the other shards write to (the messages say so);
    of shard runs started at the same moment, one writes the manifest and the others check it.
    """
    if overwrite and resume:
        raise OutputError("pass either --overwrite or --resume, not both")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if sharded:
        # another --shard run started at the same moment may be writing the manifest now: its
        # temp file is not data, and the exclusive creation below decides which run writes it
        entries = [name for name in entries if not is_temp_file(out / name)]
    if entries:
        if resume:
            old_path = out / MANIFEST
            if not old_path.exists():
                if sharded:
                    raise OutputError(
                        f"output folder {out} already holds data ({len(entries)} entries, e.g. {entries[:3]}) but no "
                        f"{MANIFEST}, so no other --shard run wrote it; pick a new --out (or --overwrite to replace it)"
                    )
                raise OutputError(f"cannot resume in {out}: it holds no {MANIFEST} from an earlier run")
            old = read_manifest(out)
            diff = recipe_differences(old, manifest)
            if diff and sharded:
                raise OutputError(
                    f"{out} holds shards of a different recipe ({'; '.join(diff)}; the folder's -> this run's): "
                    f"all --shard i/n runs of one dataset must use the same options (--config {out / MANIFEST} "
                    "repeats its config); for another dataset pick a new --out (--overwrite would delete the "
                    "other shards' work)"
                )
            if diff:
                raise OutputError(
                    f"cannot resume in {out}: the earlier run differs in {'; '.join(diff)}; rerun with its "
                    f"options (--config {out / MANIFEST} repeats its config), or pass --overwrite to start over"
                )
            note = _background_note(old, manifest)  # the config is the same: blame the pools
            if note and sharded:
                raise OutputError(
                    f"{out} holds shards of the same config, but {note[0]}: all --shard i/n runs of one "
                    f"dataset must draw from the same backgrounds; {note[1] + ', or ' if note[1] else ''}pick a new --out"
                )
            if note:
                raise OutputError(f"cannot resume in {out}: the earlier run has the same config, but {note[0]}; "
                                  f"{note[1] + ', or ' if note[1] else ''}pass --overwrite to start over")
            if clean_temp:
                for p in out.rglob("*"):
                    if is_temp_file(p):
                        p.unlink()
            return
        if not overwrite:
            raise OutputError(
                f"output folder {out} already holds data ({len(entries)} entries, e.g. {entries[:3]}); "
                "pass --overwrite to replace it or --resume to finish an interrupted run"
            )
        resolved = out.resolve()
        if resolved in _UNSAFE or resolved in Path.cwd().resolve().parents or resolved == Path.cwd().resolve():
            raise OutputError(f"refusing to --overwrite {resolved}: pick a dedicated output folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    if not sharded:
        atomic_write(out / MANIFEST, text)
    elif not atomic_create(out / MANIFEST, text):
        # a --shard run that started beside this one wrote it first: join it, recipe checked
        prepare_output(out, manifest, overwrite=False, resume=True, sharded=True)


def pools_digest(pools: dict) -> dict[str, str]:
    """Per split, a hash of the pool's bases in order (name and pixel hash): what a sample's
    background is drawn from, which the config alone does not fix for file sources."""
    import hashlib

    return {
        split: hashlib.sha256("".join(f"{n}\t{h}\n" for n, h in zip(pool.names, pool.hashes)).encode()).hexdigest()
        for split, pool in sorted(pools.items())
    }


def manifest_for(cfg: SynthConfig, fmt: str, samples_per_shard: int, pools: dict | None = None) -> dict:
    """The recipe written to (and, on --resume or --shard, checked against) ``shapesynth.json``.

    With `pools`, it also records their digests, so shards rendered from other background files
    (changed between an interrupted run and its resume, or on another machine) are refused
    instead of mixed into one dataset.
    """
    manifest = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "samples_per_shard": samples_per_shard,
        "config": cfg.to_dict(),
    }
    if pools is not None:
        manifest["backgrounds"] = pools_digest(pools)
    return manifest


# ---------------------------------------------------------------------- worker side
_WORKER: dict = {}


def _init_worker(cfg_dict: dict, fmt: str, out: str) -> None:
    _WORKER["synth"] = ShapeSynth(SynthConfig.from_dict(cfg_dict))
    _WORKER["format"] = get_format(fmt)
    _WORKER["out"] = Path(out)


def _init_pool_worker(cfg_dict: dict, fmt: str, out: str) -> None:
    # Ctrl+C reaches the whole process group: the parent alone handles it (and ends the pool),
    # rather than every worker printing a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(cfg_dict, fmt, out)


def _write_shard(shard: Shard) -> tuple[Shard, int]:
    cols = render_rows(_WORKER["synth"], shard)
    _WORKER["format"].write(_WORKER["out"], shard, cols)
    return shard, shard.stop - shard.start


def write_shards(
    cfg: SynthConfig,
    out: Path,
    fmt: str,
    shards: list[Shard],
    num_proc: int,
    on_done: Callable[[Shard, int], None],
) -> None:
    """Render and write the given shards with `num_proc` processes (fork: pools are shared)."""
    from shapesynth.backgrounds import build_pools

    build_pools(cfg)  # once in the parent; forked workers inherit the cache
    if num_proc <= 1 or len(shards) <= 1:
        _init_worker(cfg.to_dict(), fmt, str(out))
        for shard in shards:
            on_done(*_write_shard(shard))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(num_proc, initializer=_init_pool_worker, initargs=(cfg.to_dict(), fmt, str(out))) as pool:
        for shard, n in pool.imap_unordered(_write_shard, shards):
            on_done(shard, n)

