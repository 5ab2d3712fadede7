"""A user explaining their own models: layers whose grid is not shaped like the image, calls made
from inside torch.inference_mode(), a single-output classifier under Score-CAM, RefineCAM's layers
given as a ModuleList or a generator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_attributions_common import NUM_CLASSES, TinyNet, images
from validation.attributions import explain, finalize, get_explainer


class StripNet(nn.Module):
    """A text-line CNN: pools the height only, so a 16 x 64 image gives an 8 x 64 grid at ``pool``
    (aspect 1:8, the image's 1:4). Optionally resizes its input to 32 x 32 first (``resize``),
    as a model with a fixed input size does."""

    def __init__(self, resize: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.resize = resize
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d((2, 1))
        self.fc = nn.Linear(8, NUM_CLASSES)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        if self.resize:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.fc(self.pool(self.conv(x).relu()).mean((2, 3)))


def _hand_gradcam(model, x, target):
    acts = []
    h = model.pool.register_forward_hook(lambda m, a, o: acts.append(o))
    try:
        out = model(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), acts[0])
    return (g.mean((2, 3), keepdim=True) * acts[0]).sum(1).detach(), acts[0].detach()


@pytest.mark.parametrize("resize", [False, True])
@pytest.mark.parametrize("channels_last", [None, False])
def test_a_grid_not_shaped_like_the_image_is_read_as_its_layout_says(resize, channels_last):
    """An NCHW grid whose aspect is not the image's (strides differ between the axes, or the model
    resizes its input) used to be refused with "pass channels_last=True", and passing that was
    refused with "pass channels_last=False": no layer method could explain such a model."""
    model = StripNet(resize).eval()
    x = images(2, 64)[:, :, :16]  # 16 x 64
    target = torch.tensor([1, 4])
    hand, acts = _hand_gradcam(model, x, target)
    assert hand.shape == ((2, 16, 32) if resize else (2, 8, 64))
    raw = explain(model, x, target, method="gradcam", layer="pool", channels_last=channels_last, raw=True)
    torch.testing.assert_close(raw, hand, rtol=1e-4, atol=1e-6 * hand.abs().max().item())
    maps = explain(model, x, target, method="gradcam", layer="pool", channels_last=channels_last)
    torch.testing.assert_close(maps, finalize(hand, (16, 64))[0], rtol=1e-4, atol=1e-5)
    lafam = get_explainer("lafam", model, layer="pool", channels_last=channels_last, raw=True).attribute(x)
    torch.testing.assert_close(lafam, acts.mean(1))


def test_a_layout_flag_contradicted_by_the_grid_is_still_refused():
    # the fix above must keep the check it relaxed: a (1, 8, 64, 8) output read as NCHW is a 64 x 8
    # grid for an 8 x 64 image, read as NHWC it has the image's shape, so the flag is wrong
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.tokens = nn.Identity()
            self.fc = nn.Linear(8, NUM_CLASSES)

        def forward(self, x):
            t = self.tokens(self.conv(x).permute(0, 2, 3, 1))  # functional permute: not detected
            return self.fc(t.mean((1, 2)))

    model = Tokens().eval()
    x = images(1, 64)[:, :, :8]  # 8 x 64
    with pytest.raises(ValueError, match=r"\(1, 8, 64, 8\) read as \(B, C, h, w\).*channels_last=True"):
        explain(model, x, [0], method="gradcam", layer="tokens")
    raw = explain(model, x, [0], method="gradcam", layer="tokens", channels_last=True, raw=True)
    assert raw.shape == (1, 8, 64)


GRADIENT_METHODS = {
    "gradcam": {"layer": "feat"}, "shapleycam": {"layer": "feat"}, "guidedgradcam": {"layer": "feat"},
    "guidedbackprop": {}, "deeplift": {}, "inputxgradient": {}, "integratedgradients": {"n_steps": 2},
    "refinecam": {"base": "gradcam", "layers": ("feat", "head_conv")},
}


@pytest.mark.parametrize("method", sorted(GRADIENT_METHODS))
def test_gradient_methods_under_inference_mode_name_it(method):
    """torch.inference_mode() (Lightning's validate/test/predict loops run in it) cannot be lifted
    by torch.enable_grad: gradient methods used to fail there with "forward under torch.no_grad,
    or detached outputs?" (wrong: no_grad is fine) or with captum's internal errors."""
    model = TinyNet().eval()
    x = images(2, 16)
    ex = get_explainer(method, model, **GRADIENT_METHODS[method])
    expected = ex.attribute(x, [1, 2])
    with torch.no_grad():  # lifted by the methods
        torch.testing.assert_close(ex.attribute(x, [1, 2]), expected)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"{method} needs gradients.*inference_mode"):
        ex.attribute(x, [1, 2])


