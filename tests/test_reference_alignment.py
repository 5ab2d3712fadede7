"""Maps land where the model looks: a stage cell's upsampled mass is centred on the cell's receptive
field, measured from the model itself, for every reference architecture.

The paper's public code misaligned maps and masks (corner- vs centre-aligned upsampling, Swin's
channels-last stages read as channels-first). Here, independently of our upsampling code:

* the receptive field of one stage cell is the set of input pixels its activation depends on
  (support of the gradient of that cell w.r.t. the image); with the cell away from the borders
  the field is symmetric about its centre (the convolutions' kernels and padding are), so its
  centre is the midpoint of the support;
* the map is produced end to end by LaFAM (``to_nchw`` layout handling and ``finalize``) on the
  same model with that stage's output replaced, by a forward hook, by a one-hot at the cell (in
  the layout torchvision documents for the architecture, not the one ``layers.py`` detects);
* its centre of mass must be the receptive-field centre, exactly (1e-3 px: float rounding).
  Interior cells are used because bilinear upsampling clamps at the border, which pulls an edge
  cell's mass inwards.

VGG, ConvNeXt-T and Swin-T tile the image with stride S: cell i is centred at S i + (S - 1) / 2,
the half-pixel convention of ``align_corners=False``. Swin-T and ConvNeXt-T at stages 3-4 have
receptive fields larger than a test image, so they are measured with their blocks replaced by
the identity (the real blocks are checked where a field fits: ConvNeXt-T stage 1, Swin-T at
32 px, window 1): what remains is the patchify stem and the 2x2 merges, whose field is exactly
the cell's S x S patch, which ``nearest`` upsampling must then reproduce pixel for pixel.
torchvision's ResNet is the exception, pinned below: its stride-2 convolutions pad
symmetrically, so cell i is centred at S i, (S - 1) / 2 px up and left of where stretch-to-fit
upsampling (ours, pytorch-grad-cam's, cv2's) puts it.

The oracle tests check the whole path on a model whose stage activation is the mask pooled to
the stage grid: the map equals the pooled mask upsampled by numpy, its gt_cosine is near the
best any map from that grid can reach, and flipped, transposed, corner-aligned or wrongly laid
out maps score clearly worse.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import SwinTransformerBlock
from torchvision.ops.misc import Permute

from test_attributions_common import build
from trainers.models import build_model
from validation.attributions import explain, resolve_layer
from validation.metrics.ground_truth import gt_cosine

# torchvision's documented stage layout: Swin-T stages are (B, H, W, C), the others (B, C, H, W)
CHANNELS_LAST_ARCHS = {"swin_t"}


def _without_blocks(model: nn.Module) -> nn.Module:
    """The ConvNeXt / Swin stages' blocks replaced by the identity (they keep their names): left are
    the patchify stem and the downsampling / patch-merging layers between stages."""
    features = model.backbone.features
    for k in (1, 3, 5, 7):
        assert all(isinstance(b, (CNBlock, SwinTransformerBlock)) for b in features[k])
        features[k] = nn.Identity()
    return model


class _Reached(Exception):
    pass


def _stage_output(model, module, x):
    """The module's output; the forward pass stops there (the rest of the network is not needed)."""
    out = {}

    def keep(m, inputs, output):
        out["a"] = output
        raise _Reached

    handle = module.register_forward_hook(keep)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return out["a"]


def _cell(a: torch.Tensor, channels_last: bool, i: int, j: int) -> torch.Tensor:
    return a[:, i, j, :] if channels_last else a[:, :, i, j]


def _grid(a: torch.Tensor, channels_last: bool) -> tuple[int, int]:
    return tuple(a.shape[1:3]) if channels_last else tuple(a.shape[2:4])


