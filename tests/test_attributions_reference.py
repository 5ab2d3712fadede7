"""Our CAMs against pytorch-grad-cam (test-only oracle) on seeded random ResNet18 and ConvNeXt-T:
the raw low-resolution maps, and the final maps after the same post-processing (ReLU, min-max,
bilinear resize with half-pixel centres, which is what cv2.resize INTER_LINEAR does).

Grad-CAM++ on ConvNeXt runs in float64 for both libraries: on the random ConvNeXt, its denominator
2 g^2 + sum(A) g^3 nearly cancels at some positions, so two float32 implementations (or one and
the float64 truth) differ by ~1e-3 relative; in float64 the formulas agree to 1e-10."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, GuidedBackpropReLUModel, LayerCAM, RefineCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from test_attributions_common import build, images
from validation.attributions import explain, resolve_layer

PEERS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "layercam": LayerCAM, "scorecam": ScoreCAM}
OPTIONS = {"scorecam": {"variant": "pytorch-grad-cam", "batch_size": 50}}
TARGETS = [0, 3, 5]


@pytest.fixture(scope="module")
def models():
    convnext = build("convnext_tiny", wrapped=False)
    return {"resnet18": build("resnet18", wrapped=True), "convnext_tiny": convnext,
            "convnext_tiny_f64": copy.deepcopy(convnext).double()}


def _peer_raw(peer_cls, model, module, x, targets):
    """pytorch-grad-cam's un-rectified low-resolution CAM (its get_cam_image)."""
    cam = peer_cls(model, [module])
    try:
        out = cam.activations_and_grads(x)
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, out)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
        return cam.get_cam_image(x, module, targets, acts, grads, False)
    finally:
        cam.activations_and_grads.release()


def _cases():
    for arch in ("resnet18", "convnext_tiny"):
        for method in sorted(PEERS):
            for layer in ("stage1", "stage3"):
                # stage3 Score-CAM (256-384 masked forwards per image) and float64 ConvNeXt are
                # the slow cases: run with -m slow
                slow = layer == "stage3" and (method == "scorecam" or (arch, method) == ("convnext_tiny", "gradcampp"))
                yield pytest.param(arch, method, layer, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("arch,method,layer", list(_cases()))
def test_matches_pytorch_grad_cam(models, arch, method, layer):
    # Score-CAM costs one masked forward per channel and image, float64 ConvNeXt is slow on CPU:
    # keep those cases small
    size, targets_ = (64, TARGETS) if arch == "resnet18" else (32, TARGETS[:2])
    model = models[arch + "_f64"] if (arch, method) == ("convnext_tiny", "gradcampp") else models[arch]
    if method == "scorecam":
        size, targets_ = 32, TARGETS[:2] if arch == "resnet18" else TARGETS[:1]
    if model is models.get("convnext_tiny_f64"):
        targets_ = TARGETS[:1]
    x = images(len(targets_), size).to(next(model.parameters()).dtype)
    module = resolve_layer(model, layer)
    targets = [ClassifierOutputTarget(t) for t in targets_]
    opts = OPTIONS.get(method, {})

    raw = explain(model, x, targets_, method=method, layer=layer, raw=True, **opts)
    peer_raw = _peer_raw(PEERS[method], model, module, x, targets)
    scale = np.abs(peer_raw).max()
    assert scale > 0
    np.testing.assert_allclose(raw.numpy(), peer_raw, rtol=1e-4, atol=1e-5 * scale)

    ours = explain(model, x, targets_, method=method, layer=layer, **opts)
    with PEERS[method](model, [module]) as cam:
        peer = cam(x, targets)
    assert ours.shape == (len(targets_), size, size) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - peer).max() <= 1e-4


def test_refinecam_matches_pytorch_grad_cam(models):
    model = models["resnet18"]
    x = images(3, 64, seed=1)
    layers = ["stage1", "stage2", "stage3", "stage4"]
    ours = explain(model, x, TARGETS, method="refinecam", base="gradcampp", layers=layers)
    peer = RefineCAM(model, [resolve_layer(model, l) for l in layers], base_method=GradCAMPlusPlus)
    expected = peer(x, [ClassifierOutputTarget(t) for t in TARGETS])
    for base in peer.base_cam_per_layer:
        base.activations_and_grads.release()
    assert np.abs(ours.numpy() - expected).max() <= 1e-4


def test_guided_backprop_on_a_batch_matches_the_peer_one_image_at_a_time(models):
    model = models["resnet18"]
    x = images(3, 32, seed=2)
    ours = explain(model, x, TARGETS, method="guidedbackprop", reduce="sum", raw=True)
    for i, t in enumerate(TARGETS):
        peer_model = copy.deepcopy(model)  # the peer swaps the model's ReLUs for new modules
        gb = GuidedBackpropReLUModel(peer_model, device="cpu")(x[i:i + 1], target_category=t)
        expected = gb.sum(axis=-1)
        np.testing.assert_allclose(ours[i].numpy(), expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