def test_explain_layers_under_inference_mode_names_it():
    ex = get_explainer("gradcampp", TinyNet().eval(), layer="feat")
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"gradcampp needs gradients.*inference_mode"):
        ex.explain_layers(images(1, 16), [0], ["feat", "head_conv"])


@pytest.mark.parametrize("method, options", [
    ("lafam", {"layer": "feat"}), ("scorecam", {"layer": "feat"}), ("relax", {"n_masks": 8}),
    ("lime", {"n_samples": 8, "superpixels": "grid", "grid_cells": 2}),
    ("refinecam", {"base": "lafam", "layers": ("feat", "head_conv")}),
])
def test_forward_only_methods_still_run_under_inference_mode(method, options):
    model = TinyNet().eval()
    x = images(2, 16)
    ex = get_explainer(method, model, **options)
    expected = ex.attribute(x, [1, 2])
    with torch.inference_mode():
        torch.testing.assert_close(ex.attribute(x, [1, 2]), expected)


def test_official_scorecam_refuses_a_single_output_model():
    """A binary classifier with one logit: the softmax probability of its only class is 1 for every
    masked image, so official Score-CAM used to return sum_k A_k whatever the model answered."""

    class OneLogit(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(self.fc.in_features, 1)

    model = OneLogit().eval()
    x = images(2, 16)
    with pytest.raises(ValueError, match=r"variant='official'.*one output.*\(2, 1\).*variant='pytorch-grad-cam'"):
        get_explainer("scorecam", model, layer="feat").attribute(x, 0)
    # the peer's variant weighs channels by a softmax over channels of the logit: still meaningful
    out = get_explainer("scorecam", model, layer="feat", variant="pytorch-grad-cam").explain(x, 0)
    assert not out.degenerate.any()


def test_refinecam_takes_its_layers_as_explain_layers_does():
    """RefineCAM refused an nn.ModuleList of layers (explain_layers takes one) and failed on a
    generator with "object of type 'generator' has no len()"."""
    model = TinyNet().eval()
    x = images(2, 16)
    named = get_explainer("refinecam", model, base="gradcam", layers=("feat", "head_conv")).attribute(x, [1, 2])
    for layers in (nn.ModuleList([model.feat, model.head_conv]), (name for name in ("feat", "head_conv"))):
        got = get_explainer("refinecam", model, base="gradcam", layers=layers).attribute(x, [1, 2])
        torch.testing.assert_close(got, named)
    for bad in ("feat", model.feat, (), 3):
        with pytest.raises(ValueError, match=r"^layers must be a non-empty sequence of layer specs"):
            get_explainer("refinecam", model, base="gradcam", layers=bad)


def test_attribute_takes_its_images_by_captums_keyword_name():
    """captum's verb is ``attribute(inputs, target=...)``: a user who names the argument as in
    captum used to get "missing 1 required positional argument: 'x'"."""
    model = TinyNet().eval()
    x = images(2, 16)
    ex = get_explainer("gradcam", model, layer="feat")
    torch.testing.assert_close(ex.attribute(inputs=x, target=[1, 2]), ex.attribute(x, [1, 2]))
    masks = torch.zeros(2, 16, 16)
    masks[:, 4:9, 5:11] = 1
    oracle = get_explainer("oracle", model)
    torch.testing.assert_close(oracle.attribute(inputs=x, target=[1, 2], gt=masks), oracle.attribute(x, [1, 2], gt=masks))


@pytest.mark.parametrize("method, options", [("guidedbackprop", {}), ("guidedgradcam", {"layer": "1"})])
def test_guided_methods_warn_on_a_model_without_relu_modules(method, options):
    """A GELU model (ConvNeXt, Swin) has nothing to guide: the map is the plain gradient's, which
    used to pass without a word (only extras["guided_relus"] == 0 told)."""
    torch.manual_seed(0)
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()
    x = images(2, 16)
    with pytest.warns(RuntimeWarning, match=r"Sequential has no nn\.ReLU module to guide"):
        get_explainer(method, gelu, **options).attribute(x, [0, 1])
    if method == "guidedbackprop":  # what the warning says: the plain input gradient
        x_in = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gelu(x_in).gather(1, torch.tensor([[0], [1]])).sum(), x_in)
        with pytest.warns(RuntimeWarning):
            raw = get_explainer(method, gelu, raw=True).attribute(x, [0, 1])
        torch.testing.assert_close(raw, grad.sum(1).abs())
