"""Each method against an independent reference: ShapleyCAM's Hessian term against finite
differences, Score-CAM (official) against a per-channel loop, LaFAM against its formula, RELAX
against a float64 loop over masks, RefineCAM against hand computation, Guided Grad-CAM and the
captum methods against their definitions."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_common import TinyNet, build, images, np_bilinear
from validation.attributions import explain, get_explainer, mix_maps
from validation.attributions.relax import relax_masks

T3 = torch.tensor([0, 3, 5])


@pytest.fixture(scope="module")
def resnet():
    return build("resnet18", wrapped=True)


# ---------------------------------------------------------------------------------------------
# ShapleyCAM

def _logit(logits, t):
    return logits.gather(1, t[:, None])[:, 0]


# the scores written independently of validation.attributions.base.class_score
SCORES = {
    "logit": _logit,
    "softmax": lambda z, t: F.softmax(z, dim=1).gather(1, t[:, None])[:, 0],
    "log_softmax": lambda z, t: -F.cross_entropy(z, t, reduction="none"),
    # ShapleyCAM's ReST: the logit minus the cross-entropy loss
    "rest": lambda z, t: _logit(z, t) - F.cross_entropy(z, t, reduction="none"),
}


def _fd_shapley_raw(model, layer, x, target, eps=1e-4, score=_logit):
    """sum_k mean_ij(g - 1/2 H A)_k A_k with H A from central differences of g along A;
    g = d score(logits, target) / dA."""
    scale = {"s": 0.0}

    def hook(m, args, out):
        out = out * (1 + scale["s"])
        out.retain_grad()
        store.append(out)
        return out

    def grad_at(s):
        scale["s"] = s
        store.clear()
        handle = layer.register_forward_hook(hook)
        try:
            y = score(model(x), target).sum()
            y.backward()
        finally:
            handle.remove()
        return store[0].grad.detach(), store[0].detach() / (1 + s)

    store: list = []
    g, A = grad_at(0.0)
    hvp = (grad_at(eps)[0] - grad_at(-eps)[0]) / (2 * eps)  # d g(A + tA)/dt = H A
    w = (g - 0.5 * hvp).mean(dim=(2, 3), keepdim=True)
    return (w * A).sum(1), (g.mean(dim=(2, 3), keepdim=True) * A).sum(1)


def test_shapleycam_hessian_term_matches_finite_differences():
    model = TinyNet(nonlinear_head=True).double().eval()
    x = images(3, 16).double()
    expected, gradcam_raw = _fd_shapley_raw(model, model.feat, x, T3)
    ours = explain(model, x, T3, method="shapleycam", layer="feat", raw=True, score="logit")
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-8)
    # the Hessian term matters here: ShapleyCAM is not Grad-CAM
    assert (ours.double() - gradcam_raw).abs().max() > 1e-3 * gradcam_raw.abs().max()
    torch.testing.assert_close(explain(model, x, T3, method="gradcam", layer="feat", raw=True).double(),
                               gradcam_raw, rtol=1e-6, atol=1e-10)


def test_shapleycam_equals_gradcam_when_the_head_is_piecewise_linear(resnet):
    x = images(2, 32)
    a = explain(resnet, x, [1, 2], method="shapleycam", layer="stage2", raw=True, score="logit")
    b = explain(resnet, x, [1, 2], method="gradcam", layer="stage2", raw=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    # a softmax score is non-linear in the activations: the Hessian term appears
    c = explain(resnet, x, [1, 2], method="shapleycam", layer="stage2", raw=True, score="softmax")
    d = explain(resnet, x, [1, 2], method="gradcam", layer="stage2", raw=True, score="softmax")
    assert (c - d).abs().max() > 1e-3 * d.abs().max()
    # the default score is ShapleyCAM's ReST (logit + log-softmax), where the Hessian term is live
    e = explain(resnet, x, [1, 2], method="shapleycam", layer="stage2", raw=True)
    f = explain(resnet, x, [1, 2], method="shapleycam", layer="stage2", raw=True, score="rest")
    torch.testing.assert_close(e, f)
    g = explain(resnet, x, [1, 2], method="gradcam", layer="stage2", raw=True, score="rest")
    assert (e - g).abs().max() > 1e-3 * g.abs().max()


@pytest.mark.parametrize("score", ["rest", "softmax", "log_softmax"])
@pytest.mark.parametrize("nonlinear_head", [True, False])
def test_shapleycam_non_logit_scores_match_finite_differences(score, nonlinear_head):
    """The default ReST score (and the other non-logit scores) against finite differences of the
    score written by hand; with a linear head the whole Hessian term comes from the softmax."""
    model = TinyNet(nonlinear_head=nonlinear_head).double().eval()
    x = images(2, 16).double()
    t = torch.tensor([1, 4])
    expected, gradcam_raw = _fd_shapley_raw(model, model.feat, x, t, score=SCORES[score])
    opts = {} if score == "rest" else {"score": score}  # "rest" through the default path
    ours = explain(model, x, t, method="shapleycam", layer="feat", raw=True, **opts)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-8 * expected.abs().max().item())
    assert (ours.double() - gradcam_raw).abs().max() > 1e-3 * gradcam_raw.abs().max()  # the Hessian term is live
    # the score is the hand-written one: Grad-CAM of the same score is the reference's g term
    torch.testing.assert_close(explain(model, x, t, method="gradcam", layer="feat", raw=True, score=score).double(),
                               gradcam_raw, rtol=1e-6, atol=1e-10 * gradcam_raw.abs().max().item())


@pytest.mark.parametrize("score", ["logit", "rest"])
def test_shapleycam_multi_layer_has_no_cross_layer_terms(score):
    model = TinyNet(nonlinear_head=True).double().eval()
    x = images(2, 16).double()
    ex = get_explainer("shapleycam", model, layer="feat", score=score)
    joint, _, _ = ex.layer_maps(x, [1, 4], ["feat", "act"])
    for raw, layer in zip(joint, ["feat", "act"]):
        alone, _ = _fd_shapley_raw(model, model.get_submodule(layer), x, torch.tensor([1, 4]), score=SCORES[score])
        torch.testing.assert_close(raw, alone, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Score-CAM (official)

class ConstChannelNet(TinyNet):
    """TinyNet whose channel 2 at ``feat`` is constant (zero weights, so ReLU(bias) everywhere)."""

    def __init__(self):
        super().__init__(nonlinear_head=False)
        with torch.no_grad():
            self.stem.weight[2] = 0
            self.stem.bias[2] = 0.7


def _authors_scorecam(model, module, x, target):
    """The Score-CAM authors' loop, one image and one channel at a time: sum_k w_k Up(A_k) at the
    input's resolution (before their ReLU), the layer's channel count and the forwards spent."""
    size = tuple(x.shape[-2:])
    with torch.no_grad():
        acts = []
        h = module.register_forward_hook(lambda m, a, o: acts.append(o))
        model(x)
        h.remove()
        A = acts[0]
        summed = torch.zeros(x.shape[0], *size, dtype=x.dtype)
        forwards = 0
        for b in range(x.shape[0]):
            for k in range(A.shape[1]):
                sal = F.interpolate(A[b:b + 1, k:k + 1], size=size, mode="bilinear", align_corners=False)
                if sal.max() == sal.min():
                    continue
                norm = (sal - sal.min()) / (sal.max() - sal.min())
                score = F.softmax(model(x[b:b + 1] * norm), dim=1)[0, target[b]]
                forwards += 1
                summed[b] += score * sal[0, 0]
    return summed, A.shape[1], forwards


def test_scorecam_official_matches_the_authors_loop():
    model = ConstChannelNet().eval()
    x = images(2, 16)
    target = torch.tensor([1, 4])
    expected, channels, forwards = _authors_scorecam(model, model.feat, x, target)
    expected = expected.clamp_min(0)
    assert forwards == 2 * (channels - 1)  # the constant channel was skipped
    ours = explain(model, x, target, method="scorecam", layer="feat", raw=True, batch_size=5)
    torch.testing.assert_close(F.interpolate(ours[:, None], size=(16, 16), mode="bilinear")[:, 0].clamp_min(0),
                               expected, rtol=1e-5, atol=1e-6)
    # batch size does not change the result; the constant channel costs no forward pass
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        other = explain(model, x, target, method="scorecam", layer="feat", raw=True, batch_size=64)
    finally:
        h.remove()
    torch.testing.assert_close(other, ours)
    assert sum(calls) == 2 + 2 * (channels - 1)


def test_scorecam_of_a_float64_model_is_computed_in_float64():
    """As every other CAM: a float64 model's activations and channel scores stay float64 (they
    were cast to float32, 4e-7 off the float64 loop)."""
    model = ConstChannelNet().eval().double()
    x = images(2, 16).double()
    target = torch.tensor([1, 4])
    expected, _, _ = _authors_scorecam(model, model.feat, x, target)
    (raw,), _, _ = get_explainer("scorecam", model, layer="feat").layer_maps(x, target, ["feat"])
    assert raw.dtype == torch.float64
    up = F.interpolate(raw[:, None], size=(16, 16), mode="bilinear")[:, 0]
    torch.testing.assert_close(up.clamp_min(0), expected.clamp_min(0), rtol=1e-12, atol=1e-12)


def test_scorecam_official_final_map_is_the_authors_where_activations_are_negative():
    """``head_conv`` (8x8 for a 16x16 input) has no ReLU after it, so the weighted sum changes
    sign; the authors' ReLU after upsampling then differs from ReLU before it (the other CAMs')."""
    model = TinyNet(nonlinear_head=False).eval()
    x = images(2, 16)
    target = torch.tensor([1, 4])
    summed, _, _ = _authors_scorecam(model, model.head_conv, x, target)
    assert (summed < 0).any() and (summed > 0).any()
    relu = summed.clamp_min(0)
    lo, hi = relu.amin((1, 2), keepdim=True), relu.amax((1, 2), keepdim=True)
    expected = (relu - lo) / (hi - lo)
    ours = get_explainer("scorecam", model, layer="head_conv").explain(x, target)
    assert not ours.degenerate.any()
    torch.testing.assert_close(ours.maps, expected, rtol=1e-5, atol=1e-5)
    # the same final map through the multi-layer path that RefineCAM uses
    (many,) = get_explainer("scorecam", model, layer="feat").explain_layers(x, target, ["head_conv"])
    torch.testing.assert_close(many.maps, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# LaFAM

def test_lafam_is_its_formula(resnet):
    x = images(3, 64)
    A = []
    h = resnet.backbone.layer2.register_forward_hook(lambda m, a, o: A.append(o.detach()))
    resnet(x)
    h.remove()
    mean = A[0].mean(1, keepdim=True)                                               # (B, 1, 8, 8)
    lo, hi = mean.amin((2, 3), keepdim=True), mean.amax((2, 3), keepdim=True)
    normed = (mean - lo) / (hi - lo)
    # nearest upsampling: exactly Up(N(mean A)) as in the LaFAM paper
    near = explain(resnet, x, None, method="lafam", layer="stage2", interpolation="nearest")
    torch.testing.assert_close(near, F.interpolate(normed, size=(64, 64), mode="nearest")[:, 0])
    # bilinear: N(Up(mean A))
    up = F.interpolate(mean, size=(64, 64), mode="bilinear", align_corners=False)
    up = (up - up.amin((2, 3), keepdim=True)) / (up.amax((2, 3), keepdim=True) - up.amin((2, 3), keepdim=True))
    torch.testing.assert_close(explain(resnet, x, None, method="lafam", layer="stage2"), up[:, 0])


def test_lafam_takes_the_first_output_of_a_reused_module_among_several_layers(resnet):
    """layer1.0.relu runs twice before layer2 fires; LaFAM uses its first output."""
    x = images(2, 32)
    outs = {"relu": [], "layer2": []}
    hooks = [resnet.backbone.layer1[0].relu.register_forward_hook(lambda m, a, o: outs["relu"].append(o.detach())),
             resnet.backbone.layer2.register_forward_hook(lambda m, a, o: outs["layer2"].append(o.detach()))]
    try:
        resnet(x)
    finally:
        for h in hooks:
            h.remove()
    first, second = (o.mean(1) for o in outs["relu"])
    assert (first - second).abs().max() > 1e-3  # the two calls differ: which one is used matters
    ex = get_explainer("lafam", resnet)
    raws, _, rank = ex.layer_maps(x, None, ["stage2", "layer1.0.relu"])
    torch.testing.assert_close(raws[1], first)
    torch.testing.assert_close(raws[0], outs["layer2"][0].mean(1))
    assert rank == [1, 0]
    single = explain(resnet, x, None, method="lafam", layer="layer1.0.relu")
    maps = [e.maps for e in ex.explain_layers(x, None, ["layer1.0.relu", "stage2"])]
    torch.testing.assert_close(maps[0], single)
    refined = explain(resnet, x, None, method="refinecam", base="lafam", layers=["layer1.0.relu", "stage2"])
    torch.testing.assert_close(refined, _minmax(maps[0] * maps[1]))


def test_lafam_is_label_and_gradient_free(resnet):
    x = images(2, 32)
    calls = []
    h = resnet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        a = explain(resnet, x, [0, 1], method="lafam")
        b = explain(resnet, x, [5, 2], method="lafam")
    finally:
        h.remove()
    assert calls == [False, False]  # one forward per call, no graph
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# RELAX

def test_relax_matches_a_float64_loop_over_masks():
    model = TinyNet().eval()
    x = images(2, 16)
    n = 37
    ex = get_explainer("relax", model, n_masks=n, batch_size=10, seed=3, raw=True)
    out = ex.explain(x)
    ref_model = copy.deepcopy(model).double()
    masks = relax_masks(n, (16, 16), torch.Generator().manual_seed(3)).double()
    R, U, _ = _relax_float64(ref_model, ref_model.fc, x, masks, output=False)  # the head's input
    torch.testing.assert_close(out.maps.double(), R, rtol=1e-5, atol=1e-7)
    # U ~ 3e-5 is a difference of sums ~ 1 (s_n ~ 1, spread 0.005): tight only if summed in float64
    assert U.max() < 1e-4
    torch.testing.assert_close(out.extras["uncertainty"].double(), U, rtol=1e-4, atol=1e-10)
    # the masks are seeded and independent of the batch size
    again = get_explainer("relax", model, n_masks=n, batch_size=3, seed=3, raw=True).explain(x)
    torch.testing.assert_close(again.maps, out.maps, rtol=1e-5, atol=1e-6)
    other_seed = get_explainer("relax", model, n_masks=n, seed=4, raw=True).explain(x)
    assert (other_seed.maps - out.maps).abs().max() > 1e-4


def _relax_float64(model, module, x, masks, output=True):
    """RELAX by its definition, one image and one mask at a time in float64: the embedding is a
    copy of ``module``'s flattened output (``output``) or input, taken when the module runs.
    Returns (R, the weighted variance U, the unnormalised sum of the reference code) per image."""
    store = []
    pick = (lambda m, a, o: o) if output else (lambda m, a, o: a[0])
    handle = module.register_forward_hook(lambda m, a, o: store.append(pick(m, a, o).detach().flatten(1).clone()))
    R, U, S = [], [], []
    try:
        with torch.no_grad():
            for b in range(x.shape[0]):
                xb = x[b:b + 1].double()
                store.clear()
                model(xb)
                e0 = store[-1][0]
                sims = []
                for m in masks:
                    store.clear()
                    model(xb * m)
                    sims.append(F.cosine_similarity(store[-1][0], e0, dim=0))
                s = torch.stack(sims)[:, None, None]
                r = (s * masks).sum(0) / masks.sum(0)
                spread = (masks * (s - r) ** 2).sum(0)
                R.append(r), U.append(spread / masks.sum(0)), S.append(spread)
    finally:
        handle.remove()
    return torch.stack(R), torch.stack(U), torch.stack(S)


def test_relax_embedding_layer_is_the_layers_output_even_when_modified_in_place_afterwards():
    """``embedding_layer`` names a Linear followed by an inplace ReLU (as in VGG's classifier):
    the embedding is what the Linear produced, negative values included. It used to be a view of
    that output, which the ReLU then overwrote, so RELAX silently compared ReLU(Linear) features.
    Also ``uncertainty="sum"`` (the reference code's unnormalised spread)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 8), nn.ReLU(inplace=True), nn.Linear(8, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = images(2, 12, seed=1)
    n = 24
    masks = relax_masks(n, (12, 12), torch.Generator().manual_seed(2)).double()
    ref_model = copy.deepcopy(model).double()
    R, U, S = _relax_float64(ref_model, ref_model[4], x, masks)
    # the ReLU's output (what the view ended up holding) gives another map: the check can fail
    R_relu, _, _ = _relax_float64(ref_model, ref_model[6], x, masks, output=False)
    assert (R_relu - R).abs().max() > 1e-3  # 100x the tolerance below
    for uncertainty, expected_u in (("variance", U), ("sum", S)):
        out = get_explainer("relax", model, n_masks=n, batch_size=7, seed=2, embedding_layer="4", raw=True,
                            uncertainty=uncertainty).explain(x)
        torch.testing.assert_close(out.maps.double(), R, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.extras["uncertainty"].double(), expected_u, rtol=1e-4,
                                   atol=1e-6 * expected_u.abs().max().item())


def test_relax_mask_options_reach_the_explainer():
    """RELAX with non-default ``cells``, ``p`` and ``shift`` against the float64 loop over masks
    built here by their definition: from a generator seeded with ``seed``, Bernoulli(p) grids
    (rand < p), then crop offsets in [0, 2 * shift]; numpy bilinear upsampling, reflect padding
    by ``shift``, crop. The other RELAX checks of the explainer use the defaults (7, 0.5, 3), so
    an option that never reached the masks went unnoticed."""
    import numpy as np

    model = TinyNet().eval()
    x = images(2, 16, seed=7)
    n, cells, p, shift = 29, 5, 0.3, 1
    g = torch.Generator().manual_seed(2)
    grids = (torch.rand(n, 1, cells, cells, generator=g) < p).double()
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    masks = []
    for k in range(n):
        padded = np.pad(np_bilinear(grids[k, 0].numpy(), 16, 16), shift, mode="reflect")
        r, c = offsets[:, k].tolist()
        masks.append(torch.as_tensor(padded[r:r + 16, c:c + 16]))
    masks = torch.stack(masks)
    assert grids.mean() < 0.4  # p, not 0.5, decides the grids
    ref_model = copy.deepcopy(model).double()
    R, U, _ = _relax_float64(ref_model, ref_model.fc, x, masks, output=False)
    out = get_explainer("relax", model, n_masks=n, seed=2, cells=cells, p=p, shift=shift, raw=True).explain(x)
    torch.testing.assert_close(out.maps.double(), R, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.extras["uncertainty"].double(), U, rtol=1e-4, atol=1e-10)
    # each option changes the map here by far more than the tolerance
    for option in ({"cells": 7}, {"p": 0.5}, {"shift": 3}):
        other = get_explainer("relax", model, n_masks=n, seed=2, raw=True,
                              **{"cells": cells, "p": p, "shift": shift, **option}).explain(x)
        assert (other.maps.double() - R).abs().max() > 1e-4, option


def test_relax_masks_are_shifted_bilinear_grids():
    m = relax_masks(200, (28, 28), torch.Generator().manual_seed(0))
    assert m.shape == (200, 28, 28) and m.min() >= 0 and m.max() <= 1
    assert 0.4 < m.mean() < 0.6                     # Bernoulli(0.5)
    assert ((m > 0) & (m < 1)).float().mean() > 0.2  # bilinear, not binary
    # shifts: the cell borders fall at different places
    assert len({tuple(mm[0].round(decimals=3).tolist()) for mm in m}) > 150


@pytest.mark.parametrize("size,shift,pad_mode", [((5, 7), 2, "reflect"), ((3, 4), 3, "edge")])
def test_relax_masks_by_hand(size, shift, pad_mode):
    """Fixed grids and crop offsets through the renderer against numpy: bilinear upsampling,
    np.pad by shift (reflect, or edge once shift >= the shorter side), and the crop
    [row offset : + H, col offset : + W]."""
    import numpy as np

    from validation.attributions import relax as relax_module

    H, W = size
    grid = torch.tensor([[[[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]],
                         [[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]]])
    offsets = torch.tensor([[0, 2 * shift], [2 * shift - 1, 1]])  # (row, col) x 2 masks, rows != cols
    ours = relax_module.render_masks(grid, offsets, size, shift)
    up0 = np_bilinear(grid[0, 0].numpy().astype(np.float64), H, W)
    torch.testing.assert_close(torch.as_tensor(up0), F.interpolate(grid[:1].double(), size=size, mode="bilinear",
                                                                  align_corners=False)[0, 0])
    for k in range(2):
        up = np_bilinear(grid[k, 0].numpy().astype(np.float64), H, W)
        padded = np.pad(up, shift, mode=pad_mode)
        r, c = offsets[:, k].tolist()
        expected = torch.as_tensor(padded[r:r + H, c:c + W])
        torch.testing.assert_close(ours[k].double(), expected, rtol=0, atol=1e-6)
    # relax_masks draws grids then offsets from the generator and renders them the same way
    g = torch.Generator().manual_seed(5)
    masks = relax_module.relax_masks(3, size, g, cells=3, shift=shift)
    g = torch.Generator().manual_seed(5)
    grids = (torch.rand(3, 1, 3, 3, generator=g) < 0.5).float()
    offs = torch.randint(0, 2 * shift + 1, (2, 3), generator=g)
    for k in range(3):
        up = np_bilinear(grids[k, 0].numpy().astype(np.float64), H, W)
        r, c = offs[:, k].tolist()
        expected = torch.as_tensor(np.pad(up, shift, mode=pad_mode)[r:r + H, c:c + W])
        torch.testing.assert_close(masks[k].double(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# RefineCAM

LAYERS = ["stage1", "stage2", "stage3", "stage4"]


@pytest.mark.parametrize("base", ["gradcampp", "layercam", "scorecam", "shapleycam", "guidedgradcam"])
def test_refinecam_of_one_layer_is_the_base_method(resnet, base):
    x = images(2, 32)
    opts = {"base_options": {"batch_size": 256}} if base == "scorecam" else {}
    refined = explain(resnet, x, [1, 2], method="refinecam", base=base, layers=["stage3"], **opts)
    plain = explain(resnet, x, [1, 2], method=base, layer="stage3", **opts.get("base_options", {}))
    torch.testing.assert_close(refined, plain, rtol=0, atol=1e-6)


def _minmax(t):
    lo, hi = t.amin((1, 2), keepdim=True), t.amax((1, 2), keepdim=True)
    assert (hi > lo).all(), "test input should not give constant maps"
    return (t - lo) / (hi - lo)


@pytest.mark.parametrize("mix", ["product", "geomean", "invexp"])
def test_refinecam_mixes_by_hand(resnet, mix):
    x = images(3, 64, seed=5)
    per_layer = [explain(resnet, x, T3, method="gradcampp", layer=l).double() for l in LAYERS]
    stack = torch.stack(per_layer)
    if mix == "product":
        hand = stack.prod(0)
    elif mix == "geomean":
        hand = stack.prod(0) ** 0.25
    else:
        with torch.no_grad():
            hand = 1 / torch.log(torch.exp(1 / stack).mean(0))  # float64: exp(1/L) stays finite for L > 0.0014
    ok = torch.isfinite(hand).all()
    assert ok
    # layers given out of order: depth comes from the forward pass
    ours = explain(resnet, x, T3, method="refinecam", base="gradcampp", layers=LAYERS[::-1], layer="stage1", mix=mix)
    torch.testing.assert_close(ours.double(), _minmax(hand), rtol=1e-4, atol=1e-5)
    # refining at stage3 uses stage3 and stage4 only
    deep = explain(resnet, x, T3, method="refinecam", layers=LAYERS, layer="stage3", mix=mix)
    sub = stack[2:]
    hand3 = {"product": sub.prod(0), "geomean": sub.prod(0) ** 0.5,
             "invexp": 1 / torch.log(torch.exp(1 / sub).mean(0))}[mix]
    torch.testing.assert_close(deep.double(), _minmax(hand3), rtol=1e-4, atol=1e-5)


def test_mix_handles_zeros_without_nan():
    maps = torch.tensor([[[0.0, 0.5], [1.0, 1e-4]], [[1.0, 0.5], [1.0, 0.9]]])[:, None]
    for mix in ("product", "geomean", "invexp"):
        out = mix_maps(maps, mix)
        assert torch.isfinite(out).all() and out[0, 0, 0] == 0
    inv = mix_maps(maps, "invexp")[0]
    assert inv[1, 0] == pytest.approx(1.0) and inv[0, 1] == pytest.approx(0.5)
    assert inv[1, 1] == pytest.approx(1 / (1 / 1e-4 - torch.log(torch.tensor(2.0)).item()), rel=1e-4)


def test_refinecam_over_four_layers_runs_one_forward_and_one_backward(resnet, monkeypatch):
    x = images(2, 32)
    forwards, backwards = [], []
    real_grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        backwards.append(len(inputs))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    h1 = resnet.register_forward_pre_hook(lambda m, a: forwards.append(1))
    # the backward stops at the shallowest layer's output: layer1's input gradient is never formed
    h2 = resnet.backbone.layer1.register_full_backward_hook(lambda m, gi, go: backwards.append("layer1 input"))
    try:
        explain(resnet, x, [0, 1], method="refinecam", base="gradcampp", layers=LAYERS)
    finally:
        h1.remove()
        h2.remove()
    assert forwards == [1] and backwards == [4]  # one backward pass to all four layers


def test_explain_layers_equals_single_layer_calls(resnet):
    x = images(2, 32)
    many = get_explainer("layercam", resnet).explain_layers(x, [3, 4], LAYERS)
    for exp, layer in zip(many, LAYERS):
        torch.testing.assert_close(exp.maps, explain(resnet, x, [3, 4], method="layercam", layer=layer))


# ---------------------------------------------------------------------------------------------
# Guided Grad-CAM, captum methods

class _HandGuidedReLU(nn.Module):
    """ReLU whose backward passes the gradient only where both it and the input are positive."""

    def forward(self, t):
        out = t.clamp_min(0)
        if out.requires_grad:
            out.register_hook(lambda g, t=t: g.clamp_min(0) * (t > 0))
        return out


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(resnet):
    x = images(2, 32)
    ours = explain(resnet, x, [2, 3], method="guidedgradcam", layer="stage2", reduce="sum", raw=True)
    # guided backprop with hand-made guided ReLUs, on an independent copy
    ref_model = copy.deepcopy(resnet)
    for parent in list(ref_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, _HandGuidedReLU())
    xi = x.clone().requires_grad_(True)
    ref_model(xi).gather(1, torch.tensor([[2], [3]])).sum().backward()
    cam = explain(resnet, x, [2, 3], method="gradcam", layer="stage2", raw=True).clamp_min(0)
    up = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    expected = (xi.grad * up).sum(1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("score", ["softmax", "log_softmax"])
def test_guided_methods_explain_the_chosen_score(score):
    """``score=`` reaches the guided pass: guided backpropagation of the hand-written score
    (SCORES) through a copy with hand-made guided ReLUs, in float64; Guided Grad-CAM is that times
    the ReLU'd Grad-CAM of the same score (``feat`` is at input resolution: no upsampling).
    Every other guided check explains the logit, the default."""
    model = TinyNet(nonlinear_head=True).double().eval()
    x = images(2, 16, seed=6).double()
    t = torch.tensor([2, 4])
    ref_model = copy.deepcopy(model)
    ref_model.feat = _HandGuidedReLU()
    xi = x.clone().requires_grad_(True)
    SCORES[score](ref_model(xi), t).sum().backward()
    expected = xi.grad.sum(1)
    ours = explain(model, x, t, method="guidedbackprop", reduce="sum", raw=True, score=score)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item())
    logit = explain(model, x, t, method="guidedbackprop", reduce="sum", raw=True)
    assert (logit.double() - expected).abs().max() > 0.1 * expected.abs().max()  # the score matters
    cam = explain(model, x, t, method="gradcam", layer="feat", raw=True, score=score).double().clamp_min(0)
    assert cam.shape == (2, 16, 16) and (cam > 0).any()
    guided_cam = explain(model, x, t, method="guidedgradcam", layer="feat", reduce="sum", raw=True, score=score)
    expected_cam = (xi.grad * cam[:, None]).sum(1)
    torch.testing.assert_close(guided_cam.double(), expected_cam, rtol=1e-6,
                               atol=1e-9 * expected_cam.abs().max().item())


def test_deeplift_on_resnet_with_reused_relus_is_complete(resnet):
    """DeepLift's summation-to-delta: sum of attributions = f(x)_c - f(baseline)_c. It only
    holds if every use of the reused ResNet ReLU gets its own multiplier. (captum's max-pool rule
    is not complete, so the stem's max-pool is replaced by an identity for this check.)"""
    from captum.attr import DeepLift

    model = copy.deepcopy(resnet)
    model.backbone.maxpool = nn.Identity()
    x = images(2, 32)
    t = torch.tensor([1, 4])
    with pytest.raises(RuntimeError, match="used more than once"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum alone cannot: its notice about hooks is expected
        DeepLift(model).attribute(x.clone().requires_grad_(), baselines=torch.zeros_like(x), target=t)
    attr = explain(model, x, t, method="deeplift", reduce="sum", raw=True)
    with torch.no_grad():
        delta = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(attr.sum((1, 2)), delta, rtol=1e-4, atol=1e-5)
    modules = list(resnet.modules())
    explain(resnet, x, t, method="deeplift")
    assert list(resnet.modules()) == modules  # the split ReLUs are gone again


def test_deeplift_rescale_rule_by_hand_on_a_one_hidden_layer_mlp():
    """input -> Linear -> ReLU -> Linear, baseline an image b: the Rescale rule gives
    attr_i = (x_i - b_i) sum_j W2[t, j] (dh_j / dz_j) W1[j, i], dh/dz the ReLU's secant slope
    between x and b (not its gradient at either end)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = images(2, 2, seed=4)                                   # (2, 3, 2, 2): 12 inputs
    b = torch.rand(1, 3, 2, 2, generator=g)
    t = torch.tensor([0, 2])
    W1, b1, W2 = model[1].weight.double(), model[1].bias.double(), model[3].weight.double()
    dx = (x - b).double().flatten(1)                           # (2, 12)
    z, z0 = x.double().flatten(1) @ W1.T + b1, b.double().flatten(1) @ W1.T + b1
    assert (z - z0).abs().min() > 1e-2                         # no 0/0 secant
    assert ((z > 0) != (z0 > 0)).any()                         # some unit crosses the kink: secant != gradient
    slope = (z.clamp_min(0) - z0.clamp_min(0)) / (z - z0)
    expected = (dx * ((W2[t] * slope) @ W1)).view(2, 3, 2, 2).sum(1)
    ours = explain(model, x, t, method="deeplift", baseline=b, reduce="sum", raw=True)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    # not a tautology: gradient x (input - baseline) at x differs
    grad_rule = (dx * ((W2[t] * (z > 0)) @ W1)).view(2, 3, 2, 2).sum(1)
    assert (grad_rule - expected).abs().max() > 0.1


def test_deeplift_equals_captum_called_directly_on_a_net_without_reused_relus():
    from captum.attr import DeepLift as CaptumDeepLift

    model = TinyNet(nonlinear_head=True).eval()                 # one ReLU, used once; a Softplus head
    x = images(2, 8, seed=5)
    t = torch.tensor([3, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = CaptumDeepLift(copy.deepcopy(model)).attribute(
            x.clone().requires_grad_(), baselines=torch.full_like(x, 0.3), target=t).detach().sum(1)
    ours = explain(model, x, t, method="deeplift", baseline=0.3, reduce="sum", raw=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    # the baseline matters (a wrapper that dropped it would pass a 0-baseline comparison)
    zero = explain(model, x, t, method="deeplift", reduce="sum", raw=True)
    assert (zero - ref).abs().max() > 1e-2 * ref.abs().max()


def test_inputxgradient_and_integrated_gradients(resnet):
    x = images(2, 32)
    t = torch.tensor([0, 5])
    xi = x.clone().requires_grad_(True)
    resnet(xi).gather(1, t[:, None]).sum().backward()
    ixg = explain(resnet, x, t, method="inputxgradient", reduce="sum", raw=True)
    torch.testing.assert_close(ixg, (x * xi.grad).sum(1), rtol=1e-4, atol=1e-7)
    ig = explain(resnet, x, t, method="integratedgradients", reduce="sum", raw=True, n_steps=64,
                 internal_batch_size=64)
    with torch.no_grad():
        delta = resnet(x).gather(1, t[:, None])[:, 0] - resnet(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(ig.sum((1, 2)), delta, rtol=0.05, atol=0.05 * delta.abs().max().item())


def test_integrated_gradients_is_gauss_legendre_quadrature_in_float64():
    """sum_k w_k grad f(b + a_k (x - b)) (x - b), b = 0, with Gauss-Legendre nodes and weights
    on [0, 1] from numpy, in float64, against captum's float32 run. A non-linear head makes the
    quadrature (and its step count) matter."""
    import numpy as np

    model = TinyNet(nonlinear_head=True).eval()
    ref_model = copy.deepcopy(model).double()
    x = images(2, 16, seed=2)
    t = torch.tensor([2, 5])
    n = 5
    nodes, weights = np.polynomial.legendre.leggauss(n)
    alphas, w = (nodes + 1) / 2, weights / 2  # [-1, 1] -> [0, 1]
    xd = x.double()
    base = torch.zeros_like(xd)
    total = torch.zeros_like(xd)
    for a_k, w_k in zip(alphas.tolist(), w.tolist()):
        point = (base + a_k * (xd - base)).requires_grad_(True)
        (grad,) = torch.autograd.grad(ref_model(point).gather(1, t[:, None]).sum(), point)
        total += w_k * grad
    expected = (total * (xd - base)).sum(1)
    for ibs in (None, 3):  # internal batches that split the 2 x 5 scaled images unevenly
        ours = explain(model, x, t, method="integratedgradients", reduce="sum", raw=True, n_steps=n,
                       internal_batch_size=ibs)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # not a tautology: a midpoint rule with as many steps, or Gauss-Legendre with one fewer, differ
    mid = torch.zeros_like(xd)
    for k in range(n):
        point = ((k + 0.5) / n * xd).requires_grad_(True)
        mid += torch.autograd.grad(ref_model(point).gather(1, t[:, None]).sum(), point)[0] / n
    assert ((mid * xd).sum(1) - expected).abs().max() > 1e-3 * expected.abs().max()
    fewer = explain(model, x, t, method="integratedgradients", reduce="sum", raw=True, n_steps=n - 1)
    assert (fewer.double() - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("baseline", ["grey", "image"])
def test_integrated_gradients_from_a_baseline_is_gauss_legendre_quadrature_in_float64(baseline):
    """The same quadrature from a non-zero baseline b (a number, or an image per batch):
    sum_k w_k grad f(b + a_k (x - b)) (x - b). Every other IG check starts from 0, so a
    baseline that never reached captum (which then integrates from 0) went unnoticed."""
    import numpy as np

    model = TinyNet(nonlinear_head=True).eval()
    ref_model = copy.deepcopy(model).double()
    x = images(2, 16, seed=4)
    t = torch.tensor([1, 3])
    n = 5
    if baseline == "grey":
        option, base = 0.3, torch.full((2, 3, 16, 16), 0.3, dtype=torch.float64)
    else:
        option = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
        base = option.double().expand(2, 3, 16, 16)
    nodes, weights = np.polynomial.legendre.leggauss(n)
    xd = x.double()
    total = torch.zeros_like(xd)
    for a_k, w_k in zip(((nodes + 1) / 2).tolist(), (weights / 2).tolist()):
        point = (base + a_k * (xd - base)).requires_grad_(True)
        (grad,) = torch.autograd.grad(ref_model(point).gather(1, t[:, None]).sum(), point)
        total += w_k * grad
    expected = (total * (xd - base)).sum(1)
    ours = explain(model, x, t, method="integratedgradients", reduce="sum", raw=True, n_steps=n, baseline=option)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # the baseline matters here: integrating from 0 gives another map
    from_zero = explain(model, x, t, method="integratedgradients", reduce="sum", raw=True, n_steps=n)
    assert (from_zero.double() - expected).abs().max() > 0.1 * expected.abs().max()


def test_every_channel_reduction_by_hand():
    from validation.attributions.pixel import REDUCTIONS, reduce_channels

    # (B=1, C=2, 2, 3): channel sums 3, -1, 0, -7, 2, 0.5
    a = torch.tensor([[[[1.0, -3.0, 2.0], [-4.0, 0.0, 0.5]],
                       [[2.0, 2.0, -2.0], [-3.0, 2.0, 0.0]]]])
    hand = {
        "sum": [[3.0, -1.0, 0.0], [-7.0, 2.0, 0.5]],
        "sum_abs": [[3.0, 1.0, 0.0], [7.0, 2.0, 0.5]],
        "sum_relu": [[3.0, 0.0, 0.0], [0.0, 2.0, 0.5]],
        "abs_sum": [[3.0, 5.0, 4.0], [7.0, 2.0, 0.5]],
        "max_abs": [[2.0, 3.0, 2.0], [4.0, 2.0, 0.5]],
    }
    assert set(REDUCTIONS) == set(hand)  # a new reduction needs its hand check here
    for name, values in hand.items():
        torch.testing.assert_close(reduce_channels(a, name), torch.tensor([values]), rtol=0, atol=0)
    torch.testing.assert_close(reduce_channels(a), torch.tensor([hand["sum_abs"]]), rtol=0, atol=0)  # the default
    with pytest.raises(ValueError, match="reduce must be one of"):
        reduce_channels(a, "mean")


def test_inputxgradient_default_path_is_minmax_of_abs_channel_sum():
    """explain() with no options: |sum_c x dlogit_t/dx| (no ReLU, no upsampling), min-maxed per
    sample; a map that is constant (target with zero head weights: zero gradient) is all zeros."""
    model = TinyNet(nonlinear_head=True).eval()
    with torch.no_grad():
        model.fc.weight[4] = 0  # logit 4 = bias: no gradient
    x = images(2, 16, seed=3)
    t = torch.tensor([1, 4])
    xi = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xi).gather(1, t[:, None]).sum(), xi)
    signed = (x * grad).sum(1)
    assert (signed[0] > 0).any() and (signed[0] < 0).any()  # the absolute value matters
    m = signed[0].abs()
    expected = torch.stack([(m - m.min()) / (m.max() - m.min()), torch.zeros(16, 16)])
    assert torch.equal(signed[1], torch.zeros(16, 16))
    out = get_explainer("inputxgradient", model).explain(x, t)
    torch.testing.assert_close(out.maps, expected, rtol=1e-5, atol=1e-6)
    assert out.degenerate.tolist() == [False, True]
    torch.testing.assert_close(explain(model, x, t, method="inputxgradient"), expected, rtol=1e-5, atol=1e-6)


GRID_2X2 = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])  # 2x2 grid on 4x4 px


def _exact_shapley(model, x, target, features=GRID_2X2):
    """Shapley values of the features of one image (1, C, H, W), by enumerating every coalition;
    a feature left out is set to the baseline 0."""
    n = int(features.max()) + 1

    def value(coalition):
        with torch.no_grad():
            return model(x * torch.isin(features, torch.tensor(coalition, dtype=torch.long)))[0, target].double()

    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for k in range(n):
            for s in itertools.combinations(others, k):
                weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                phi[i] += weight * (value(list(s) + [i]) - value(list(s)))
    return phi


@pytest.mark.parametrize("method,atol", [
    ("kernelshap", 1e-4),
    # captum's LIME fits a Lasso (alpha 0.01): each coefficient shrinks by ~alpha / Var(z) = 0.04
    ("lime", 0.25),
])
def test_superpixel_methods_against_exact_shapley_values(method, atol):
    """A model linear in the pixels is additive in the features: its Shapley values are exact
    by enumeration (16 coalitions of a 2x2 grid) and any linear surrogate fit recovers them."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 6)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    x = images(2, 4)
    opts = dict(superpixels="grid", grid_cells=2, n_samples=100, raw=True, reduce="sum", seed=1)
    maps = {}
    for t in ([3, 5], [0, 1]):
        maps[tuple(t)] = ours = explain(model, x, t, method=method, **opts)
        # every colour channel gets its feature's value: the channel sum is 3 phi
        ref = torch.stack([3 * _exact_shapley(model, x[b:b + 1], t[b])[GRID_2X2] for b in range(2)])
        assert ref.abs().max() > 10
        torch.testing.assert_close(ours.double(), ref, rtol=0, atol=atol)
    assert (maps[(3, 5)] - maps[(0, 1)]).abs().amax((1, 2)).min() > 1  # each image's map follows its target


# an arbitrary game over the 4 cells of GRID_2X2 (index 8 z0 + 4 z1 + 2 z2 + z3, z_k = cell k kept):
# far from additive, so its Shapley values, plain occlusion and a uniformly weighted fit all differ
GAME = torch.tensor([0., 1., 1., -2., 0., -2., -2., 2., -2., 1., 2., 0., 2., -1., -2., -1.])


class CellGame(nn.Module):
    """Logit 0 = GAME of which 2x2 cells of a 4x4 image have a mean above 0.075 (the test images
    are >= 0.1, the baselines <= 0.05); logit 1 = -logit 0."""

    def forward(self, x):
        kept = (F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1) > 0.075).long()
        v = GAME[kept @ torch.tensor([8, 4, 2, 1])]
        return torch.stack([v, -v], 1)


def test_kernelshap_on_a_non_additive_game_is_the_shapley_value():
    """captum's KernelShap samples coalitions from the Shapley kernel (not exact for a finite
    n_samples): with 3000 samples the error is ~0.1, while the fit under uniform coalition
    weights (a wrong kernel) is >= 0.6 off and plain occlusion 2.25 off."""
    model = CellGame().eval()
    x = images(1, 4, seed=1) + 0.1                              # every cell non-zero: kept != removed
    phi = _exact_shapley(model, x, 0)
    torch.testing.assert_close(phi, torch.tensor([-0.75, -7 / 12, 1 / 12, 0.25], dtype=torch.float64))
    with torch.no_grad():
        occlusion = torch.stack([model(x)[0, 0] - model(x * (GRID_2X2 != k))[0, 0] for k in range(4)])
    assert (occlusion.double() - phi).abs().max() > 2
    ours = explain(model, x, 0, method="kernelshap", superpixels="grid", grid_cells=2, n_samples=3000,
                   perturbations_per_eval=1000, raw=True, reduce="sum", seed=0)[0]
    cells = ours.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)  # (cell, pixel in cell)
    assert torch.equal(cells, cells[:, :1].expand(4, 4))      # constant on each cell
    torch.testing.assert_close(cells[:, 0].double(), 3 * phi, rtol=0, atol=3 * 0.25)  # 3 colour channels
    # efficiency (summation to f(x) - f(baseline)) is enforced by the kernel's infinite weights
    assert abs(cells[:, 0].sum().item() / 3 - (-1.0)) < 1e-3


def test_lime_equals_an_independent_weighted_lasso_on_the_same_samples():
    """captum's LIME with our options, rebuilt by hand: from torch.manual_seed(seed), n_samples
    draws of Bernoulli(0.5) cell masks, removed cells set to the baseline, weights
    exp(-(1 - cos(x, x'))^2 / 2) (cosine kernel, width 1), and an sklearn Lasso(alpha=0.01) fit with
    an intercept. Every image of a batch is fitted from its own stream seeded with ``seed`` (a batch
    equals its images one at a time: tests/test_attributions_api.py)."""
    from sklearn.linear_model import Lasso

    model = CellGame().eval()
    n, seed, base = 60, 3, 0.05
    for img_seed, target in ((1, 0), (2, 1)):
        x = images(1, 4, seed=img_seed)[0] + 0.1
        ours = explain(model, x[None], target, method="lime", superpixels="grid", grid_cells=2, n_samples=n,
                       baseline=base, raw=True, reduce="sum", seed=seed)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            z = torch.cat([torch.bernoulli(torch.full((1, 4), 0.5)) for _ in range(n)])
        keep = z[:, GRID_2X2][:, None]                            # (n, 1, 4, 4)
        pert = x * keep + base * (1 - keep)
        with torch.no_grad():
            y = model(pert)[:, target]
        w = torch.exp(-(1 - F.cosine_similarity(pert.flatten(1), x.flatten()[None], dim=1)) ** 2 / 2)
        coef = torch.as_tensor(Lasso(alpha=0.01).fit(z.numpy(), y.numpy(), sample_weight=w.numpy()).coef_)
        assert coef.abs().max() > 0.1
        torch.testing.assert_close(ours.double(), 3 * coef[GRID_2X2].double(), rtol=1e-4, atol=1e-5)

@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_superpixel_methods_are_seeded_and_piecewise_constant(resnet, method, monkeypatch):
    x = images(2, 32)
    opts = dict(superpixels="grid", grid_cells=4, n_samples=40, perturbations_per_eval=20, raw=True, reduce="sum")
    state = torch.get_rng_state()
    cuda_seeds = []  # torch.manual_seed would also (lazily) reseed every CUDA device, for good
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    a = explain(resnet, x, [1, 2], method=method, seed=7, **opts)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert cuda_seeds == []
    b = explain(resnet, x, [1, 2], method=method, seed=7, **opts)
    c = explain(resnet, x, [1, 2], method=method, seed=8, **opts)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 0
    cells = a.view(2, 4, 8, 4, 8)  # 4x4 grid of 8x8 cells: constant inside each cell
    assert torch.allclose(cells, cells[:, :, :1, :, :1].expand_as(cells))
    assert a.abs().amax((1, 2)).min() > 0


def test_slic_superpixels_follow_the_image():
    from validation.attributions.captum_methods import slic_segments

    x = torch.zeros(1, 3, 32, 32)
    x[:, 0, :, 16:] = 1.0  # left black, right red
    seg = slic_segments(x, n_segments=8)[0, 0]
    left, right = set(seg[:, :15].unique().tolist()), set(seg[:, 17:].unique().tolist())
    assert left.isdisjoint(right)
    assert seg.min() == 0 and seg.max() == len(seg.unique()) - 1


def test_relax_refuses_an_embedding_layer_that_runs_twice_or_returns_no_tensor():
    """A module called twice used to give its last output silently; one returning a tuple crashed
    with an AttributeError naming no layer."""

    class TwiceAndTuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.shared = nn.Linear(4, 4)
            self.pair = _Pair()
            self.head = nn.Linear(4, 6)

        def forward(self, x):
            z = self.shared(self.shared(self.features(x)))
            return self.head(self.pair(z)[0])

    class _Pair(nn.Module):
        def forward(self, z):
            return z, z

    model = TwiceAndTuple().eval()
    x = images(1, 12)
    with pytest.raises(ValueError, match="embedding layer ran 2 times in one forward pass"):
        get_explainer("relax", model, n_masks=4, embedding_layer="shared").explain(x)
    with pytest.raises(TypeError, match="embedding_layer 'pair' returns tuple, not a tensor"):
        get_explainer("relax", model, n_masks=4, embedding_layer="pair").explain(x)
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are gone after the errors
