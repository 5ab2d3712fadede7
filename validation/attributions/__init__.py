"""Attribution methods: one API, ``explain(model, x, target, method=..., layer=...)`` -> maps
(B, H, W) float32 in [0, 1] on x's device, and reusable explainers from ``get_explainer``.
See docs/attributions.md."""

from . import baselines, cam, captum_methods, guided, lafam, refine, relax, scorecam, shapley  # noqa: F401  (register)
from .base import Explainer, Explanation, LayerExplainer, ModelGuard
from .layers import STAGES, resolve_layer, resolve_layer_full, stage_names
from .postprocess import finalize, minmax
from .refine import mix_maps
from .registry import available_methods, explain, get_explainer, register

__all__ = [
    "explain", "get_explainer", "available_methods", "resolve_layer", "resolve_layer_full", "stage_names",
    "STAGES", "Explainer", "LayerExplainer", "Explanation", "ModelGuard", "register", "finalize", "minmax",
    "mix_maps",
]
