"""Several metrics in one go, sharing work: one unperturbed forward, the Average Drop and all
ROAD forwards in one batched pass, Coherency computed once for ADCC and ARCC."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ._checks import check_images, check_maps, check_target, eval_forward
from ._forward import probabilities_and_predictions
from .faithfulness import _combine, average_drop_from_probabilities, coherency, complexity
from .ground_truth import gt_cosine
from .localisation import (localisation_auc, pointing_game, relevance_mass_accuracy, relevance_rank_accuracy,
                           sparseness, topk_intersection)
from .road import DEFAULT_FRACTIONS, check_fractions, road_from_probabilities, road_images, score_reasons

__all__ = ["evaluate", "EvaluationResult", "METRIC_NAMES", "MODEL_METRICS", "GT_METRICS", "EXPLAINER_METRICS"]

MODEL_METRICS = ("average_drop", "adcc", "road", "arcc")
EXPLAINER_METRICS = ("coherency", "adcc", "arcc")
GT_METRICS = ("gt_cosine", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
              "topk_intersection", "localisation_auc")
METRIC_NAMES = ("average_drop", "complexity", "coherency", "adcc", "road", "arcc", "gt_cosine", "pointing_game",
                "sparseness", "relevance_mass_accuracy", "relevance_rank_accuracy", "topk_intersection",
                "localisation_auc")
_LOCALISATION = {"gt_cosine": gt_cosine, "pointing_game": pointing_game,
                 "relevance_mass_accuracy": relevance_mass_accuracy,
                 "relevance_rank_accuracy": relevance_rank_accuracy, "topk_intersection": topk_intersection,
                 "localisation_auc": localisation_auc}


class EvaluationResult(dict):
    """dict metric name -> (B,) tensor, plus

    * ``reasons``: metric name -> list of B strings ("" where the value is defined, else why NaN);
    * ``probability``: (B,) p_c(X); ``prediction``: (B,) argmax class of X (when a model ran);
    * ``road_morf`` / ``road_lerf``: (B, F) probabilities per fraction, ``road_fractions``.
    """

    def __init__(self):
        super().__init__()
        self.reasons: dict[str, list[str]] = {}
        self.probability = None
        self.prediction = None
        self.road_morf = None
        self.road_lerf = None
        self.road_fractions = None

    def records(self, sample_ids: Sequence | None = None) -> list[dict]:
        """Long table: one dict per (sample, metric) with value and reason; ``sample_ids`` (a
        sequence, or a tensor / array of ids, stored as Python numbers) default to 0..B-1."""
        if hasattr(sample_ids, "tolist"):  # 0-d tensors in the table would hash by identity (groupby)
            sample_ids = sample_ids.tolist()
        rows = []
        for name, values in self.items():
            if sample_ids is not None and len(sample_ids) != values.shape[0]:  # zip would drop rows
                raise ValueError(f"sample_ids has {len(sample_ids)} entries for {values.shape[0]} samples")
            ids = range(values.shape[0]) if sample_ids is None else sample_ids
            for i, (sid, v) in enumerate(zip(ids, values.tolist())):
                rows.append({"sample": sid, "metric": name, "value": v, "reason": self.reasons[name][i]})
        return rows


def evaluate(model: torch.nn.Module | None, x: torch.Tensor, target, maps: torch.Tensor,
             metrics: Sequence[str] = ("average_drop", "complexity", "coherency", "adcc", "road", "arcc"),
             explainer=None, gt: torch.Tensor | None = None, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
             noise: float = 0.01, seed: int = 0, tie_seed: int = 0, batch_size: int = 64,
             impute_batch_size: int = 64, bf16: bool = False, pointing_ties: str = "any",
             topk: int | None = None, gt_threshold: float = 0.5) -> EvaluationResult:
    """Compute ``metrics`` (names, or one name) for one batch; returns an :class:`EvaluationResult`.

    model/x/target/maps as for the functionals; ``explainer`` (``.attribute(x, target)`` or a
    callable) is needed for coherency/adcc/arcc, ``gt`` (B, H, W) masks for the localisation
    metrics. Options are those of ``road`` (fractions, noise, seed, tie_seed, batch_size,
    impute_batch_size, bf16), ``pointing_game`` (pointing_ties), ``topk_intersection`` (topk)
    and the mask threshold.
    """
    if not isinstance(metrics, str) and not hasattr(metrics, "__iter__"):  # tuple(None): "not iterable"
        raise TypeError(f"metrics must be a metric name or a sequence of them, got {metrics!r}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(METRIC_NAMES)}")
    maps = check_maps(maps)
    b = maps.shape[0]
    needs_model = any(m in MODEL_METRICS for m in metrics)
    if needs_model or any(m in EXPLAINER_METRICS for m in metrics):
        x = check_images(x, maps)
        target = check_target(target, b, x.device)
    if needs_model and model is None:
        raise ValueError(f"metrics {[m for m in metrics if m in MODEL_METRICS]} need a model")
    if any(m in EXPLAINER_METRICS for m in metrics) and explainer is None:
        raise ValueError(f"metrics {[m for m in metrics if m in EXPLAINER_METRICS]} need an explainer")
    if any(m in GT_METRICS for m in metrics) and gt is None:
        raise ValueError(f"metrics {[m for m in metrics if m in GT_METRICS]} need gt masks")

    result = EvaluationResult()
    no_reason = [""] * b
    parts: dict[str, tuple] = {}

    if needs_model:
        want_ad = any(m in metrics for m in ("average_drop", "adcc"))
        want_road = any(m in metrics for m in ("road", "arcc"))
        fractions = check_fractions(fractions)
        batches, targets = [x], [target]
        if want_ad:
            batches.append(x * maps[:, None].to(x.dtype))
            targets.append(target)
        if want_road:
            images = road_images(x, maps, fractions, noise=noise, seed=seed, tie_seed=tie_seed,
                                 impute_batch_size=impute_batch_size)
            batches.append(images.flatten(0, 2))  # sample-major: B x (F x 2) images
            targets.append(target.repeat_interleave(2 * len(fractions)))
        targets = torch.cat(targets)
        probs, predictions = probabilities_and_predictions(model, torch.cat(batches), targets,
                                                           batch_size=batch_size, bf16=bf16, sample_target=target)
        base = probs[:b]
        result.probability, result.prediction = base, predictions[:b]
        offset = b
        if want_ad:
            ad = average_drop_from_probabilities(base, probs[offset:offset + b], return_reasons=True)
            parts["average_drop"] = ad
            offset += b
        if want_road:
            road = road_from_probabilities(probs[offset:].view(b, len(fractions), 2), fractions)
            parts["road"] = (road.score, score_reasons(road.score))
            result.road_morf, result.road_lerf, result.road_fractions = road.morf, road.lerf, fractions
    if any(m in metrics for m in ("complexity", "adcc", "arcc")):
        parts["complexity"] = (complexity(maps), no_reason)
    if any(m in EXPLAINER_METRICS for m in metrics):
        # a user's callable explainer may run the model as it finds it: in eval mode, as every
        # other forward here, so BatchNorm statistics are not updated (flags restored after)
        # (Coherency needs no model: without one the explainer runs as it is)
        with eval_forward(model) if model is not None else contextlib.nullcontext():
            parts["coherency"] = coherency(x, target, maps, explainer, return_reasons=True)
    if "adcc" in metrics:
        parts["adcc"] = _combine({"coherency": parts["coherency"],
                                  "complexity": (1 - parts["complexity"][0], no_reason),
                                  "average_drop": (1 - parts["average_drop"][0], parts["average_drop"][1])}, True)
    if "arcc" in metrics:
        parts["arcc"] = _combine({"coherency": parts["coherency"],
                                  "complexity": (1 - parts["complexity"][0], no_reason),
                                  "road": parts["road"]}, True)
    if "sparseness" in metrics:
        parts["sparseness"] = sparseness(maps, return_reasons=True)
    for name, fn in _LOCALISATION.items():
        if name in metrics:
            options = {} if name == "gt_cosine" else {"threshold": gt_threshold}
            if name == "pointing_game":
                options["ties"] = pointing_ties
            if name == "topk_intersection":
                options["k"] = topk
            parts[name] = fn(maps, gt, return_reasons=True, **options)
    for name in metrics:
        result[name], result.reasons[name] = parts[name]
    return result
