"""One registry of methods: ``@register("gradcam")`` on a class, ``get_explainer("gradcam", model)``."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .base import Explainer

METHODS: dict[str, type[Explainer]] = {}
ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str):
    def deco(cls: type[Explainer]) -> type[Explainer]:
        if name in METHODS or name in ALIASES:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        for alias in aliases:
            ALIASES[alias] = name
        return cls
    return deco


def available_methods() -> list[str]:
    """Registered method names (aliases such as "gradcam++" resolve to these)."""
    return sorted(METHODS)


def canonical_name(method: str) -> str:
    key = method.lower().replace("-", "").replace("_", "") if isinstance(method, str) else method
    for name in METHODS:
        if name == key:
            return name
    for alias, name in ALIASES.items():
        if alias == method or alias.replace("-", "").replace("_", "") == key:
            return name
    raise ValueError(f"unknown method {method!r}; available: {', '.join(available_methods())}")


def _accepted_options(cls: type) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(vars(klass)["__init__"]).parameters
            names |= {p for p, v in params.items()
                      if p not in ("self", "model") and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return names


def unknown_options(cls: type, options, reserved=()) -> tuple[list[str], list[str]]:
    """(the ``options`` that ``cls`` does not take, the ones it takes), both sorted; ``reserved``
    options count as not taken."""
    accepted = _accepted_options(cls) - set(reserved)
    return sorted(set(options) - accepted), sorted(accepted)


def get_explainer(method: str, model: nn.Module, **options: Any) -> Explainer:
    """Build a reusable explainer: ``get_explainer("gradcampp", model, layer="stage2")``."""
    cls = METHODS[canonical_name(method)]
    unknown, accepted = unknown_options(cls, options)
    if unknown:
        raise TypeError(f"{cls.name}: unknown option(s) {unknown}; accepted: {accepted}")
    return cls(model, **options)


def explain(model: nn.Module, x: torch.Tensor, target: Any = None, method: str = "gradcam",
            layer: Any = None, **options: Any) -> torch.Tensor:
    """Maps (B, H, W) float32 in [0, 1] on x's device. ``target``: int, sequence or LongTensor (B,);
    None explains the predicted class. ``layer``: for layer methods (default "stage1"); for
    RefineCAM the layer refined (default: the shallowest listed); ignored by other methods.
    Per-call inputs (``gt=`` for the oracle) are passed through to ``attribute``."""
    per_call = {k: options.pop(k) for k in ("gt",) if k in options}
    cls = METHODS[canonical_name(method)]
    if "layer" in _accepted_options(cls):
        if layer is not None:
            options["layer"] = layer
        elif cls.uses_layer:
            options["layer"] = "stage1"
    return get_explainer(method, model, **options).attribute(x, target, **per_call)
