"""The API contract: registry, output format and post-processing, model-state restoration
(also when a method raises), bad input, baselines, batching."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_common import TinyNet, build, images
from validation.attributions import (
    Explanation, available_methods, explain, finalize, get_explainer, minmax,
)

ALL = ["gradcam", "gradcampp", "layercam", "scorecam", "shapleycam", "guidedgradcam", "guidedbackprop", "lafam",
       "relax", "lime", "kernelshap", "deeplift", "inputxgradient", "integratedgradients", "randomcam", "halfcam",
       "all1scam", "oracle", "centre", "refinecam"]
FAST = {"scorecam": {"batch_size": 128}, "relax": {"n_masks": 16},
        "lime": {"n_samples": 12, "superpixels": "grid"}, "kernelshap": {"n_samples": 12, "superpixels": "grid"},
        "integratedgradients": {"n_steps": 4},
        # stage4 of ResNet18 is 1x1 at 32 px: a constant map that would zero every product
        "refinecam": {"base": "gradcam", "layers": ("stage1", "stage2", "stage3")}}


@pytest.fixture(scope="module")
def resnet():
    return build("resnet18", wrapped=True)


def test_registry_lists_every_method():
    assert sorted(ALL) == available_methods()  # a newly registered method cannot skip the contract tests
    assert type(get_explainer("gradcam++", build("resnet18"))).__name__ == "GradCAMPlusPlus"
    assert type(get_explainer("Grad-CAM", build("resnet18"))).__name__ == "GradCAM"


@pytest.mark.parametrize("method", ALL)
def test_every_method_returns_unit_maps_on_the_input_device(resnet, method):
    x = images(2, 32)
    extra = {"gt": torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))} if method == "oracle" else {}
    ex = get_explainer(method, resnet, **FAST.get(method, {}))
    out = ex.explain(x, torch.tensor([1, 2]), **extra)
    assert isinstance(out, Explanation)
    maps = out.maps
    assert maps.shape == (2, 32, 32) and maps.dtype == torch.float32 and maps.device == x.device
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert out.degenerate.shape == (2,) and out.degenerate.dtype == torch.bool
    # real maps, not the zeros of a degenerate case (which would pass every check above)
    assert not out.degenerate.any()
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1)).all()
    torch.testing.assert_close(ex.attribute(x, [1, 2], **extra), maps)  # deterministic, seeded
    torch.testing.assert_close(ex(x, [1, 2], **extra), maps)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "scorecam", "guidedgradcam", "lafam",
                                    "deeplift", "inputxgradient", "lime", "kernelshap"])
def test_a_batch_equals_its_images_one_at_a_time(resnet, method):
    x = images(3, 32, seed=4)
    t = torch.tensor([5, 0, 2])
    batch = explain(resnet, x, t, method=method, layer="stage2", **FAST.get(method, {}))
    for i in range(3):
        one = explain(resnet, x[i:i + 1], t[i:i + 1], method=method, layer="stage2", **FAST.get(method, {}))
        torch.testing.assert_close(batch[i:i + 1], one, rtol=1e-4, atol=2e-5)


def test_target_none_explains_the_prediction(resnet):
    x = images(3, 32)
    pred = resnet(x).argmax(1)
    torch.testing.assert_close(explain(resnet, x, None), explain(resnet, x, pred))
    assert torch.equal(get_explainer("gradcam", resnet).explain(x).target, pred)
    torch.testing.assert_close(explain(resnet, x, 4), explain(resnet, x, [4, 4, 4]))


# ---------------------------------------------------------------------------------------------
# post-processing

def test_postprocess_relu_minmax_and_upsampling():
    raw = torch.tensor([[[-2.0, 1.0], [3.0, 5.0]], [[7.0, 7.0], [7.0, 7.0]], [[-1.0, -1.0], [-2.0, -3.0]]])
    maps, flags = finalize(raw, (4, 4))
    assert flags.tolist() == [False, True, True]  # constant; and all negative -> constant 0 after ReLU
    assert torch.equal(maps[1:], torch.zeros(2, 4, 4))
    relu_up = F.interpolate(raw[:1, None].clamp_min(0), size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps[0], (relu_up - relu_up.min()) / (relu_up.max() - relu_up.min()))
    near, _ = finalize(raw[:1], (4, 4), interpolation="nearest")
    torch.testing.assert_close(near[0], torch.tensor([0.0, 0.2, 0.6, 1.0]).view(2, 2).repeat_interleave(2, 0)
                               .repeat_interleave(2, 1))
    absolute, _ = finalize(raw[:1], None, rectifier="abs")
    torch.testing.assert_close(absolute[0], torch.tensor([[0.25, 0.0], [0.5, 1.0]]))
    signed, _ = finalize(raw[:1], None, rectifier=None)
    torch.testing.assert_close(signed[0], torch.tensor([[0.0, 3 / 7], [5 / 7, 1.0]]))


def test_minmax_never_returns_nan():
    raw = torch.tensor([[[float("nan"), 1.0]], [[float("inf"), 0.0]], [[1e-30, 1e-30]], [[1e-30, 2e-30]]])
    maps, flags = minmax(raw)
    assert torch.isfinite(maps).all()
    assert flags.tolist() == [True, True, True, False]
    torch.testing.assert_close(maps[3], torch.tensor([[0.0, 1.0]]))


def test_constant_map_is_flagged_zero(resnet):
    """A head with zero weights has zero gradients: the CAM is constant, returned as zeros + flag."""
    model = build("resnet18")
    with torch.no_grad():
        model.backbone.fc.weight.zero_()
    out = get_explainer("gradcam", model).explain(images(2, 32), [0, 1])
    assert out.degenerate.all() and torch.equal(out.maps, torch.zeros(2, 32, 32))


def test_raw_maps_on_request(resnet):
    x = images(2, 64)
    raw = explain(resnet, x, [0, 1], method="gradcam", layer="stage3", raw=True)
    acts = []
    h = resnet.backbone.layer3.register_forward_hook(lambda m, a, o: acts.append(o))
    out = resnet(x)
    h.remove()
    (g,) = torch.autograd.grad(out[0, 0] + out[1, 1], acts[0])
    hand = (g.mean((2, 3), keepdim=True) * acts[0]).sum(1).detach()
    assert raw.shape == (2, 4, 4)  # no ReLU, no upsampling, no min-max
    torch.testing.assert_close(raw, hand, rtol=1e-5, atol=1e-6 * hand.abs().max().item())
    maps = explain(resnet, x, [0, 1], method="gradcam", layer="stage3")
    expected, _ = finalize(raw, (64, 64))
    torch.testing.assert_close(maps, expected)


def test_swin_channels_last_stage_gives_a_spatial_map():
    model = build("swin_t", wrapped=True)
    x = images(1, 64)
    raw = explain(model, x, [2], method="gradcam", layer="stage2", raw=True)
    assert raw.shape == (1, 8, 8)  # features.3 emits (B, 8, 8, 192): permuted to (B, 192, 8, 8)
    acts = []
    h = model.backbone.features[3].register_forward_hook(lambda m, a, o: acts.append(o))
    xi = x.clone()
    out = model(xi)
    h.remove()
    (g,) = torch.autograd.grad(out[0, 2], acts[0])
    A, G = acts[0].permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    expected = (G.mean((2, 3), keepdim=True) * A).sum(1)
    torch.testing.assert_close(raw, expected.detach(), rtol=1e-4, atol=1e-6)


def _hand_gradcam(model, module, x, target, channels_last):
    acts = []
    h = module.register_forward_hook(lambda m, a, o: acts.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[0, target], acts[0])
    A, G = (t.permute(0, 3, 1, 2) if channels_last else t for t in (acts[0], g))
    return (G.mean((2, 3), keepdim=True) * A).sum(1).detach()


def test_swin_layouts_follow_the_permutes():
    """Swin-T is NCHW up to the patch-embedding conv, NHWC from its Permute to the final norm."""
    model = build("swin_t", wrapped=True)
    x = images(1, 64)
    net = model.backbone
    for layer, module, channels_last, shape in [("backbone.features.0.0", net.features[0][0], False, (1, 16, 16)),
                                                ("backbone.features.0", net.features[0], True, (1, 16, 16)),
                                                ("backbone.norm", net.norm, True, (1, 2, 2))]:
        raw = explain(model, x, [2], method="gradcam", layer=layer, raw=True)
        assert raw.shape == shape, layer
        expected = _hand_gradcam(model, module, x, 2, channels_last)
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    # a layout flag that contradicts the output's shape is refused, naming the fix
    with pytest.raises(ValueError, match=r"\(1, 96, 16, 16\) read as \(B, h, w, C\).*channels_last=False"):
        explain(model, x, [2], method="gradcam", layer="backbone.features.0.0", channels_last=True)
    with pytest.raises(ValueError, match=r"\(1, 2, 2, 768\) read as \(B, C, h, w\).*channels_last=True"):
        explain(model, x, [2], method="lafam", layer="backbone.norm", channels_last=False)


# ---------------------------------------------------------------------------------------------
# model state

# every per-module hook dict torch keeps (forward, pre-forward, backward, backward-pre, with-kwargs
# and always-called flags, state-dict hooks): a hook left behind in any of them is state
_HOOK_DICTS = sorted(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))


def _state(model):
    return ([(n, m.training, type(m), id(m), len(m._forward_hooks), len(m._forward_pre_hooks),
              len(m._backward_hooks)) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, tuple(len(getattr(m, k)) for k in _HOOK_DICTS)) for n, m in model.named_modules()],
            # weights and BatchNorm statistics (a pass in train mode would update the latter)
            [(k, v.double().sum().item(), v.double().square().sum().item()) for k, v in model.state_dict().items()],
            # torch's global flags and random state
            torch.is_grad_enabled(), torch.get_rng_state().tolist())


def _dirty(model):
    model.train()
    model.backbone.layer2.eval()
    model.backbone.conv1.weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["gradcam", "shapleycam", "scorecam", "guidedgradcam", "guidedbackprop",
                                    "lafam", "relax", "deeplift", "integratedgradients", "lime", "refinecam"])
def test_model_leaves_as_it_came(method):
    model = _dirty(build("resnet18"))
    before = _state(model)
    explain(model, images(2, 32), [1, 2], method=method, **FAST.get(method, {}))
    assert _state(model) == before


class Exploding(nn.Module):
    """Raises on the n-th forward pass (to interrupt a method half-way)."""

    def __init__(self, inner, fail_at):
        super().__init__()
        self.backbone = inner.backbone
        self.inner = inner
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("method,fail_at", [("gradcam", 1), ("guidedgradcam", 2), ("deeplift", 2),
                                            ("deeplift", 3), ("scorecam", 2), ("relax", 2),
                                            # every other method that runs the model, on its last pass
                                            ("gradcampp", 1), ("layercam", 1), ("shapleycam", 1),
                                            ("guidedbackprop", 1), ("lafam", 1), ("inputxgradient", 2),
                                            ("integratedgradients", 2), ("lime", 2), ("kernelshap", 3),
                                            ("refinecam", 1), ("guidedgradcam", 1), ("scorecam", 1)])
def test_model_state_restored_when_a_method_raises(method, fail_at):
    model = Exploding(_dirty(build("resnet18")), fail_at)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, images(2, 32), [1, 2], method=method, **FAST.get(method, {}))
    assert _state(model) == before


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_targets(resnet):
    x = images(2, 32)
    with pytest.raises(ValueError, match=r"one entry per image: expected shape \(2,\)"):
        explain(resnet, x, [1, 2, 3])
    with pytest.raises(ValueError, match=r"target out of range: the model has 6 classes, got \[6\]"):
        explain(resnet, x, [1, 6])
    with pytest.raises(ValueError, match="out of range"):
        explain(resnet, x, [-1, 0], method="scorecam")
    with pytest.raises(ValueError, match="out of range"):
        explain(resnet, x, [0, 9], method="deeplift")
    with pytest.raises(TypeError, match="integer class indices"):
        explain(resnet, x, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("method,option,value", [
    ("relax", "p", "a"), ("relax", "n_masks", 0), ("relax", "batch_size", 2.5), ("centre", "sigma", "a"),
    ("lime", "n_samples", 0), ("kernelshap", "perturbations_per_eval", True), ("integratedgradients", "n_steps", 0),
    ("integratedgradients", "internal_batch_size", 0), ("deeplift", "baseline", "black"),
    ("scorecam", "batch_size", True), ("scorecam", "batch_size", 0), ("relax", "seed", "a"), ("lime", "seed", 1.5),
    ("randomcam", "seed", -1),
])
def test_mistyped_option_values_are_refused_by_name(resnet, method, option, value):
    with pytest.raises(ValueError, match=rf"^{option} "):
        get_explainer(method, resnet, **{option: value})


@pytest.mark.parametrize("method,option,value", [
    ("relax", "n_masks", float("inf")), ("scorecam", "batch_size", float("inf")), ("relax", "seed", float("nan")),
    ("integratedgradients", "n_steps", float("-inf")), ("relax", "shift", float("inf")),
    ("lime", "seed", float("inf")), ("integratedgradients", "baseline", float("inf")),
    ("deeplift", "baseline", float("-inf")), ("centre", "sigma", float("inf")), ("relax", "p", float("nan")),
])
def test_non_finite_option_values_are_refused_by_name(resnet, method, option, value):
    """An infinite or NaN option (a config's ``.inf``) used to escape as int()'s own OverflowError
    or ValueError ("cannot convert float infinity to integer", naming no option), or was taken:
    an infinite baseline gave NaN maps returned as zeros, an infinite sigma a constant prior."""
    with pytest.raises(ValueError, match=rf"^{option} must be (an int|a finite real number)"):
        get_explainer(method, resnet, **{option: value})


def test_a_baseline_that_does_not_fit_the_images_is_named(resnet):
    with pytest.raises(ValueError, match=r"baseline of shape \(3, 8, 8\) does not broadcast to the images \(1, 3, 16, 16\)"):
        explain(resnet, images(1, 16), 0, method="integratedgradients", n_steps=2, baseline=torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match=r"base_options must be a dict"):
        get_explainer("refinecam", resnet, base_options=[1])


def test_images_of_another_dtype_than_the_model_are_named(resnet):
    for method in ("gradcam", "deeplift", "lafam"):
        with pytest.raises(ValueError, match=r"images x are torch.float64 but the model's weights are torch.float32"):
            explain(resnet, images(1, 16).double(), 0, method=method)


@pytest.mark.parametrize("method", ["gradcam", "lafam", "scorecam", "shapleycam"])
def test_several_layers_name_images_the_model_cannot_take(resnet, method):
    """explain_layers and layer_maps (several layers in one pass) give the same errors as explain:
    they used to pass on torch's "expected scalar type Double but found Float" and "Output size is
    too small" about a layer's input, naming neither the images nor the fix."""
    ex = get_explainer(method, resnet)
    dtype = r"images x are torch.float64 but the model's weights are torch.float32: pass x.to\(torch.float32\)"
    with pytest.raises(ValueError, match=dtype):
        ex.explain_layers(images(1, 16).double(), 0, ["stage1", "stage2"])
    with pytest.raises(ValueError, match=dtype):
        ex.layer_maps(images(1, 16).double(), 0, ["stage1"])
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4, 6))
    small = get_explainer(method, pooled.eval(), layer="1")
    with pytest.raises(ValueError, match=r"images of 2x3 px are too small for Sequential"):
        small.explain_layers(images(1, 3)[..., :2, :], 0, ["0", "2"])  # LaFAM stops after its deepest layer


