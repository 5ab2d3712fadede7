"""The Python examples of docs/*.md run as written.

Each document's ``python`` blocks run in order in one namespace that holds only what the prose
says the reader already has (a model, a batch, its maps and masks, ...); every name an example
takes from our packages it must import itself. Paths of finished runs are swapped for tiny ones,
and ``fit`` for a stand-in that checks its config (training is tested in test_trainers_fit).
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
from markdown_blocks import split_markdown
import torch
import torch.nn.functional as F

import trainers
from shapesynth import CLASS_NAMES, ShapeSynth, SynthConfig
from shapesynth.generate import generate
from shapesynth.readers import load_config
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


def _raster(meta: dict, n: int, sub: int = 8) -> np.ndarray:
    """A shape's pixel coverage from its recorded geometry, by point sampling (sub x sub per
    pixel) with our own inside tests: independent of shapesynth's signed distances."""
    kind, filled = meta["shape"], meta["filled"]
    size, w = float(meta["size_px"]), float(meta["stroke_px"])
    cx, cy = meta["center"]
    c, s = math.cos(math.radians(meta["angle"])), math.sin(math.radians(meta["angle"]))
    coords = (np.arange(n)[:, None] + (np.arange(sub) + 0.5) / sub).ravel()
    dx, dy = np.meshgrid(coords - cx, coords - cy)
    u, v = dx * c + dy * s, dy * c - dx * s  # the shape's own frame (rotated back by the angle)
    h = size / 2

    def inside(shrink):
        if kind == "circle":
            return np.hypot(u, v) < h - shrink
        if kind == "square":
            return np.maximum(abs(u), abs(v)) < h - shrink
        verts = np.array([[0.0, -h], [h, h], [-h, h]])  # base = height = size, apex up
        sides = np.array([np.linalg.norm(verts[(k + 1) % 3] - verts[(k + 2) % 3]) for k in range(3)])
        incentre, r = sides @ verts / sides.sum(), size * size / sides.sum()
        verts = incentre + (verts - incentre) * (r - shrink) / r  # the inward stroke's inner edge
        ok = np.ones(u.shape, bool)
        for k in range(3):
            (x0, y0), (x1, y1) = verts[k], verts[(k + 1) % 3]
            ok &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) > 0
        return ok

    cov = inside(0.0) if filled else inside(0.0) & ~inside(w)
    return cov.reshape(n, sub, n, sub).mean((1, 3))


def _probabilities(model, x, target):
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), 1)
    return probs.gather(1, target[:, None])[:, 0], probs.argmax(1)


def _check_attributions(new, given, ns):
    checked = 0
    if "ex" in new and "maps" in new:
        maps, x, target = new["maps"], given["x"], given["target"]
        assert maps.dtype == torch.float32 and maps.shape == x.shape[:1] + x.shape[-2:]
        assert 0 <= maps.min() and maps.max() <= 1
        torch.testing.assert_close(new["ex"](x, target), maps)  # "also ex(x, target)"
        checked += 1
        if "full" in new:
            full = new["full"]
            torch.testing.assert_close(full.maps, maps)
            assert torch.equal(full.target, target)
            # at 32 px stage4 is a 1 x 1 grid: its map is constant, so the product is degenerate,
            # which the Explanation flags and returns as zeros; others are normalised to max 1
            assert full.degenerate.shape == target.shape
            peaks = maps.flatten(1).amax(1)
            assert torch.equal(peaks[full.degenerate], torch.zeros_like(peaks[full.degenerate]))
            torch.testing.assert_close(peaks[~full.degenerate], torch.ones_like(peaks[~full.degenerate]))
    return checked


def _check_evaluation(new, given, ns):
    if "my_metric" not in new:
        return 0
    params = inspect.signature(new["my_metric"]).parameters
    assert list(params)[:4] == ["model", "x", "target", "maps"]
    assert {k: (p.kind, p.default) for k, p in params.items() if k in ("explainer", "gt")} == {
        "explainer": (inspect.Parameter.KEYWORD_ONLY, None), "gt": (inspect.Parameter.KEYWORD_ONLY, None)}
    return 1


