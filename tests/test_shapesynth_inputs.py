"""Bad and conflicting input to `shapesynth`: each refused with its own error naming the field,
flag or argument (exit status 2 from the CLI), before anything is written; and the finishing
steps (`card` on merged shard folders, stale temp files, durable writes)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shapesynth import ShapeSynth, SynthConfig
from shapesynth.backgrounds import build_pools
from shapesynth.cli import build_parser, config_from_args, main
from shapesynth.config import HARD_CLUTTER, PAPER_SIZE_BANDS, ConfigError
from shapesynth.generate import generate
from shapesynth.readers import open_split
from shapesynth.torchdata import SynthStream
from shapesynth.writers import OutputError

SIZES = ["--train-size", "24", "--val-size", "6", "--test-size", "12", "--samples-per-shard", "10", "--no-progress",
         "--num-proc", "1"]
TINY = ["--image-size", "32", "--size-bands", "0.31-0.39,0.16-0.19", *SIZES]
CFG = SynthConfig(image_size=32, size_bands=PAPER_SIZE_BANDS[:2], split_sizes={"train": 12, "val": 6, "test": 6},
                  bg_pool_sizes={"train": 2, "val": 1, "test": 1})


pytestmark = pytest.mark.usefixtures("fresh_pool_cache")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(capsys, argv, *words):
    """`shapesynth ARGV` exits with status 2 and one error line holding every word."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ---------------------------------------------------------------- `card` finishes merged shard folders
def test_card_finishes_an_arrow_dataset_merged_from_shard_folders(tmp_path, capsys):
    reference = tmp_path / "reference"
    assert main(["generate", "--out", str(reference), *TINY, "--format", "arrow"]) == 0
    merged = tmp_path / "merged"
    for i in range(2):
        part = tmp_path / f"machine{i}"
        assert main(["generate", "--out", str(part), *TINY, "--format", "arrow", "--shard", f"{i}/2"]) == 0
        shutil.copytree(part, merged, dirs_exist_ok=True)  # "copy the folders together"
    with pytest.raises(OutputError, match="shapesynth card --data"):  # the readers' advice...
        open_split(merged, "test")
    assert main(["card", "--data", str(merged)]) == 0  # ...works
    assert _tree(merged) == _tree(reference)
    assert len(open_split(merged, "test")) == 12


def test_card_names_the_missing_shards_and_a_folder_without_recipe(tmp_path, capsys):
    part = tmp_path / "part"
    assert main(["generate", "--out", str(part), *TINY, "--format", "arrow", "--shard", "1/2"]) == 0
    _refused(capsys, ["card", "--data", str(part)], "incomplete", "3 shard(s) missing", "train-00000-of-00003")
    _refused(capsys, ["card", "--data", str(tmp_path)], "has no shapesynth.json")


# ---------------------------------------------------------------- generate(): checked before the folder is touched
@pytest.mark.parametrize("shard", [(3, 2), (-1, 2), (0, 0), (2, 2), (0.5, 2)])
def test_generate_refuses_an_impossible_shard(tmp_path, shard):
    with pytest.raises(OutputError, match=r"shard \(--shard i/n\) must be .* got"):
        generate(CFG, tmp_path / "o", shard=shard, samples_per_shard=8, progress=False)
    assert not (tmp_path / "o").exists()


def test_samples_per_shard_0_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    _refused(capsys, ["generate", "--out", str(out), *TINY, "--samples-per-shard", "0"], "--samples-per-shard", "got 0")
    assert not out.exists()
    assert main(["generate", "--out", str(out), *TINY]) == 0  # the corrected rerun is not refused