@pytest.mark.parametrize("method,option,value", [
    ("relax", "cells", 0), ("relax", "cells", 2.5), ("relax", "p", 0.0), ("relax", "p", 1.0), ("relax", "p", 2.0),
    ("relax", "shift", -1), ("lime", "grid_cells", 0), ("lime", "n_segments", 0), ("kernelshap", "grid_cells", -2),
])
def test_bad_option_values_are_refused_by_name(resnet, method, option, value):
    with pytest.raises(ValueError, match=rf"^{option} "):
        get_explainer(method, resnet, **{option: value})


@pytest.mark.parametrize("method", ["gradcam", "guidedbackprop", "relax", "deeplift", "randomcam", "refinecam"])
def test_per_call_inputs_are_refused_alike_by_every_method_but_the_oracle(resnet, method):
    x = images(1, 16)
    options = {"n_masks": 4} if method == "relax" else {}
    with pytest.raises(TypeError, match=rf"^{method} takes no per-call inputs, got \['gt'\]$"):
        get_explainer(method, resnet, **options).attribute(x, 0, gt=torch.ones(1, 16, 16))
    with pytest.raises(TypeError, match=r"^oracle takes only the per-call input\(s\) \['gt'\], got \['mask'\]$"):
        get_explainer("oracle", resnet).attribute(x, 0, mask=torch.ones(1, 16, 16))


