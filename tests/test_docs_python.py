"""The Python examples of docs/*.md run as written.

Each document's ``python`` blocks run in order in one namespace that holds only what the prose
says the reader already has (a model, a batch, its maps and masks, ...); every name an example
takes from our packages it must import itself. Paths of finished runs are swapped for tiny ones,
and ``fit`` for a stand-in that checks its config (training is tested in test_trainers_fit).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_blocks import split_markdown
import torch

import trainers
from shapesynth import CLASS_NAMES, SynthConfig
from shapesynth.generate import generate
from trainers import build_model
from trainers.api import TrainConfig
from validation.attributions import get_explainer

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BANDS = ((0.3, 0.4), (0.2, 0.25))
DATA_PATH, MODEL_PATH = "outputs/quick/data", "outputs/models/quick_resnet18"


def _python_blocks(text: str) -> list[str]:
    return [body for lang, body in split_markdown(text)[0] if lang == "python"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, save_untrained_model):
    """A tiny dataset folder and a saved model folder to stand in for the documented paths."""
    root = tmp_path_factory.mktemp("docs")
    cfg = SynthConfig(image_size=32, size_bands=BANDS, split_sizes={"train": 8, "val": 4, "test": 6},
                      bg_pool_sizes={"train": 2, "val": 1, "test": 1})
    generate(cfg, root / "data", progress=False)
    save_untrained_model(root / "model", data={"synth": cfg.to_dict()})
    return {DATA_PATH: str(root / "data"), MODEL_PATH: str(root / "model")}


def _context() -> dict:
    """What the docs' prose assumes in scope: a model, a batch with targets, maps, masks."""
    g = torch.Generator().manual_seed(0)
    model = build_model("resnet18", num_classes=len(CLASS_NAMES), image_size=32).eval()
    x = torch.rand(2, 3, 32, 32, generator=g)
    return dict(model=model, x=x, target=torch.tensor([0, 3]), maps=torch.rand(2, 32, 32, generator=g),
                masks=(torch.rand(2, 32, 32, generator=g) > 0.7).float(), sample_ids=[10, 11], e=1,
                explainer=get_explainer("gradcam", model, layer="stage4"),
                cfg=SynthConfig(image_size=32, size_bands=BANDS))


def test_the_docs_have_python_examples():
    found = {doc.name for doc in DOCS if _python_blocks(doc.read_text())}
    assert {"attributions.md", "metrics.md", "shapesynth.md", "trainers.md"} <= found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_python_examples_run(doc, finished, monkeypatch):
    blocks = _python_blocks(doc.read_text())
    if not blocks:
        pytest.skip(f"{doc.name} has no python example")
    fitted = []

    def fake_fit(config):
        assert isinstance(config, TrainConfig)
        fitted.append(config)
        return {"arch": config.arch}

    monkeypatch.setattr(trainers, "fit", fake_fit, raising=False)
    namespace = _context()
    for i, code in enumerate(blocks):
        for documented, tiny in finished.items():
            code = code.replace(f'"{documented}"', repr(tiny))
        exec(compile(code, f"{doc.name} python block {i + 1}", "exec"), namespace)
    if doc.name == "trainers.md":
        assert fitted and namespace["model"].training is False
