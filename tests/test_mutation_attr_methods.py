"""Behaviour the mutation audit of the captum wrappers, guided backpropagation, RELAX and the
baseline maps found untested: the SLIC ``n_segments`` option reaching the features, the sign of
KernelShap's exact single-feature value, captum DeepLift's ``eps`` in float16, RELAX's default
shift (``cells // 2``) and default embedding (the input of the *last* Linear), and the centre
prior's width on non-square images (a fraction of the shorter side)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_common import TinyNet, images, np_bilinear
from validation.attributions import explain, get_explainer
from validation.attributions.captum_methods import CAPTUM_DEEPLIFT_EPS, deeplift_eps


def _with_seeded_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _seeded_linear(n_in: int, n_out: int, seed: int = 0) -> nn.Module:
    return _with_seeded_weights(nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out)), seed)


# --- LIME / KernelShap features ---------------------------------------------------------------

def test_kernelshap_uses_slic_superpixels_of_the_requested_count():
    """A model linear in the pixels: the Shapley value of a superpixel S is sum_{i in S} w_i x_i
    (baseline 0), and KernelShap recovers it. The superpixels are computed here by scikit-image
    directly with n_segments=3 (compactness 10, sigma 1): an explainer that dropped n_segments
    (SLIC with its default 100 segments) gives a map constant on other regions."""
    from skimage.segmentation import slic

    x = torch.zeros(1, 3, 8, 8)
    x[:, 0, :, :3] = 0.9          # three vertical bands of different colours
    x[:, 1, :, 3:6] = 0.8
    x[:, 2, :, 6:] = 0.7
    x += 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    seg = slic(x[0].permute(1, 2, 0).double().numpy(), n_segments=3, compactness=10.0, sigma=1.0, start_label=0,
               channel_axis=-1)
    _, seg = np.unique(seg, return_inverse=True)
    seg = torch.as_tensor(seg.reshape(8, 8))
    n_features = int(seg.max()) + 1
    assert 2 <= n_features <= 4  # few superpixels: 100 requested segments would give many more
    model, target = _seeded_linear(192, 3), 1
    contribution = (model[1].weight[target].view(3, 8, 8).double() * x[0].double()).sum(0)  # per pixel
    phi = torch.stack([contribution[seg == k].sum() for k in range(n_features)])
    expected = 3 * phi[seg]  # every colour channel of a pixel carries its superpixel's value
    ours = explain(model, x, target, method="kernelshap", superpixels="slic", n_segments=3, n_samples=200,
                   raw=True, reduce="sum", seed=0)[0]
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_kernelshap_of_a_single_feature_keeps_its_sign():
    """With reduce="sum" the exact single-feature value 3 (f(x) - f(0)) keeps its sign (the
    existing check uses |sum|, under which f(0) - f(x) passes too)."""
    model = _seeded_linear(3 * 2 * 3, 4, seed=2)
    x = torch.rand(2, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 3])
    with torch.no_grad():
        change = model(x)[[0, 1], target] - model(torch.zeros_like(x))[[0, 1], target]
    ours = explain(model, x, target, method="kernelshap", superpixels="grid", grid_cells=1, n_samples=8, raw=True,
                   reduce="sum")
    torch.testing.assert_close(ours, (3 * change)[:, None, None].expand(2, 2, 3), rtol=1e-5, atol=1e-6)
    assert change.abs().min() > 0.1 and (change < 0).any()  # |.| would hide a swapped sign
    # from a grey baseline the value is f(x) - f(grey), not f(x) - f(0)
    with torch.no_grad():
        from_grey = model(x)[[0, 1], target] - model(torch.full_like(x, 0.3))[[0, 1], target]
    assert (from_grey - change).abs().min() > 0.1
    ours = explain(model, x, target, method="kernelshap", superpixels="grid", grid_cells=1, n_samples=8, raw=True,
                   reduce="sum", baseline=0.3)
    torch.testing.assert_close(ours, (3 * from_grey)[:, None, None].expand(2, 2, 3), rtol=1e-5, atol=1e-6)


# --- DeepLift in float16 ----------------------------------------------------------------------

def test_deeplift_eps_is_captums_default_or_the_smallest_float16_value():
    """1e-10 rounds to 0 in float16 (|delta_in| < 0 never holds: 0/0 = NaN); the documented eps
    is the larger of 1e-10 and the dtype's smallest positive (subnormal) value."""
    x = torch.zeros(1, 3, 2, 2)
    assert deeplift_eps(nn.Linear(2, 2), x) == CAPTUM_DEEPLIFT_EPS
    assert deeplift_eps(nn.Linear(2, 2).double(), x) == CAPTUM_DEEPLIFT_EPS
    assert deeplift_eps(nn.Linear(2, 2).half(), x) == 2.0 ** -24          # float16's smallest subnormal
    assert deeplift_eps(nn.Flatten(), x.half()) == 2.0 ** -24             # no parameters: the images' dtype


