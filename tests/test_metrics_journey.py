"""validation.metrics from the side of a user who brings their own model, images, maps and masks:
non-square images, torchvision models in train mode, targets as int / list / tensor, maps in other
dtypes and layouts, class forms over uneven batches, and the mistakes such a user makes (a model
ending in a softmax, tensors on two devices, images that still require grad, low-resolution CAMs)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from validation.metrics import (ROAD, AverageDrop, PointingGame, TopKIntersection, adcc, arcc, evaluate,
                                linear_impute, pointing_game, relevance_rank_accuracy, road, topk_intersection)
from test_metrics_helpers import TinyConv, cam_maps, smooth_images

H, W = 24, 40  # non-square on purpose
ALL = ["average_drop", "complexity", "coherency", "adcc", "road", "arcc", "gt_cosine", "pointing_game",
       "sparseness", "relevance_mass_accuracy", "relevance_rank_accuracy", "topk_intersection",
       "localisation_auc"]


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = smooth_images(b, 3, H, W, seed=seed)
    maps = cam_maps(b, H, W, seed=seed, tie_free=False)  # ReLU zeros: ties, as real CAMs have
    gt = (torch.rand(b, H, W, generator=g) > 0.6).float()
    return x, torch.arange(b) % 5, maps, gt


def _explainer(x, target):
    return F.avg_pool2d(x.mean(1, keepdim=True), 5, 1, 2)[:, 0]


def _resnet18(seed=0):
    import torchvision
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=5)


def _assert_same(a, b, atol=1e-6):
    for name in a:
        torch.testing.assert_close(a[name].double(), b[name].double(), atol=atol, rtol=0, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


# -- defects found on the journey ------------------------------------------------------------------

def test_road_and_linear_impute_take_images_that_require_grad():
    # a gradient explainer is usually run on x.requires_grad_(); the same x then went to ROAD,
    # whose solve writes into out= buffers: "functions with out=... arguments don't support
    # automatic differentiation"
    model = TinyConv(num_classes=5)
    x, target, maps, gt = _batch()
    plain = evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    graded = evaluate(model, x.clone().requires_grad_(), target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    _assert_same(graded, plain, atol=0)
    torch.testing.assert_close(road(model, x.clone().requires_grad_(), target, maps), plain["road"], atol=0, rtol=0)
    removed = maps > 0.5
    torch.testing.assert_close(linear_impute(x.clone().requires_grad_(), removed), linear_impute(x, removed))


def test_a_model_that_returns_probabilities_is_refused_log_probabilities_are_fine():
    # softmax on top of probabilities pulls every p_c towards 1/K: AD and ROAD came out
    # silently wrong (AD 0.33 -> 0.16 on a random net)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5))
    x, target, maps, _ = _batch()
    with pytest.raises(ValueError, match="probabilities.*logits"):
        evaluate(torch.nn.Sequential(net, torch.nn.Softmax(1)), x, target, maps, metrics=["average_drop"])
    with pytest.raises(ValueError, match="probabilities.*logits"):
        road(torch.nn.Sequential(net, torch.nn.Softmax(1)), x[:1], 0, maps[:1])
    logits = evaluate(net, x, target, maps, metrics=["average_drop", "road"])
    logp = evaluate(torch.nn.Sequential(net, torch.nn.LogSoftmax(1)), x, target, maps, metrics=["average_drop", "road"])
    _assert_same(logp, logits, atol=1e-6)
    torch.testing.assert_close(logp.probability, logits.probability)


def test_logits_that_happen_to_be_one_hot_are_not_taken_for_probabilities():
    class ChannelMeans(torch.nn.Module):  # logits = channel means: (0, 1, 0) on a green image
        def forward(self, x):
            return x.mean((2, 3))

    x = torch.zeros(2, 3, 8, 8)
    x[:, 1] = 1
    p = evaluate(ChannelMeans(), x, 1, torch.rand(2, 8, 8), metrics=["average_drop"]).probability
    expected = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)[1]
    torch.testing.assert_close(p, expected.expand(2))


@pytest.mark.parametrize("kind", ["tuple", "dict", "4d", "1d"])
def test_a_model_output_that_is_not_a_logits_tensor_raises_a_clear_error(kind):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            z = self.fc(x.mean((2, 3)))
            return {"tuple": (z, z), "dict": {"logits": z}, "4d": z[:, :, None, None], "1d": z[:, 0]}[kind]

    x, _, maps, _ = _batch(2)
    # before: AttributeError 'tuple' object has no attribute 'float', IndexError, gather's RuntimeError
    with pytest.raises(ValueError, match=r"logits tensor \(N, num_classes\)"):
        road(Odd(), x, [0, 1], maps)
    with pytest.raises(ValueError, match=r"logits tensor \(N, num_classes\)"):
        evaluate(Odd(), x, [0, 1], maps, metrics="average_drop")


def test_tensors_on_two_devices_raise_naming_them():
    # the meta device stands in for a GPU: torch's own error came from deep inside, naming neither
    x, target, maps, gt = _batch(2)
    with pytest.raises(ValueError, match="x is on meta but maps on cpu"):
        evaluate(TinyConv(num_classes=5), x.to("meta"), target, maps, metrics=["road"])
    with pytest.raises(ValueError, match="x is on meta but maps on cpu"):
        road(TinyConv(num_classes=5), x.to("meta"), target, maps)
    with pytest.raises(ValueError, match="gt is on meta but the maps are on cpu"):
        pointing_game(maps, gt.to("meta"))
    with pytest.raises(ValueError, match="gt is on meta but the maps are on cpu"):
        evaluate(None, None, None, maps, metrics=["gt_cosine"], gt=gt.to("meta"))


def test_road_class_form_compute_before_update_has_the_curve_keys():
    # the docs promise "morf", "lerf" and "fractions"; before an update they were missing (KeyError)
    metric = ROAD(fractions=(0.2, 0.8))
    out = metric.compute()
    assert out["values"].shape == (0,) and out["nan"] == 0 and torch.isnan(out["mean"])
    assert out["morf"].shape == out["lerf"].shape == (0, 2) and out["fractions"] == (0.2, 0.8)
    model = TinyConv(num_classes=5)
    x, target, maps, _ = _batch(2)
    metric.update(model, x, target, maps)
    assert metric.compute()["morf"].shape == (2, 2)
    metric.reset()
    out = metric.compute()
    assert out["values"].shape == (0,) and out["morf"].shape == (0, 2) and not out["reasons"]
    assert ROAD().compute()["fractions"] == (0.2, 0.4, 0.6, 0.8)


def test_records_store_tensor_sample_ids_as_numbers():
    # ids straight from a DataLoader are a tensor; 0-d tensors in the table hash by identity, so a
    # DataFrame groupby split one sample into several groups
    x, target, maps, gt = _batch(3)
    res = evaluate(None, x, target, maps, metrics=["pointing_game", "complexity"], gt=gt)
    rows = res.records(torch.tensor([10, 11, 12]))
    assert [r["sample"] for r in rows] == [10, 11, 12, 10, 11, 12]
    assert all(type(r["sample"]) is int for r in rows)
    assert res.records(torch.tensor([10, 11, 12])) == res.records([10, 11, 12])


def test_shape_and_range_errors_say_how_to_fix_a_users_inputs():
    x, target, maps, gt = _batch(2)
    low = maps[:, ::4, ::4]  # a CAM at its layer's resolution
    with pytest.raises(ValueError, match="upsample them first, e.g. F.interpolate"):
        road(TinyConv(num_classes=5), x, target, low)
    # the documented upsampling then works
    up = F.interpolate(low[:, None], size=x.shape[-2:], mode="bilinear")[:, 0]
    assert road(TinyConv(num_classes=5), x, target, up).shape == (2,)
    # a 0/255 PNG mask is not a map to min-max
    with pytest.raises(ValueError, match="divide 0-255 masks by 255"):
        pointing_game(maps, gt.to(torch.uint8) * 255)
    with pytest.raises(ValueError, match="normalise each map per sample"):
        pointing_game(maps * 3, gt)


# -- the journey itself: what already holds and must keep holding ----------------------------------

def test_resnet18_in_train_mode_non_square_images_is_left_as_it_came():
    model = _resnet18().train()
    before = copy.deepcopy(model.state_dict())
    x, target, maps, gt = _batch()
    res = evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no BatchNorm update
    eval_res = evaluate(model.eval(), x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    _assert_same(res, eval_res, atol=0)  # the train-mode model was evaluated in eval mode
    assert all(torch.isfinite(res[m]).all() for m in ALL)


def test_results_do_not_depend_on_batch_composition_and_repeat_exactly():
    model = _resnet18().eval()
    x, target, maps, gt = _batch()
    batch = evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    singles = [evaluate(model, x[i:i + 1], int(target[i]), maps[i:i + 1], metrics=ALL, explainer=_explainer,
                        gt=gt[i:i + 1]) for i in range(4)]
    joined = {m: torch.cat([s[m] for s in singles]) for m in ALL}
    _assert_same(joined, batch, atol=1e-6)
    torch.testing.assert_close(torch.cat([s.road_morf for s in singles]), batch.road_morf, atol=1e-6, rtol=0)
    again = evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    _assert_same(again, batch, atol=0)


def test_targets_maps_and_masks_in_the_forms_a_user_has_them():
    model = TinyConv(num_classes=5)
    x, target, maps, gt = _batch()
    ref = evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt)
    _assert_same(evaluate(model, x, target.tolist(), maps, metrics=ALL, explainer=_explainer, gt=gt), ref, atol=0)
    _assert_same(evaluate(model, x, target.int(), maps[:, None], metrics=ALL, explainer=_explainer,
                          gt=gt[:, None].bool()), ref, atol=0)
    _assert_same(evaluate(model, x, target, maps, metrics=ALL, explainer=_explainer, gt=gt.to(torch.uint8)),
                 ref, atol=0)
    one = evaluate(model, x, 2, maps, metrics=ALL, explainer=_explainer, gt=gt)
    _assert_same(one, evaluate(model, x, torch.full((4,), 2), maps, metrics=ALL, explainer=_explainer, gt=gt),
                 atol=0)
    double = evaluate(model, x, target, maps.double(), metrics=ALL, explainer=_explainer, gt=gt)
    assert double["complexity"].dtype == torch.float64
    _assert_same(double, ref, atol=1e-6)
    # float16 maps are converted to float32 (rounded to half first: compared with that map)
    half = evaluate(model, x, target, maps.half(), metrics=ALL, explainer=_explainer, gt=gt)
    assert half["complexity"].dtype == torch.float32
    _assert_same(half, evaluate(model, x, target, maps.half().float(), metrics=ALL, explainer=_explainer, gt=gt),
                 atol=0)


def test_documented_normalisation_wrapper_equals_the_net_on_normalised_images():
    import torchvision
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = torch.nn.Sequential(torchvision.transforms.Normalize(mean, std), net).eval()
    x, target, maps, _ = _batch()
    res = evaluate(model, x, target, maps, metrics=["average_drop"])
    normalised = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    p = torch.softmax(net(normalised), 1)[torch.arange(4), target]
    torch.testing.assert_close(res.probability, p.detach())
    with pytest.raises(ValueError, match="pass the images before normalisation"):
        evaluate(model, normalised, target, maps, metrics=["road"])


def test_class_forms_over_uneven_batches_equal_the_functional_on_all():
    model = TinyConv(num_classes=5)
    x, target, maps, gt = _batch(5)
    maps[3] = 0.25  # constant: NaN with a reason
    cuts = [(0, 1), (1, 4), (4, 5)]  # batches of 1, 3 and 1
    for metric, args in [(PointingGame(ties="fraction"), (maps, gt)), (TopKIntersection(k=7), (maps, gt)),
                         (AverageDrop(batch_size=3), (model, x, target, maps)),
                         (ROAD(fractions=(0.3, 0.7)), (model, x, target, maps))]:
        for lo, hi in cuts:
            metric.update(*[a if isinstance(a, torch.nn.Module) else a[lo:hi] for a in args])
        out = metric.compute()
        torch.testing.assert_close(out["values"], metric(*args), atol=1e-6, rtol=0, equal_nan=True)
        assert out["nan"] == int(torch.isnan(out["values"]).sum())
        torch.testing.assert_close(out["mean"], out["values"].nanmean())
        metric.reset()
        assert metric.compute()["values"].numel() == 0 and torch.isnan(metric.compute()["mean"])
    tk = TopKIntersection(k=7)
    tk.update(maps, gt)
    assert tk.compute()["reasons"] == {"constant_map": 1}


def test_tie_policy_by_hand_with_a_soft_mask():
    L = torch.tensor([[[0.9, 0.5, 0.5], [0.5, 0.1, 0.0]]])
    soft = torch.tensor([[[0.6, 0.4, 0.5], [0.49, 0.0, 1.0]]])  # S = gt >= 0.5: pixels 0, 2 and 5
    # top-2: 0.9 (in S) and one of three tied 0.5s, one of which is in S
    assert topk_intersection(L, soft, k=2).item() == pytest.approx((1 + 1 / 3) / 2, abs=1e-7)
    # |S| = 3: 0.9 and two of the three tied 0.5s
    assert relevance_rank_accuracy(L, soft).item() == pytest.approx((1 + 2 / 3) / 3, abs=1e-7)
    tied = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    assert pointing_game(tied, soft).item() == 1.0  # a tied maximum (pixel 0) lies in S
    assert pointing_game(tied, soft, ties="fraction").item() == pytest.approx(1 / 3)


def test_evaluate_runs_a_users_callable_explainer_with_the_model_in_eval_mode():
    """A plain callable explainer that calls the model used to run it in train mode: BatchNorm
    statistics moved and the recomputed maps depended on the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).train()
    before = model[1].running_mean.clone()
    seen = []

    def explainer(x, target):  # a gradient-free "method": the input's saliency through the model
        seen.append(model.training)
        return model(x).softmax(1).gather(1, target[:, None])[:, :, None] * x.mean(1)

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    evaluate(model, x, [0, 1, 2], maps, metrics=["coherency"], explainer=explainer)
    assert seen == [False]
    torch.testing.assert_close(model[1].running_mean, before, rtol=0, atol=0)
    assert model.training and model[1].training  # handed back in the mode it came in


