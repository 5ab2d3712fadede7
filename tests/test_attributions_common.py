"""Shared model builders for the attribution tests (imported by the other test_attributions_* files),
plus checks of the layer registry."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from validation.attributions import resolve_layer, resolve_layer_full, stage_names

NUM_CLASSES = 6


class Wrapped(nn.Module):
    """The trainers contract: [0, 1] images in, normalisation inside, torchvision net as .backbone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.backbone = backbone

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)


def build(arch: str = "resnet18", wrapped: bool = True, seed: int = 0) -> nn.Module:
    """A seeded random torchvision classifier (6 classes), eval mode; torchvision's init draws from
    the global generator, so it runs inside fork_rng to leave the caller's state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)(num_classes=NUM_CLASSES)
        if arch.startswith("resnet"):
            # non-trivial BN statistics so eval mode differs from train mode
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    model = Wrapped(net) if wrapped else net
    return model.eval()


def images(b: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g)


class TinyNet(nn.Module):
    """Small CNN with a non-linear head after ``feat`` (softplus and a square), for Hessian tests."""

    def __init__(self, channels: int = 8, seed: int = 0, nonlinear_head: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.feat = nn.ReLU()
        self.head_conv = nn.Conv2d(channels, channels, 3, padding=1, stride=2)
        self.act = nn.Softplus() if nonlinear_head else nn.Identity()
        self.fc = nn.Linear(channels, NUM_CLASSES)
        self.nonlinear_head = nonlinear_head
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        a = self.feat(self.stem(x))
        h = self.act(self.head_conv(a))
        pooled = h.mean(dim=(2, 3))
        if self.nonlinear_head:
            pooled = pooled + 0.1 * pooled ** 2
        return self.fc(pooled)


# ---------------------------------------------------------------------------------------------
# layer registry

EXPECTED_STAGES = {
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "vgg11": ["features.5", "features.10", "features.15", "features.20"],
    "vgg11_bn": ["features.7", "features.14", "features.21", "features.28"],
    "swin_t": ["features.1", "features.3", "features.5", "features.7"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_STAGES))
def test_stage_aliases_resolve_to_stage_ends(arch):
    bare = build(arch, wrapped=False)  # VGG's head is large: build once, check bare and wrapped
    for wrapped in (True, False):
        _check_stages(arch, Wrapped(bare) if wrapped else bare, wrapped)


def _check_stages(arch, model, wrapped):
    prefix = "backbone." if wrapped else ""
    names = stage_names(model)
    assert names == {f"stage{i + 1}": prefix + n for i, n in enumerate(EXPECTED_STAGES[arch])}
    net = model.backbone if wrapped else model
    for i, name in enumerate(EXPECTED_STAGES[arch]):
        assert resolve_layer(model, f"stage{i + 1}") is net.get_submodule(name)
        # a name inside the backbone also resolves on the wrapper
        assert resolve_layer(model, name) is net.get_submodule(name)
    if arch.startswith("vgg"):
        assert all(isinstance(resolve_layer(model, f"stage{i}"), nn.MaxPool2d) for i in range(1, 5))
    layer = resolve_layer_full(model, "stage2")
    assert layer.channels_last == (arch == "swin_t")


def test_modules_and_dotted_names_resolve():
    model = build("resnet18")
    conv = model.backbone.layer3[1].conv2
    assert resolve_layer(model, "backbone.layer3.1.conv2") is conv
    assert resolve_layer(model, "layer3.1.conv2") is conv
    assert resolve_layer(model, conv) is conv
    assert resolve_layer_full(model, conv).name == "backbone.layer3.1.conv2"
    tiny = TinyNet()
    assert resolve_layer(tiny, "feat") is tiny.feat
    assert stage_names(tiny) == {}


def test_unknown_layer_lists_valid_ones():
    model = build("resnet18")
    with pytest.raises(ValueError) as err:
        resolve_layer(model, "stage9")
    msg = str(err.value)
    assert "stage9" in msg and "stage1 -> backbone.layer1" in msg and "backbone.layer4" in msg
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="architecture not recognised.*feat"):
        resolve_layer(TinyNet(), "stage1")


@pytest.mark.parametrize("arch,expected", [
    ("swin_t", {"features.0.0": False, "features.0.1": True, "features.0": True, "stage1": True, "stage4": True,
                "features.2.reduction": True, "norm": True, "permute": False, "avgpool": False}),
    ("convnext_tiny", {"features.0.0": False, "stage1": False, "features.1.0.block.0": False,
                       "features.1.0.block.3": True, "features.1.0.block.5": True, "features.1.0.block.6": False}),
])
def test_layouts_follow_torchvision_permutes(arch, expected):
    """Swin-T is NHWC from its patch-embedding Permute to the final norm; ConvNeXt only between
    the two Permutes of each block's MLP (torchvision's module structure, checked by type)."""
    from torchvision.ops.misc import Permute

    model = build(arch, wrapped=True)
    net = model.backbone
    if arch == "swin_t":
        assert isinstance(net.features[0][1], Permute) and list(net.features[0][1].dims) == [0, 2, 3, 1]
        assert isinstance(net.permute, Permute) and list(net.permute.dims) == [0, 3, 1, 2]
    for name, channels_last in expected.items():
        assert resolve_layer_full(model, name).channels_last == channels_last, name
        assert resolve_layer_full(model, name, channels_last=not channels_last).channels_last != channels_last


def np_bilinear(grid, H, W):
    """align_corners=False bilinear upsampling in numpy: source coordinate (i + 0.5) n / H - 0.5,
    clamped at 0, neighbours clamped at the last cell."""
    import numpy as np

    def axis(out, n):
        src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    r0, r1, fr = axis(H, grid.shape[0])
    c0, c1, fc = axis(W, grid.shape[1])
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c1] * fc
    bottom = grid[r1][:, c0] * (1 - fc) + grid[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bottom * fr[:, None]
