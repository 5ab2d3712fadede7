"""``cell_centres="model"``: each cell of a stage's grid is upsampled to the pixel the model centres
it on (torchvision's ResNet: S i; VGG, ConvNeXt-T, Swin-T: S i + (S - 1) / 2, the stretch-to-fit
convention, so unchanged), on every path that upsamples a layer's map; the default stays the
convention, bitwise.

Independent references: the receptive-field centre measured from the model's gradients
(``tests/test_reference_alignment.py``'s probes), and float64 interpolation matrices built here
from that geometry, applied to each method's raw map (``raw=True``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from test_attributions_common import build
from test_reference_alignment import MaskOracle, _field_centre, _l_shape, _mass_centre, _receptive_field
from trainers.models import build_model
from validation.attributions import explain, get_explainer, resolve_layer
from validation.attributions.layers import CellGeometry, resolve_layer_full
from validation.attributions.postprocess import _upsample_cells, minmax, upsample
from validation.attributions.registry import METHODS, unknown_options
from validation.metrics.ground_truth import gt_cosine

RESNET_STRIDES = {"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32}


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _interpolation_matrix(out: int, cells: int, stride: int, first_centre: float) -> torch.Tensor:
    """(out, cells) float64 linear interpolation whose cell i sits at pixel stride i + first_centre,
    the border cells' values continued outwards."""
    m = torch.zeros(out, cells, dtype=torch.float64)
    for y in range(out):
        s = min(max((y - first_centre) / stride, 0.0), cells - 1.0)
        lower = int(s)
        upper = min(lower + 1, cells - 1)
        m[y, lower] += 1 - (s - lower)
        m[y, upper] += s - lower
    return m


def _expected(raw: torch.Tensor, size: int, stride: int, first_centre: float, relu: bool = True) -> torch.Tensor:
    """min-max(R ReLU(raw) C^T) in float64 for raw maps (B, h, w) (rectified before upsampling, as
    the CAMs are)."""
    raw = raw.double().clamp_min(0) if relu else raw.double()
    rows = _interpolation_matrix(size, raw.shape[1], stride, first_centre)
    cols = _interpolation_matrix(size, raw.shape[2], stride, first_centre)
    return minmax(rows @ raw @ cols.T)[0]


# ---------------------------------------------------------------------------------------------
# (1) the default is the convention, bitwise

@pytest.mark.parametrize("interpolation,mode", [("bilinear", "bilinear"), ("nearest", "nearest-exact")])
def test_default_upsampling_is_unchanged_bitwise(interpolation, mode):
    model = build("resnet18")
    x = _images(2, 64)
    raw = explain(model, x, 0, method="gradcam", layer="stage2", raw=True)
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    expected = minmax(F.interpolate(raw.clamp_min(0)[:, None], size=(64, 64), mode=mode, **kwargs)[:, 0])[0]
    for options in ({}, {"cell_centres": "stride"}):
        ours = explain(model, x, 0, method="gradcam", layer="stage2", interpolation=interpolation, **options)
        assert torch.equal(ours, expected)


def test_convention_geometry_gives_the_default_upsampling():
    # the shifted sampling with the convention's own geometry is F.interpolate's (float rounding
    # only); ``upsample`` then uses torch's kernel, bitwise the default
    g = torch.Generator().manual_seed(3)
    for h, stride in ((8, 4), (4, 8), (2, 32), (5, 16)):
        maps = torch.randn(3, h, h + 1, generator=g)
        size = (h * stride, (h + 1) * stride)
        cells = CellGeometry(stride, (stride - 1) / 2)
        for interpolation in ("bilinear", "nearest"):
            default = upsample(maps, size, interpolation)
            torch.testing.assert_close(_upsample_cells(maps, size, interpolation, cells), default,
                                       atol=1e-6, rtol=0)
            assert torch.equal(upsample(maps, size, interpolation, cells), default)
    # a map already at the image's resolution has no cells to place
    full = torch.randn(2, 16, 16, generator=g)
    assert torch.equal(upsample(full, (16, 16), "bilinear", CellGeometry(4, 0.0)), full)


# ---------------------------------------------------------------------------------------------
# (2) ResNet18: a one-hot stage cell's map is centred on the cell's receptive field

def _one_hot_lafam(model, module, size, cell, **options):
    """LaFAM's map (end to end) with the stage output replaced by a one-hot at ``cell``."""

    def one_hot(m, inputs, out):
        hot = torch.zeros_like(out)
        hot[:, :, cell[0], cell[1]] = 1
        return hot

    handle = module.register_forward_hook(one_hot)
    try:
        return explain(model, _images(1, size, seed=1), method="lafam", layer=module, **options)[0]
    finally:
        handle.remove()


