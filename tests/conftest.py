import os

import pytest

# Under pytest-xdist each worker is its own process: one intra-op thread each avoids
# oversubscribing the 2 cores CI has.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tmp_out(tmp_path):
    """A fresh output folder under pytest's tmp dir."""
    out = tmp_path / "out"
    out.mkdir()
    return out
