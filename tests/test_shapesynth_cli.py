"""`shapesynth generate / preview / push` from the command line, bad input and the Hub upload."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shapesynth.hub as hub
from shapesynth.backgrounds import clear_pool_cache
from shapesynth.cli import main
from shapesynth.readers import data_file_list

TINY = ["--image-size", "32", "--size-bands", "0.31-0.39,0.16-0.19", "--train-size", "24", "--val-size", "6", "--test-size", "12", "--samples-per-shard", "10", "--no-progress", "--num-proc", "1"]


pytestmark = pytest.mark.usefixtures("fresh_pool_cache")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "data"
    assert main(["generate", "--out", str(out), *TINY]) == 0
    return out


def test_generate_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["generate", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "written     42 samples" in text and "fingerprint" in text
    assert "audit       not run for val (too few samples); train, test passed" in text
    assert (out / "README.md").exists() and len(list((out / "data").glob("*.parquet"))) == 6


def test_generate_refuses_existing_data_then_overwrites(generated, capsys):
    assert main(["generate", "--out", str(generated), *TINY]) == 2
    assert "already holds data" in capsys.readouterr().err
    assert main(["generate", "--out", str(generated), *TINY, "--overwrite"]) == 0


def test_config_file_reproduces_a_dataset(generated, tmp_path):
    from shapesynth import dataset_fingerprint

    again = tmp_path / "again"
    assert main(["generate", "--out", str(again), "--config", str(generated / "shapesynth.json"), "--samples-per-shard", "10", "--no-progress"]) == 0
    assert dataset_fingerprint(again) == dataset_fingerprint(generated)


def test_preview_tile_draws_the_mask_contour():
    import cv2

    from shapesynth.preview import draw_tile

    image = np.full((32, 32, 3), 100, np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[16:26, 8:22] = 1.0  # below the class name
    tile = draw_tile(image, mask, label=1, scale=2)
    white = (tile == 255).all(axis=2)
    white[:16] = False  # the class name's rows
    inside = cv2.resize(mask, (64, 64), interpolation=cv2.INTER_NEAREST) >= 0.5
    edge = inside ^ cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    near_edge = cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert white.sum() >= 0.9 * edge.sum()  # the whole outline is drawn...
    assert not (white & ~near_edge).any()  # ...and nothing white away from it


def test_preview_writes_a_grid_with_contours(generated, tmp_path):
    png = tmp_path / "preview.png"
    assert main(["preview", "--data", str(generated), "--out", str(png), "--per-class", "2"]) == 0
    grid = np.asarray(Image.open(png))
    assert grid.shape[0] > 6 * 64 and grid.shape[1] > 2 * 64  # 6 rows of 2 tiles at scale 2
    white = (grid == 255).all(axis=2)
    assert white.mean() > 0.01  # contour lines and padding are drawn
    # row k shows the first two samples of class k, each as its own tile (padding alone was
    # enough for the white fraction above)
    from shapesynth.preview import draw_tile
    from shapesynth.readers import open_split

    records = open_split(generated, "train")
    labels = [records[i][3] for i in range(len(records))]
    side, pad = 64, 4
    assert grid.shape == (6 * (side + pad) + pad, 2 * (side + pad) + pad, 3)
    for label in range(6):
        for column, i in enumerate([i for i, y in enumerate(labels) if y == label][:2]):
            image, mask, _, stored_label, _ = records[i]
            top, left = pad + label * (side + pad), pad + column * (side + pad)
            tile = grid[top : top + side, left : left + side]
            assert np.array_equal(tile, draw_tile(image, mask, stored_label, scale=2)), (label, column)
            assert (tile == 255).all(axis=2).any()  # its contour


def test_preview_keeps_one_row_per_class_when_a_class_has_fewer_samples(generated):
    # val holds one sample per class: with two per class wanted, the tiles of later classes used
    # to move up into the rows of earlier ones (3 rows of 2 for six classes)
    from shapesynth.preview import draw_tile, preview_array
    from shapesynth.readers import open_split

    records = open_split(generated, "val")
    labels = [records[i][3] for i in range(len(records))]
    assert sorted(labels) == list(range(6))
    grid = preview_array(generated, split="val", per_class=2, scale=1)
    side, pad = 32, 4
    assert grid.shape == (6 * (side + pad) + pad, 2 * (side + pad) + pad, 3)
    for label in range(6):
        image, mask, _, stored_label, _ = records[labels.index(label)]
        top = pad + label * (side + pad)
        assert np.array_equal(grid[top : top + side, pad : pad + side], draw_tile(image, mask, stored_label, scale=1))
        assert (grid[top : top + side, 2 * pad + side : 2 * pad + 2 * side] == 255).all()  # nothing to show


@pytest.mark.parametrize("flag", ["--per-class", "--scale"])
def test_preview_refuses_a_count_below_1_naming_the_flag(generated, tmp_path, capsys, flag):
    assert main(["preview", "--data", str(generated), "--out", str(tmp_path / "p.png"), flag, "0"]) == 2
    assert f"({flag}) must be an int >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_preview_of_a_missing_folder(tmp_path, capsys):
    assert main(["preview", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "p.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "64", "--backgrounds", "/definitely/missing"], "does not exist"),
        (["--image-size", "32"], "3 px empty triangle"),
        (["--image-size", "12"], "image_size"),
        (["--shard", "3/2"], "--shard"),
        (["--shard", "half"], "--shard"),
        (["--num-proc", "0"], "--num-proc"),
        (["--image-size", "32", "--size-bands", "0.8-0.9"], "cannot fit"),
        (["--config", "/no/such/config.json"], "does not exist"),
    ],
)
def test_bad_arguments_give_clear_errors(tmp_path, capsys, args, message):
    assert main(["generate", "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, text, words", [("c.json", "{'seed': 1", "c.json is not valid JSON"),
                                               ("c.yaml", "seed: [1", "c.yaml is not valid YAML")])
def test_a_malformed_config_file_is_named(tmp_path, capsys, name, text, words):
    (tmp_path / name).write_text(text)
    assert main(["generate", "--out", str(tmp_path / "o"), "--config", str(tmp_path / name)]) == 2
    assert words in capsys.readouterr().err


def _background_folder(tmp_path):
    """Eight random 40 px backgrounds in tmp_path/bgs, and the generator that drew them."""
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(bgs / f"{k}.png")
    return bgs, rng


def test_folder_backgrounds_from_the_cli_with_strict(tmp_path, capsys):
    bgs, rng = _background_folder(tmp_path)
    (bgs / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "o"
    assert main(["generate", "--out", str(out), *TINY, "--backgrounds", str(bgs)]) == 0
    text = capsys.readouterr().out
    assert "1 file(s) skipped" in text and "broken.jpg" in text
    clear_pool_cache()
    assert main(["generate", "--out", str(tmp_path / "o2"), *TINY, "--backgrounds", str(bgs), "--strict"]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_an_unaudited_split_does_not_count_as_passed(generated, tmp_path, capsys):
    from shapesynth.generate import audit_verdict

    counts = {"train": 6, "val": 6, "test": 6}
    assert audit_verdict(None, ["train", "val", "test"], counts) == "not run for train, val, test (too few samples)"
    assert audit_verdict(True, [], counts) == "passed"
    assert audit_verdict(False, ["val"], counts) == "FAILED: see the card; not run for val (too few samples)"
    capsys.readouterr()
    assert main(["card", "--data", str(generated)]) == 0  # val (6 samples) is not audited
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["audit_passed"] is None and verdict["not_audited"] == ["val"]
    assert "**Overall: incomplete**: val not audited" in (generated / "README.md").read_text()
    out = tmp_path / "tiny"
    assert main(["generate", "--out", str(out), *TINY, "--train-size", "6", "--test-size", "6", "--pool-sizes", "2,2,2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("audit"))
    assert line == "audit       not run for train, val, test (too few samples)"


SMALL = [*TINY, "--pool-sizes", "2,2,2"]


def test_resume_refusals_name_the_differing_fields(tmp_path, capsys):
    out = tmp_path / "rg"
    assert main(["generate", "--out", str(out), *SMALL]) == 0
    capsys.readouterr()
    for flags, diff in ((["--test-size", "18"], "config.split_sizes.test 12 -> 18"),
                        (["--seed", "3"], "config.seed 0 -> 3"),
                        (["--image-size", "40"], "config.image_size 32 -> 40"),
                        (["--samples-per-shard", "7"], "samples_per_shard 10 -> 7")):
        assert main(["generate", "--out", str(out), *SMALL, *flags, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"differs in {diff};" in err and "--overwrite" in err, err
        assert "background" not in err, err  # procedural pools differ because the config does
    # the same config with other pools: blamed on the backgrounds, by source
    manifest = json.loads((out / "shapesynth.json").read_text())
    manifest["backgrounds"]["val"] = "0" * 64
    (out / "shapesynth.json").write_text(json.dumps(manifest))
    assert main(["generate", "--out", str(out), *SMALL, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "its procedural background pools differ from those this shapesynth version renders (pools: val)" in err and "config." not in err, err
    del manifest["backgrounds"]
    (out / "shapesynth.json").write_text(json.dumps(manifest))
    assert main(["generate", "--out", str(out), *SMALL, "--resume"]) == 2
    assert "written before shapesynth.json recorded its background files" in capsys.readouterr().err


def test_resume_blames_changed_background_files(tmp_path, capsys):
    bgs, rng = _background_folder(tmp_path)
    out = tmp_path / "o"
    assert main(["generate", "--out", str(out), *TINY, "--backgrounds", str(bgs)]) == 0
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(bgs / "extra.png")
    clear_pool_cache()
    capsys.readouterr()
    assert main(["generate", "--out", str(out), *TINY, "--backgrounds", str(bgs), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "its background files differ from those found now (pools:" in err and "config." not in err, err
    assert "restore the files it was generated from, or pass --overwrite" in err
    assert main(["generate", "--out", str(out), *TINY, "--backgrounds", str(bgs), "--shard", "1/2"]) == 2
    err = capsys.readouterr().err
    assert "holds shards of the same config, but its background files differ" in err and "pick a new --out" in err, err


def test_a_shard_of_another_recipe_is_refused_without_suggesting_overwrite(tmp_path, capsys):
    out = tmp_path / "sh"
    assert main(["generate", "--out", str(out), *SMALL, "--shard", "0/2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--out", str(out), *SMALL, "--shard", "1/2", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds shards of a different recipe (config.seed 0 -> 3;" in err, err
    assert "all --shard i/n runs of one dataset must use the same options" in err and "new --out" in err
    assert "cannot resume" not in err and "use --overwrite" not in err and "pass --overwrite" not in err
    assert main(["generate", "--out", str(out), *SMALL, "--shard", "1/2"]) == 0  # the same options join


def _main_interrupted(argv) -> int:
    try:
        return main(argv)
    except KeyboardInterrupt:  # would end the test session, and the user's run in a traceback
        pytest.fail("KeyboardInterrupt escaped main()")


def test_ctrl_c_says_what_is_finished_and_resumes(tmp_path, monkeypatch, capsys):
    import shapesynth.generate as gen
    import shapesynth.writers as writers
    from shapesynth.schema import is_temp_file

    out = tmp_path / "ctrl-c"

    def no_pools(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "build_pools", no_pools)
    assert _main_interrupted(["generate", "--out", str(out), *SMALL]) == 130
    assert capsys.readouterr().err == "shapesynth generate: interrupted before anything was written; run the same command again\n"
    monkeypatch.undo()
    real, calls = writers.render_rows, []

    def flaky(synth, shard):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(synth, shard)

    monkeypatch.setattr(writers, "render_rows", flaky)
    assert _main_interrupted(["generate", "--out", str(out), *SMALL]) == 130
    err = capsys.readouterr().err
    assert err == (f"shapesynth generate: interrupted; 2 of 6 shard(s) are finished in {out}, "
                   "and the same command with --resume continues from them\n")
    assert not [p for p in out.rglob("*") if is_temp_file(p)]
    # interrupted under --overwrite: rerun as it was, it would delete the finished shards
    calls.clear()
    assert _main_interrupted(["generate", "--out", str(out), *SMALL, "--overwrite"]) == 130
    assert capsys.readouterr().err.endswith("and the same command with --resume instead of --overwrite "
                                            "continues from them\n")
    monkeypatch.setattr(writers, "render_rows", real)
    assert main(["generate", "--out", str(out), *SMALL, "--resume"]) == 0
    assert "resumed     2 finished shard(s) kept" in capsys.readouterr().out


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
def test_ctrl_c_with_worker_processes_prints_one_line(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "shapesynth", "generate", "--out", str(out), "--image-size", "64", "--train-size", "4000",
           "--val-size", "6", "--test-size", "6", "--samples-per-shard", "20", "--pool-sizes", "2,2,2", "--num-proc", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(list((out / "data").glob("*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl+C does: the whole foreground group
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # hung: leave no processes behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode == 0:
        pytest.skip("generation finished before the interrupt")
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.startswith("shapesynth generate: interrupted; ") and err.count("\n") == 1, err


def test_generate_help_shows_the_defaults(capsys):
    from shapesynth import SynthConfig

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    # one block per option (its help wrapped inside), whitespace normalised
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", capsys.readouterr().out)]
    d = SynthConfig()
    for flag, default in (("--format {hub,imagefolder,arrow}", "hub"), ("--image-size IMAGE_SIZE", d.image_size),
                          ("--seed SEED", d.seed), ("--train-size TRAIN_SIZE", d.split_sizes["train"]),
                          ("--val-size VAL_SIZE", d.split_sizes["val"]), ("--test-size TEST_SIZE", d.split_sizes["test"]),
                          ("--samples-per-shard SAMPLES_PER_SHARD", 500), ("--min-contrast MIN_CONTRAST", d.min_contrast),
                          ("--small-backgrounds {refuse,upscale}", d.bg_small)):
        help_text = next(b for b in blocks if b.startswith(f"{flag} "))
        assert f"(default: {default})" in help_text, (flag, help_text)


@pytest.mark.parametrize("flag, knob", [("--min-contrast MIN_CONTRAST", "min_contrast"),
                                        ("--clutter-contrast CLUTTER_CONTRAST", "clutter_contrast")])
def test_generate_help_states_the_range_the_config_accepts(capsys, flag, knob):
    # --min-contrast said [0, 1] while the config refuses 1 (a shape as far from its background
    # as black from white everywhere)
    from shapesynth import ConfigError, SynthConfig

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", capsys.readouterr().out)]
    help_text = next(b for b in blocks if b.startswith(f"{flag} "))
    closed = re.search(r"in \[0, 1([\])])", help_text).group(1) == "]"
    SynthConfig(**{knob: 0.0})
    SynthConfig(**{knob: 0.999})
    if closed:
        SynthConfig(**{knob: 1.0})
    else:
        with pytest.raises(ConfigError, match=knob):
            SynthConfig(**{knob: 1.0})


def test_module_entry_point_has_help():
    done = subprocess.run([sys.executable, "-m", "shapesynth", "generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--push-to-hub" in done.stdout and "--resume" in done.stdout


# ---------------------------------------------------------------- push to hub (network mocked)
class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        return type("Commit", (), {"commit_url": f"https://hf.co/datasets/{kw['repo_id']}/commit/abc"})()




def test_push_refuses_an_incomplete_folder(tmp_path, monkeypatch, capsys):
    api = RecordingApi()
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    out = tmp_path / "half"
    assert main(["generate", "--out", str(out), *TINY, "--shard", "0/2", "--push-to-hub", "me/x"]) == 1
    assert api.calls == []
    assert main(["push", "--data", str(out), "me/x"]) == 2
    assert api.calls == []
    # neither a card forced onto the half dataset nor a push after it
    assert main(["card", "--data", str(out)]) == 2
    (out / "README.md").write_text("a card written by hand")
    assert main(["push", "--data", str(out), "me/x"]) == 2
    assert "incomplete" in capsys.readouterr().err and api.calls == []


class LocalHub:
    """The Hub as `upload_folder` documents it, kept in a local folder: the allow, ignore and
    delete patterns are matched by huggingface_hub's own `filter_repo_objects`; files uploaded
    are never deleted, nor is `.gitattributes`."""

    def __init__(self, root):
        self.root, self.calls = Path(root), []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        (self.root / repo_id / ".gitattributes").touch()

    def upload_folder(self, **kw):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kw["repo_id"], kw))
        local, remote = Path(kw["folder_path"]), self.root / kw["repo_id"]

        def files(root):
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

        added = list(filter_repo_objects(files(local), allow_patterns=kw.get("allow_patterns"),
                                         ignore_patterns=kw.get("ignore_patterns")))
        if kw.get("delete_patterns") is not None:
            for rel in filter_repo_objects(files(remote), allow_patterns=kw["delete_patterns"]):
                if rel != ".gitattributes" and rel not in added:
                    (remote / rel).unlink()
        for rel in added:
            (remote / rel).parent.mkdir(parents=True, exist_ok=True)
            (remote / rel).write_bytes((local / rel).read_bytes())
        return type("Commit", (), {"commit_url": f"https://hf.co/datasets/{kw['repo_id']}/commit/{len(self.calls)}"})()


def test_push_to_hub_uploads_exactly_what_is_on_disk(monkeypatch, tmp_path, capsys):
    api = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    out = tmp_path / "pushed"
    assert main(["generate", "--out", str(out), *TINY, "--push-to-hub", "me/shapes", "--private"]) == 0
    assert "hf.co/datasets/me/shapes" in capsys.readouterr().out
    (create, repo, ckw), (upload, repo2, ukw) = api.calls
    assert (create, repo, upload, repo2) == ("create_repo", "me/shapes", "upload_folder", "me/shapes")
    assert ckw["repo_type"] == "dataset" and ckw["private"] is True and ckw["exist_ok"] is True
    assert ukw["repo_type"] == "dataset" and Path(ukw["folder_path"]) == out
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    remote = tmp_path / "hub" / "me" / "shapes"
    assert sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()) == sorted(on_disk + [".gitattributes"])
    assert "README.md" in on_disk and any(f.startswith("data/") for f in on_disk)


@pytest.mark.parametrize("fmt", ["imagefolder", "arrow"])
def test_push_leaves_out_work_temp_and_cache_files_with_few_patterns(monkeypatch, tmp_path, fmt):
    import datasets

    api = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    out = tmp_path / fmt
    assert main(["generate", "--out", str(out), *TINY, "--format", fmt]) == 0
    (out / "train" / ".000001.png.Ab3xYz12.tmp").write_bytes(b"a killed run's temp file")
    (out / ".shapesynth").mkdir(exist_ok=True)
    (out / ".shapesynth" / "train-00000.parquet").write_bytes(b"work")
    if fmt == "arrow":  # `datasets` writes these beside a split it maps; `[1]` is no fnmatch class here
        (out / "train" / "cache-[1].arrow").write_bytes(b"cache")
        (out / "train" / "cache-1.arrow").write_bytes(b"cache")
    hub.push_to_hub(out, "me/shapes")
    remote = tmp_path / "hub" / "me" / "shapes"
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == sorted(
        hub.upload_list(out) + [".gitattributes"])
    assert "train/cache-1.arrow" not in hub.upload_list(out) and len(hub.upload_list(out)) > (60 if fmt == "imagefolder" else 6)
    # huggingface_hub matches every file against every pattern: one pattern per file made the push
    # of a default-size imagefolder dataset (15,000 files) spend half a minute before uploading
    (_, _, kw), = [c for c in api.calls if c[0] == "upload_folder"]
    assert len(kw.get("allow_patterns") or []) + len(kw.get("ignore_patterns") or []) <= 4
    loaded = datasets.load_dataset(str(remote), cache_dir=str(tmp_path / "hf_cache"))
    assert {s: len(d) for s, d in loaded.items()} == {"train": 24, "val": 6, "test": 12}


def test_pushing_a_regenerated_dataset_leaves_no_stale_shards_on_the_hub(monkeypatch, tmp_path):
    # the card loads data/{split}-*.parquet: a shard of the first push that the second one does not
    # overwrite (fewer shards, so other names) would be loaded beside the new data
    import datasets

    from shapesynth.readers import load_metadata

    api = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["generate", "--out", str(first), *TINY]) == 0
    assert main(["generate", "--out", str(second), *TINY, "--train-size", "12", "--seed", "5"]) == 0
    hub.push_to_hub(first, "me/shapes", token="hf_secret")
    hub.push_to_hub(second, "me/shapes", private=True, token="hf_secret")
    remote = tmp_path / "hub" / "me" / "shapes"
    assert sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file()) == sorted(
        hub.upload_list(second) + [".gitattributes"])
    # what the token and private flag reach: every call of both pushes carries the token
    assert [(c[0], c[2]["token"]) for c in api.calls] == [("create_repo", "hf_secret"), ("upload_folder", "hf_secret")] * 2
    assert [c[2]["private"] for c in api.calls if c[0] == "create_repo"] == [False, True]
    loaded = datasets.load_dataset(str(remote), cache_dir=str(tmp_path / "hf_cache"))
    for split in ("train", "val", "test"):
        assert loaded[split]["index"] == load_metadata(second, split)["index"].tolist(), split
        assert loaded[split]["label"] == load_metadata(second, split)["label"].tolist(), split


def test_push_without_the_hub_is_one_clear_error(generated, tmp_path):
    # the real HfApi, offline: no traceback, the error says what failed and how to push later
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-m", "shapesynth", "push", "--data", str(generated), "me/shapes",
                           "--private"], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert f"cannot push {generated} to the Hub dataset repo 'me/shapes': OfflineModeIsEnabled" in done.stderr
    assert f"`shapesynth push --data {generated} me/shapes --private` uploads it" in done.stderr


def test_upload_list_skips_hidden_and_work_files(generated):
    (generated / ".shapesynth").mkdir(exist_ok=True)
    (generated / ".shapesynth" / "junk.parquet").write_bytes(b"x")
    files = hub.upload_list(generated)
    assert not any(f.startswith(".") for f in files)
    assert len(data_file_list(generated)) == len([f for f in files if f.startswith("data/")])


def test_difficulty_flag_sets_the_preset_and_flags_still_win(tmp_path):
    from shapesynth import SynthConfig
    from shapesynth.cli import build_parser, config_from_args

    args = build_parser().parse_args(["generate", "--out", "x", "--difficulty", "easy", "--clutter", "0.9"])
    cfg = config_from_args(args)
    easy = SynthConfig().with_difficulty("easy")
    assert cfg.clutter == 0.9 and cfg.clutter_contrast == easy.clutter_contrast and cfg.min_contrast == easy.min_contrast
    args = build_parser().parse_args(["generate", "--out", "x", "--difficulty", "0.25"])
    assert config_from_args(args) == SynthConfig().with_difficulty(0.25)


def test_card_command_rewrites_the_same_card(generated):
    before = (generated / "README.md").read_text()
    (generated / "README.md").unlink()
    assert main(["card", "--data", str(generated)]) == 0
    assert (generated / "README.md").read_text() == before


def test_shape_and_pool_flags_reach_the_config(capsys):
    from shapesynth.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["generate", "--out", "x", "--image-size", "64", "--size-bands", "0.3-0.35,0.15-0.2", "--stroke-fraction", "0.25", "--pool-sizes", "10,2,3",
         "--size-band-weights", "1,3"]
    )
    cfg = config_from_args(args)
    assert cfg.size_bands == ((0.3, 0.35), (0.15, 0.2)) and cfg.stroke_fraction == 0.25
    assert cfg.size_band_weights == (1.0, 3.0)
    assert cfg.bg_pool_sizes == {"train": 10, "val": 2, "test": 3}
    # a malformed value is a usage error (exit 2) naming the flag, its expected form and the value
    for flag, value, why in (("--size-bands", "big", "size bands look like 0.31-0.39,0.16-0.19"),
                             ("--size-band-weights", "1,a", "weights look like 1,1,2"),
                             ("--pool-sizes", "1,2", "pool sizes are three integers train,val,test")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["generate", "--out", "x", flag, value])
        assert exc.value.code == 2, flag
        err = capsys.readouterr().err
        assert f"error: argument {flag}: {why} (got '{value}')" in err, err


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp, "is a folder, not a JSON/YAML file"),
    (lambda tmp: (tmp / "c.json").write_bytes(b"\xd0\xff\x00") and tmp / "c.json", "cannot be read as text"),
])
def test_a_config_that_is_a_folder_or_not_text_is_named(tmp_path, capsys, make, words):
    """A folder or a binary --config ended in an IsADirectoryError / UnicodeDecodeError traceback."""
    config = make(tmp_path)
    assert main(["generate", "--out", str(tmp_path / "o"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shapesynth generate: error: config file {config} {words}") and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--out", "--config", "--backgrounds", "--backgrounds-train", "--push-to-hub"])
def test_an_empty_path_or_name_is_refused_naming_its_flag(tmp_path, capsys, flag, monkeypatch):
    """`--backgrounds-train ''` and `--push-to-hub ''` were dropped silently (a procedural dataset
    was written, nothing pushed); `--config ''` was a traceback; `--out ''` meant the current folder."""
    monkeypatch.chdir(tmp_path)
    out = [] if flag == "--out" else ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main(["generate", *out, *TINY, flag, ""])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"shapesynth generate: error: argument {flag}: an empty value names nothing"
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_below_a_file_is_a_one_line_error(tmp_path, capsys):
    """--out under a file ended in a NotADirectoryError traceback."""
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--out", str(tmp_path / "file" / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth generate: error:") and str(tmp_path / "file") in err and len(err.splitlines()) == 1