@pytest.mark.parametrize("method", ["gradcam", "guidedbackprop", "guidedgradcam", "shapleycam"])
def test_an_unknown_score_is_refused_when_the_method_is_built(resnet, method):
    with pytest.raises(ValueError, match=r"score must be one of 'logit', 'softmax', 'log_softmax', 'rest', got 'prob'"):
        get_explainer(method, resnet, score="prob")


def test_bad_images_layers_methods_and_options(resnet):
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\), got shape \(3, 32, 32\)"):
        explain(resnet, torch.rand(3, 32, 32), 0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        explain(resnet, [[0.0]], 0)
    with pytest.raises(TypeError, match="floating"):
        explain(resnet, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match=r"unknown layer 'stage7'.*stage1 -> backbone.layer1"):
        explain(resnet, images(1, 32), 0, layer="stage7")
    with pytest.raises(ValueError, match="unknown method 'gradcam3'; available: .*layercam"):
        explain(resnet, images(1, 32), 0, method="gradcam3")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['n_mask'\]"):
        get_explainer("relax", resnet, n_mask=3)
    with pytest.raises(ValueError, match="interpolation"):
        get_explainer("gradcam", resnet, interpolation="cubic")
    with pytest.raises(ValueError, match="mix"):
        get_explainer("refinecam", resnet, mix="sum")
    # the base's options are checked like any method's; RefineCAM's own post-processing ones refused
    with pytest.raises(TypeError, match=r"unknown base_options \['n_mask'\] for scorecam.*batch_size"):
        get_explainer("refinecam", resnet, base="scorecam", base_options={"n_mask": 3})
    with pytest.raises(TypeError, match=r"unknown base_options \['interpolation'\]"):
        get_explainer("refinecam", resnet, base_options={"interpolation": "nearest"})
    assert get_explainer("refinecam", resnet, base="scorecam", base_options={"batch_size": 8}).base.batch_size == 8
    with pytest.raises(ValueError, match="variant"):
        get_explainer("scorecam", resnet, variant="fast")
    with pytest.raises(ValueError, match="not among the listed layers"):
        get_explainer("refinecam", resnet, layers=["stage2", "stage3"], layer="stage1")
    with pytest.raises(ValueError, match="needs a layer method as base"):
        get_explainer("refinecam", resnet, base="lime")
    with pytest.raises(ValueError, match=r"oracle needs the ground truth"):
        explain(resnet, images(1, 32), 0, method="oracle")
    with pytest.raises(ValueError, match=r"gt must have shape \(1, 32, 32\)"):
        explain(resnet, images(1, 32), 0, method="oracle", gt=torch.ones(1, 16, 16))


class Detached(TinyNet):
    def forward(self, x):
        return super().forward(x).detach()


class Skips(TinyNet):
    """``stem`` runs, but only for show: the output does not depend on it."""

    def forward(self, x):
        self.stem(x)
        return self.fc(x.mean((2, 3)).repeat(1, 3)[:, : self.fc.in_features])


def test_models_without_gradient_path():
    x = images(1, 16)
    with pytest.raises(RuntimeError, match="no gradient path"):
        explain(Detached(), x, 0, layer="feat")
    with pytest.raises(RuntimeError, match="no gradient path from layer 'stem'"):
        explain(Skips(), x, 0, layer="stem")
    with pytest.raises(RuntimeError, match="was not called during the forward pass"):
        explain(Skips(), x, 0, layer="head_conv")
    with pytest.raises(RuntimeError, match="no gradient path"):
        explain(Detached(), x, 0, method="guidedbackprop")


def test_a_layer_called_twice_is_refused():
    model = build("resnet18", wrapped=False)
    with pytest.raises(RuntimeError, match="called 2 times"):
        explain(model, images(1, 32), 0, layer="layer1.0.relu")


@pytest.mark.parametrize("layer", ["backbone.layer1.0.bn1", "backbone.layer1.0.bn2"])
def test_a_layer_whose_output_is_later_modified_in_place(resnet, layer):
    """bn1 is followed by an inplace ReLU, bn2 by ResNet's ``out += identity``: the maps use the
    values the layer produced (negative ones included) and the gradient with respect to them,
    not those of the in-place op that follows. Reference: a hook handing the rest of the forward
    pass a copy, Grad-CAM and Score-CAM (official) written out by hand."""
    x = images(2, 32, seed=6)
    t = torch.tensor([1, 2])
    store = []
    h = resnet.get_submodule(layer).register_forward_hook(lambda m, a, o: (store.append(o), o.clone())[1])
    try:
        out = resnet(x)
    finally:
        h.remove()
    A = store[0]
    assert (A < 0).any()  # what the in-place ReLU (or the residual sum) would change
    (g,) = torch.autograd.grad(out[0, 1] + out[1, 2], A)
    A = A.detach()
    hand = (g.mean((2, 3), keepdim=True) * A).sum(1)
    ours = explain(resnet, x, t, method="gradcam", layer=layer, raw=True)
    torch.testing.assert_close(ours, hand, rtol=1e-4, atol=1e-6 * hand.abs().max().item())
    # LaFAM with a deeper layer: its forward pass runs on past the in-place op
    raws, _, _ = get_explainer("lafam", resnet).layer_maps(x, None, [layer, "stage2"])
    torch.testing.assert_close(raws[0], A.mean(1))
    # Score-CAM's masks come from the captured activations
    up = F.interpolate(A, size=(32, 32), mode="bilinear", align_corners=False)
    lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    masks = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(up))
    with torch.no_grad():
        probs = resnet((x[:, None] * masks[:, :, None]).flatten(0, 1)).softmax(1).view(2, A.shape[1], -1)
    w = torch.where((hi > lo)[:, :, 0, 0], probs[torch.arange(2), :, t], torch.zeros(()))
    hand_sc = (w[:, :, None, None] * A).sum(1)
    ours_sc = explain(resnet, x, t, method="scorecam", layer=layer, raw=True, batch_size=128)
    torch.testing.assert_close(ours_sc, hand_sc, rtol=1e-4, atol=1e-5 * hand_sc.abs().max().item())


