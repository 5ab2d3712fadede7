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

LayerSpec = Union[str, nn.Module]
STAGES = ("stage1", "stage2", "stage3", "stage4")


@dataclass(frozen=True)
class Layer:
    """A resolved layer: the module, a readable name and the layout of its output."""

    module: nn.Module
    name: str
    channels_last: bool = False  # Swin-T stages emit (B, H, W, C)


def _resnet_stages(net: nn.Module) -> list[str]:
    return ["layer1", "layer2", "layer3", "layer4"]


def _vgg_stages(net: nn.Module) -> list[str]:
    # stage ends are the max-pools after the first (vgg11: 5, 10, 15, 20; vgg11_bn: 7, 14, 21, 28)
    pools = [f"features.{i}" for i, m in enumerate(net.features) if isinstance(m, nn.MaxPool2d)]
    return pools[-4:]


def _features_stages(net: nn.Module) -> list[str]:
    return ["features.1", "features.3", "features.5", "features.7"]


# architecture type -> (stage names inside that network, stage outputs are channels-last)
_ARCHITECTURES: dict[type, tuple[Callable[[nn.Module], list[str]], bool]] = {
    tvm.ResNet: (_resnet_stages, False),
    tvm.VGG: (_vgg_stages, False),
    tvm.SwinTransformer: (_features_stages, True),
    tvm.ConvNeXt: (_features_stages, False),
}


def _find_architecture(model: nn.Module):
    """(network, prefix, stage-name function, channels_last) of a known architecture, or None."""
    for prefix, net in (("", model), ("backbone.", getattr(model, "backbone", None))):
        if isinstance(net, nn.Module):
            for arch_type, (stages, channels_last) in _ARCHITECTURES.items():
                if isinstance(net, arch_type):
                    return net, prefix, stages, channels_last
    return None


def stage_names(model: nn.Module) -> dict[str, str]:
    """``{"stage1": "layer1", ...}`` (full dotted names) for a known architecture, else ``{}``."""
    found = _find_architecture(model)
    if found is None:
        return {}
    net, prefix, stages, _ = found
    return {alias: prefix + name for alias, name in zip(STAGES, stages(net))}


def _is_channels_last(model: nn.Module, name: str) -> bool:
    found = _find_architecture(model)
    if found is None or not found[3]:
        return False
    prefix = found[1] + "features."
    return name.startswith(prefix)


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def resolve_layer_full(model: nn.Module, layer: LayerSpec, channels_last: bool | None = None) -> Layer:
    """Resolve a layer spec to a :class:`Layer` (module, name, output layout)."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                cl = _is_channels_last(model, name) if channels_last is None else channels_last
                return Layer(module, name or "<model>", cl)
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
            return Layer(modules[candidate], candidate, cl)
    names = _module_names(model)
    shown = names if len(names) <= 60 else names[:60] + [f"... ({len(names) - 60} more)"]
    alias_text = (", ".join(f"{a} -> {n}" for a, n in aliases.items())
                  if aliases else "none (architecture not recognised)")
    raise ValueError(
        f"unknown layer {layer!r}. Stage aliases: {alias_text}. Module names: {', '.join(shown)}")


def resolve_layer(model: nn.Module, layer: LayerSpec) -> nn.Module:
    """The module a layer spec names: ``resolve_layer(model, "stage1")`` -> ``model.backbone.layer1``."""
    return resolve_layer_full(model, layer).module
