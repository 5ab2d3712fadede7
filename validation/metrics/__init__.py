"""Faithfulness and localisation metrics for saliency maps: per sample, batched, exact.

Functionals return one value per sample (tensor of shape B); with ``return_reasons=True`` they
return ``(values, reasons)``, one string per sample ("" when defined, else why it is NaN).
``evaluate`` computes several at once, sharing forwards. See docs/metrics.md.
"""
from .evaluate import EXPLAINER_METRICS, GT_METRICS, METRIC_NAMES, MODEL_METRICS, EvaluationResult, evaluate
from .faithfulness import adcc, arcc, average_drop, coherency, complexity, harmonic_mean
from .ground_truth import gt_cosine
from .imputation import linear_impute, linear_impute_complementary, noisy_linear_impute
from .localisation import (default_topk, localisation_auc, pointing_game, relevance_mass_accuracy,
                           relevance_rank_accuracy, sparseness, topk_intersection)
from .modules import (ADCC, ARCC, ROAD, AverageDrop, Coherency, Complexity, GTCosine, LocalisationAUC, Metric,
                      PointingGame, RelevanceMassAccuracy, RelevanceRankAccuracy, Sparseness, TopKIntersection)
from .road import DEFAULT_FRACTIONS, RoadResult, removal_masks, road, road_images

METRICS = {
    "average_drop": average_drop, "complexity": complexity, "coherency": coherency, "adcc": adcc, "road": road,
    "arcc": arcc, "gt_cosine": gt_cosine, "pointing_game": pointing_game, "sparseness": sparseness,
    "relevance_mass_accuracy": relevance_mass_accuracy, "relevance_rank_accuracy": relevance_rank_accuracy,
    "topk_intersection": topk_intersection, "localisation_auc": localisation_auc,
}


def get_metric(name: str):
    """The functional registered under ``name``."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; available: {sorted(METRICS)}") from None


def available_metrics() -> list[str]:
    return sorted(METRICS)


__all__ = sorted(METRICS) + [
    "evaluate", "EvaluationResult", "METRIC_NAMES", "MODEL_METRICS", "GT_METRICS", "EXPLAINER_METRICS",
    "METRICS", "get_metric", "available_metrics", "harmonic_mean", "default_topk", "linear_impute",
    "linear_impute_complementary", "noisy_linear_impute", "removal_masks", "road_images", "RoadResult",
    "DEFAULT_FRACTIONS",
    "Metric", "AverageDrop", "Complexity", "Coherency", "ADCC", "ROAD", "ARCC", "GTCosine", "PointingGame",
    "Sparseness", "RelevanceMassAccuracy", "RelevanceRankAccuracy", "TopKIntersection", "LocalisationAUC",
]
