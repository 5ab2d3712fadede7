"""Layer registry: ``stage1``..``stage4`` for the four reference architectures, any module otherwise.

A layer spec is a stage alias (``"stage1"``), a dotted module name (``"layer3.1.conv2"``,
``"backbone.features.5"``), or an ``nn.Module`` of the model. Models wrapped with a
``.backbone`` (the trainers contract) resolve names against the wrapper first, then the
backbone. Architectures are recognised by module type, not by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from torch import nn
from torchvision import models as tvm
from torchvision.ops.misc import Permute

LayerSpec = Union[str, nn.Module]
STAGES = ("stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class CellGeometry:
    """Where the model centres the cells of a layer's grid: cell i (on either axis) at input pixel
    ``stride * i + first_centre``, whatever the image size."""

    stride: int
    first_centre: float  # pixel of cell 0's centre: (stride - 1) / 2 for a patch, 0 for ResNet


@dataclass(frozen=True)
class Layer:
    """A resolved layer: the module, a readable name, the layout of its output and, for a
    reference architecture's stage, where the model centres its cells (None: not declared)."""

    module: nn.Module
    name: str
    channels_last: bool = False  # output is (B, H, W, C), e.g. Swin-T stages
    cells: CellGeometry | None = None


STAGE_STRIDES = (4, 8, 16, 32)  # every reference architecture's stage1..stage4


def _patch_centre(stride: int) -> float:
    """Cell i covers pixels S i .. S i + S - 1 (stride-S patches, 2x2 pools or merges of them)."""
    return (stride - 1) / 2


def _resnet_centre(stride: int) -> float:
    """torchvision's ResNet pads its strided convolutions and max-pool symmetrically (7x7 pad 3,
    3x3 pad 1, 1x1 pad 0): each halving centres output j on input 2 j, so cell i on pixel S i."""
    return 0.0


def _resnet_stages(net: nn.Module) -> list[str]:
    return ["layer1", "layer2", "layer3", "layer4"]


def _vgg_stages(net: nn.Module) -> list[str]:
    # stage ends are the max-pools after the first (vgg11: 5, 10, 15, 20; vgg11_bn: 7, 14, 21, 28)
    pools = [f"features.{i}" for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
    return pools[-4:]


def _features_stages(net: nn.Module) -> list[str]:
    return ["features.1", "features.3", "features.5", "features.7"]


# architecture type -> stage names inside that network
_ARCHITECTURES: dict[type, Callable[[nn.Module], list[str]]] = {
    tvm.ResNet: _resnet_stages,
    tvm.VGG: _vgg_stages,
    tvm.SwinTransformer: _features_stages,
    tvm.ConvNeXt: _features_stages,
}
# architecture type -> pixel of cell 0's centre at a stage of stride S (tests/test_reference_alignment.py
# measures each from the model's gradients)
_CELL_CENTRES: dict[type, Callable[[int], float]] = {
    tvm.ResNet: _resnet_centre,
    tvm.VGG: _patch_centre,
    tvm.SwinTransformer: _patch_centre,
    tvm.ConvNeXt: _patch_centre,
}


def _find_architecture(model: nn.Module):
    """(network, prefix, stage-name function) of a known architecture, or None."""
    for prefix, net in (("", model), ("backbone.", getattr(model, "backbone", None))):
        if isinstance(net, nn.Module):
            for arch_type, stages in _ARCHITECTURES.items():
                if isinstance(net, arch_type):
                    return net, prefix, stages
    return None


def stage_names(model: nn.Module) -> dict[str, str]:
    """``{"stage1": "layer1", ...}`` (full dotted names) for a known architecture, else ``{}``."""
    found = _find_architecture(model)
    if found is None:
        return {}
    net, prefix, stages = found
    return {alias: prefix + name for alias, name in zip(STAGES, stages(net))}


def stage_cells(model: nn.Module) -> dict[str, CellGeometry]:
    """Full dotted stage name -> where the model centres that stage's cells; ``{}`` for an
    architecture not recognised."""
    found = _find_architecture(model)
    if found is None:
        return {}
    net, prefix, stages = found
    centre = next(rule for arch_type, rule in _CELL_CENTRES.items() if isinstance(net, arch_type))
    return {prefix + name: CellGeometry(stride, centre(stride)) for name, stride in zip(stages(net), STAGE_STRIDES)}


def _is_channels_last(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` outputs (B, H, W, C). torchvision switches layouts with ``Permute``
    modules (Swin-T: after the patch-embedding conv ``features.0.0``, and back after the final
    ``norm``; ConvNeXt: around each block's MLP) and registers submodules in the order they run,
    so a module's output has the layout set by the last Permute that ends before it does."""
    channels_last, layout = False, {}

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal channels_last
        for child_name, child in module.named_children():
            visit(prefix + child_name + ".", child)
        if isinstance(module, Permute) and list(module.dims) in ([0, 2, 3, 1], [0, 3, 1, 2]):
            channels_last = list(module.dims) == [0, 2, 3, 1]
        layout[prefix[:-1]] = channels_last

    visit("", model)
    return layout[name]


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def resolve_layer_full(model: nn.Module, layer: LayerSpec, channels_last: bool | None = None) -> Layer:
    """Resolve a layer spec to a :class:`Layer` (module, name, output layout, cell geometry)."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                cl = _is_channels_last(model, name) if channels_last is None else channels_last
                return Layer(module, name or "<model>", cl, stage_cells(model).get(name))
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a stage name, a module name or an nn.Module, got {type(layer).__name__}")
    aliases = stage_names(model)
    name = aliases.get(layer, layer)
    candidates = [name]
    if hasattr(model, "backbone") and not name.startswith("backbone."):
        candidates.append("backbone." + name)
    modules = dict(model.named_modules())
    for candidate in candidates:
        if candidate in modules and candidate:
            cl = _is_channels_last(model, candidate) if channels_last is None else channels_last
            return Layer(modules[candidate], candidate, cl, stage_cells(model).get(candidate))
    names = _module_names(model)
    shown = names if len(names) <= 60 else names[:60] + [f"... ({len(names) - 60} more)"]
    alias_text = (", ".join(f"{a} -> {n}" for a, n in aliases.items())
                  if aliases else "none (architecture not recognised)")
    raise ValueError(
        f"unknown layer {layer!r}. Stage aliases: {alias_text}. Module names: {', '.join(shown)}")


def resolve_layer(model: nn.Module, layer: LayerSpec) -> nn.Module:
    """The module a layer spec names: ``resolve_layer(model, "stage1")`` -> ``model.backbone.layer1``."""
    return resolve_layer_full(model, layer).module
