"""Thin stateful forms of the functionals (torchmetrics style): same names in CamelCase.

    metric = ROAD(fractions=(0.2, 0.4, 0.6, 0.8))
    metric.update(model, x, target, maps)   # per batch; also returns the batch's values
    metric.compute()  # {"mean": nanmean, "values": (N,), "nan": count, "reasons": Counter}
"""
from __future__ import annotations

from collections import Counter

import torch

from . import faithfulness, ground_truth, localisation, road as road_module

__all__ = ["Metric", "AverageDrop", "Complexity", "Coherency", "ADCC", "ROAD", "ARCC", "GTCosine",
           "PointingGame", "Sparseness", "RelevanceMassAccuracy", "RelevanceRankAccuracy", "TopKIntersection",
           "LocalisationAUC"]


class Metric:
    """Accumulates per-sample values and NaN reasons of one functional over batches."""

    function = None

    def __init__(self, **options):
        self.options = options
        self.reset()

    def reset(self) -> None:
        self._values: list[torch.Tensor] = []
        self._reasons: list[str] = []

    def __call__(self, *args, **kwargs):
        return type(self).function(*args, **{**self.options, **kwargs})

    def update(self, *args, **kwargs) -> torch.Tensor:
        values, reasons = type(self).function(*args, **{**self.options, **kwargs, "return_reasons": True})
        self._values.append(values.detach())
        self._reasons.extend(reasons)
        return values

    def compute(self) -> dict:
        values = torch.cat(self._values) if self._values else torch.zeros(0)
        return {"mean": values.nanmean() if values.numel() else values.new_tensor(float("nan")),
                "values": values, "nan": int(torch.isnan(values).sum()),
                "reasons": Counter(r for r in self._reasons if r)}


def _metric(name: str, function) -> type:
    return type(name, (Metric,), {"function": staticmethod(function),
                                  "__doc__": f"Stateful form of :func:`{function.__module__}.{function.__name__}`."})


AverageDrop = _metric("AverageDrop", faithfulness.average_drop)
Complexity = _metric("Complexity", faithfulness.complexity)
Coherency = _metric("Coherency", faithfulness.coherency)
ADCC = _metric("ADCC", faithfulness.adcc)
ARCC = _metric("ARCC", faithfulness.arcc)


class ROAD(Metric):
    """Stateful form of :func:`validation.metrics.road.road`; ``compute()`` also returns the
    accumulated curves: ``"morf"`` and ``"lerf"`` (N, F) and ``"fractions"``."""

    function = staticmethod(road_module.road)

    def reset(self) -> None:
        super().reset()
        self._curves: list[road_module.RoadResult] = []

    def update(self, *args, **kwargs):
        """Accumulates scores, reasons and curves; returns the scores, or a RoadResult with
        ``return_curves=True`` (never the reasons: ``compute()`` has them)."""
        options = {**self.options, **kwargs}
        result, reasons = road_module.road(*args, **{**options, "return_curves": True, "return_reasons": True})
        if self._curves and result.fractions != self._curves[0].fractions:
            raise ValueError(f"ROAD.update: fractions {result.fractions} differ from the accumulated "
                             f"{self._curves[0].fractions}; reset() first or use one ROAD per set of fractions")
        self._values.append(result.score.detach())
        self._curves.append(result)
        self._reasons.extend(reasons)
        return result if options.get("return_curves") else result.score

    def compute(self) -> dict:
        out = super().compute()
        if self._curves:
            out["morf"] = torch.cat([c.morf.detach() for c in self._curves])
            out["lerf"] = torch.cat([c.lerf.detach() for c in self._curves])
            out["fractions"] = self._curves[0].fractions
        else:  # no update yet: the same keys, with no rows, for the constructor's fractions
            fractions = road_module.check_fractions(self.options.get("fractions", road_module.DEFAULT_FRACTIONS))
            out["morf"] = out["lerf"] = torch.zeros(0, len(fractions))
            out["fractions"] = fractions
        return out


GTCosine = _metric("GTCosine", ground_truth.gt_cosine)
PointingGame = _metric("PointingGame", localisation.pointing_game)
Sparseness = _metric("Sparseness", localisation.sparseness)
RelevanceMassAccuracy = _metric("RelevanceMassAccuracy", localisation.relevance_mass_accuracy)
RelevanceRankAccuracy = _metric("RelevanceRankAccuracy", localisation.relevance_rank_accuracy)
TopKIntersection = _metric("TopKIntersection", localisation.topk_intersection)
LocalisationAUC = _metric("LocalisationAUC", localisation.localisation_auc)