def _check_metrics(new, given, ns):
    """Recompute what the blocks produced from the same model, images, maps and masks."""
    model, x, target, maps, gt = given["model"], given["x"], given["target"], given["maps"], given["masks"]
    res, checked = new.get("res"), 0
    if res is not None and hasattr(res, "reasons"):  # evaluate's result
        L, S = maps.double().flatten(1).numpy(), (gt >= 0.5).flatten(1).numpy()
        np.testing.assert_allclose(res["complexity"].numpy(), L.mean(1), rtol=1e-6)
        # pointing game (ties="any"): a hit when a maximum of L lies in S
        hit = [float(S[b][L[b] == L[b].max()].any()) for b in range(len(L))]
        assert res["pointing_game"].tolist() == hit
        k = round(1000 * 32 * 32 / 224**2)  # 20; torch.rand maps have no ties
        top = [float(S[b][np.argsort(-L[b])[:k]].sum()) / k for b in range(len(L))]
        np.testing.assert_allclose(res["topk_intersection"].numpy(), top, rtol=1e-6)
        G = gt.double().flatten(1).numpy()
        cos = (L * G).sum(1) / (np.linalg.norm(L, axis=1) * np.linalg.norm(G, axis=1))
        np.testing.assert_allclose(res["gt_cosine"].numpy(), cos, rtol=1e-5)
        y, pred = _probabilities(model, x, target)
        o, _ = _probabilities(model, x * maps[:, None], target)
        torch.testing.assert_close(res.probability.double(), y, rtol=1e-5, atol=1e-6)
        assert torch.equal(res.prediction, pred)
        torch.testing.assert_close(res["average_drop"].double(), ((y - o).clamp_min(0) / y).clamp(0, 1),
                                   rtol=1e-4, atol=1e-5)
        checked += 1
    if res is not None and hasattr(res, "morf"):  # road's RoadResult
        # ROAD = mean over k of p_c(X_LeRF,k) - p_c(X_MoRF,k)
        torch.testing.assert_close(res.score, (res.lerf - res.morf).mean(1))
        if "score" in new:
            torch.testing.assert_close(new["score"], res.score)
        if "images" in new:  # the curves are the model's probabilities on road_images' images
            images = new["images"]
            assert images.shape[:3] == (len(x), len(res.fractions), 2)
            for j, curve in enumerate((res.morf, res.lerf)):
                p, _ = _probabilities(model, images[:, :, j].flatten(0, 1), target.repeat_interleave(len(res.fractions)))
                torch.testing.assert_close(curve.double(), p.view_as(curve), rtol=1e-4, atol=1e-5)
        checked += 1
    masks = new.get("masks")
    if masks is not None and masks.ndim == 5:  # removal_masks(maps, (0.2, 0.4))
        n = 32 * 32
        for b in range(len(maps)):
            order = np.argsort(-maps[b].flatten().double().numpy())  # no ties in torch.rand maps
            for f, frac in enumerate((0.2, 0.4)):
                count = math.floor(frac * n + 0.5)  # round half up: 205, 410
                morf, lerf = np.zeros(n, bool), np.zeros(n, bool)
                morf[order[:count]], lerf[order[n - count:]] = True, True
                assert np.array_equal(masks[b, f, 0].flatten().numpy(), morf)
                assert np.array_equal(masks[b, f, 1].flatten().numpy(), lerf)
        checked += 1
        if "filled" in new:  # linear imputation: kept pixels as they were, removed pixels the
            # weighted mean of their in-image 8 neighbours (1/6 edge, 1/12 diagonal, renormalised)
            filled, images = new["filled"].double(), x.repeat_interleave(4, 0).double()
            removed = masks.flatten(0, 2)[:, None].expand_as(filled)
            assert torch.equal(filled[~removed], images[~removed])
            kernel = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]],
                                  dtype=torch.float64).view(1, 1, 3, 3)
            c = filled.shape[1]
            num = F.conv2d(filled, kernel.repeat(c, 1, 1, 1), padding=1, groups=c)
            den = F.conv2d(torch.ones_like(filled[:, :1]), kernel, padding=1)
            assert (filled - num / den)[removed].abs().max() < 1e-4
            assert (filled - images)[removed].abs().max() > 1e-2  # something was imputed
    return checked