def _receptive_field(model, module, channels_last, size, cell):
    """(H, W) bool mask of the input pixels the cell's activation depends on."""
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    with torch.enable_grad():
        a = _stage_output(model, module, x)
        grad, = torch.autograd.grad(_cell(a, channels_last, *cell).abs().sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    return support


def _field_centre(support: torch.Tensor, interior: bool = True) -> tuple[float, float]:
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    H, W = support.shape
    if interior:  # a field cut by the image border has its midpoint moved: not its centre
        assert rows.min() > 0 and rows.max() < H - 1 and cols.min() > 0 and cols.max() < W - 1, \
            "receptive field reaches the border: use a larger image or an inner cell"
    return (rows.min() + rows.max()).item() / 2, (cols.min() + cols.max()).item() / 2


def _one_hot_map(model, module, channels_last, size, cell, interpolation="bilinear"):
    """LaFAM's map (ours, end to end) with the stage output replaced by a one-hot at ``cell``."""

    def one_hot(m, inputs, out):
        hot = torch.zeros_like(out)
        if channels_last:
            hot[:, cell[0], cell[1], :] = 1
        else:
            hot[:, :, cell[0], cell[1]] = 1
        return hot

    handle = module.register_forward_hook(one_hot)
    try:
        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
        return explain(model, x, method="lafam", layer=module, interpolation=interpolation)[0]
    finally:
        handle.remove()


def _mass_centre(m: torch.Tensor) -> tuple[float, float]:
    m = m.double()
    rows = torch.arange(m.shape[0], dtype=torch.float64)
    cols = torch.arange(m.shape[1], dtype=torch.float64)
    total = m.sum()
    return ((m.sum(1) * rows).sum() / total).item(), ((m.sum(0) * cols).sum() / total).item()


def _inner_cell(grid: tuple[int, int]) -> tuple[int, int]:
    """A cell off the border, with row != column where the grid allows (a transposed map puts it
    elsewhere)."""
    h, w = grid
    assert h >= 3 and w >= 3, f"grid {grid} has no inner cell"
    return (h // 2, w // 2 - 1) if w >= 4 else (1, 1)


def _check_centred(model, arch, stage, size, exact_patch=False, cell=None):
    """``size``: the image side, or (H, W)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    module = resolve_layer(model, stage)
    channels_last = arch in CHANNELS_LAST_ARCHS
    with torch.no_grad():
        grid = _grid(_stage_output(model, module, torch.zeros(1, 3, *size)), channels_last)
    cell = _inner_cell(grid) if cell is None else cell
    support = _receptive_field(model, module, channels_last, size, cell)
    stride = size[0] // grid[0]
    # the stage tiles the image evenly, with the same stride on both axes
    assert (grid[0] * stride, grid[1] * stride) == size
    centre = _field_centre(support, interior=not exact_patch)
    # the model itself: cell (i, j) centred at S i + (S - 1) / 2, its S x S patch (or a symmetric
    # field) around it
    assert centre == (stride * cell[0] + (stride - 1) / 2, stride * cell[1] + (stride - 1) / 2)
    ours = _mass_centre(_one_hot_map(model, module, channels_last, size, cell))
    assert ours == pytest.approx(centre, abs=1e-3), f"{arch} {stage} at {size} px, cell {cell} of {grid}"
    if exact_patch:
        patch = _one_hot_map(model, module, channels_last, size, cell, interpolation="nearest") > 0
        assert torch.equal(patch, support), "nearest upsampling must cover exactly the cell's patch"


@pytest.mark.parametrize("arch", ["vgg11", "vgg11_bn"])
def test_vgg_stage_cells_are_centred_on_their_receptive_fields(arch):
    # fields 10, 30 and 70 px: inside 96 px for an inner cell
    model = build(arch)
    for stage in ("stage1", "stage2", "stage3"):
        _check_centred(model, arch, stage, 96)


def test_vgg_stage4_cell_is_centred_on_its_receptive_field():
    # a 150 px field: at 160 px only the central cell (2, 2) of the 5x5 grid has it inside
    _check_centred(build("vgg11"), "vgg11", "stage4", 160, cell=(2, 2))


def test_convnext_stage1_cells_are_centred_on_their_receptive_fields():
    # the real blocks (7x7 depthwise convolutions): a 76 px field, inside 96 px for an inner cell
    _check_centred(build("convnext_tiny"), "convnext_tiny", "stage1", 96)


@pytest.mark.parametrize("size", [96, 128, (96, 128)])
def test_convnext_patch_grid_is_centre_aligned_at_every_stage(size):
    model = _without_blocks(build("convnext_tiny"))
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        _check_centred(model, "convnext_tiny", stage, size, exact_patch=True)


@pytest.mark.parametrize("size", [96, 128, (96, 128)])
def test_swin_channels_last_patch_grid_is_centre_aligned_at_every_stage(size):
    # the trainers' Swin-T (window 3 at 96 px, 4 at 128 px); its stages are (B, H, W, C): a map read
    # as (B, C, H, W), or transposed, puts the (row != column) cell's mass elsewhere, as does a
    # non-square map upsampled to (W, H)
    side = size if isinstance(size, int) else size[0]
    model = _without_blocks(build_model("swin_t", image_size=side).eval())
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        _check_centred(model, "swin_t", stage, size, exact_patch=True)


def test_swin_real_blocks_keep_the_layout_at_32px():
    # window 1 at 32 px: no token mixing inside a stage, so even with the real blocks a stage cell
    # depends on exactly its patch; stage 2 is the last with an inner cell (4x4 grid)
    model = build_model("swin_t", image_size=32).eval()
    for stage in ("stage1", "stage2"):
        _check_centred(model, "swin_t", stage, 32, exact_patch=True)


def test_resnet_cells_are_centred_up_left_of_their_upsampled_mass():
    """Known limitation, pinned so that it cannot change silently. torchvision's ResNet pads its
    stride-2 convolutions symmetrically (7x7 pad 3, 3x3 pad 1, 1x1 pad 0): the field of stage cell
    i is centred at S i (pixel 0 for the first cell), not S i + (S - 1) / 2. Stretch-to-fit
    upsampling, ours as pytorch-grad-cam's, puts the cell's mass (S - 1) / 2 px below and right
    of that: 1.5 px at stage 1, 3.5 at stage 2 (7.5 and 15.5 at stages 3-4, measured on a
    1024 px image: fields of 211 and 435 px)."""
    model = build("resnet18")
    # fields of 43 and 99 px, inside 128 px around these cells
    for stage, stride, cell in (("stage1", 4, (7, 6)), ("stage2", 8, (7, 8))):
        module = resolve_layer(model, stage)
        centre = _field_centre(_receptive_field(model, module, False, (128, 128), cell))
        assert centre == (stride * cell[0], stride * cell[1])
        ours = _mass_centre(_one_hot_map(model, module, False, (128, 128), cell))
        offset = (stride - 1) / 2
        assert ours == pytest.approx((centre[0] + offset, centre[1] + offset), abs=1e-3)


# --------------------------------------------------------------------------------------------
# oracle models: the stage activation is the ground-truth mask pooled to the stage grid

class MaskOracle(nn.Module):
    """x's first channel is the mask; ``stage`` = its S x S average pool, as ``channels`` positive
    multiples, (B, C, h, w), or (B, h, w, C) behind torchvision ``Permute`` modules (Swin's
    layout). Head: global average pool and a positive linear layer, so every class's Grad-CAM
    weights are positive and equal per channel up to the layer's weights."""

    def __init__(self, stride: int, channels: int, channels_last: bool):
        super().__init__()
        self.pool = nn.AvgPool2d(stride)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, channels), requires_grad=False)
        self.channels_last = channels_last
        self.to_last = Permute([0, 2, 3, 1]) if channels_last else nn.Identity()
        self.stage = nn.Identity()
        self.to_first = Permute([0, 3, 1, 2]) if channels_last else nn.Identity()
        self.head = nn.Linear(channels, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.linspace(0.1, 1.0, 2 * channels).view(2, channels))

    def forward(self, x):
        a = self.pool(x[:, :1]) * self.scale.view(1, -1, 1, 1)
        a = self.stage(self.to_last(a))
        return self.head(self.to_first(a).mean(dim=(2, 3)))