def test_half_precision_models_are_explained_in_float32():
    """A bfloat16 model: the maps are computed from its activations and gradients in float32
    (in bfloat16 the weighted sum and the min-max keep 8 bits), and the masking methods hand the
    model images of its own dtype. Reference: A and g recorded during the call, the rest in
    float64 by hand."""
    model = TinyNet(nonlinear_head=False).eval().to(torch.bfloat16)
    x = images(2, 16).to(torch.bfloat16)
    t = torch.tensor([1, 4])
    rec = {}

    def hook(m, a, o):
        rec["A"] = o.detach().double()
        o.register_hook(lambda g: rec.__setitem__("g", g.double()))

    def final(cam):
        up = F.interpolate(cam.clamp_min(0)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
        return (up - lo) / (hi - lo)

    for method, cam in [("gradcam", lambda A, g: (g.mean((2, 3), keepdim=True) * A).sum(1)),
                        ("layercam", lambda A, g: (g.clamp_min(0) * A).sum(1))]:
        h = model.head_conv.register_forward_hook(hook)  # 8x8, signed: upsampled, rectified
        try:
            ours = explain(model, x, t, method=method, layer="head_conv")
        finally:
            h.remove()
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), final(cam(rec["A"], rec["g"])), rtol=0, atol=1e-5)
    reference = TinyNet(nonlinear_head=False).eval()  # the same weights in float32
    for method, opts in [("scorecam", {"layer": "head_conv"}), ("relax", {"n_masks": 64})]:
        seen = []  # the dtype of every batch the model is handed, masked images included
        h = model.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        try:
            half = explain(model, x, t, method=method, **opts)
        finally:
            h.remove()
        assert len(seen) >= 2 and set(seen) == {torch.bfloat16}  # the plain pass, then the masked ones
        full = explain(reference, x.float(), t, method=method, **opts)
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert torch.corrcoef(torch.stack([half.flatten(), full.flatten()]))[0, 1] > 0.9