# fields of 43, 99, 211 and 435 px: inside the image around these cells
@pytest.mark.parametrize("stage,size,cell", [("stage1", 128, (7, 6)), ("stage2", 128, (7, 8)),
                                             ("stage3", 256, (8, 7)), ("stage4", 512, (8, 7))])
def test_resnet_model_centres_put_each_cell_on_its_receptive_field(stage, size, cell):
    model = build("resnet18")
    module = resolve_layer(model, stage)
    centre = _field_centre(_receptive_field(model, module, False, (size, size), cell))
    ours = _mass_centre(_one_hot_lafam(model, module, size, cell, cell_centres="model"))
    assert ours == pytest.approx(centre, abs=0.25)
    # nearest: the cell's S x S block (S even) cannot be centred on a pixel, it is half a pixel off
    block = _one_hot_lafam(model, module, size, cell, interpolation="nearest", cell_centres="model")
    assert _mass_centre(block) == pytest.approx((centre[0] - 0.5, centre[1] - 0.5), abs=1e-3)
    assert int((block > 0).sum()) == RESNET_STRIDES[stage] ** 2
    # the default is (S - 1) / 2 px off: what the option corrects
    offset = (RESNET_STRIDES[stage] - 1) / 2
    default = _mass_centre(_one_hot_lafam(model, module, size, cell))
    assert default == pytest.approx((centre[0] + offset, centre[1] + offset), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# (3) the oracle: ResNet's stage activation is the mask pooled over each cell's own window

class CentredPool(nn.Module):
    """The mask (channel 0) averaged over a window of width S centred on pixel S i (half weight at
    its two end pixels), repeated over ``channels``: a ResNet stage that sees exactly its cells."""

    def __init__(self, stride: int, channels: int):
        super().__init__()
        kernel = torch.ones(stride + 1, dtype=torch.float32)
        kernel[0] = kernel[-1] = 0.5
        self.register_buffer("kernel", (kernel[:, None] * kernel[None, :] / stride ** 2)[None, None])
        self.stride, self.channels = stride, channels

    def forward(self, x):
        pooled = F.conv2d(x[:, :1], self.kernel, stride=self.stride, padding=self.stride // 2)
        return pooled.expand(-1, self.channels, -1, -1)


def _resnet_oracle(stage: str) -> nn.Module:
    net = build("resnet18", wrapped=False)  # no normalisation: the stage sees the mask itself
    widths = {"stage1": 64, "stage2": 128, "stage3": 256, "stage4": 512}
    for name in ("conv1", "bn1", "relu", "maxpool"):
        setattr(net, name, nn.Identity())
    deepest = int(stage[-1])
    for k in range(1, 5):  # the stages before ``stage`` pass the image through
        if k < deepest:
            setattr(net, f"layer{k}", nn.Identity())
    setattr(net, f"layer{deepest}", CentredPool(RESNET_STRIDES[stage], widths[stage]))
    return net


# measured gt_cosine, default -> model-centred: 0.958 -> 0.969, 0.901 -> 0.935, 0.776 -> 0.882, 0.665 -> 0.770
@pytest.mark.parametrize("stage,gain", [("stage1", 0.008), ("stage2", 0.025), ("stage3", 0.08), ("stage4", 0.08)])
def test_resnet_oracle_agrees_better_with_the_ground_truth(stage, gain):
    model = _resnet_oracle(stage)
    mask = torch.from_numpy(_l_shape(128, 128)).float()
    x = mask.expand(1, 3, 128, 128).contiguous()
    default = explain(model, x, method="lafam", layer=stage)
    centred = explain(model, x, method="lafam", layer=stage, cell_centres="model")
    # the stage is the pooled mask: the model-centred map is its float64 upsampling
    pooled = model.get_submodule(f"layer{stage[-1]}")(x)[:, 0]
    torch.testing.assert_close(centred.double(), _expected(pooled, 128, RESNET_STRIDES[stage], 0.0, relu=False),
                               atol=1e-5, rtol=0)
    before, after = gt_cosine(default, mask[None]).item(), gt_cosine(centred, mask[None]).item()
    assert after >= before + gain, (before, after)


# ---------------------------------------------------------------------------------------------
# (4) VGG, ConvNeXt-T, Swin-T already centre their cells where the convention does

@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn", "convnext_tiny", "swin_t"])
def test_patch_architectures_are_unchanged(arch):
    model = build_model("swin_t", image_size=64).eval() if arch == "swin_t" else build(arch)
    x = _images(2, 64)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    default = get_explainer("lafam", model).explain_layers(x, None, stages)
    centred = get_explainer("lafam", model, cell_centres="model").explain_layers(x, None, stages)
    for stage, a, b in zip(stages, default, centred):
        assert torch.equal(b.maps, a.maps), f"{arch} {stage}"


# ---------------------------------------------------------------------------------------------
# (5) refused where the geometry is not declared

def test_undeclared_layers_are_refused_naming_the_layer():
    resnet = build("resnet18")
    with pytest.raises(ValueError, match=r"cell_centres='model'.*'backbone\.layer1\.0\.conv1'.*cell_centres='stride'"):
        get_explainer("gradcam", resnet, layer="layer1.0.conv1", cell_centres="model")
    oracle = MaskOracle(8, channels=4, channels_last=False)
    with pytest.raises(ValueError, match=r"'stage'.*not.*declared"):
        get_explainer("lafam", oracle, layer="stage", cell_centres="model")
    with pytest.raises(ValueError, match=r"'backbone\.layer2\.0'"):
        get_explainer("refinecam", resnet, layers=("stage1", "layer2.0"), cell_centres="model")
    with pytest.raises(ValueError, match=r"'backbone\.layer3\.1'"):
        get_explainer("lafam", resnet, cell_centres="model").explain_layers(_images(1, 32), None,
                                                                            ["stage1", "layer3.1"])
    with pytest.raises(ValueError, match=r"cell_centres must be one of \('stride', 'model'\), got 'centre'"):
        get_explainer("lafam", resnet, cell_centres="centre")
    with pytest.raises(ValueError, match=r"variant='official'"):
        get_explainer("scorecam", resnet, variant="pytorch-grad-cam", cell_centres="model")
    with pytest.raises(TypeError, match=r"cell_centres"):
        get_explainer("refinecam", resnet, base_options={"cell_centres": "model"})
    # the default keeps working on any layer
    get_explainer("lafam", oracle, layer="stage")


def _stage_grids(model: nn.Module, size: int) -> dict[str, tuple]:
    """Each stage's output grid (h, w) for a size x size image, from forward hooks."""
    grids, handles = {}, []
    def record(stage: str, channels_last: bool):
        def hook(module, inputs, output) -> None:
            grids[stage] = tuple(output.shape[1:3] if channels_last else output.shape[2:])
        return hook

    for stage in RESNET_STRIDES:
        layer = resolve_layer_full(model, stage)
        handles.append(layer.module.register_forward_hook(record(stage, layer.channels_last)))
    try:
        with torch.no_grad():
            model(_images(1, size))
    finally:
        for handle in handles:
            handle.remove()
    return grids


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "swin_t", "convnext_tiny"])
def test_reference_grids_pass_the_stride_check_at_odd_sizes(arch):
    # floor(n / S) cells (valid pools, patches) or ceil(n / S) (padded strided convs, Swin's
    # padded merges): every reference architecture lands within, at sizes S does not divide
    model = build(arch)
    for size in (33, 65, 72, 97):
        grids = _stage_grids(model, size)
        for stage, stride in RESNET_STRIDES.items():
            cells = resolve_layer_full(model, stage).cells
            assert cells is not None and cells.stride == stride
            upsample(torch.rand(1, *grids[stage]), (size, size), "bilinear", cells)  # no error