# ---------------------------------------------------------------- config values: type, finiteness, shape
@pytest.mark.parametrize("flags, words", [
    (["--stroke-fraction", "inf"], ["stroke_fraction", "inf"]),
    (["--stroke-fraction", "nan"], ["stroke_fraction", "nan"]),
    (["--stroke-fraction", "1e308"], ["stroke_fraction", "1e+308"]),
    (["--clutter", "nan"], ["clutter must be a finite number", "nan"]),
    (["--min-contrast=-inf"], ["min_contrast", "-inf"]),
])
def test_non_finite_flags_are_named(tmp_path, capsys, flags, words):
    _refused(capsys, ["generate", "--out", str(tmp_path / "o"), *TINY, *flags], *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("entry, words", [
    ({"size_bands": [[0.31]]}, ["size_bands", "[[0.31]]"]),
    ({"size_bands": [[0.31, None]]}, ["size_bands", "None"]),
    ({"split_sizes": 5}, ["split_sizes", "5"]),
    ({"bg_jitter": "0.2"}, ["bg_jitter", "'0.2'"]),
    ({"bg_base_scale": None}, ["bg_base_scale", "None"]),
    ({"bg_flip": "no"}, ["bg_flip", "'no'"]),
    ({"size_band_weights": [1, "x"]}, ["size_band_weights", "'x'"]),
    ({"bg_pool_fractions": {"train": None}}, ["bg_pool_fractions['train']", "None"]),
    ({"seed": 1.5}, ["seed", "1.5"]),
])
def test_wrongly_typed_config_entries_are_named(tmp_path, capsys, entry, words):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"image_size": 32, "size_bands": [[0.31, 0.39]], **entry}))
    _refused(capsys, ["generate", "--out", str(tmp_path / "o"), *SIZES, "--config", str(config)], *words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("entry, words", [
    # a split left out used to get one procedural base instead of its default pool, silently
    ({"bg_pool_sizes": {"train": 4}}, ["bg_pool_sizes", "missing ['val', 'test']"]),
    # multipliers 1 +- jitter: above 1 they turned negative and inverted the background's colours
    ({"bg_jitter": 1.5}, ["bg_jitter", "[0, 1]", "1.5"]),
    ({"split_sizes": {"train": True}}, ["split_sizes['train']", "True"]),
    # a mistyped size used to end in a MemoryError traceback inside rendering
    ({"image_size": 100_000_000}, ["image_size must be an int in [16, 4096]", "100000000"]),
    ({"bg_pool_sizes": {"train": True, "val": 1, "test": 1}}, ["bg_pool_sizes['train']", "True"]),
])
def test_out_of_range_config_values_are_named(entry, words):
    with pytest.raises(ConfigError) as raised:
        CFG.replace(**entry)
    for w in words:
        assert w in str(raised.value), (w, str(raised.value))


def test_numpy_integer_counts_are_accepted_and_stored_as_ints():
    cfg = CFG.replace(split_sizes={"train": np.int64(4)}, bg_pool_sizes={s: np.int32(2) for s in ("train", "val", "test")})
    assert cfg.split_sizes == {"train": 4} and type(cfg.split_sizes["train"]) is int
    assert json.loads(cfg.to_json())["bg_pool_sizes"] == {"train": 2, "val": 2, "test": 2}
    assert [len(p) for p in build_pools(cfg).values()] == [2, 2, 2]


def test_a_recipe_of_no_sample_is_refused(tmp_path, capsys):
    _refused(capsys, ["generate", "--out", str(tmp_path / "o"), *TINY, "--train-size", "0", "--val-size", "0",
                      "--test-size", "0"], "split_sizes", "hold no sample")
    assert not (tmp_path / "o").exists()


def test_numpy_scalars_and_paths_are_stored_as_plain_values(tmp_path):
    cfg = CFG.replace(seed=np.int64(3), margin_px=np.float32(1.5))
    assert type(cfg.seed) is int and type(cfg.margin_px) is float
    assert json.loads(cfg.to_json())["seed"] == 3
    for k in range(8):
        (tmp_path / "bgs").mkdir(exist_ok=True)
        from PIL import Image

        Image.fromarray(np.random.default_rng(k).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "bgs" / f"{k}.png")
    cfg = CFG.replace(background="folder", bg_path=tmp_path / "bgs")
    assert cfg.bg_path == str(tmp_path / "bgs")
    assert sum(len(p) for p in build_pools(cfg).values()) == 8
    split_cfg = CFG.replace(background="folder", bg_split_paths={"train": tmp_path / "bgs", "test": tmp_path})
    assert split_cfg.bg_split_paths == {"train": str(tmp_path / "bgs"), "test": str(tmp_path)}


# ---------------------------------------------------------------- background sources and flags
def test_hf_source_with_split_folders_is_refused(tmp_path, capsys):
    _refused(capsys, ["generate", "--out", str(tmp_path / "o"), *TINY, "--backgrounds-source", "hf",
                      "--backgrounds-train", str(tmp_path), "--backgrounds-test", str(tmp_path)],
             "background='hf' needs bg_path", "--backgrounds-train")


@pytest.mark.parametrize("flags, words", [
    (["--backgrounds", "X", "--backgrounds-train", "A", "--backgrounds-test", "B"], ["--backgrounds and", "exclude each other"]),
    (["--backgrounds-source", "procedural", "--backgrounds", "X"], ["--backgrounds-source procedural"]),
    (["--backgrounds-source", "procedural", "--backgrounds-train", "A", "--backgrounds-test", "B"], ["--backgrounds-source procedural"]),
])
def test_conflicting_background_flags_are_refused(tmp_path, capsys, flags, words):
    _refused(capsys, ["generate", "--out", str(tmp_path / "o"), *TINY, *flags], *words)


def test_background_flags_replace_the_config_files_backgrounds(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**CFG.to_dict(), "background": "folder", "bg_path": "from_file"}))
    args = build_parser().parse_args(["generate", "--out", "x", "--config", str(config), "--backgrounds-train", "A",
                                      "--backgrounds-test", "B"])
    cfg = config_from_args(args)  # recorded as used: the split folders, not the file's bg_path
    assert cfg.bg_path is None and cfg.bg_split_paths == {"train": "A", "test": "B"}
    # a dataset's recipe names the procedural source; --backgrounds alone switches it to folder
    config.write_text(json.dumps({"config": CFG.to_dict()}))
    cfg = config_from_args(build_parser().parse_args(["generate", "--out", "x", "--config", str(config), "--backgrounds", "D"]))
    assert (cfg.background, cfg.bg_path) == ("folder", "D")
    with pytest.raises(ConfigError, match="background='procedural' reads no files"):
        CFG.replace(bg_path="D")
    with pytest.raises(ConfigError, match="exclude each other"):
        CFG.replace(background="folder", bg_path="D", bg_split_paths={"train": "A", "test": "B"})