def test_several_layers_must_be_a_sequence(resnet):
    """``explain_layers(x, t, "stage1")`` would read the string as the layers 's', 't', ..."""
    ex = get_explainer("gradcam", resnet)
    for bad in ("stage1", [], resnet.backbone.layer1):
        with pytest.raises(ValueError, match=r"^layers must be a non-empty sequence of layer specs"):
            ex.explain_layers(images(1, 32), 0, bad)
    (one,) = ex.explain_layers(images(1, 32), 0, ("stage1",))
    torch.testing.assert_close(one.maps, ex.attribute(images(1, 32), 0))
    # a ModuleList is a sequence of layers, as before
    listed = ex.explain_layers(images(1, 32), 0, torch.nn.ModuleList([resnet.backbone.layer1, resnet.backbone.layer4]))
    named = ex.explain_layers(images(1, 32), 0, ("stage1", "stage4"))
    for got, want in zip(listed, named, strict=True):
        torch.testing.assert_close(got.maps, want.maps)


# ---------------------------------------------------------------------------------------------
# baselines

def test_trivial_maps_as_the_paper_defines_them(resnet):
    x = images(3, 16)
    half = explain(resnet, x, 0, method="halfcam")
    ones = explain(resnet, x, 0, method="all1scam")
    rand = explain(resnet, x, 0, method="randomcam", seed=1)
    for h in half:
        assert (h == 0).sum() == 1 and (h == 1).sum() == 1 and (h == 0.5).sum() == 16 * 16 - 2
    for o in ones:
        assert (o == 0).sum() == 1 and (o == 1).sum() == 16 * 16 - 1
    assert not torch.equal(half[0], half[1])  # special pixels drawn per image
    assert rand.min() >= 0 and rand.max() <= 1 and abs(rand.mean().item() - 0.5) < 0.05
    torch.testing.assert_close(rand, explain(resnet, x, 0, method="randomcam", seed=1))
    assert not torch.equal(rand, explain(resnet, x, 0, method="randomcam", seed=2))


