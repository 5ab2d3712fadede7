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


@pytest.fixture
def fresh_pool_cache():
    """An empty background-pool cache before and after the test (the cache is per process, as a
    new process would have it): ``pytestmark = pytest.mark.usefixtures("fresh_pool_cache")``."""
    from shapesynth.backgrounds import clear_pool_cache

    clear_pool_cache()
    yield
    clear_pool_cache()


@pytest.fixture(scope="session")
def save_untrained_model():
    """save_untrained_model(folder, seed=0, **meta): a seeded, untrained 32 px ResNet18 saved as a
    model folder (what `trainers.save_model` writes), for tests of code that loads one."""
    import torch

    from shapesynth import CLASS_NAMES
    from trainers import build_model, save_model
    from trainers.export import META_KEYS

    def save(folder, seed: int = 0, **meta):
        torch.manual_seed(seed)
        model = build_model("resnet18", num_classes=len(CLASS_NAMES), image_size=32)
        full = {k: None for k in META_KEYS}
        full.update(arch="resnet18", image_size=32, class_names=list(CLASS_NAMES), test_accuracy=0.0)
        full.update(meta)
        save_model(model, folder, full)
        return folder

    return save


@pytest.fixture
def user_cam():
    """A user's own CAM, registered the documented way; unregistered afterwards."""
    from validation.attributions.cam import GradCAM
    from validation.attributions.registry import METHODS, register

    @register("usercam")
    class UserCAM(GradCAM):
        """Grad-CAM with the absolute value as rectifier (a user's variant)."""
        rectifier = "abs"

    yield "usercam"
    METHODS.pop("usercam", None)
