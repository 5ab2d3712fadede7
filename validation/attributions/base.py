"""What every method shares: input and target checks, model-state restoration, activation
capture at several layers in one forward pass, and post-processing of raw maps."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .._layout import fast_layout
from .._model_input import nonfinite_samples, raise_for_failed_forward
from .layers import STAGES, CellGeometry, Layer, LayerSpec, resolve_layer_full
from .postprocess import INTERPOLATIONS, finalize


@dataclass
class Explanation:
    """Maps (B, H, W) float32 in [0, 1]; ``degenerate`` (B,) flags constant or non-finite raw
    maps (returned as zeros); ``target`` the classes explained; ``extras`` method-specific
    tensors (e.g. RELAX uncertainty)."""

    maps: torch.Tensor
    degenerate: torch.Tensor
    target: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# checks

def check_input(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor of images in [0, 1], got dtype {x.dtype}")
    # NaN or Inf pixels made every method's raw map non-finite: returned as silent all-zero maps
    bad = nonfinite_samples(x.detach())
    if bad:
        raise ValueError(f"x: image(s) {bad} contain NaN or Inf")
    return fast_layout(x.detach())


def _finite_real(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)  # an int too large for a float is finite


def option_int(name: str, value: Any, minimum: int = 1) -> int:
    """A method's integer option, at least ``minimum``; ValueError naming the option otherwise
    (bools, strings, NaN, infinities and floats with a fraction included)."""
    # finite first: int() of an infinity or NaN raises its own error, which names no option
    if not _finite_real(value) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def option_number(name: str, value: Any) -> float:
    """A method's finite real-valued option; ValueError naming the option otherwise."""
    if not _finite_real(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def option_bool(name: str, value: Any, none: bool = False) -> bool | None:
    """A method's on/off option: True or False (also 0/1 and numpy bools; None where ``none``);
    ValueError naming the option otherwise (a string such as "false" would be truthy)."""
    if (none and value is None) or (not isinstance(value, str) and value is not None and value in (True, False)):
        return None if value is None else bool(value)
    raise ValueError(f"{name} must be {'None, ' if none else ''}True or False, got {value!r}")


def as_target(target: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """int, sequence or tensor -> LongTensor (B,) on ``device``; None stays None (= predicted)."""
    if target is None:
        return None
    try:
        t = torch.as_tensor(target, device=device)
    except (TypeError, RuntimeError, ValueError):  # torch's "new(): invalid data type 'str'" names nothing
        raise TypeError(f"target must hold integer class indices, got {target!r:.80}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.ndim == 0:
        return t.expand(batch).clone()
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"target must be an int or have one entry per image: expected shape ({batch},), "
                         f"got {tuple(t.shape)}")
    return t


def resolve_target(target: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Check the range of ``target`` against the logits; None -> the predicted classes."""
    if target is None:
        return logits.detach().argmax(dim=1)
    k = logits.shape[1]
    bad = (target < 0) | (target >= k)
    if bool(bad.any()):
        raise ValueError(f"target out of range: the model has {k} classes, got "
                         f"{sorted(set(target[bad].tolist()))} at positions {bad.nonzero().flatten().tolist()}")
    return target


SCORES = ("logit", "softmax", "log_softmax", "rest")


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")
    return score


def class_score(logits: torch.Tensor, target: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Per-sample scalar explained: the class logit (default), its softmax probability, its
    log-probability, or ShapleyCAM's ReST (logit - cross-entropy)."""
    check_score(score)
    rows = torch.arange(logits.shape[0], device=logits.device)
    if score == "logit":
        return logits[rows, target]
    if score == "softmax":
        return logits.softmax(dim=1)[rows, target]
    if score == "log_softmax":
        return logits.log_softmax(dim=1)[rows, target]
    return logits[rows, target] + logits.log_softmax(dim=1)[rows, target]  # rest


# ---------------------------------------------------------------------------------------------
# model state

class ModelGuard:
    """Puts the model in eval mode and undoes everything in ``__exit__``, also on error:
    training flags of every module, ``requires_grad`` of every parameter, hooks registered
    through the guard, and modules swapped through it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list = []
        self._swaps: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> "ModelGuard":
        self._training = [(m, m.training) for m in self.model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        try:
            for handle in reversed(self._handles):
                handle.remove()
            for parent, name, original in reversed(self._swaps):
                parent._modules[name] = original
        finally:
            for module, training in self._training:
                module.training = training
            for param, flag in self._requires_grad:
                param.requires_grad_(flag)
            self._handles.clear()
            self._swaps.clear()

    def register(self, handle) -> None:
        self._handles.append(handle)

    def swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self._swaps.append((parent, name, parent._modules[name]))
        parent._modules[name] = new

    def capture(self, layers: Sequence[Layer], stop_early: bool = False) -> "Capture":
        return Capture(self, layers, stop_early)


class StopForward(Exception):
    """Raised by a capture with ``stop_early`` once every layer has fired: the rest of the
    forward pass is not needed."""


class Capture:
    """Records the outputs of several layers during one forward pass (graph kept), and the
    order in which they fired (shallow to deep); the rest of the pass runs on a copy of each
    recorded output, so an in-place op after a layer leaves it intact. With ``stop_early`` only
    the first output of each layer is kept and the forward pass is cut short (``StopForward``)
    as soon as every layer has fired; run it through ``forward``."""

    def __init__(self, guard: ModelGuard, layers: Sequence[Layer], stop_early: bool = False):
        self.stop_early = stop_early
        self.layers = list(layers)
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.order: list[int] = []
        self.enabled = True  # switch off for extra forward passes that must not be recorded
        for i, layer in enumerate(self.layers):
            guard.register(layer.module.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, args, output):
            if not self.enabled:
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {self.layers[i].name!r} returned {type(output).__name__}, "
                                f"not a tensor; choose a layer that outputs a feature map")
            if self.stop_early and self.outputs[i]:
                return  # a module that runs again before a deeper layer fires: its first output counts
            self.outputs[i].append(output)
            self.order.append(i)
            if self.stop_early and all(self.outputs):
                raise StopForward
            # the rest of the forward pass gets a copy: a later in-place op (an inplace ReLU after
            # a BatchNorm, ResNet's ``out += identity``) would otherwise overwrite the captured
            # values (and rebase their gradient) with another layer's
            return output.clone()
        return hook

    def forward(self, model: nn.Module, x: torch.Tensor):
        """model(x), or None when the pass was cut short after the last captured layer."""
        try:
            return model(x)
        except StopForward:
            return None

    def reset(self) -> None:
        self.outputs = [[] for _ in self.layers]
        self.order = []

    def raw(self) -> list[torch.Tensor]:
        """The layer outputs as produced (layout untouched), one per layer."""
        out = []
        for layer, seen in zip(self.layers, self.outputs):
            if not seen:
                raise RuntimeError(f"layer {layer.name!r} was not called during the forward pass")
            if len(seen) > 1:
                raise RuntimeError(f"layer {layer.name!r} was called {len(seen)} times in one forward pass; "
                                   f"choose a module that runs once")
            out.append(seen[0])
        return out

    def depth_rank(self) -> list[int]:
        """Rank of each layer by the order its output was produced (0 = shallowest)."""
        first = {}
        for pos, i in enumerate(self.order):
            first.setdefault(i, pos)
        ranked = sorted(range(len(self.layers)), key=lambda i: first.get(i, len(self.order)))
        rank = [0] * len(self.layers)
        for r, i in enumerate(ranked):
            rank[i] = r
        return rank


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype maps are computed in: float32 for half-precision (bf16/fp16) models, whose
    sums and min-max would otherwise keep 8-11 bits; float32 and float64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def to_nchw(t: torch.Tensor, layer: Layer, size=None) -> torch.Tensor:
    """The layer output as (B, C, h, w), permuted from (B, h, w, C) for a channels-last layer,
    in :func:`compute_dtype` (half precision promoted to float32).

    With the input's ``size`` (H, W), a grid whose aspect is not the input's (beyond +-2 cells
    of stride rounding) while the other layout's grid has it is refused: the layout flag is then
    wrong, e.g. an NCHW output read as NHWC gives a (C, h) "map". A grid that fits neither
    layout (a model that resizes its input, or strides that differ between the axes) is
    taken as the flag says: its aspect says nothing about the layout."""
    if t.ndim != 4:
        raise ValueError(f"layer {layer.name!r} output has shape {tuple(t.shape)}; a 4-D feature map "
                         f"(B, C, h, w) is needed")
    out = (t.permute(0, 3, 1, 2) if layer.channels_last else t).to(compute_dtype(t.dtype))
    if size is not None:
        (h, w), (H, W) = out.shape[-2:], size
        other_h, other_w = t.shape[2:4] if layer.channels_last else t.shape[1:3]

        def fits(rows: int, cols: int) -> bool:
            return abs(rows * W - cols * H) <= 2 * (H + W)

        if not fits(h, w) and fits(other_h, other_w):
            read = "(B, h, w, C)" if layer.channels_last else "(B, C, h, w)"
            raise ValueError(f"layer {layer.name!r} output of shape {tuple(t.shape)} read as {read} is a {h}x{w} "
                             f"grid, inconsistent with the {H}x{W} input: wrong layout? pass "
                             f"channels_last={not layer.channels_last}")
    return out


def layer_gradients(score: torch.Tensor, acts: Sequence[torch.Tensor], layers: Sequence[Layer],
                    create_graph: bool = False) -> list[torch.Tensor]:
    """d(sum score)/d(act) for every captured activation, in one backward pass."""
    if not score.requires_grad:
        raise RuntimeError("the model output has no gradient path (forward under torch.no_grad, "
                           "or detached outputs?); gradient methods need a differentiable model")
    grads = torch.autograd.grad(score.sum(), list(acts), create_graph=create_graph,
                                retain_graph=create_graph, allow_unused=True)
    for g, layer in zip(grads, layers):
        if g is None:
            raise RuntimeError(f"no gradient path from layer {layer.name!r} to the model output")
    return list(grads)


def layer_specs(layers: Any) -> list:
    """Several layer specs as a list: a non-empty sequence (an ``nn.ModuleList`` included); a
    single spec is refused."""
    one = isinstance(layers, str) or (isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList))
    specs = None if one or not isinstance(layers, Iterable) else list(layers)
    if not specs:  # a bare string would otherwise be read as one layer per character
        raise ValueError(f"layers must be a non-empty sequence of layer specs (e.g. [\"stage1\", \"stage2\"]), "
                         f"got {layers!r}")
    return specs


# ---------------------------------------------------------------------------------------------
# explainers

CELL_CENTRES = ("stride", "model")


class Explainer:
    """Base of every method: ``attribute(x, target)`` -> maps (B, H, W) in [0, 1] on x's device.

    Options shared by every method: ``interpolation`` ("bilinear" or "nearest"), ``raw``
    (return the method's raw map: no rectification, no upsampling, no normalisation) and
    ``cell_centres``: "stride" (default) stretches a layer's grid over the image, centring cell i
    of a stride-S grid at pixel S i + (S - 1) / 2; "model" centres it where the model does (see
    :class:`~validation.attributions.layers.CellGeometry`; refused for a layer whose geometry is
    not declared). Methods without a layer map at the input's resolution: there it has no effect.
    """

    name = "explainer"
    rectifier: str | None = "relu"
    uses_layer = False
    # keyword inputs that ``attribute`` takes per call (the oracle's ``gt``); any other is refused
    call_inputs: tuple[str, ...] = ()
    # whether the method backpropagates: torch.inference_mode() forbids that, and unlike
    # torch.no_grad it cannot be lifted by the torch.enable_grad() the methods run under
    needs_gradients = False

    def __init__(self, model: nn.Module, *, interpolation: str = "bilinear", raw: bool = False,
                 cell_centres: str = "stride"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if cell_centres not in CELL_CENTRES:
            raise ValueError(f"cell_centres must be one of {CELL_CENTRES}, got {cell_centres!r}")
        self.model = model
        self.interpolation = interpolation
        self.raw = option_bool("raw", raw)
        self.cell_centres = cell_centres

    # subclasses implement: raw maps (B, h, w), resolved target (or None), extras; ``inputs`` are
    # the per-call inputs named in ``call_inputs``
    def _explain_raw(self, x: torch.Tensor, target: torch.Tensor | None, guard: ModelGuard, **inputs):
        raise NotImplementedError

    def check_grad_mode(self) -> None:
        if self.needs_gradients and torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name} needs gradients, which torch.inference_mode() disables (torch.enable_grad "
                               f"cannot turn them back on inside it): call it outside inference mode "
                               f"(under torch.no_grad() is fine)")

    def explain(self, x: torch.Tensor, target: Any = None, **inputs) -> Explanation:
        unknown = sorted(set(inputs) - set(self.call_inputs))
        if unknown:
            takes = f"takes only the per-call input(s) {list(self.call_inputs)}" if self.call_inputs else \
                "takes no per-call inputs"
            raise TypeError(f"{self.name} {takes}, got {unknown}")
        self.check_grad_mode()
        x = check_input(x)
        target = as_target(target, x.shape[0], x.device)
        raw, target, extras = self.guarded(x, lambda guard: self._explain_raw(x, target, guard, **inputs))
        maps, degenerate = self.postprocess(raw, tuple(x.shape[-2:]))
        return Explanation(maps.float(), degenerate, target, extras)

    def guarded(self, x: torch.Tensor, run):
        """``run(guard)`` inside a :class:`ModelGuard`; a forward that fails on the images ``x``
        (their dtype, their size) raises an error naming them instead of torch's."""
        with ModelGuard(self.model) as guard:
            try:
                return run(guard)
            except RuntimeError as error:
                raise_for_failed_forward(self.model, x, error)
                raise

    def postprocess(self, raw: torch.Tensor, size, cells: CellGeometry | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rectified, upsampled (cells placed by ``cells``: see :meth:`LayerExplainer.cells`) and
        min-maxed maps, or the raw maps with ``raw``."""
        if self.raw:
            return raw.detach(), torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)
        maps, degenerate = finalize(raw.detach().to(compute_dtype(raw.dtype)), size, rectifier=self.rectifier,
                                    interpolation=self.interpolation, cells=cells)
        return maps, degenerate

    def attribute(self, inputs: torch.Tensor, target: Any = None, **per_call) -> torch.Tensor:
        """Maps (B, H, W) for ``inputs`` (B, C, H, W); the first argument is named as in captum."""
        return self.explain(inputs, target, **per_call).maps

    __call__ = attribute

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={type(self.model).__name__})"


class LayerExplainer(Explainer):
    """A method computed from the activations of one layer (CAMs, LaFAM). ``layer_maps`` gives
    the raw maps at several layers, sharing the forward (and backward) pass where it can."""

    uses_layer = True

    def __init__(self, model: nn.Module, layer: LayerSpec = "stage1", *, channels_last: bool | None = None,
                 **options):
        super().__init__(model, **options)
        self.channels_last = option_bool("channels_last", channels_last, none=True)
        self.layer = self.resolve([layer])[0]

    def resolve(self, layers: Sequence[LayerSpec]) -> list[Layer]:
        """The layers, each with its cell geometry, which ``cell_centres="model"`` requires."""
        resolved = [resolve_layer_full(self.model, spec, self.channels_last) for spec in layer_specs(layers)]
        if self.cell_centres == "model":
            for layer in resolved:
                if layer.cells is None:
                    raise ValueError(
                        f"cell_centres='model': where the cells of layer {layer.name!r} are centred is not "
                        f"declared (it is for the stages {', '.join(STAGES)} of ResNet, VGG, ConvNeXt and "
                        f"Swin-T); use cell_centres='stride' (the default) for this layer")
        return resolved

    def cells(self, layer: Layer) -> CellGeometry | None:
        """Where upsampling puts ``layer``'s cells: its geometry with ``cell_centres="model"``, None
        (stretch-to-fit) otherwise."""
        return layer.cells if self.cell_centres == "model" else None

    # subclasses implement: list of raw maps (B, h, w) per layer, target, depth ranks
    def _layer_maps(self, x, target, layers: list[Layer], guard: ModelGuard):
        raise NotImplementedError

    def layer_maps(self, x: torch.Tensor, target: Any, layers: Sequence[LayerSpec]):
        """Raw maps at every layer of ``layers`` -> (list of (B, h, w), target, depth ranks)."""
        return self._resolved_layer_maps(x, target, self.resolve(layers))

    def _resolved_layer_maps(self, x: torch.Tensor, target: Any, layers: list[Layer]):
        self.check_grad_mode()
        x = check_input(x)
        target = as_target(target, x.shape[0], x.device)
        return self.guarded(x, lambda guard: self._layer_maps(x, target, layers, guard))

    def explain_layers(self, x: torch.Tensor, target: Any, layers: Sequence[LayerSpec]) -> list[Explanation]:
        """One :class:`Explanation` per layer, all from a shared pass."""
        resolved = self.resolve(layers)
        raws, target, _ = self._resolved_layer_maps(x, target, resolved)
        out = []
        for raw, layer in zip(raws, resolved):
            maps, degenerate = self.postprocess(raw, tuple(x.shape[-2:]), self.cells(layer))
            out.append(Explanation(maps.float(), degenerate, target, {}))
        return out

    def postprocess(self, raw: torch.Tensor, size, cells: CellGeometry | None = None):
        """As :meth:`Explainer.postprocess`, for this explainer's layer unless ``cells`` is given."""
        return super().postprocess(raw, size, self.cells(self.layer) if cells is None else cells)

    def _explain_raw(self, x, target, guard):
        raws, target, _ = self._layer_maps(x, target, [self.layer], guard)
        return raws[0], target, {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer.name!r})"