@pytest.mark.parametrize("method", ["randomcam", "halfcam", "all1scam", "relax"])
def test_random_maps_of_a_batch_equal_its_images_one_at_a_time(resnet, method):
    """The pipeline retries a failed batch image by image, and which images form a batch depends
    on which ones the model classifies correctly: an image's random map must not depend on them."""
    x = images(3, 16, seed=2)
    options = {"n_masks": 16} if method == "relax" else {}
    # RELAX runs the model: batched forwards round differently from single ones
    tol = dict(rtol=1e-4, atol=2e-5) if method == "relax" else dict(rtol=0, atol=0)
    batch = explain(resnet, x, 0, method=method, seed=3, **options)
    for i in range(3):
        torch.testing.assert_close(explain(resnet, x[i:i + 1], 0, method=method, seed=3, **options), batch[i:i + 1],
                                   **tol)
    torch.testing.assert_close(explain(resnet, x.flip(0), 0, method=method, seed=3, **options), batch.flip(0), **tol)
    if method != "relax":
        assert not torch.equal(batch[0], batch[1])  # a map per image, not one for the batch
        # the documented seeding: a CPU generator per image from sha256(b"<seed>:" + its float32 bytes)
        digest = hashlib.sha256(b"3:" + x[1].float().contiguous().numpy().tobytes()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if method == "randomcam":
            torch.testing.assert_close(batch[1], torch.rand(16, 16, generator=g), rtol=0, atol=0)
        else:
            special = torch.randperm(256, generator=g)[:2 if method == "halfcam" else 1]
            expected = torch.full((256,), 0.5 if method == "halfcam" else 1.0)
            expected[special] = torch.tensor([0.0, 1.0] if method == "halfcam" else [0.0])
            torch.testing.assert_close(batch[1].flatten(), expected, rtol=0, atol=0)


def test_oracle_and_centre_prior(resnet):
    x = images(2, 15)
    gt = torch.zeros(2, 1, 15, 15)
    gt[0, 0, 3:6, 4:9] = 1.0
    gt[1, 0, 7, 7] = 0.5
    torch.testing.assert_close(explain(resnet, x, 0, method="oracle", gt=gt), gt[:, 0])
    centre = explain(resnet, x, 0, method="centre", sigma=0.2)
    assert centre[0, 7, 7] == 1.0 and torch.equal(centre[0], centre[0].flip(0)) and torch.equal(centre[0], centre[0].T)
    yy, xx = torch.meshgrid(torch.arange(15.0) - 7, torch.arange(15.0) - 7, indexing="ij")
    g = torch.exp(-(yy ** 2 + xx ** 2) / (2 * 3.0 ** 2))
    torch.testing.assert_close(centre[1], (g - g.min()) / (g.max() - g.min()))


def test_oracle_clips_the_ground_truth_to_the_unit_interval(resnet):
    """A soft or mis-scaled gt (e.g. -0.5 or 1.7, a 0..255 mask) becomes a map in [0, 1]: values
    outside are clipped, not min-maxed, so values inside stay as they are."""
    x = images(1, 4)
    gt = torch.tensor([[-0.5, 0.0, 0.3, 1.7], [255.0, 1.0, 0.5, -3.0],
                       [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[0.0, 0.0, 0.3, 1.0], [1.0, 1.0, 0.5, 0.0],
                             [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    for g in (gt[None], gt[None, None]):
        torch.testing.assert_close(explain(resnet, x, 0, method="oracle", gt=g), expected[None], rtol=0, atol=0)
        raw = get_explainer("oracle", resnet, raw=True).explain(x, 0, gt=g).maps
        torch.testing.assert_close(raw, expected[None], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_oracle_refuses_a_non_finite_ground_truth_naming_the_sample(resnet, bad):
    gt = torch.zeros(3, 4, 4)
    gt[2, 1, 1] = bad  # clamp would have passed NaN on as a map
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\] holds NaN or Inf"):
        explain(resnet, images(3, 4), 0, method="oracle", gt=gt)

@pytest.mark.parametrize("size", [1, 2])
def test_centre_prior_of_a_constant_gaussian_is_flagged_not_nan(resnet, size):
    """On a 1x1 or 2x2 image every pixel is equally central: 0/0 in a naive min-max."""
    out = get_explainer("centre", resnet).explain(images(2, size), 0)
    assert torch.equal(out.maps, torch.zeros(2, size, size)) and out.degenerate.all()
