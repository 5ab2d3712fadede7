"""Interruptions, resumption and atomic writes: a run killed at a chosen point (an injected
failure, not a random kill) and rerun as the docs say ends where the uninterrupted run ends,
with nothing half-written or left behind."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from shapesynth import SynthConfig
from shapesynth.config import PAPER_SIZE_BANDS
from shapesynth.generate import generate
from shapesynth.schema import process_umask
from shapesynth.writers import MANIFEST, WORK_DIR, OutputError

CFG = SynthConfig(
    image_size=32,
    size_bands=PAPER_SIZE_BANDS[:2],  # the smallest band's 3 px triangles have no hole at 32 px
    split_sizes={"train": 16, "val": 6, "test": 8},
    bg_pool_sizes={"train": 4, "val": 2, "test": 2},
)
BANDS = [[0.3, 0.4], [0.2, 0.25]]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _gen(out, cfg=CFG, **kw):
    kw.setdefault("samples_per_shard", 8)
    kw.setdefault("progress", False)
    return generate(cfg, out, **kw)


# ---------------------------------------------------------------- generate --shard: started together
def test_a_shard_run_joins_a_folder_whose_manifest_another_shard_run_is_writing(tmp_path):
    # two `--shard i/n` runs started at once: the second finds only the first one's temp file of
    # shapesynth.json (not yet renamed), which is no reason to refuse the folder
    reference = tmp_path / "ref"
    _gen(reference)
    out = tmp_path / "shared"
    out.mkdir()
    (out / f".{MANIFEST}.ab12cd34.tmp").write_text("{")  # the other run, mid-write
    _gen(out, shard=(1, 2))
    assert json.loads((out / MANIFEST).read_text())["config"] == CFG.to_dict()
    _gen(out, shard=(0, 2))
    assert {k: v for k, v in _tree(out).items() if not k.startswith(".")} == _tree(reference)


def test_shard_runs_started_together_never_replace_each_others_manifest(tmp_path, monkeypatch):
    # a shard run of another recipe publishes shapesynth.json between this run's check of the
    # folder and its own write: this run must check that recipe, not replace it and mix shards
    out = tmp_path / "shared"
    rival = json.dumps({"format": "hub", "format_version": 1, "samples_per_shard": 8,
                        "config": CFG.replace(seed=7).to_dict()}, sort_keys=True, indent=2) + "\n"
    real_mkstemp, fired = tempfile.mkstemp, []

    def rival_first(*args, **kwargs):
        made = real_mkstemp(*args, **kwargs)
        if kwargs.get("prefix") == f".{MANIFEST}." and not fired:
            fired.append(True)
            (out / MANIFEST).write_text(rival)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", rival_first)
    with pytest.raises(OutputError, match=r"holds shards of a different recipe \(config.seed 7 -> 0"):
        _gen(out, shard=(0, 2))
    assert fired and (out / MANIFEST).read_text() == rival
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST]  # no temp file left behind


# ---------------------------------------------------------------- generate --format arrow
def test_arrow_resume_after_a_kill_before_the_work_files_were_removed(tmp_path, monkeypatch):
    import shapesynth.writers as writers

    reference = tmp_path / "ref"
    _gen(reference, fmt="arrow")
    out = tmp_path / "arr"
    real_rmtree = writers.shutil.rmtree

    def killed_before_cleanup(path, *args, **kwargs):
        if Path(path).name == WORK_DIR:  # the conversion is complete: dataset_dict.json is in place
            raise KeyboardInterrupt("killed")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(writers.shutil, "rmtree", killed_before_cleanup)
    with pytest.raises(KeyboardInterrupt):
        _gen(out, fmt="arrow")
    monkeypatch.setattr(writers.shutil, "rmtree", real_rmtree)
    assert (out / "dataset_dict.json").exists() and (out / WORK_DIR).exists()
    summary = _gen(out, fmt="arrow", resume=True)
    assert summary.complete and summary.written == 0
    assert not (out / WORK_DIR).exists()
    assert _tree(out) == _tree(reference)


def test_shard_runs_that_finish_together_convert_the_arrow_dataset_once(tmp_path, monkeypatch):
    # in a shared folder the last two --shard runs can finish at the same moment: both then
    # convert, into the same work folder, and one must not remove the other's files mid-way
    import threading
    import time

    import datasets

    import shapesynth.writers as writers

    reference = tmp_path / "ref"
    _gen(reference, fmt="arrow")
    out = tmp_path / "shared"

    def killed_before_converting(self, *args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:  # every shard written, nothing converted yet
        m.setattr(writers.Arrow, "finalize", killed_before_converting)
        with pytest.raises(KeyboardInterrupt):
            _gen(out, fmt="arrow")
    real_save = datasets.DatasetDict.save_to_disk

    def slow_save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        time.sleep(1.0)  # the other run reaches its conversion meanwhile

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", slow_save)
    errors = []

    def last_shard_done():
        try:
            writers.get_format("arrow").finalize(out, CFG, writers.shard_plan(CFG, 8), progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    runs = [threading.Thread(target=last_shard_done) for _ in range(2)]
    runs[0].start()
    time.sleep(0.3)
    runs[1].start()
    for run in runs:
        run.join()
    assert errors == []
    assert (out / "dataset_dict.json").exists() and not (out / WORK_DIR).exists()
    _gen(out, fmt="arrow", resume=True)  # the card, as the last run writes it
    assert _tree(out) == _tree(reference)


# ---------------------------------------------------------------- training
def _tiny_cfg(out, **kw):
    from trainers.api import TrainConfig

    base = dict(arch="resnet18", image_size=32, out=str(out), batch_size=32, max_epochs=3, train_length=64,
                val_length=32, test_length=36, precision="32-true", num_workers=0, progress_bar=False,
                curriculum_epochs=0, log_every_n_steps=1, lr=1e-3, synth={"size_bands": BANDS}, threads=1)
    base.update(kw)
    return TrainConfig(**base)


class _KilledWhileTesting(Callback):
    """Stands in for a SIGKILL after training ended (early stop included), before the export."""

    def on_test_start(self, trainer, pl_module):
        raise RuntimeError("killed while testing")


def test_a_run_resumed_after_it_stopped_early_trains_no_further(tmp_path):
    from trainers.api import fit

    # the threshold fires after the first epoch's validation (any accuracy above 0.001)
    kw = dict(stop_at_val_acc=0.001)
    a = fit(_tiny_cfg(tmp_path / "a", **kw))
    assert a["stopped_by"].startswith("early stopping") and a["global_step"] == 2
    with pytest.raises(RuntimeError, match="killed while testing"):
        fit(_tiny_cfg(tmp_path / "b", **kw), callbacks=[_KilledWhileTesting()])
    assert not (tmp_path / "b" / "model.json").exists()
    # a checkpoint write cut by the kill leaves its temp file: the resumed run removes it
    stale = tmp_path / "b" / "checkpoints" / ".last.ckpt.ab12cd34.tmp"
    stale.write_bytes(b"partial")
    b = fit(_tiny_cfg(tmp_path / "b", **kw))  # the same command again
    for key in ("epochs", "global_step", "stopped_by", "best_val_accuracy", "test_accuracy"):
        assert b[key] == a[key], key
    ca = torch.load(tmp_path / "a/checkpoints/last.ckpt", weights_only=True)
    cb = torch.load(tmp_path / "b/checkpoints/last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert not stale.exists()


def test_checkpoints_are_renamed_into_place_from_their_own_folder(tmp_path, monkeypatch):
    # staged in the system temp folder, a checkpoint is copied (not renamed) into place when that
    # folder is another file system: a kill during the copy truncates last.ckpt for good
    from trainers.api import fit

    real_replace, renames = os.replace, []

    def recording_replace(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", recording_replace)
    fit(_tiny_cfg(tmp_path / "run", max_epochs=1))
    ckpts = {dst.name: src for src, dst in renames if dst.suffix == ".ckpt"}
    assert set(ckpts) == {"best.ckpt", "last.ckpt"}
    folder = tmp_path / "run" / "checkpoints"
    assert all(src.parent == folder and src.name.startswith(f".{name}.") for name, src in ckpts.items())
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    want = 0o666 & ~process_umask()
    assert all((folder / n).stat().st_mode & 0o777 == want for n in ("best.ckpt", "last.ckpt"))


def test_model_files_get_the_usual_permissions(tmp_path, save_untrained_model):
    # mkstemp makes 0600 files: renamed into place as they are, nobody else could load the model
    folder = save_untrained_model(tmp_path / "m")
    want = 0o666 & ~process_umask()
    for name in ("model.safetensors", "model.json"):
        assert (folder / name).stat().st_mode & 0o777 == want, name


# ---------------------------------------------------------------- report
def test_a_figure_cut_short_leaves_no_file_behind(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from validation.report import figures as F

    def killed_mid_write(self, target, *args, **kwargs):
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"\x89PNG half")
        else:
            target.write(b"\x89PNG half")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Figure, "savefig", killed_mid_write)
    folder = tmp_path / "figures"
    folder.mkdir()
    with pytest.raises(KeyboardInterrupt):
        F.save(Figure(), folder / "correlation.png")
    assert list(folder.iterdir()) == []


def test_a_damaged_last_checkpoint_is_refused_saying_how_to_go_on(tmp_path):
    from trainers.api import plan_fit

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a checkpoint cut short
    with pytest.raises(ValueError, match=r"resume checkpoint .*last.ckpt cannot be read \(.*\); if it is "
                                         r"damaged, --resume never starts over"):
        plan_fit(_tiny_cfg(tmp_path / "run"))


# ---------------------------------------------------------------- reproduce
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be read


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_reproduce_does_not_leave_its_children_running(tmp_path):
    # SIGKILL cannot be handled: the trainer or shard worker reproduce started must end by itself,
    # or the rerun that resumes its work would train or evaluate beside it
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = ("import sys; from pathlib import Path; from validation.reproduce import _run_command; "
              f"_run_command([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'log.txt')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    pid = None
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().isdigit()):
            assert proc.poll() is None and time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
