"""Average Drop, Complexity, Coherency and their harmonic means ADCC and ARCC (per sample).

    AD   = max(0, Y - O) / Y,  Y = p_c(X), O = p_c(X * L)      (in [0, 1]; x100 only for display)
    Cmx  = mean_p L_p
    Chn  = (pearson(L, M(X * L)) + 1) / 2                       (M = the same method, recomputed)
    ADCC = 3 / (1/Chn + 1/(1 - Cmx) + 1/(1 - AD))
    ARCC = 3 / (1/Chn + 1/(1 - Cmx) + 1/ROAD+),  ROAD+ = clip(ROAD, 0, 1)

Average Drop divides by Y as in Chattopadhay et al. and the paper's code (its printed formula
divides by O). Complexity is the mean, not the printed L1 norm, and Coherency r is mapped to
[0, 1], so that 1 - Cmx and Chn are valid harmonic-mean parts (docs/metrics.md). Harmonic means
clip every part to [0, 1] and are 0 when any part is 0.
"""
from __future__ import annotations


import torch

from ._checks import (CONSTANT_MAP, CONSTANT_RECOMPUTED_MAP, ZERO_PROBABILITY, check_images,
                      check_maps, check_target, eval_forward, finish)
from ._forward import class_probabilities
from .road import road as _road, score_reasons

__all__ = ["average_drop", "complexity", "coherency", "adcc", "arcc", "harmonic_mean",
           "average_drop_from_probabilities", "recompute_maps"]


def average_drop_from_probabilities(base: torch.Tensor, masked: torch.Tensor, *, return_reasons: bool = False):
    """AD from Y = p_c(X) and O = p_c(X * L); NaN (zero_probability) where Y == 0."""
    zero = base <= 0
    drop = (base - masked).clamp_min(0) / torch.where(zero, torch.ones_like(base), base)
    return finish(drop.clamp(0, 1), [(ZERO_PROBABILITY, zero)], return_reasons)


def average_drop(model: torch.nn.Module, x: torch.Tensor, target, maps: torch.Tensor, *,
                 batch_size: int = 64, bf16: bool = False, return_reasons: bool = False):
    """Average Drop per sample in [0, 1] (lower is better); both forwards in one batch."""
    maps = check_maps(maps)
    x = check_images(x, maps)
    target = check_target(target, x.shape[0], x.device)
    probs = class_probabilities(model, torch.cat([x, x * maps[:, None].to(x.dtype)]), target.repeat(2),
                                batch_size=batch_size, bf16=bf16, sample_target=target)
    base, masked = probs.chunk(2)
    return average_drop_from_probabilities(base, masked, return_reasons=return_reasons)


def complexity(maps: torch.Tensor, *, return_reasons: bool = False):
    """Mean of L per sample, in [0, 1] (lower is better); 0 for all-zero maps, 1 for all-one.

    Always defined: with ``return_reasons=True`` the reasons are all "".
    """
    return finish(check_maps(maps).flatten(1).mean(1), [], return_reasons)


def pearson(a: torch.Tensor, b: torch.Tensor):
    """Per-sample Pearson r of flattened (B, ...) tensors, float64; also the zero-variance flags."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    # constant rows by an exact test: a float64 mean of equal values can be off by an ulp, which
    # left ~1e-17 deviations and a silent r ~ 0 (Coherency 0.5) for e.g. a float64 map of 0.1
    flat_a, flat_b = a.amax(1) == a.amin(1), b.amax(1) == b.amin(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    flat_a, flat_b = flat_a | (na <= 0), flat_b | (nb <= 0)
    r = (a * b).sum(1) / (na * nb).where(~(flat_a | flat_b), torch.ones_like(na))
    return r.clamp(-1, 1), flat_a, flat_b


def recompute_maps(explainer, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Run an explainer (object with ``.attribute(x, target)`` or a callable) -> (B, H, W)."""
    attribute = getattr(explainer, "attribute", None)
    if attribute is None:
        if not callable(explainer):
            raise TypeError("explainer must have .attribute(x, target) or be a callable (x, target) -> maps")
        attribute = explainer
    return _checked_recomputed(attribute(x, target), x, "explainer returned")


