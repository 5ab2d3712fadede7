"""ROAD (Rong et al., 2022): remove pixels by rank, fill them by noisy linear imputation.

    ROAD(X, L) = 1/|K| sum_{k in K} ( p_c(X_LeRF,k) - p_c(X_MoRF,k) )

MoRF_k removes the round(k*H*W) most relevant pixels, LeRF_k the round(k*H*W) least relevant
ones (round half up). Ties in L are broken by a fixed pseudo-random order of pixel positions
(``tie_seed``), the same for every image of a size, so exactly round(k*H*W) pixels go whatever
the number of ties and the score depends on the ranking of L only. Removed pixels are filled by
linear imputation and get N(0, noise^2) in [0, 1] pixel space (before the model's
normalisation). The noise is one (C, H, W) field per fraction and MoRF/LeRF, drawn from a CPU
generator seeded with ``seed`` and shared by every image of the batch, so a sample's score does
not depend on the batch it is in, its position there, or the device.
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Sequence

import torch

from ._checks import check_images, check_int, check_maps, check_target, finish
from ._forward import class_probabilities
from .imputation import (DEFAULT_TOL, SolveReport, check_noise, reported_linear_impute,
                         reported_linear_impute_complementary)

__all__ = ["road", "removal_masks", "road_images", "complementary_pairs", "score_reasons", "RoadResult",
           "DEFAULT_FRACTIONS"]

DEFAULT_FRACTIONS = (0.2, 0.4, 0.6, 0.8)


class RoadResult(NamedTuple):
    """score (B,); morf, lerf (B, F): class probability after removing each fraction."""
    score: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    fractions: tuple


def check_fractions(fractions: Sequence[float]) -> tuple:
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__iter__"):
        raise TypeError(f"fractions must be a sequence of values in (0, 1), e.g. (0.2, 0.4), got {fractions!r}")
    fractions = tuple(float(k) for k in fractions)
    if not fractions or any(not 0 < k < 1 for k in fractions):
        raise ValueError(f"fractions must be a non-empty sequence of values in (0, 1), got {fractions}")
    return fractions


def pixel_ranks(maps: torch.Tensor, tie_seed: int = 0) -> torch.Tensor:
    """(B, H, W) -> (B, H, W) long: 0 for the most relevant pixel, H*W-1 for the least.

    Ties are ordered by a fixed pseudo-random permutation of pixel positions drawn from a
    generator seeded with ``tie_seed`` (a seeded stand-in for the reference's tiny random
    perturbation), so no tie favours the top of the image.
    """
    b, h, w = maps.shape
    n = h * w
    generator = torch.Generator(device="cpu").manual_seed(check_int("tie_seed", tie_seed))
    priority = torch.randperm(n, generator=generator).to(maps.device)
    flat = maps.reshape(b, n)[:, priority]
    order = priority[torch.argsort(flat, dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=maps.device).expand(b, n))
    return ranks.view(b, h, w)


def removal_counts(fractions: Sequence[float], height: int, width: int) -> list[int]:
    """round(k * n), half up, for n = height * width; at least one pixel must be removed and one
    kept (ValueError naming the fraction and the map size otherwise).

    k is taken as the decimal it is written as (``repr``): in binary 0.29 is 0.28999..., and
    0.29 * 50 = 14.499... would round to 14 where round half up of 14.5 is 15.
    """
    n = height * width
    fractions = check_fractions(fractions)
    counts = [int(Fraction(repr(k)) * n + Fraction(1, 2)) for k in fractions]
    for k, count in zip(fractions, counts):
        if count == 0:  # MoRF and LeRF would both be the image itself: a silent 0 in the score's mean
            raise ValueError(f"fraction {k} removes round({k} * {n}) = 0 of the {n} pixels of a {height}x{width} "
                             "map, so its MoRF and LeRF images would both be the unperturbed image (use a "
                             "larger fraction or larger maps)")
        if count >= n:  # nothing left to impute from
            raise ValueError(f"fraction {k} removes round({k} * {n}) = {count} of the {n} pixels of a "
                             f"{height}x{width} map; ROAD needs at least one kept pixel (use a smaller "
                             "fraction or larger maps)")
    return counts


def complementary_pairs(counts: Sequence[int], pixels: int) -> list[tuple[int, int]]:
    """(i, j) pairs of fractions whose MoRF (removing counts[i] pixels) and LeRF (removing
    counts[j] = pixels - counts[i]) remove complementary sets; each fraction used at most once."""
    free = list(range(len(counts)))
    pairs = []
    for i, count in enumerate(counts):
        match = next((j for j in free if counts[j] == pixels - count), None)
        if match is not None:
            free.remove(match)
            pairs.append((i, match))
    return pairs


def removal_masks(maps: torch.Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                  tie_seed: int = 0) -> torch.Tensor:
    """(B, H, W) maps -> (B, F, 2, H, W) bool masks, True = removed; [:, :, 0] MoRF, [:, :, 1] LeRF.

    ValueError if a fraction would remove every pixel (round(k * H * W) == H * W) or none
    (round(k * H * W) == 0).
    """
    maps = check_maps(maps)
    b, h, w = maps.shape
    ranks = pixel_ranks(maps, tie_seed)[:, None]
    counts = torch.tensor(removal_counts(fractions, h, w), device=maps.device).view(1, -1, 1, 1)
    morf = ranks < counts
    lerf = ranks >= h * w - counts
    return torch.stack([morf, lerf], dim=2)


def road_images(x: torch.Tensor, maps: torch.Tensor, fractions: Sequence[float] = DEFAULT_FRACTIONS, *,
                noise: float = 0.01, seed: int = 0, tie_seed: int = 0, impute_batch_size: int = 64,
                tol: float = DEFAULT_TOL) -> torch.Tensor:
    """All perturbed images, (B, F, 2, C, H, W): [:, :, 0] MoRF, [:, :, 1] LeRF, in [0, 1] units.

    Removed pixels get ``noise`` times one standard normal (C, H, W) field per (fraction,
    MoRF/LeRF), drawn in float32 from a CPU generator seeded with ``seed`` and applied to every
    image of the batch: an image's perturbed copies depend only on the image, its map and the
    seed (not on the batch, its position, ``impute_batch_size`` or the device). Each removed
    pixel still gets N(0, noise^2). Imputed pixels are not clipped (as in the reference). If an
    imputation stops short of ``tol`` (see ``linear_impute``), one RuntimeWarning names the images.
    """
    maps = check_maps(maps)
    x = check_images(x, maps)
    check_noise(noise)
    impute_batch_size = check_int("impute_batch_size", impute_batch_size, 1)
    seed = check_int("seed", seed)
    fractions = check_fractions(fractions)
    b, c, h, w = x.shape
    masks = removal_masks(maps, fractions, tie_seed=tie_seed)  # (B, F, 2, H, W)
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    slots = {}  # (fraction, side) -> its (B, C, H, W) imputed images
    report = SolveReport(b, tol, x.device)  # one warning for the call, naming images
    pairs = complementary_pairs(removal_counts(fractions, h, w), h * w)
    if pairs and b:
        # MoRF at k and LeRF at 1 - k remove complementary pixel sets: one solve gives both
        morf = [i for i, _ in pairs]
        both = _impute_in_batches(reported_linear_impute_complementary, work, masks[:, morf, 0],
                                  max(1, impute_batch_size // 2), tol, report).view(b, len(pairs), 2, c, h, w)
        for p, (i, j) in enumerate(pairs):
            slots[i, 0], slots[j, 1] = both[:, p, 0], both[:, p, 1]
    alone = [(i, side) for i in range(len(fractions)) for side in (0, 1) if (i, side) not in slots]
    if alone and b:
        index_f, index_side = (list(index) for index in zip(*alone))
        single = _impute_in_batches(reported_linear_impute, work, masks[:, index_f, index_side], impute_batch_size,
                                    tol, report).view(b, len(alone), c, h, w)
        for a, slot in enumerate(alone):
            slots[slot] = single[:, a]
    report.finish()
    if b:
        filled = torch.stack([slots[i, side] for i in range(len(fractions)) for side in (0, 1)], dim=1)
    else:
        filled = work.new_empty(0, 2 * len(fractions), c, h, w)
    masks = masks.reshape(-1, 1, h, w)
    if noise > 0:
        # one field for the batch, drawn on the CPU in float32: a draw of shape (B, ...) would tie
        # a sample's noise to its batch and position (the pipeline retries a failed batch image
        # by image), a draw on x.device to the device's generator
        generator = torch.Generator(device="cpu").manual_seed(seed)
        eps = torch.randn((2 * len(fractions), c, h, w), generator=generator, dtype=torch.float32)
        filled.addcmul_(eps.to(device=filled.device, dtype=filled.dtype),
                        masks.view(b, 2 * len(fractions), 1, h, w).to(filled.dtype), value=noise)
    return filled.view(b, len(fractions), 2, c, h, w).to(x.dtype)


def _impute_in_batches(impute, x: torch.Tensor, removed: torch.Tensor, batch_size: int, tol: float,
                       report: SolveReport) -> torch.Tensor:
    """impute(images, masks) for every image of x (B, C, H, W) and each of its K masks in removed
    (B, K, H, W), in calls of ``batch_size`` systems, concatenated image-major; each call's
    shortfalls go into ``report`` under their image's index."""
    b, c, h, w = x.shape
    k = removed.shape[1]
    images = x[:, None].expand(b, k, c, h, w).reshape(-1, c, h, w)
    removed = removed.reshape(-1, h, w)
    image_of_system = torch.arange(b, device=x.device).repeat_interleave(k)
    parts = []
    for s in range(0, images.shape[0], batch_size):
        part, part_report = impute(images[s:s + batch_size], removed[s:s + batch_size], tol=tol)
        report.add(part_report, image_of_system[s:s + batch_size])
        parts.append(part)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def road_from_probabilities(probs: torch.Tensor, fractions: tuple) -> RoadResult:
    """(B, F, 2) probabilities [MoRF, LeRF] -> RoadResult."""
    morf, lerf = probs[..., 0], probs[..., 1]
    return RoadResult((lerf - morf).mean(1), morf, lerf, fractions)


