"""Extreme sizes: tiny and one-pixel-thin images, empty batches, ROAD fractions that round to
nothing, and memory held across the passes of one call."""
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_metrics_helpers import cam_maps, smooth_images, spsolve_impute
from validation.attributions import get_explainer
from validation.metrics import coherency, evaluate, linear_impute, linear_impute_complementary, removal_masks, road
from validation.metrics.evaluate import METRIC_NAMES


class TinyNet(nn.Module):
    """Two convs and a global average pool: runs on images down to 1x1."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


# --- KernelShap on an image that is a single feature ------------------------------------------

@pytest.mark.parametrize("size, options", [((1, 1), {}), ((6, 5), {"superpixels": "grid", "grid_cells": 1}),
                                           ((6, 5), {"n_segments": 1})])
def test_kernelshap_of_a_single_feature_is_its_exact_shapley_value(net, size, options):
    # captum's KernelShap failed inside torch.distributions (Categorical of NaN) when the image
    # had one feature; the Shapley value of one player is f(x) - f(baseline)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2])
    raw = get_explainer("kernelshap", net, n_samples=8, raw=True, **options).explain(x, target).maps
    with torch.no_grad():
        change = net(x)[[0, 1], target] - net(torch.zeros_like(x))[[0, 1], target]
    expected = (3 * change).abs()[:, None, None].expand(2, *size)  # |sum over the 3 channels|
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    final = get_explainer("kernelshap", net, n_samples=8, **options).explain(x, target)
    assert final.degenerate.all() and (final.maps == 0).all()  # a constant map, as documented


# --- ROAD fractions that remove no pixel ------------------------------------------------------

def test_road_fraction_that_removes_no_pixel_raises(net):
    # round(0.01 * 49) = 0: MoRF and LeRF were both the unperturbed image, a silent 0 in the mean
    x = torch.rand(2, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"fraction 0.01 removes round\(0.01 \* 49\) = 0 of the 49 pixels of a 7x7"):
        road(net, x, 0, maps, fractions=(0.01, 0.5))
    with pytest.raises(ValueError, match="= 0 of the 4 pixels of a 2x2"):
        removal_masks(maps[:, :2, :2], (0.1,))
    assert road(net, x, 0, maps, fractions=(0.03, 0.5)).shape == (2,)  # round(1.47) = 1 pixel is fine


# --- empty batches ----------------------------------------------------------------------------

def test_evaluate_empty_batch_with_a_registered_explainer(net):
    # Coherency called the explainer on the empty batch, and every method refuses empty input
    x, maps = torch.rand(0, 3, 8, 8), torch.rand(0, 8, 8)
    explainer = get_explainer("gradcam", net, layer="relu2")
    res = evaluate(net, x, 0, maps, metrics=list(METRIC_NAMES), explainer=explainer, gt=maps)
    assert set(res) == set(METRIC_NAMES)
    assert all(v.shape == (0,) for v in res.values()) and res.records() == []
    values, reasons = coherency(x, torch.zeros(0, dtype=torch.long), maps, explainer, return_reasons=True)
    assert values.shape == (0,) and reasons == []


def test_empty_list_target_for_an_empty_batch(net):
    # torch.as_tensor([]) is float32: an empty list of labels was refused as non-integer
    x, maps = torch.rand(0, 3, 8, 8), torch.rand(0, 8, 8)
    res = evaluate(net, x, [], maps, metrics=["average_drop", "road"])
    assert res["average_drop"].shape == (0,) and res["road"].shape == (0,)
    with pytest.raises(ValueError, match="target must be an integer tensor of shape"):
        evaluate(net, torch.rand(1, 3, 8, 8), [], torch.rand(1, 8, 8), metrics=["average_drop"])


# --- ROAD's paired imputation on images one pixel high or wide --------------------------------

@pytest.mark.parametrize("size", [(1, 64), (64, 1)])
def test_complementary_imputation_on_one_pixel_thin_images(size):
    # the pair's V-cycle barely helped there: CG gave up as stalled ~1e-3 off, with a warning
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, *size, generator=g)
    maps = F.interpolate(torch.rand(4, 1, 3, 3, generator=g), size=size, mode="bilinear")[:, 0]
    removed = removal_masks(maps, (0.4,))[:, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "imputation stopped" warning either
        both = linear_impute_complementary(x, removed)
    for i in range(4):
        for side, mask in enumerate((removed[i], ~removed[i])):
            ref = spsolve_impute(x[i].double().numpy(), mask.numpy())
            assert np.abs(both[i, side].double().numpy() - ref).max() <= 2e-5


# --- Guided Grad-CAM: the Grad-CAM pass's graph is gone before the guided pass ----------------

def test_guided_gradcam_frees_the_gradcam_graph_before_its_guided_pass(net, monkeypatch):
    # the backward stops at the layer, so the graph below it keeps its saved activations while the
    # captured activation lives; the capture kept it alive through the guided pass (at 224 px,
    # batch 32, ResNet18 stage4: peak RSS +0.5 GB over running the two passes one after the other)
    from validation.attributions import guided

    class Saved:
        __slots__ = ("tensor", "__weakref__")

        def __init__(self, tensor):
            self.tensor = tensor

    alive = weakref.WeakSet()

    def pack(tensor):
        saved = Saved(tensor.detach())  # a saved output kept with its grad_fn would be a reference cycle
        alive.add(saved)
        return saved

    counts = []
    original = guided.guided_gradients

    def spy(*args, **kwargs):
        gc.collect()
        counts.append(len(alive))  # saved tensors of the Grad-CAM pass still alive
        return original(*args, **kwargs)

    monkeypatch.setattr(guided, "guided_gradients", spy)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        maps = get_explainer("guidedgradcam", net, layer="relu2").explain(x, 0).maps
    assert counts == [0]
    monkeypatch.setattr(guided, "guided_gradients", original)
    torch.testing.assert_close(maps, get_explainer("guidedgradcam", net, layer="relu2").explain(x, 0).maps)


# --- RELAX: batch_size bounds every masked forward, also for batches larger than it -----------

def test_relax_masked_forwards_stay_within_batch_size(net):
    # with B > batch_size every forward took all B images (one mask each): memory grew with the
    # batch (224 px, batch_size=8, ResNet18: +82 MB at B = 8, +647 MB at B = 64)
    sizes = []
    handle = net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        chunked = get_explainer("relax", net, n_masks=6, batch_size=2).explain(x)
    finally:
        handle.remove()
    assert sizes[0] == 5 and max(sizes[1:]) <= 2  # the unmasked reference, then the masked images
    one_go = get_explainer("relax", net, n_masks=6, batch_size=30).explain(x)
    # oneDNN picks its convolution kernel by batch size on some CPUs (AMD EPYC: forwards of 2 and
    # of 30 images round differently), and min-max scaling of importances that span ~1e-3 turns
    # that float32 rounding into up to ~1e-4 on the [0, 1] maps; a wrong mask-to-image pairing
    # moves them by O(0.1), as another seed's masks do (checked below)
    torch.testing.assert_close(chunked.maps, one_go.maps, rtol=0, atol=5e-4)
    other_masks = get_explainer("relax", net, n_masks=6, batch_size=30, seed=1).explain(x)
    assert (other_masks.maps - one_go.maps).abs().max() > 0.1
    torch.testing.assert_close(chunked.extras["uncertainty"], one_go.extras["uncertainty"], rtol=1e-4, atol=1e-7)


def test_deeplift_chunks_its_captum_calls_and_gives_the_same_maps(monkeypatch):
    """DeepLift holds every ReLU's input and output for the whole batch (~110 MB per image at
    224 px): a batch of 64 needed ~7.5 GB. ``batch_size`` bounds the images per captum call."""
    from captum.attr import DeepLift as CaptumDeepLift

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = [0, 1, 2, 0, 1]
    seen = []
    original = CaptumDeepLift.attribute

    def recording(self, inputs, *args, **kwargs):
        seen.append(inputs.shape[0])
        return original(self, inputs, *args, **kwargs)

    whole = get_explainer("deeplift", model, batch_size=None, raw=True).attribute(x, target)
    monkeypatch.setattr(CaptumDeepLift, "attribute", recording)
    chunked = get_explainer("deeplift", model, batch_size=2, raw=True).attribute(x, target)
    assert seen == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 0"):
        get_explainer("deeplift", model, batch_size=0)


@pytest.mark.parametrize("call", ["metric", "method"])
def test_images_too_small_for_the_model_are_named(call):
    """A model whose pooling runs out of pixels (VGG below 32 px) gave torch's "Output size is too
    small" about a layer's input, naming neither the images nor their size."""
    from validation.metrics import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"images of 3x3 px are too small for Sequential: .*Output size is too small"):
        if call == "metric":
            evaluate(model, x, [0, 1], torch.rand(2, 3, 3), metrics=["average_drop"])
        else:
            get_explainer("inputxgradient", model).attribute(x, [0, 1])


