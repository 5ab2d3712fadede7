"""A long `run` stays bounded: no temp files pile up over kills and resumes, and neither memory,
live tensors nor open files grow chunk after chunk."""

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

import test_pipeline_standins as S
from shapesynth.schema import _data_writer, _temp_file, is_temp_file
from validation.pipeline import run as run_module
from validation.pipeline.run import run_eval
from validation.pipeline.table import chunk_stem, load_results

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def models(tmp_path):
    return S.make_models(tmp_path)


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if is_temp_file(p))


def _left_by_a_kill(path: Path) -> Path:
    """The temp file an atomic write of ``path`` leaves when its process dies before the rename."""
    return Path(_temp_file(path, _data_writer(b"cut short")))


def _run(models, out):
    torch.set_num_threads(1)
    return run_eval(S.config(models), out, components=S.components(), progress=False)


_KILLED_AT_A_RENAME = """
import os, sys
sys.path.insert(0, {tests!r})
import test_pipeline_standins as S
import torch
from validation.pipeline.run import run_eval

torch.set_num_threads(1)
real, calls = os.replace, [0]

def replace(src, dst):  # dies as kill -9 would: between a chunk file's write and its rename
    calls[0] += 1
    if calls[0] == {kill_at}:
        os._exit(9)
    return real(src, dst)

os.replace = replace
models = [os.path.join({models!r}, n + ".ckpt") for n in ("alpha", "beta")]
run_eval(S.config(models), {out!r}, components=S.components(), progress=False)
"""


def test_a_run_killed_while_writing_a_chunk_leaves_no_temp_file_once_resumed(models, tmp_path):
    out = tmp_path / "run"
    # the 6th rename is in the second chunk (after run_config.json and the first chunk's four files)
    code = _KILLED_AT_A_RENAME.format(tests=str(TESTS), kill_at=6, models=str(tmp_path), out=str(out))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert _temp_files(out), "the kill was meant to cut a write short"
    _run(models, out)  # the same command again
    assert _temp_files(out) == []
    _run(models, tmp_path / "fresh")
    assert load_results(out).equals(load_results(tmp_path / "fresh"))


def test_a_resumed_run_removes_the_temp_files_of_its_chunks_and_tables(models, tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    with pytest.raises(KeyboardInterrupt):
        run_eval(S.config(models), out, components=S.components(interrupt_after=30), progress=False)
    finished = chunk_stem(out, "alpha", 0, 4)
    unfinished = chunk_stem(out, "beta", 16, 20)
    assert Path(f"{finished}.done.json").exists() and not Path(f"{unfinished}.done.json").exists()
    left = [_left_by_a_kill(Path(f"{unfinished}.results.parquet")),
            _left_by_a_kill(Path(f"{finished}.maps.npz")),  # a finished chunk recomputed when killed
            _left_by_a_kill(out / "results.csv")]  # a merge killed while writing the table
    assert all(p.exists() for p in left)
    _run(models, out)
    assert _temp_files(out) == []


def test_a_shard_removes_its_own_chunks_temp_files_only(models, tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    run_eval(S.config(models), out, shard=(0, 2), components=S.components(), progress=False)
    # shard 0 computes chunks 0-4, 8-12, 16-20; 4-8 is shard 1's, whose process may be writing it
    own = _left_by_a_kill(Path(f"{chunk_stem(out, 'alpha', 8, 12)}.results.parquet"))
    other_shards = _left_by_a_kill(Path(f"{chunk_stem(out, 'alpha', 4, 8)}.results.parquet"))
    merging = _left_by_a_kill(out / "results.parquet")  # a `merge` may be running beside the shards
    run_eval(S.config(models), out, shard=(0, 2), components=S.components(), progress=False)
    assert not own.exists()
    assert other_shards.exists() and merging.exists()


def _live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(obj), torch.Tensor) for obj in gc.get_objects())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc")
def test_memory_tensors_and_open_files_stay_flat_chunk_after_chunk(models, tmp_path, monkeypatch):
    # 40 chunks of one image, measured between chunks from the 10th on (the first ones import and
    # fill caches): a run that kept each chunk's rows, maps, explainers or files would grow by
    # kilobytes, tensors or a file per chunk
    n_chunks, real_run_chunk = 2 * S.N_IMAGES, run_module.Runner._run_chunk
    open_files, tensors, grown = [], [], []

    def run_chunk(*args, **kwargs):
        errors = real_run_chunk(*args, **kwargs)
        open_files.append(len(os.listdir("/proc/self/fd")))
        if len(open_files) == 10:
            tensors.append(_live_tensors())
            tracemalloc.start()
        elif len(open_files) == n_chunks:
            gc.collect()
            grown.append(tracemalloc.get_traced_memory()[0])
            tensors.append(_live_tensors())
        return errors

    monkeypatch.setattr(run_module.Runner, "_run_chunk", run_chunk)
    torch.set_num_threads(1)
    try:
        run_eval(S.config(models, chunk_size=1), tmp_path / "run", components=S.components(), progress=False)
    finally:
        tracemalloc.stop()
    assert len(open_files) == n_chunks and max(open_files[9:]) <= open_files[9], open_files
    assert tensors[1] <= tensors[0], tensors
    # measured: about 50 kB (caches of pandas and pyarrow filling); keeping the rows of the 10
    # chunks with a correctly classified image among these 30 costs 260 kB
    assert grown[0] < 120 * 1024, grown
