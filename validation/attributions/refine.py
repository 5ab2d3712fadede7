"""RefineCAM (RefineCAM paper, Eq. 7-9) over any layer method. At layer l:
L = minmax(mix over listed layers l' deeper than or as deep as l of L_l'), each L_l' the base
method's final map (rectified, upsampled to the input with ``interpolation``, bilinear by
default, its cells placed by ``cell_centres``, and min-max normalised).
Depth is the order in which the layers run in the forward pass, not the order given.

mix: "product" (Eq. 7, default), "geomean" (Eq. 8, N-th root of the product) or "invexp"
(Eq. 9, 1 / ln(mean exp(1 / L)), computed as 1 / (logsumexp(1 / L) - ln N) so it never
overflows; a zero in any layer gives 0).

For gradient CAMs all layers come from one forward and one backward pass.
"""

from __future__ import annotations

import math

import torch

from .base import Explainer, LayerExplainer, layer_specs
from .postprocess import minmax
from .registry import METHODS, canonical_name, register, unknown_options

MIXES = ("product", "geomean", "invexp")


def mix_maps(maps: torch.Tensor, mix: str = "product") -> torch.Tensor:
    """Combine (N, B, H, W) maps in [0, 1] into (B, H, W) (before the final min-max)."""
    if mix == "product":
        return maps.prod(dim=0)
    if mix == "geomean":
        return maps.prod(dim=0) ** (1.0 / maps.shape[0])
    if mix == "invexp":
        inv = 1.0 / maps  # 0 -> inf, and logsumexp(inf) = inf -> result 0
        return 1.0 / (torch.logsumexp(inv, dim=0) - math.log(maps.shape[0]))
    raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")


# how the base's maps are upsampled: RefineCAM's own options, which it passes to its base
UPSAMPLING_OPTIONS = ("interpolation", "cell_centres")


@register("refinecam")
class RefineCAM(Explainer):
    rectifier = None

    def __init__(self, model, *, base: str = "gradcampp", layers=("stage1", "stage2", "stage3", "stage4"),
                 layer=None, mix: str = "product", base_options: dict | None = None, **options):
        super().__init__(model, **options)
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        layers = layer_specs(layers)
        cls = METHODS[canonical_name(base)]
        if not issubclass(cls, LayerExplainer):
            raise ValueError(f"RefineCAM needs a layer method as base, {cls.name!r} is not one")
        if base_options is not None and not isinstance(base_options, dict):
            raise TypeError(f"base_options must be a dict of the base method's options, got {base_options!r}")
        base_options = dict(base_options or {})
        # RefineCAM itself upsamples and normalises the fused map: the base's own settings for
        # that would be ignored or clash, so they are refused like any unknown option
        unknown, accepted = unknown_options(cls, base_options, reserved=("layer", "raw", *UPSAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"refinecam: unknown base_options {unknown} for {cls.name}; accepted: {accepted} "
                            f"(interpolation, cell_centres and raw are RefineCAM's own options)")
        self.base = cls(model, layers[0], interpolation=self.interpolation, cell_centres=self.cell_centres,
                        **base_options)
        self.needs_gradients = self.base.needs_gradients
        self.layers = self.base.resolve(layers)
        if len({id(l.module) for l in self.layers}) != len(self.layers):
            raise ValueError("layers must be distinct modules")
        self.refined = None if layer is None else self.base.resolve([layer])[0]  # None: the shallowest
        if self.refined is not None and all(l.module is not self.refined.module for l in self.layers):
            raise ValueError(f"layer {self.refined.name!r} is not among the listed layers "
                             f"{[l.name for l in self.layers]}")
        self.mix = mix

    def _explain_raw(self, x, target, guard):
        raws, target, rank = self.base._layer_maps(x, target, self.layers, guard)
        size = tuple(x.shape[-2:])
        modules = [l.module for l in self.layers]
        l_rank = 0 if self.refined is None else rank[modules.index(self.refined.module)]
        chosen = [self.base.postprocess(raw, size, self.base.cells(layer))[0]
                  for raw, r, layer in zip(raws, rank, self.layers) if r >= l_rank]
        mixed = mix_maps(torch.stack(chosen), self.mix)
        return mixed, target, {"layers": [l.name for l, r in zip(self.layers, rank) if r >= l_rank]}

    def postprocess(self, raw, size, cells=None):  # the fused map is at the input's resolution
        if self.raw:
            return raw, torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)
        return minmax(raw)

    def __repr__(self) -> str:
        return (f"RefineCAM(base={self.base.name!r}, layers={[l.name for l in self.layers]}, "
                f"layer={self.refined.name if self.refined else 'shallowest'!r}, mix={self.mix!r})")
