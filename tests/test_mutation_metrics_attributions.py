"""Behaviour the mutation audit of validation/metrics and validation/attributions found untested:
the zero_probability reason of Average Drop, the class forms' accumulation of NaN values and
reasons (nanmean, NaN count, reason counts, reset, constructor options vs call options), and
the model's eval mode while ADCC's explainer runs (training flags restored after), the
constant_map rule of relevance rank accuracy, and ModelGuard's restore of requires_grad, hooks
and swapped modules when the guarded code raises, the reasons in
EvaluationResult.records and ADCC's average_drop reason in evaluate."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from validation.metrics import (average_drop, adcc, evaluate, pointing_game, relevance_rank_accuracy,
                                topk_intersection, PointingGame, TopKIntersection)
from validation.attributions.base import ModelGuard
from validation.metrics.faithfulness import average_drop_from_probabilities
from test_metrics_helpers import TinyConv, cam_maps, smooth_images


# ---------------------------------------------------------------------------------------------
# Average Drop: Y = 0 is undefined and says why


class OneHotLogits(torch.nn.Module):
    """Logits (0, 200 * mean red): for a red image p_0 = exp(-200) / ... underflows to 0 in float32."""

    def forward(self, x):
        red = x[:, 0].mean((1, 2))
        return torch.stack([torch.zeros_like(red), 200 * red], dim=1)


def test_average_drop_of_a_zero_probability_is_nan_with_its_reason():
    values, reasons = average_drop_from_probabilities(torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.25]),
                                                      return_reasons=True)
    assert torch.isnan(values[0]) and values[1].item() == pytest.approx(0.5)
    assert reasons == ["zero_probability", ""]
    # the same through the model: class 0 of an all-red image has probability exactly 0 in float32
    x = torch.zeros(2, 3, 8, 8)
    x[0, 0] = 1.0
    maps = torch.full((2, 8, 8), 0.5)
    values, reasons = average_drop(OneHotLogits(), x, torch.tensor([0, 0]), maps, return_reasons=True)
    # sample 1: logits (0, 0), Y = 1/2, O = 1/2: no drop
    assert torch.isnan(values[0]) and values[1].item() == 0.0
    assert reasons == ["zero_probability", ""]


# ---------------------------------------------------------------------------------------------
# localisation: a constant map ranks nothing


def test_relevance_rank_accuracy_of_a_constant_map_is_nan_not_the_chance_level():
    """Without the constant_map rule every tie order is equally likely and the expected value
    would be the chance level |S| / n (here 4 / 16), a number that looks like a score."""
    maps = torch.stack([torch.full((4, 4), 0.3), torch.zeros(4, 4)])
    maps[1, 0, 0] = 1.0  # one clear maximum inside S, the rest tied at 0
    gt = torch.zeros(2, 4, 4)
    gt[:, :2, :2] = 1.0
    values, reasons = relevance_rank_accuracy(maps, gt, return_reasons=True)
    assert reasons == ["constant_map", ""] and torch.isnan(values[0])
    # sample 1: the maximum (a hit) plus 3 of the 15 tied zeros, 3 of which lie in S: 1 + 3 * 3/15
    assert values[1].item() == pytest.approx((1 + 3 * 3 / 15) / 4)
    # a constant map with an empty mask: the first rule listed (empty_mask) names it
    _, reasons = relevance_rank_accuracy(maps[:1], torch.zeros(1, 4, 4), return_reasons=True)
    assert reasons == ["empty_mask"]


# ---------------------------------------------------------------------------------------------
# class forms


def _maps_and_masks():
    """Three 4x4 maps with one clear maximum each; sample 1's mask is empty (NaN, empty_mask),
    sample 2's map is constant (NaN, constant_map), sample 0 hits."""
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1.0
    maps[1, 2, 2] = 1.0
    maps[2] = 0.5
    gt = torch.zeros(3, 4, 4)
    gt[0, :2, :2] = 1.0
    gt[2, :2, :2] = 1.0
    return maps, gt


def test_class_form_accumulates_nan_values_and_their_reasons_and_reset_forgets_them():
    maps, gt = _maps_and_masks()
    metric = PointingGame()
    metric.update(maps[:2], gt[:2])
    metric.update(maps[2:], gt[2:])
    out = metric.compute()
    assert out["values"][0].item() == 1.0 and torch.isnan(out["values"][1:]).all()
    assert out["mean"].item() == 1.0  # nanmean: the undefined samples are left out, not NaN
    assert out["nan"] == 2
    assert out["reasons"] == Counter({"empty_mask": 1, "constant_map": 1})  # "" of defined samples not counted
    metric.reset()
    metric.update(maps[:1], gt[:1])
    out = metric.compute()
    assert out["values"].tolist() == [1.0] and out["nan"] == 0 and out["reasons"] == Counter()