def test_adcc_and_arcc_run_a_users_callable_explainer_with_the_model_in_eval_mode():
    """As evaluate does: adcc/arcc ran the explainer with the model as it came, so a train-mode
    model's BatchNorm statistics moved and the values differed from evaluate's (ARCC 0.0085 vs
    0.0073 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).train()
    before = model[1].running_mean.clone()
    seen = []

    def explainer(x, target):
        seen.append(model.training)
        return model(x).softmax(1).gather(1, target[:, None]).detach()[:, :, None] * x.mean(1)

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2])
    for metric in (adcc, arcc):
        seen.clear()
        values = metric(model, x, target, maps, explainer)
        assert seen == [False], metric.__name__
        torch.testing.assert_close(model[1].running_mean, before, rtol=0, atol=0, msg=metric.__name__)
        assert model.training and model[1].training  # handed back in the mode it came in
        # the reference: the same metric with the model put in eval mode by hand
        model.eval()
        try:
            in_eval = metric(model, x, target, maps, explainer)
        finally:
            model.train()
        torch.testing.assert_close(values, in_eval, rtol=0, atol=0, msg=metric.__name__)
        from_evaluate = evaluate(model, x, target, maps, metrics=[metric.__name__], explainer=explainer)
        torch.testing.assert_close(values, from_evaluate[metric.__name__], rtol=0, atol=1e-6, msg=metric.__name__)


def test_every_class_form_has_the_functionals_name_and_values_over_several_updates():
    """All 13 class forms (not only the four above): the registry name in CamelCase, the same
    function, and update() over uneven batches gives the functional's per-sample values on the
    whole batch and its reasons (NaN cases included: zero, constant maps, an empty mask)."""
    from collections import Counter

    import validation.metrics as metrics

    classes = {"average_drop": "AverageDrop", "complexity": "Complexity", "coherency": "Coherency", "adcc": "ADCC",
               "road": "ROAD", "arcc": "ARCC", "gt_cosine": "GTCosine", "pointing_game": "PointingGame",
               "sparseness": "Sparseness", "relevance_mass_accuracy": "RelevanceMassAccuracy",
               "relevance_rank_accuracy": "RelevanceRankAccuracy", "topk_intersection": "TopKIntersection",
               "localisation_auc": "LocalisationAUC"}
    assert set(classes) == set(metrics.METRICS) and set(classes.values()) <= set(metrics.__all__)
    model = TinyConv(num_classes=5)
    x, target, maps, gt = _batch(5, seed=1)
    maps[1], maps[3] = 0.0, 0.25  # zero map, constant map
    gt[2] = 0.0  # empty mask
    inputs = {"maps": maps, "gt": gt, "x": x, "target": target}
    signature = {"complexity": ("maps",), "sparseness": ("maps",), "average_drop": ("x", "target", "maps"),
                 "road": ("x", "target", "maps"), "coherency": ("x", "target", "maps"),
                 "adcc": ("x", "target", "maps"), "arcc": ("x", "target", "maps")}

    def args(name, part):
        tensors = [inputs[k][part] for k in signature.get(name, ("maps", "gt"))]
        lead = (model,) if name in ("average_drop", "road", "adcc", "arcc") else ()
        tail = (_explainer,) if name in ("coherency", "adcc", "arcc") else ()
        return (*lead, *tensors, *tail)

    for name, class_name in classes.items():
        metric_class = getattr(metrics, class_name)
        assert metric_class.function is metrics.METRICS[name], name
        options = {"fractions": (0.5,)} if name in ("road", "arcc") else {}  # one imputation: fast
        metric = metric_class(**options)
        for lo, hi in [(0, 2), (2, 3), (3, 5)]:
            metric.update(*args(name, slice(lo, hi)))
        out = metric.compute()
        values, reasons = metrics.METRICS[name](*args(name, slice(None)), return_reasons=True, **options)
        # model forwards (oneDNN convolutions) round differently per batch size (AD here: 1.6e-6,
        # the drop (Y - O) / Y amplifies the probabilities' 1e-7), the Gini's matrix product by an
        # ulp; every other metric is exactly per sample
        atol = {"average_drop": 1e-5, "road": 1e-5, "adcc": 1e-5, "arcc": 1e-5, "sparseness": 1e-6}.get(name, 0)
        torch.testing.assert_close(out["values"], values, rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
        assert out["reasons"] == Counter(r for r in reasons if r), name
        assert out["nan"] == int(torch.isnan(values).sum()), name
        assert any(reasons) == (name not in ("average_drop", "complexity", "road")), name  # NaN cases ran