# --- RELAX ------------------------------------------------------------------------------------

def _relax_reference(model, x, masks, embedding):
    """R = sum_n s_n m_n / sum_n m_n in float64, s_n the cosine of embedding(x * m_n) and embedding(x)."""
    with torch.no_grad():
        e0 = embedding(model, x.double())
        sims = torch.stack([F.cosine_similarity(embedding(model, x.double() * m), e0, dim=1) for m in masks], 1)
    return torch.einsum("bn,nhw->bhw", sims, masks) / masks.sum(0)


def _masks_by_definition(n, size, seed, cells, p, shift):
    g = torch.Generator().manual_seed(seed)
    grids = (torch.rand(n, 1, cells, cells, generator=g) < p).double()
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    out = []
    for k in range(n):
        padded = np.pad(np_bilinear(grids[k, 0].numpy(), *size), shift, mode="reflect")
        r, c = offsets[:, k].tolist()
        out.append(torch.as_tensor(padded[r:r + size[0], c:c + size[1]]))
    return torch.stack(out)


def _penultimate(model, x):  # TinyNet's head input: what the last Linear receives
    store = []
    handle = model.fc.register_forward_hook(lambda m, a, o: store.append(a[0].flatten(1)))
    try:
        model(x)
    finally:
        handle.remove()
    return store[-1]


def test_relax_default_shift_is_half_the_cells():
    """shift=None means cells // 2 (the reference's 3 px for 7 cells): with cells=5 that is 2,
    not a fixed 3 (the existing checks pass shift explicitly or keep cells=7)."""
    model = TinyNet().eval()
    x = images(2, 16, seed=4)
    n, cells, seed = 23, 5, 1
    masks = _masks_by_definition(n, (16, 16), seed, cells, 0.5, cells // 2)
    ref_model = copy.deepcopy(model).double()
    expected = _relax_reference(ref_model, x, masks, _penultimate)
    out = get_explainer("relax", model, n_masks=n, seed=seed, cells=cells, raw=True).explain(x)
    torch.testing.assert_close(out.maps.double(), expected, rtol=1e-5, atol=1e-7)
    wrong = _relax_reference(ref_model, x, _masks_by_definition(n, (16, 16), seed, cells, 0.5, 3), _penultimate)
    assert (wrong - expected).abs().max() > 1e-4  # the check can fail


def test_relax_default_embedding_is_the_input_of_the_last_linear():
    """A model with two Linears (an MLP head): the default embedding is what the last one
    receives (the penultimate features), not the input of the first."""
    model = _with_seeded_weights(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                               nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5)))
    x = images(2, 12, seed=2)
    n, seed = 20, 5
    masks = _masks_by_definition(n, (12, 12), seed, 7, 0.5, 3)
    ref_model = copy.deepcopy(model).double()
    expected = _relax_reference(ref_model, x, masks, lambda m, v: m[:6](v))
    first_linear_input = _relax_reference(ref_model, x, masks, lambda m, v: m[:4](v))
    assert (first_linear_input - expected).abs().max() > 1e-3
    out = get_explainer("relax", model, n_masks=n, seed=seed, raw=True).explain(x)
    torch.testing.assert_close(out.maps.double(), expected, rtol=1e-5, atol=1e-6)


# --- baseline maps ----------------------------------------------------------------------------

def test_centre_prior_width_is_a_fraction_of_the_shorter_side_on_a_wide_image():
    """sigma = 0.25 of min(H, W): on a 9 x 21 image that is 2.25 px, centred at ((H-1)/2, (W-1)/2)."""
    model = _seeded_linear(3 * 9 * 21, 2)  # never run: the prior ignores it
    x = torch.zeros(1, 3, 9, 21)
    raw = get_explainer("centre", model, raw=True).explain(x).maps[0]
    yy, xx = torch.meshgrid(torch.arange(9.0) - 4, torch.arange(21.0) - 10, indexing="ij")
    expected = torch.exp(-(yy ** 2 + xx ** 2) / (2 * 2.25 ** 2))
    torch.testing.assert_close(raw, expected, rtol=1e-6, atol=1e-7)


# --- Guided Grad-CAM --------------------------------------------------------------------------