def test_class_form_options_are_defaults_that_a_call_overrides():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 8, 8, generator=g)
    gt = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    metric = TopKIntersection(k=3)
    assert torch.equal(metric(maps, gt), topk_intersection(maps, gt, k=3))
    assert torch.equal(metric(maps, gt, k=10), topk_intersection(maps, gt, k=10))
    assert torch.equal(metric.update(maps, gt, k=10), topk_intersection(maps, gt, k=10))
    assert not torch.equal(topk_intersection(maps, gt, k=3), topk_intersection(maps, gt, k=10))
    # ties="fraction" from the constructor reaches every call: two tied maxima, one inside S
    tied = torch.zeros(1, 4, 4)
    tied[0, 0, 0] = tied[0, 3, 3] = 1.0
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0
    assert PointingGame(ties="fraction")(tied, mask).item() == 0.5
    assert PointingGame(ties="fraction").update(tied, mask).item() == 0.5
    assert pointing_game(tied, mask).item() == 1.0


# ---------------------------------------------------------------------------------------------
# ADCC's explainer runs with the model in eval mode


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyConv()
        self.norm = torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return self.inner(self.norm(x))


def test_adcc_runs_the_explainer_in_eval_mode_and_restores_training_flags():
    model = BatchNormNet().train()
    model.inner.eval()  # a mixed state must come back as it was
    x, maps = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16)
    seen = []

    def explainer(images, target):
        seen.append([m.training for m in model.modules()])
        model(images)  # in train mode this would move the BatchNorm statistics
        return images.mean(1)

    before = model.norm.running_mean.clone()
    adcc(model, x, torch.tensor([0, 1]), maps, explainer)
    assert seen == [[False] * len(seen[0])]
    assert torch.equal(model.norm.running_mean, before)
    assert model.training and model.norm.training and not model.inner.training


# ---------------------------------------------------------------------------------------------
# ModelGuard undoes everything on error


def test_model_guard_restores_flags_requires_grad_hooks_and_swaps_when_the_body_raises():
    """No shipped method turns off requires_grad, so the method-level state tests cannot see that
    restore; a method added later (or a frozen-backbone trick) would rely on it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    relu = model[2]
    with pytest.raises(RuntimeError, match="interrupted"):
        with ModelGuard(model) as guard:
            assert not any(m.training for m in model.modules())
            for p in model.parameters():
                p.requires_grad_(not p.requires_grad)
            guard.register(model[0].register_forward_hook(lambda m, a, out: out * 0))
            guard.swap(model, "2", torch.nn.Identity())
            raise RuntimeError("interrupted")
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad and model[1].weight.requires_grad
    assert not model[0]._forward_hooks and model[2] is relu


# ---------------------------------------------------------------------------------------------
# evaluate's long table carries the reasons


def test_evaluation_records_carry_values_and_reasons_per_sample():
    maps, gt = _maps_and_masks()
    result = evaluate(None, torch.zeros(3, 3, 4, 4), 0, maps, metrics=("pointing_game",), gt=gt)
    rows = result.records(torch.tensor([10, 11, 12]))
    assert [(r["sample"], r["metric"], r["reason"]) for r in rows] == [
        (10, "pointing_game", ""), (11, "pointing_game", "empty_mask"), (12, "pointing_game", "constant_map")]
    assert rows[0]["value"] == 1.0 and all(r["value"] != r["value"] for r in rows[1:])  # NaN


def test_adcc_of_a_zero_probability_names_average_drop_in_evaluate_and_the_functional():
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0] = 1.0  # OneHotLogits: p_0 = 0 exactly
    maps = cam_maps(1, 8, 8)

    def explainer(images, target):
        return images.mean(1)

    result = evaluate(OneHotLogits(), x, 0, maps, metrics=("adcc",), explainer=explainer)
    assert torch.isnan(result["adcc"]).all() and result.reasons["adcc"] == ["average_drop:zero_probability"]
    value, reasons = adcc(OneHotLogits(), x, 0, maps, explainer, return_reasons=True)
    assert torch.isnan(value).all() and reasons == ["average_drop:zero_probability"]