# ---------------------------------------------------------------- --difficulty after the flags
def test_difficulty_applies_after_the_flags_and_validates_once(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"image_size": 32, "clutter": 0.1, "min_contrast": 0.2}))
    args = build_parser().parse_args(["generate", "--out", "x", "--config", str(config), "--size-bands", "0.31-0.39",
                                      "--difficulty", "hard", "--min-contrast", "0.33"])
    cfg = config_from_args(args)  # the file's default bands alone would not fit 32 px
    assert cfg.image_size == 32 and cfg.size_bands == ((0.31, 0.39),)
    assert cfg.clutter == HARD_CLUTTER["clutter"]  # the preset overrides the file...
    assert cfg.min_contrast == 0.33  # ...and the flag overrides the preset


# ---------------------------------------------------------------- streams: epoch and index
def test_negative_epochs_and_non_integer_indices_are_named():
    synth = ShapeSynth(CFG)
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        synth.sample("train", 0, epoch=-1)
    with pytest.raises(TypeError, match="epoch must be an int, got 0.5"):
        synth.sample("train", 0, epoch=0.5)
    with pytest.raises(TypeError, match="i must be an int, got 1.5"):
        synth.sample("train", 1.5)
    assert synth.sample("train", np.int64(2), epoch=np.int64(1)).meta["index"] == 2
    with pytest.raises(ValueError, match="epoch must be >= 0, got -1"):
        SynthStream(CFG, length=4, epoch=-1)
    stream = SynthStream(CFG, length=4)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        stream.set_epoch(-2)
    with pytest.raises(TypeError, match="index must be an int, got 1.0"):
        stream[1.0]
    # int(2.5) used to make a stream of 2
    with pytest.raises(TypeError, match="length must be an int, got 2.5"):
        SynthStream(CFG, length=2.5)


# ---------------------------------------------------------------- files: stale temps, fsync, umask
def test_resume_removes_only_the_stale_temp_files_of_a_killed_run(tmp_path):
    out = tmp_path / "o"
    generate(CFG, out, samples_per_shard=8, progress=False)
    stale = [out / "data" / ".train-00000-of-00002.parquet.k3_x9a2q.tmp", out / ".README.md.abcd1234.tmp"]
    foreign = [out / "data" / ".notes.tmp", out / "keep.abcd1234.tmp"]
    for p in stale + foreign:
        p.write_bytes(b"partial")
    # a plain --shard run may share the folder with runs still writing: it leaves temp files alone
    generate(CFG, out, samples_per_shard=8, progress=False, shard=(1, 2))
    assert all(p.exists() for p in stale + foreign)
    generate(CFG, out, samples_per_shard=8, progress=False, resume=True)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in foreign)


def test_atomic_write_flushes_the_data_to_disk_before_the_rename(tmp_path, monkeypatch):
    from shapesynth.schema import atomic_write

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    atomic_write(tmp_path / "f.bin", b"12345")
    assert events == [("fsync", 5), ("replace", "f.bin")]


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    from shapesynth import schema

    target = tmp_path / "f.bin"
    schema.atomic_write(target, b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)
    else:  # the data is partly written, then the disk fills up
        def fsync_after_partial(fd):
            assert os.fstat(fd).st_size == len(b"new, longer content")
            boom()

        monkeypatch.setattr(os, "fsync", fsync_after_partial)
    with pytest.raises(OSError, match="disk full"):
        schema.atomic_write(target, b"new, longer content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_the_umask_is_read_without_being_changed(monkeypatch):
    if not Path("/proc/self/status").exists():
        pytest.skip("reading the umask without setting it needs /proc")
    from shapesynth import schema

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("the umask was set"))
        assert schema.process_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)