def _checked_recomputed(maps, x: torch.Tensor, source: str) -> torch.Tensor:
    """M(X * L) as (B, H, W): any real values (Pearson is scale-free), clear errors otherwise."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{source} {type(maps).__name__}, expected a (B, H, W) torch.Tensor")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if tuple(maps.shape) != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"{source} maps of shape {tuple(maps.shape)}, expected {(x.shape[0], *x.shape[-2:])}")
    if maps.device != x.device:  # e.g. a callable that returns CPU maps for CUDA images
        raise ValueError(f"{source} maps on {maps.device} for images on {x.device}: return them on the "
                         "images' device")
    bad = (~torch.isfinite(maps.flatten(1)).all(1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{source} NaN or Inf maps for sample(s) {bad} (on X * L)")
    return maps


def coherency(x: torch.Tensor, target, maps: torch.Tensor, explainer, *, recomputed: torch.Tensor | None = None,
              return_reasons: bool = False):
    """(pearson(L, M(X * L)) + 1) / 2 per sample, in [0, 1] (higher is better).

    ``explainer`` recomputes the whole method (RefineCAM included) on X * L. NaN with reason
    ``constant_map`` when L is constant, ``constant_recomputed_map`` when M(X * L) is.
    ``recomputed`` skips the explainer call when the maps on X * L are already known.
    """
    maps = check_maps(maps)
    x = check_images(x, maps)
    target = check_target(target, x.shape[0], x.device)
    if recomputed is None and not x.shape[0]:
        recomputed = maps  # an empty batch: nothing to recompute (the methods refuse empty input)
    elif recomputed is None:
        recomputed = recompute_maps(explainer, x * maps[:, None].to(x.dtype), target)
    else:
        recomputed = _checked_recomputed(recomputed, x, "recomputed:")
    r, flat_l, flat_m = pearson(maps, recomputed)
    value = ((r + 1) / 2).to(maps.dtype)
    return finish(value, [(CONSTANT_MAP, flat_l), (CONSTANT_RECOMPUTED_MAP, flat_m)], return_reasons)


def harmonic_mean(*parts: torch.Tensor) -> torch.Tensor:
    """n / sum(1 / part) per sample, parts clipped to [0, 1]; 0 when any part is 0; NaN propagates."""
    stacked = torch.stack([p.clamp(0, 1) for p in parts])
    zero = (stacked == 0).any(0)
    safe = torch.where(stacked == 0, torch.ones_like(stacked), stacked)
    value = len(parts) / (1 / safe).sum(0)
    return torch.where(zero & ~torch.isnan(stacked).any(0), torch.zeros_like(value), value)


def _combine(parts: dict, return_reasons: bool):
    """Harmonic mean of named (values, reasons) parts; a NaN part names itself in the reason."""
    value = harmonic_mean(*[v for v, _ in parts.values()])
    if not return_reasons:
        return value
    reasons = []
    undefined = torch.isnan(value).tolist()  # one transfer, not one sync per sample
    for i, nan in enumerate(undefined):
        why = [f"{name}:{r[i]}" for name, (v, r) in parts.items() if r[i]]
        reasons.append(";".join(why) if nan else "")
    return value, reasons


def _coherency_in_eval(model: torch.nn.Module, x: torch.Tensor, target, maps: torch.Tensor, explainer):
    """Coherency (values, reasons) with ``model`` in eval mode while the explainer runs: a user's
    callable explainer may call the model as it finds it, and in train mode BatchNorm statistics
    would move (and the recomputed maps depend on the batch). Training flags restored after."""
    with eval_forward(model):
        return coherency(x, target, maps, explainer, return_reasons=True)


def adcc(model: torch.nn.Module, x: torch.Tensor, target, maps: torch.Tensor, explainer, *,
         batch_size: int = 64, bf16: bool = False, return_reasons: bool = False):
    """ADCC = harmonic mean of Coherency, 1 - Complexity and 1 - Average Drop, in [0, 1].
    The explainer runs with the model in eval mode (training flags restored), as in ``evaluate``."""
    chn = _coherency_in_eval(model, x, target, maps, explainer)
    ad = average_drop(model, x, target, maps, batch_size=batch_size, bf16=bf16, return_reasons=True)
    cmx = complexity(maps)
    no_reason = [""] * cmx.shape[0]
    return _combine({"coherency": chn, "complexity": (1 - cmx, no_reason), "average_drop": (1 - ad[0], ad[1])},
                    return_reasons)


def arcc(model: torch.nn.Module, x: torch.Tensor, target, maps: torch.Tensor, explainer, *,
         return_reasons: bool = False, **road_options):
    """ARCC = harmonic mean of Coherency, 1 - Complexity and clip(ROAD, 0, 1), in [0, 1].
    ``road_options`` are ``road``'s (fractions, noise, seed, ...); for its curves call ``road``.
    The explainer runs with the model in eval mode (training flags restored), as in ``evaluate``."""
    if "return_curves" in road_options:
        raise TypeError("arcc returns one value per sample: call road(..., return_curves=True) for the curves")
    chn = _coherency_in_eval(model, x, target, maps, explainer)
    score = _road(model, x, target, maps, **road_options)
    cmx = complexity(maps)
    no_reason = [""] * cmx.shape[0]
    return _combine({"coherency": chn, "complexity": (1 - cmx, no_reason), "road": (score, score_reasons(score))},
                    return_reasons)