def road(model: torch.nn.Module, x: torch.Tensor, target, maps: torch.Tensor, *,
         fractions: Sequence[float] = DEFAULT_FRACTIONS, noise: float = 0.01, seed: int = 0,
         tie_seed: int = 0, batch_size: int = 64, impute_batch_size: int = 64, bf16: bool = False,
         return_curves: bool = False, return_reasons: bool = False):
    """ROAD score per sample, in [-1, 1] (higher = more faithful).

    model takes images in [0, 1] and returns logits (B, num_classes); x (B, C, H, W) in [0, 1];
    target (B,) class indices; maps (B, H, W) in [0, 1], on x's device and at its resolution.
    All B * 2|K| perturbed images go through the model in batches of
    ``batch_size`` (``bf16=True``: bfloat16 autocast forward, float32 softmax).
    Returns (B,) scores, or a ``RoadResult`` (score, morf, lerf, fractions) with
    ``return_curves=True``; with ``return_reasons=True`` that and a list of B reasons: "" (ROAD is
    defined for every map: constant maps are ranked by the tie order) except ``nan`` where the
    model's outputs gave a NaN probability (non-finite logits), as for Average Drop.
    """
    maps = check_maps(maps)
    x = check_images(x, maps)
    target = check_target(target, x.shape[0], x.device)
    fractions = check_fractions(fractions)
    images = road_images(x, maps, fractions, noise=noise, seed=seed, tie_seed=tie_seed,
                         impute_batch_size=impute_batch_size)
    per_image = 2 * len(fractions)
    probs = class_probabilities(model, images.flatten(0, 2), target.repeat_interleave(per_image),
                                batch_size=batch_size, bf16=bf16, sample_target=target)
    result = road_from_probabilities(probs.view(x.shape[0], len(fractions), 2), fractions)
    values = result if return_curves else result.score
    return (values, score_reasons(result.score)) if return_reasons else values


def score_reasons(score: torch.Tensor) -> list[str]:
    """ROAD's reasons: "" for every score but a NaN one (non-finite logits), which gets ``nan``."""
    return finish(score, [], True)[1]