def _l_shape(H: int, W: int) -> np.ndarray:
    """An L off the centre: no flip or transposition maps it onto itself."""
    m = np.zeros((H, W))
    r, c = H / 64, W / 64
    m[int(8 * r):int(40 * r), int(12 * c):int(28 * c)] = 1
    m[int(32 * r):int(40 * r), int(28 * c):int(52 * c)] = 1
    return m


def _np_upsample_matrix(out: int, n: int) -> np.ndarray:
    """(out, n) half-pixel bilinear interpolation: output pixel y samples source (y + 0.5) n / out - 0.5,
    clamped to [0, n - 1]."""
    src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    frac = src - i0
    M = np.zeros((out, n))
    M[np.arange(out), i0] += 1 - frac
    M[np.arange(out), i1] += frac
    return M


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("method", ["lafam", "gradcam"])
@pytest.mark.parametrize("H,W,stride,channels_last",
                         [(64, 64, 8, False), (64, 64, 8, True), (48, 48, 8, True), (64, 64, 16, False),
                          (48, 64, 8, False)])
def test_oracle_stage_gives_the_best_map_its_grid_allows(method, H, W, stride, channels_last):
    h, w = H // stride, W // stride
    # C = h, so that a misread layout still runs (the paper's bug gave no error either)
    model = MaskOracle(stride, channels=h, channels_last=channels_last).eval()
    mask = _l_shape(H, W)
    x = torch.from_numpy(mask).float().expand(1, 3, H, W).contiguous()
    ours = explain(model, x, 0, method=method, layer="stage")[0].double().numpy()

    # numpy: pool, upsample (half-pixel bilinear, each axis), min-max
    pooled = mask.reshape(h, stride, w, stride).mean(axis=(1, 3))
    rows, cols = _np_upsample_matrix(H, h), _np_upsample_matrix(W, w)
    expected = rows @ pooled @ cols.T
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    # the best cosine of any map upsampled from an h x w grid (least squares in that span, which holds
    # the constants, so min-max stays inside it): ours is within a few hundredths of it
    basis = np.kron(rows, cols)
    coef, *_ = np.linalg.lstsq(basis, mask.ravel(), rcond=None)
    best = _cos(basis @ coef, mask)
    score = gt_cosine(torch.from_numpy(ours)[None], torch.from_numpy(mask)[None]).item()
    assert score == pytest.approx(_cos(expected, mask), abs=1e-6)
    assert best - 0.04 <= score <= best + 1e-9

    # misaligned versions of the same grid score clearly worse
    corner = F.interpolate(torch.from_numpy(pooled)[None, None], size=(H, W), mode="bilinear",
                           align_corners=True)[0, 0].numpy()
    wrongs = {"flipped": ours[::-1], "mirrored": ours[:, ::-1], "corner-aligned": corner,
              "half a cell off": np.roll(ours, stride // 2, axis=(0, 1))}
    if H == W:
        wrongs["transposed"] = ours.T
    for name, wrong in wrongs.items():
        assert _cos(wrong, mask) < score - 0.03, name
    if channels_last:  # a (B, h, w, C) stage read as (B, C, h, w): the paper's Swin bug
        misread = explain(model, x, 0, method=method, layer="stage", channels_last=False)[0].double().numpy()
        assert _cos(misread, mask) < score - 0.1