def test_guided_gradcam_default_reduction_is_the_absolute_channel_sum():
    """The default (as the paper's code via captum) is |sum over channels|, then min-max: the
    signed sum (checked against guided backprop x Grad-CAM elsewhere) made non-negative."""
    model = TinyNet(nonlinear_head=False).eval()
    x = images(2, 16, seed=6)
    t = torch.tensor([1, 4])
    signed = explain(model, x, t, method="guidedgradcam", layer="feat", reduce="sum", raw=True).double()
    assert (signed < 0).any() and (signed > 0).any()  # |sum| and sum differ here
    magnitude = signed.abs()
    low, high = magnitude.amin((1, 2), keepdim=True), magnitude.amax((1, 2), keepdim=True)
    ours = explain(model, x, t, method="guidedgradcam", layer="feat")
    torch.testing.assert_close(ours.double(), (magnitude - low) / (high - low), rtol=1e-5, atol=1e-6)


def test_relax_masks_default_shift_is_half_the_cells():
    """The public mask helper follows the same default: shift=None is cells // 2."""
    from validation.attributions.relax import relax_masks

    for cells in (3, 5, 9):
        default = relax_masks(12, (10, 13), torch.Generator().manual_seed(4), cells=cells)
        explicit = torch.as_tensor(_masks_by_definition(12, (10, 13), 4, cells, 0.5, cells // 2)).float()
        torch.testing.assert_close(default, explicit, rtol=1e-5, atol=1e-6)


def test_grid_superpixels_on_a_non_square_image():
    """Cell of pixel (i, j) on an H x W image: row floor(i cells / H), column floor(j cells / W),
    id row * cells + column (the existing grid checks use square images or one cell)."""
    from validation.attributions.captum_methods import grid_segments

    ids = grid_segments(2, (4, 6), 2, "cpu")
    expected = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2, 2, 2, 3, 3, 3]])
    assert ids.shape == (2, 1, 4, 6) and torch.equal(ids[0, 0], expected) and torch.equal(ids[1, 0], expected)
    ids = grid_segments(1, (5, 7), 3, "cpu")[0, 0]
    rows, cols = [0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 2, 2]  # floor(3 i / 5), floor(3 j / 7)
    assert ids.tolist() == [[3 * r + c for c in cols] for r in rows]


def test_guided_backprop_reports_how_many_relus_it_guided():
    model = _with_seeded_weights(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                               nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    out = get_explainer("guidedbackprop", model).explain(images(1, 8), 0)
    assert out.extras["guided_relus"] == 2


def test_trivial_maps_on_images_with_just_enough_pixels():
    """halfcam needs two special pixels and all1scam one: a 1x2 image holds exactly [0, 1] in some
    order, a 1x1 image's all1scam map is [0]; one pixel is too few for halfcam."""
    model = _seeded_linear(6, 2)  # never run: the maps ignore the model
    half = get_explainer("halfcam", model).explain(images(3, 2)[:, :, :1, :]).maps
    assert half.shape == (3, 1, 2) and all(sorted(h.flatten().tolist()) == [0.0, 1.0] for h in half)
    ones = get_explainer("all1scam", model).explain(images(2, 1)).maps
    assert torch.equal(ones, torch.zeros(2, 1, 1))
    with pytest.raises(ValueError, match="fewer than 2 pixels"):
        get_explainer("halfcam", model).explain(images(1, 1))


def test_grid_cells_beyond_an_image_side_give_contiguous_feature_ids():
    """captum counts max id + 1 features: with grid_cells > a side, ids row * cells + column
    skipped values (grid_cells=8 on 4x4 px: ids up to 54, 39 features no pixel holds), which
    KernelShap sampled and fitted for nothing (error 3e-3 instead of 4e-6 on the model below)."""
    from validation.attributions.captum_methods import grid_segments

    torch.testing.assert_close(grid_segments(1, (4, 4), 8, "cpu")[0, 0], torch.arange(16).view(4, 4), rtol=0, atol=0)
    cols = [0, 0, 1, 2, 2, 3]  # floor(4 j / 6); 3 rows < 4 cells: a row each
    assert grid_segments(1, (3, 6), 4, "cpu")[0, 0].tolist() == [[4 * r + c for c in cols] for r in range(3)]
    model, target = _seeded_linear(48, 3), 1
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    exact = 3 * (model[1].weight[target].view(3, 4, 4) * x[0]).sum(0)  # a pixel per feature
    opts = dict(superpixels="grid", n_samples=300, raw=True, reduce="sum", seed=0)
    beyond = explain(model, x, target, method="kernelshap", grid_cells=8, **opts)[0]
    torch.testing.assert_close(beyond, explain(model, x, target, method="kernelshap", grid_cells=4, **opts)[0],
                               rtol=0, atol=0)
    torch.testing.assert_close(beyond, exact, rtol=0, atol=1e-4 * exact.abs().max().item())