def _check_shapesynth(new, given, ns):
    checked = 0
    if "s" in new and "synth" in new:
        s, n = new["s"], new["synth"].config.image_size
        mine = _raster(s.meta, n)
        # rasterisations agree to a few hundredths per pixel (the renderer's 4 x 4 ramps, 8-bit
        # alpha) and to 1 % in area; the wrong shape, size, angle or centre is off by far more
        assert np.abs(mine - s.mask).max() < 0.1
        assert s.mask.sum() == pytest.approx(mine.sum(), rel=0.01)
        assert np.array_equal(s.binary_mask, s.mask >= 0.5)
        clear = np.abs(mine - 0.5) > 0.1
        assert np.array_equal(s.binary_mask[clear], (mine >= 0.5)[clear])
        assert np.array_equal(new["synth"].background_only("test", s.meta["index"]), s.background)
        checked += 1
    if "train" in new:  # item i of epoch e is ShapeSynth(cfg).sample(split, i, epoch=e, n=length)
        train, e = new["train"], given["e"]
        ref = ShapeSynth(given["cfg"]).sample("train", 3, epoch=e, n=len(train))
        assert torch.equal(train[3]["mask"][0], torch.from_numpy(ref.mask))
        assert torch.equal(train[3]["image"], torch.from_numpy(ref.image).permute(2, 0, 1).float() / 255)
        other = ShapeSynth(given["cfg"]).sample("train", 3, epoch=e + 1, n=len(train))
        assert not np.array_equal(other.image, ref.image)
        checked += 1
    if "test" in new and "item" in new:  # the disk item is the sample its recipe renders
        test, item = new["test"], new["item"]
        ref = ShapeSynth(load_config(test.path)).sample("test", item["index"])
        assert int(item["label"]) == ref.label
        torch.testing.assert_close(item["mask"][0], torch.from_numpy(ref.mask), rtol=0, atol=1e-6)
        assert torch.equal(item["image"], torch.from_numpy(ref.image).permute(2, 0, 1).float() / 255)
        checked += 1
    return checked


def _check_trainers(new, given, ns):
    checked = 0
    if "fast" in new:
        model, fast, x = ns["model"], new["fast"], given["x"]
        n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert n_bn > 0 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) == 0
        assert sum(note.startswith("batchnorm") for note in fast.inference_folds) == n_bn
        assert model.training is False and fast is not model
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
        checked += 1
    return checked


_CHECKS = {"attributions.md": _check_attributions, "evaluation.md": _check_evaluation,
           "metrics.md": _check_metrics, "shapesynth.md": _check_shapesynth, "trainers.md": _check_trainers}


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
    given = _context()
    namespace = dict(given)
    check, checked = _CHECKS.get(doc.name), 0
    for i, code in enumerate(blocks):
        for documented, tiny in finished.items():
            code = code.replace(f'"{documented}"', repr(tiny))
        before = dict(namespace)
        exec(compile(code, f"{doc.name} python block {i + 1}", "exec"), namespace)
        if check is not None:
            # the names this block bound, checked against independent recomputations
            new = {k: v for k, v in namespace.items() if k not in before or before[k] is not v}
            checked += check(new, given, namespace)
    if check is not None:
        assert checked > 0, f"none of the names checked for {doc.name} is produced by its examples any more"
    if doc.name == "trainers.md":
        assert fitted and namespace["model"].training is False
        assert [(c.arch, c.image_size) for c in fitted] == [("resnet18", 64)]
