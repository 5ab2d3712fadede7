"""Our CAMs against pytorch-grad-cam (test-only oracle) on seeded random ResNet18 and ConvNeXt-T:
the raw low-resolution maps, and the final maps after the same post-processing (ReLU, min-max,
bilinear resize with half-pixel centres, which is what cv2.resize INTER_LINEAR does).

ConvNeXt runs in float64 for both libraries: on the random ConvNeXt, Grad-CAM++'s denominator
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
from validation.attributions import explain, get_explainer, resolve_layer

PEERS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "layercam": LayerCAM, "scorecam": ScoreCAM}
OPTIONS = {"scorecam": {"variant": "pytorch-grad-cam", "batch_size": 50}}
TARGETS = [0, 3, 5]


@pytest.fixture(scope="module")
def models():
    return {"resnet18": build("resnet18", wrapped=True),
            "convnext_tiny": build("convnext_tiny", wrapped=False).double()}


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


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
@pytest.mark.parametrize("method", sorted(PEERS))
@pytest.mark.parametrize("layer", ["stage1", "stage3"])
def test_matches_pytorch_grad_cam(models, arch, method, layer):
    if method == "scorecam" and arch == "convnext_tiny" and layer == "stage1":
        pytest.skip("96 channels x 3 images of masked ConvNeXt forwards: covered on ResNet18 and stage3")
    model = models[arch]
    x = images(3, 64).to(next(model.parameters()).dtype)
    module = resolve_layer(model, layer)
    targets = [ClassifierOutputTarget(t) for t in TARGETS]
    opts = OPTIONS.get(method, {})

    raw = explain(model, x, TARGETS, method=method, layer=layer, raw=True, **opts)
    peer_raw = _peer_raw(PEERS[method], model, module, x, targets)
    scale = np.abs(peer_raw).max()
    assert scale > 0
    np.testing.assert_allclose(raw.numpy(), peer_raw, rtol=1e-4, atol=1e-5 * scale)

    ours = explain(model, x, TARGETS, method=method, layer=layer, **opts)
    with PEERS[method](model, [module]) as cam:
        peer = cam(x, targets)
    assert ours.shape == (3, 64, 64) and ours.dtype == torch.float32
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
