"""Input checks and NaN-with-reason bookkeeping shared by every metric."""
from __future__ import annotations

import math
import numbers

import torch

# Reason codes carried next to NaN values (one string per sample; "" when the value is defined).
CONSTANT_MAP = "constant_map"
ZERO_MAP = "zero_map"
EMPTY_MASK = "empty_mask"
FULL_MASK = "full_mask"
CONSTANT_RECOMPUTED_MAP = "constant_recomputed_map"
ZERO_PROBABILITY = "zero_probability"

# Maps may exceed [0, 1] by this much (float noise of a min-max normalisation); they are clamped.
RANGE_TOLERANCE = 1e-6


def _bad_samples(flags: torch.Tensor) -> list[int]:
    return flags.nonzero().flatten().tolist()


def check_maps(maps: torch.Tensor, name: str = "maps", *, shape=None, device=None) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) floating maps in [0, 1] -> (B, H, W); clear errors otherwise.
    ``shape`` and ``device``: those of the maps the tensor goes with (for ``gt``)."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(maps.shape)}")
    if shape is not None and tuple(maps.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(maps.shape)} does not match the expected (B, H, W) = {tuple(shape)}")
    if device is not None and maps.device != device:  # torch's own error names neither tensor
        raise ValueError(f"{name} is on {maps.device} but the maps are on {device}: pass {name}.to(maps.device)")
    if maps.shape[0] and not maps.shape[1] * maps.shape[2]:  # torch's aminmax error names no tensor
        raise ValueError(f"{name} has no pixels: shape {tuple(maps.shape)}")
    if maps.is_complex():  # .float() would drop the imaginary part with only a warning
        raise TypeError(f"{name} must be real-valued, got {maps.dtype}")
    if maps.dtype not in (torch.float32, torch.float64):  # integer and half maps: computed in float32
        maps = maps.float()
    # a 0/255 mask read from a PNG is the usual way masks go out of range, not a missing min-max
    hint = (" (masks are 0/1 or soft alpha masks in [0, 1]: divide 0-255 masks by 255)" if name == "gt"
            else " (normalise each map per sample first)")
    lo, hi = _finite_in_unit_range(maps, name, hint)
    if bool((lo < 0).any() or (hi > 1).any()):
        maps = maps.clamp(0, 1)
    return maps


def check_images(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():  # uint8 images would fail inside the model, or truncate ROAD's imputation
        raise TypeError(f"x must be floating point images in [0, 1], got {x.dtype} (for 0-255 images "
                        "pass x.float() / 255)")
    if (x.shape[0], *x.shape[-2:]) != tuple(maps.shape):
        upsample = (" (the maps must have the images' resolution: upsample them first, e.g. "
                    "F.interpolate(maps[:, None], size=x.shape[-2:], mode='bilinear')[:, 0])"
                    if x.shape[0] == maps.shape[0] else "")
        raise ValueError(f"x shape {tuple(x.shape)} does not match maps shape {tuple(maps.shape)} "
                         f"(need the same batch size and H, W){upsample}")
    if x.device != maps.device:  # torch's own error, deep inside, names neither tensor
        raise ValueError(f"x is on {x.device} but maps on {maps.device}: pass both on one device, "
                         "e.g. maps.to(x.device)")
    # normalised images (ImageNet mean/std: about [-2.1, 2.6]) would be normalised twice by the
    # model and the ROAD noise would be on the wrong scale: a common, otherwise silent mistake
    _finite_in_unit_range(x, "x", ": the metrics take images in [0, 1] and the model normalises them "
                                  "(pass the images before normalisation)")
    return x


def _finite_in_unit_range(values: torch.Tensor, name: str, hint: str):
    """Per-sample (min, max) of values (B, ...); ValueError naming the samples with NaN or Inf,
    then those outside [0, 1] beyond RANGE_TOLERANCE (``hint`` is appended to that message)."""
    lo, hi = values.flatten(1).aminmax(dim=1)  # NaN and Inf propagate into the extremes
    bad = _bad_samples(~(torch.isfinite(lo) & torch.isfinite(hi)))
    if bad:
        raise ValueError(f"{name}: sample(s) {bad} contain NaN or Inf")
    out_of_range = _bad_samples((lo < -RANGE_TOLERANCE) | (hi > 1 + RANGE_TOLERANCE))
    if out_of_range:
        raise ValueError(f"{name}: sample(s) {out_of_range} have values outside [0, 1]{hint}")
    return lo, hi


def check_int(name: str, value, minimum: int | None = None) -> int:
    """An integer option (Python, numpy or 0-d torch integer; a float with no fraction) as an int,
    at least ``minimum``; ValueError naming the option otherwise. A float with a fraction was
    truncated or failed inside ``range`` (naming no option), NaN passed a ``< 1`` check, and a
    fractional seed reached ``manual_seed``'s RuntimeError."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = value.item()
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and (isinstance(value, numbers.Integral) or (math.isfinite(value) and int(value) == value)))
    if not ok:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_target(target, batch: int, device) -> torch.Tensor:
    if isinstance(target, (list, tuple)) and not target:  # torch.as_tensor([]) is float32
        target = torch.zeros(0, dtype=torch.long)
    try:
        target = torch.as_tensor(target, device=device)
    except (TypeError, RuntimeError, ValueError):  # torch's "new(): invalid data type 'str'" names nothing
        raise TypeError(f"target must be integer class indices (an int, a sequence or a tensor), "
                        f"got {target!r:.80}") from None
    if target.ndim == 0:
        target = target.expand(batch)
    integer = not (target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool)
    if target.shape != (batch,) or not integer:  # any integer dtype (int8 too), as the attribution methods take
        raise ValueError(f"target must be an integer tensor of shape ({batch},), got "
                         f"{tuple(target.shape)} {target.dtype}")
    return target.long()


def check_num_classes(target: torch.Tensor, num_classes: int) -> None:
    bad = _bad_samples((target < 0) | (target >= num_classes))
    if bad:
        raise ValueError(f"target: sample(s) {bad} have a class outside [0, {num_classes})")


def finish(values: torch.Tensor, undefined: list[tuple[str, torch.Tensor]], return_reasons: bool):
    """Set NaN where a condition holds; the first matching reason names it.

    Returns ``values`` or ``(values, reasons)`` with one reason string per sample ("" if defined).
    """
    for _, flags in undefined:
        values = torch.where(flags, torch.full_like(values, float("nan")), values)
    if not return_reasons:
        return values
    reasons = [""] * values.shape[0]
    for reason, flags in undefined:
        for i in _bad_samples(flags):
            if not reasons[i]:
                reasons[i] = reason
    nan_left = _bad_samples(torch.isnan(values))
    for i in nan_left:  # NaN that came in through a part (e.g. ADCC from Coherency) keeps a reason
        if not reasons[i]:
            reasons[i] = "nan"
    return values, reasons


def eval_forward(model: torch.nn.Module):
    """Context manager: model in eval mode, training flags restored afterwards."""
    return _EvalMode(model)


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, mode in self.modes:
            module.training = mode
        return False
