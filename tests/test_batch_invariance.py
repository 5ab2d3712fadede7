"""Batch invariance, determinism, dtypes and memory layouts of every registered attribution method
and every metric, on a tiny seeded CNN (eval-mode BatchNorm with non-trivial statistics, one ReLU
module used three times, a max-pool, a Linear head) and 16 px images.

* An image's map or metric value depends only on that image (and its map, target, mask): not on
  the other images of its batch, their number or their order, up to the rounding of batched
  convolutions. The seeded methods (RELAX, LIME, KernelShap, the random baselines) and ROAD's
  noise draw the same for an image whatever its batch (docs/attributions.md, docs/metrics.md).
* The same call twice gives identical results and leaves torch's global generator as it was.
* float64 models compute in float64 and agree with float32; bfloat16 and float16 models are
  explained and evaluated from float32 sums, close to the float32 model on the same (rounded)
  images; images whose dtype a float32 model does not take are refused naming both dtypes.
* Non-contiguous, channels_last and expanded (stride 0) inputs give the same results.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from validation.attributions import available_methods, get_explainer
from validation.metrics import METRIC_NAMES, METRICS, evaluate

SIZE = 16
LAYER_METHODS = {"gradcam", "gradcampp", "layercam", "scorecam", "shapleycam", "guidedgradcam", "lafam"}
# the baselines never run the model
MODEL_FREE = {"randomcam", "halfcam", "all1scam", "oracle", "centre"}
FAST = {"scorecam": {"batch_size": 7}, "relax": {"n_masks": 12, "batch_size": 10},
        "lime": {"n_samples": 16, "superpixels": "grid", "grid_cells": 4},
        "kernelshap": {"n_samples": 16, "superpixels": "grid", "grid_cells": 4},
        "integratedgradients": {"n_steps": 4, "internal_batch_size": 5}, "deeplift": {"batch_size": 2},
        "refinecam": {"base": "gradcam", "layers": ("conv1", "conv2")}}
# batched forwards round differently from single ones (float32)
ROUNDING = dict(rtol=1e-4, atol=2e-5)
FRACTIONS = (0.25, 0.5, 0.75)  # a complementary pair (one solve for both) and one alone


class TinyCNN(nn.Module):
    def __init__(self, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()  # reused: DeepLift must split it, guided backprop must guide every use
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for bn in (self.bn1, self.bn2):  # eval mode differs from batch statistics
                bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 0.4 - 0.2)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x):
        a = self.pool(self.relu(self.bn1(self.conv1(x))))
        b = self.relu(self.bn2(self.conv2(a)))
        return self.fc(self.relu(self.conv3(b)).mean(dim=(2, 3)))


def _data(b: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, SIZE, SIZE, generator=g)
    gt = (torch.rand(b, SIZE, SIZE, generator=g) > 0.5).float()
    return x, torch.tensor([1, 4, 3, 4])[:b], gt  # classes of probability 0.06-0.8


@pytest.fixture(scope="module")
def model():
    return TinyCNN()


def _explainer(method: str, model: nn.Module):
    options = dict(FAST.get(method, {}))
    if method in LAYER_METHODS:
        options["layer"] = "conv2"
    return get_explainer(method, model, **options)


def _explain(ex, x, t, gt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum's notices
        return ex.explain(x, t, **({"gt": gt} if ex.name == "oracle" else {}))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


ALL_METHODS = available_methods()


def test_every_registered_method_is_checked(model):
    # the real maps of the tiny model: an invariance of all-zero maps would say nothing
    x, t, gt = _data()
    for method in ALL_METHODS:
        out = _explain(_explainer(method, model), x, t, gt)
        assert not out.degenerate.any(), method
        assert (out.maps.flatten(1).amax(1) > out.maps.flatten(1).amin(1)).all(), method


# ---------------------------------------------------------------------------------------------
# attribution methods

@pytest.mark.parametrize("method", ALL_METHODS)
def test_an_images_map_does_not_depend_on_the_rest_of_its_batch(model, method):
    """Permuted batches (un-permuted after), sub-batches and single images give each image the
    same map, flag and extras as the full batch."""
    x, t, gt = _data()
    ex = _explainer(method, model)
    full = _explain(ex, x, t, gt)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = _explain(ex, x[perm], t[perm], gt[perm])
    unperm = torch.argsort(perm)
    torch.testing.assert_close(shuffled.maps[unperm], full.maps, **ROUNDING)
    assert torch.equal(shuffled.degenerate[unperm], full.degenerate)
    for key, value in full.extras.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(shuffled.extras[key][unperm], value, **ROUNDING)
    for rows in ([1, 3], [0], [1], [2], [3]):
        part = _explain(ex, x[rows], t[rows], gt[rows])
        torch.testing.assert_close(part.maps, full.maps[rows], **ROUNDING)
        assert torch.equal(part.degenerate, full.degenerate[rows])
        for key, value in full.extras.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(part.extras[key], value[rows], **ROUNDING)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_method_repeats_exactly_and_leaves_the_global_generator_alone(model, method):
    x, t, gt = _data(3)
    ex = _explainer(method, model)
    state = torch.get_rng_state()
    first = _explain(ex, x, t, gt)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # whatever the caller's global state, the same result
    again = _explain(ex, x, t, gt)
    assert torch.equal(again.maps, first.maps) and torch.equal(again.degenerate, first.degenerate)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_non_contiguous_channels_last_and_expanded_images_give_the_same_maps(model, method):
    x, t, gt = _data(3)
    ex = _explainer(method, model)
    ref = _explain(ex, x, t, gt).maps
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    assert not transposed.is_contiguous() and torch.equal(transposed, x)
    torch.testing.assert_close(_explain(ex, transposed, t, gt.transpose(1, 2).contiguous().transpose(1, 2)).maps,
                               ref, rtol=0, atol=0)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_explain(ex, channels_last, t, gt).maps, ref, rtol=0, atol=0)
    strided = torch.zeros(3, 3, SIZE, 2 * SIZE)[..., ::2].copy_(x)  # a view with a step
    torch.testing.assert_close(_explain(ex, strided, t, gt).maps, ref, rtol=0, atol=0)
    expanded = x[1:2].expand(3, -1, -1, -1)  # one image three times, stride 0 along the batch
    out = _explain(ex, expanded, t[1].expand(3), gt[1:2].expand(3, -1, -1)).maps
    for row in out:
        torch.testing.assert_close(row, ref[1], **ROUNDING)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_float64_model_gives_the_float32_maps(model, method):
    """Computed in float64 (maps returned as float32), equal to the float32 model's up to its
    rounding; the baselines depend on the images' values, not their dtype."""
    x, t, gt = _data(3)
    ref = _explain(_explainer(method, model), x, t, gt)
    out = _explain(_explainer(method, TinyCNN().double()), x.double(), t, gt)
    assert out.maps.dtype == torch.float32
    torch.testing.assert_close(out.maps, ref.maps, rtol=0, atol=1e-4)
    assert torch.equal(out.degenerate, ref.degenerate)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_half_precision_model_is_explained_in_float32(model, method, dtype):
    """A bfloat16 or float16 model with images of its dtype: float32 maps that follow the float32
    model's maps of the same rounded images (the model itself runs in half precision, so not to
    float32 rounding). DeepLift in float16 used to return zeros flagged degenerate for every image
    (captum's eps 1e-10 is 0 in float16: 0 / 0 at every ReLU input the baseline leaves as it is)."""
    x, t, gt = _data(3)
    rounded = x.to(dtype)
    ref = _explain(_explainer(method, model), rounded.float(), t, gt)
    out = _explain(_explainer(method, TinyCNN().to(dtype)), rounded, t, gt)
    assert out.maps.dtype == torch.float32 and torch.isfinite(out.maps).all()
    if method in MODEL_FREE:  # no model: the maps of the rounded images, exactly
        assert torch.equal(out.maps, ref.maps)
        return
    assert not out.degenerate.any()
    assert (_pearson(out.maps, ref.maps) > 0.9).all(), _pearson(out.maps, ref.maps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_images_a_float32_model_does_not_take_are_refused_by_dtype(model, method, dtype):
    x, t, gt = _data(2)
    ex = _explainer(method, model)
    if method in MODEL_FREE:  # maps from the images' values: those of the same values in float32
        rounded = x.to(dtype)
        assert torch.equal(_explain(ex, rounded, t, gt).maps, _explain(ex, rounded.float(), t, gt).maps)
        return
    with pytest.raises(ValueError, match=rf"images x are {dtype} but the model's weights are torch.float32: "
                                         r"pass x.to\(torch.float32\)"):
        _explain(ex, x.to(dtype), t, gt)


# ---------------------------------------------------------------------------------------------
# metrics

@pytest.fixture(scope="module")
def metric_inputs(model):
    """Images, targets, Grad-CAM maps (one made constant: NaN with a reason where undefined),
    masks, and the explainer for Coherency."""
    x, t, gt = _data()
    explainer = _explainer("gradcam", model)
    maps = explainer.attribute(x, t)
    maps[2] = 0.5
    return x, t, maps, gt, explainer


def _metric(form: str, name: str, model, x, t, maps, gt, explainer, **options):
    """(values, reasons) of metric ``name`` through ``evaluate`` or its functional."""
    if form == "evaluate":
        out = evaluate(model, x, t, maps, [name], explainer=explainer, gt=gt, fractions=FRACTIONS, **options)
        return out[name], out.reasons[name]
    road = {"fractions": FRACTIONS, **options}
    chunks = {k: v for k, v in options.items() if k == "batch_size"}
    fn = METRICS[name]
    if name == "average_drop":
        return fn(model, x, t, maps, return_reasons=True, **chunks)
    if name == "road":
        return fn(model, x, t, maps, return_reasons=True, **road)
    if name == "adcc":
        return fn(model, x, t, maps, explainer, return_reasons=True, **chunks)
    if name == "arcc":
        return fn(model, x, t, maps, explainer, return_reasons=True, **road)
    if name == "coherency":
        return fn(x, t, maps, explainer, return_reasons=True)
    if name in ("complexity", "sparseness"):
        return fn(maps, return_reasons=True)
    return fn(maps, gt, return_reasons=True)


FORMS = ["evaluate", "functional"]


def test_every_metric_is_checked():
    assert sorted(METRICS) == sorted(METRIC_NAMES)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_a_samples_value_does_not_depend_on_the_rest_of_its_batch(model, metric_inputs, name, form):
    """Permuted batches (un-permuted after), sub-batches, single samples and other chunk sizes
    give each sample the same value and reason (ROAD's noise and tie order are shared by every
    image: they do not depend on the batch)."""
    x, t, maps, gt, explainer = metric_inputs
    full, reasons = _metric(form, name, model, x, t, maps, gt, explainer)
    assert torch.isfinite(full[[0, 1, 3]]).all()  # real values (sample 2's map is constant)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled, shuffled_reasons = _metric(form, name, model, x[perm], t[perm], maps[perm], gt[perm], explainer)
    unperm = torch.argsort(perm)
    torch.testing.assert_close(shuffled[unperm], full, rtol=0, atol=1e-6, equal_nan=True)
    assert [shuffled_reasons[i] for i in unperm.tolist()] == reasons
    for rows in ([1, 3], [0], [2], [3]):
        part, part_reasons = _metric(form, name, model, x[rows], t[rows], maps[rows], gt[rows], explainer)
        torch.testing.assert_close(part, full[rows], rtol=0, atol=1e-6, equal_nan=True)
        assert part_reasons == [reasons[i] for i in rows]
    chunked, _ = _metric(form, name, model, x, t, maps, gt, explainer, batch_size=3, impute_batch_size=5)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_a_metric_repeats_exactly_and_leaves_the_global_generator_alone(model, metric_inputs, name, form):
    x, t, maps, gt, explainer = metric_inputs
    state = torch.get_rng_state()
    first, _ = _metric(form, name, model, x, t, maps, gt, explainer)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)
    again, _ = _metric(form, name, model, x, t, maps, gt, explainer)
    assert torch.equal(first.nan_to_num(-7), again.nan_to_num(-7))


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_non_contiguous_channels_last_and_expanded_inputs_give_the_same_values(model, metric_inputs, name):
    x, t, maps, gt, explainer = metric_inputs
    ref, _ = _metric("evaluate", name, model, x, t, maps, gt, explainer)
    flip = lambda a: a.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731  same values, strided
    got, _ = _metric("evaluate", name, model, flip(x), t, flip(maps), flip(gt), explainer)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    got, _ = _metric("evaluate", name, model, x.contiguous(memory_format=torch.channels_last), t, maps, gt,
                     explainer)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    got, _ = _metric("evaluate", name, model, x[1:2].expand(3, -1, -1, -1), t[1].expand(3),
                     maps[1:2].expand(3, -1, -1), gt[1:2].expand(3, -1, -1), explainer)
    torch.testing.assert_close(got, ref[1].expand(3), rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_a_float64_model_images_and_maps_give_the_float32_values(model, metric_inputs, name):
    x, t, maps, gt, explainer = metric_inputs
    ref, ref_reasons = _metric("evaluate", name, model, x, t, maps, gt, explainer)
    double = TinyCNN().double()
    got, reasons = _metric("evaluate", name, double, x.double(), t, maps.double(), gt.double(),
                           _explainer("gradcam", double))
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=1e-5, equal_nan=True)
    assert reasons == ref_reasons


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_a_half_precision_model_is_evaluated_in_float32(model, metric_inputs, name, dtype):
    """Images of the model's dtype (ROAD imputes them in float32, the softmax is float32): float32
    values near the float32 model's on the same rounded images."""
    x, t, maps, gt, explainer = metric_inputs
    rounded = x.to(dtype)
    ref, ref_reasons = _metric("evaluate", name, model, rounded.float(), t, maps, gt, explainer)
    half = TinyCNN().to(dtype)
    got, reasons = _metric("evaluate", name, half, rounded, t, maps, gt, _explainer("gradcam", half))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0.03, equal_nan=True)
    assert reasons == ref_reasons