# --- imputation on very long images -----------------------------------------------------------

def _imputation_errors(x, removed, out):
    return [np.abs(out[i].double().numpy() - spsolve_impute(x[i].double().numpy(), removed[i].numpy())).max()
            for i in range(len(removed))]


def test_imputation_of_long_images_meets_the_contract_single_and_paired():
    # a long hole with a small kept set has a smooth error mode with an eigenvalue near 1e-6:
    # float32 rounding in CG's recursive residual left 1x4000 single systems 4.8e-4 and 8.6e-4
    # off and an 8x2000 pair 2.9e-4 off, all without a warning. Such systems now stop only on a
    # step taken from their exactly computed residual (measured here: <= 1.2e-5)
    x = torch.rand(2, 3, 1, 4000, generator=torch.Generator().manual_seed(4001))
    removed = torch.ones(2, 1, 4000, dtype=torch.bool)
    removed[0, 0, :2] = removed[1, 0, :4] = False  # the first 2 and 4 pixels kept
    pair_x = torch.rand(1, 3, 8, 2000, generator=torch.Generator().manual_seed(2008))
    pair_removed = torch.zeros(1, 8, 2000, dtype=torch.bool)
    pair_removed[0, :, :1000] = True  # each side a 8x1000 hole, kept only on the other's side
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "imputation stopped" warning
        single = linear_impute(x, removed)
        both = linear_impute_complementary(pair_x, pair_removed)
    assert max(_imputation_errors(x, removed, single)) <= 3e-5
    assert max(_imputation_errors(pair_x, pair_removed, both[:, 0])) <= 3e-5
    assert max(_imputation_errors(pair_x, ~pair_removed, both[:, 1])) <= 3e-5


def test_imputation_of_cam_holes_in_one_pixel_thin_images_converges():
    # undamped fine-level Jacobi leaves a 1 x N image's alternating mode as it is: CG stalled
    # after 14 iterations on these holes, with a warning, up to 1.3e-4 off
    x = smooth_images(4, 3, 1, 4000, seed=3)
    maps = cam_maps(2, 1, 4000, seed=0)
    removed = removal_masks(maps, (0.8,))[:, 0, 0]
    removed, x = torch.cat([removed, ~removed]), x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = linear_impute(x, removed)
    assert max(_imputation_errors(x, removed, out)) <= 2e-5