def test_a_grid_that_does_not_match_the_declared_stride_is_refused():
    # a hand-built VGG with one pool fewer than vgg11: its "stage1" (the last four pools' first)
    # has stride 2, not the 4 the reference geometry declares; placing cells at stride 4 would
    # shift the map without a sign
    features = nn.Sequential(*[m for k in range(4) for m in
                               (nn.Conv2d(3 if k == 0 else 8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torchvision.models.VGG(features, num_classes=6, init_weights=False).eval()
    with pytest.raises(ValueError, match=r"grid \(16, 16\) does not come from a \(32, 32\) image at stride 4 "
                                         r"\(height: 16 cells, expected 8 or 8\).*cell_centres='stride'"):
        explain(net, _images(1, 32), 0, method="lafam", layer="stage1", cell_centres="model")
    explain(net, _images(1, 32), 0, method="lafam", layer="stage1")  # the default does not assume
    with pytest.raises(ValueError, match=r"width: 3 cells, expected 4 or 4"):
        upsample(torch.rand(1, 4, 3), (16, 16), "bilinear", CellGeometry(4, 1.5))


def test_every_method_takes_the_option_and_pixel_methods_ignore_it():
    for name, cls in METHODS.items():
        assert unknown_options(cls, {"cell_centres": "model"})[0] == [], name
    model = build("resnet18")
    x = _images(2, 32)
    for method in ("guidedbackprop", "inputxgradient"):
        assert torch.equal(explain(model, x, 0, method=method, cell_centres="model"),
                           explain(model, x, 0, method=method))


# ---------------------------------------------------------------------------------------------
# (6) every path that upsamples a layer's map honours it

SIZE = 64


def _model_maps(raw: torch.Tensor, stage: str, relu: bool = True) -> torch.Tensor:
    return _expected(raw, SIZE, RESNET_STRIDES[stage], 0.0, relu)


def _check(ours: torch.Tensor, expected: torch.Tensor, default: torch.Tensor) -> None:
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=0)
    assert (default.double() - expected).abs().max() > 0.05  # the check tells the two apart


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam", "shapleycam", "lafam"])
@pytest.mark.parametrize("stage", ["stage1", "stage3"])
def test_cams_and_lafam_honour_the_option(method, stage):
    model, x = build("resnet18"), _images(2, SIZE)
    raw = explain(model, x, [0, 1], method=method, layer=stage, raw=True)
    ours = explain(model, x, [0, 1], method=method, layer=stage, cell_centres="model")
    default = explain(model, x, [0, 1], method=method, layer=stage)
    _check(ours, _model_maps(raw, stage, relu=method != "lafam"), default)


def test_explain_layers_honours_the_option_per_layer():
    model, x = build("resnet18"), _images(2, SIZE)
    stages = ["stage1", "stage2", "stage4"]
    ours = get_explainer("gradcam", model, cell_centres="model").explain_layers(x, [0, 1], stages)
    for stage, explanation in zip(stages, ours):
        single = explain(model, x, [0, 1], method="gradcam", layer=stage, cell_centres="model")
        torch.testing.assert_close(explanation.maps, single, atol=1e-6, rtol=0)


def test_scorecam_places_masks_and_map_at_the_model_centres():
    model, x, target = build("resnet18"), _images(2, 32), torch.tensor([0, 1])
    stage, stride = "stage1", RESNET_STRIDES["stage1"]
    acts = {}
    handle = resolve_layer(model, stage).register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    # the authors' Score-CAM in float64 with this geometry: each channel upsampled, min-max
    # normalised (constant ones weigh 0), weighted by the softmax of the masked image
    A = acts["a"].double()
    rows = _interpolation_matrix(32, A.shape[2], stride, 0.0)
    up = rows @ A @ rows.T  # (B, C, 32, 32)
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    masks = (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    weights = torch.zeros(A.shape[:2], dtype=torch.float64)
    with torch.no_grad():
        for b in range(2):
            probs = model((x[b] * masks[b, :, None]).float()).double().softmax(1)[:, target[b]]
            weights[b] = torch.where((hi > lo).flatten(1)[b], probs, torch.zeros_like(probs))
    expected = minmax((weights[:, :, None, None] * up).sum(1).clamp_min(0))[0]
    ours = explain(model, x, target, method="scorecam", layer=stage, cell_centres="model")
    default = explain(model, x, target, method="scorecam", layer=stage)
    _check(ours, expected, default)


def test_guided_gradcam_upsamples_its_cam_at_the_model_centres():
    model, x = build("resnet18"), _images(2, SIZE)
    stage = "stage2"
    cam = explain(model, x, [0, 1], method="gradcam", layer=stage, raw=True).double()
    guided = explain(model, x, [0, 1], method="guidedbackprop", reduce="sum", raw=True).double()
    rows = _interpolation_matrix(SIZE, cam.shape[1], RESNET_STRIDES[stage], 0.0)
    # |sum_c g_c * up| = up * |sum_c g_c| for the ReLU'd, non-negative upsampled CAM
    expected = minmax((rows @ cam.clamp_min(0) @ rows.T) * guided.abs())[0]
    ours = explain(model, x, [0, 1], method="guidedgradcam", layer=stage, cell_centres="model")
    default = explain(model, x, [0, 1], method="guidedgradcam", layer=stage)
    _check(ours, expected, default)


def test_refinecam_fuses_maps_upsampled_at_the_model_centres():
    model, x = build("resnet18"), _images(2, SIZE)
    stages = ("stage1", "stage2", "stage3")
    per_layer = [_model_maps(explain(model, x, [0, 1], method="gradcampp", layer=s, raw=True), s)
                 for s in stages]
    expected = minmax(torch.stack(per_layer).prod(0))[0]
    ours = explain(model, x, [0, 1], method="refinecam", layers=stages, cell_centres="model")
    default = explain(model, x, [0, 1], method="refinecam", layers=stages)
    _check(ours, expected, default)
