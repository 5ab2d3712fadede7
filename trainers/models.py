"""Architecture registry: ``build_model("resnet18")`` instead of if-chains.

Every model takes images in [0, 1] (B, 3, H, W): ImageNet normalisation is the first module,
so perturbation metrics can work in pixel space. The torchvision network is kept unchanged
as ``.backbone`` (layer names such as ``layer1`` or ``features.1`` stay resolvable); only the
classifier head is sized for the task, and Swin-T gets a window that tiles every stage.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import swin_transformer as tv_swin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std stored as buffers (saved in checkpoints)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ShapeClassifier(nn.Module):
    """``backbone(normalize(x))`` with the metadata attributions and metrics need."""

    def __init__(self, arch: str, backbone: nn.Module, num_classes: int, image_size: int,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.arch = arch
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.arch}: expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        return self.backbone(self.normalize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, image_size={self.image_size}"


# ---------------------------------------------------------------------------------------------
# registry

_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "vgg11": "VGG11_Weights",
    "vgg11_bn": "VGG11_BN_Weights",
    "swin_t": "Swin_T_Weights",
    "convnext_tiny": "ConvNeXt_Tiny_Weights",
}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}  # (num_classes, image_size, **options)
_HEADS: dict[str, str] = {}  # arch -> state-dict prefix of the ImageNet classifier layer


def register(name: str, head: str):
    def deco(fn):
        _BUILDERS[name] = fn
        _HEADS[name] = head
        return fn

    return deco


def available_archs() -> tuple[str, ...]:
    return tuple(sorted(_BUILDERS))


def swin_window_size(image_size: int) -> int:
    """Largest window <= 7 that tiles all four Swin stages exactly (stage sizes s/4 .. s/32).

    With a window that divides the last stage's side it divides every earlier one, so no stage
    pads its feature map and no token attends to padding: 7 at 224 px, 4 at 128 px, 3 at 96 px,
    2 at 64 px, 1 at 32 px (plain per-token MLP at the tiny test size).
    """
    if image_size % 32:
        raise ValueError(f"swin_t needs an image size divisible by 32 (4x patches, 3 merges), got {image_size}")
    last = image_size // 32
    return max(w for w in range(1, 8) if last % w == 0)


@register("resnet18", head="fc")
def _resnet18(num_classes: int, image_size: int) -> nn.Module:
    return tvm.resnet18(weights=None, num_classes=num_classes)


@register("vgg11", head="classifier.6")
def _vgg11(num_classes: int, image_size: int) -> nn.Module:
    return tvm.vgg11(weights=None, num_classes=num_classes)


@register("vgg11_bn", head="classifier.6")
def _vgg11_bn(num_classes: int, image_size: int) -> nn.Module:
    return tvm.vgg11_bn(weights=None, num_classes=num_classes)


# stochastic depth (drop path) of the archs that have it: torchvision's ImageNet values
DEFAULT_STOCHASTIC_DEPTH = {"swin_t": 0.2, "convnext_tiny": 0.1}


@register("swin_t", head="head")
def _swin_t(num_classes: int, image_size: int,
            stochastic_depth: float = DEFAULT_STOCHASTIC_DEPTH["swin_t"]) -> nn.Module:
    w = swin_window_size(image_size)
    # same hyper-parameters as torchvision.models.swin_t except the window
    return tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
        window_size=[w, w], stochastic_depth_prob=stochastic_depth, num_classes=num_classes,
    )


@register("convnext_tiny", head="classifier.2")
def _convnext_tiny(num_classes: int, image_size: int,
                   stochastic_depth: float = DEFAULT_STOCHASTIC_DEPTH["convnext_tiny"]) -> nn.Module:
    return tvm.convnext_tiny(weights=None, num_classes=num_classes, stochastic_depth_prob=stochastic_depth)


def _check_arch(arch: str) -> None:
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; available: {', '.join(available_archs())}")


def build_model(arch: str, num_classes: int = 6, image_size: int = 128, pretrained: bool = False,
                weights_path: str | os.PathLike | None = None,
                stochastic_depth: float | None = None) -> ShapeClassifier:
    """Build ``arch`` for ``num_classes`` classes at ``image_size`` px, from scratch by default.

    ``pretrained=True`` loads torchvision's ImageNet weights from the local torch hub cache
    (or from ``weights_path``) and never downloads; the classifier head is re-initialised.
    ``stochastic_depth`` (drop-path rate, Swin-T and ConvNeXt-T only; None: torchvision's
    ``DEFAULT_STOCHASTIC_DEPTH``) acts in training only; inference is the same either way.
    """
    _check_arch(arch)
    if int(num_classes) < 2:
        raise ValueError(f"{arch}: num_classes must be >= 2, got {num_classes}")
    if int(image_size) < 32 or int(image_size) % 32:
        raise ValueError(f"{arch}: image_size must be a multiple of 32 and >= 32 (five 2x downsamplings), "
                         f"got {image_size}")
    options = {}
    if stochastic_depth is not None:
        if arch not in DEFAULT_STOCHASTIC_DEPTH:
            raise ValueError(f"{arch} has no stochastic depth (only {', '.join(sorted(DEFAULT_STOCHASTIC_DEPTH))})")
        if not 0.0 <= float(stochastic_depth) < 1.0:
            raise ValueError(f"{arch}: stochastic_depth must be in [0, 1), got {stochastic_depth}")
        options["stochastic_depth"] = float(stochastic_depth)
    backbone = _BUILDERS[arch](int(num_classes), int(image_size), **options)
    if pretrained or weights_path is not None:
        load_imagenet_weights(arch, backbone, weights_path)
    return ShapeClassifier(arch, backbone, num_classes, image_size)


# ---------------------------------------------------------------------------------------------
# pretrained weights (offline only)

def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision would cache ``arch``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints``)."""
    _check_arch(arch)
    weights = getattr(tvm, _TORCHVISION_WEIGHTS[arch]).DEFAULT
    filename = weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_imagenet_weights(arch: str, backbone: nn.Module, weights_path=None) -> None:
    """Copy ImageNet weights into ``backbone`` except its classifier head. Never downloads.

    The file is read with ``weights_only=True``. Swin's relative-position bias tables are
    resized bicubically when the window differs from the 7 it was trained with.
    """
    path = Path(weights_path) if weights_path is not None else imagenet_weights_file(arch)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not {arch}'s ImageNet weights file (torchvision "
                                f"{_TORCHVISION_WEIGHTS[arch]}.DEFAULT, a .pth file)")
    if not path.is_file():
        raise FileNotFoundError(
            f"--pretrained needs torchvision's ImageNet weights for {arch}, but {path} is missing. "
            f"Copy that file there from a machine with internet (torchvision "
            f"{_TORCHVISION_WEIGHTS[arch]}.DEFAULT), or train from scratch without --pretrained.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's message names neither the file nor the arch
        raise ValueError(f"{path}: cannot be read as {arch}'s ImageNet weights (a truncated download, or not a "
                         f"plain state dict: refused by weights_only=True): {' '.join(str(err).split())}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    head = _HEADS[arch] + "."
    own = backbone.state_dict()
    kept = {}
    for key, value in state.items():
        if key.startswith(head) or key.endswith("relative_position_index"):
            continue
        if key not in own:
            raise ValueError(f"{path}: unexpected tensor {key!r} for {arch}; is this the right weights file?")
        if key.endswith("relative_position_bias_table") and value.shape != own[key].shape:
            value = _resize_bias_table(value, own[key].shape[0])
        if value.shape != own[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
        kept[key] = value
    # torchvision's older ImageNet files (resnet18, vgg11_bn) predate BatchNorm's num_batches_tracked
    # counter: it is no weight (with a momentum it is never read), and BatchNorm fills it in itself
    missing = [k for k in own if k not in kept and not k.startswith(head)
               and not k.endswith(("relative_position_index", "num_batches_tracked"))]
    if missing:
        raise ValueError(f"{path}: weights file lacks {len(missing)} tensors for {arch}, e.g. {missing[:3]}")
    backbone.load_state_dict(kept, strict=False)


def _resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    old, new = int(math.isqrt(table.shape[0])), int(math.isqrt(rows))
    grid = table.T.reshape(1, table.shape[1], old, old)
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], new * new).T.contiguous()
