"""Average Drop, Complexity, Coherency, ADCC, ARCC and evaluate(): hand checks and properties."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from validation.metrics import (adcc, arcc, average_drop, coherency, complexity, evaluate, get_metric,
                                harmonic_mean, road, AverageDrop, Complexity, ROAD)
from test_metrics_helpers import TinyConv, cam_maps, smooth_images


class Linear(torch.nn.Module):
    """logits = W . mean-pooled channels: hand-checkable softmax."""

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.mean((2, 3)) @ self.w.T


def gradient_explainer(model):
    """A plain |gradient| map, min-max normalised: our own explainer for Coherency tests."""
    def explain(x, target):
        x = x.clone().requires_grad_(True)
        out = model(x).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(out, x)
        m = g.abs().sum(1)
        lo, hi = m.flatten(1).amin(1).view(-1, 1, 1), m.flatten(1).amax(1).view(-1, 1, 1)
        return (m - lo) / (hi - lo).clamp_min(1e-12)
    return explain


def channel_mean_explainer(x, target):
    """LaFAM-like label-free map on the input itself: min-max of the channel mean."""
    m = x.mean(1)
    lo, hi = m.flatten(1).amin(1).view(-1, 1, 1), m.flatten(1).amax(1).view(-1, 1, 1)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def test_average_drop_hand_computed_divides_by_y():
    model = Linear()
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 1.0  # logits (2, 0, 0)
    maps = torch.full((1, 4, 4), 0.5)  # X * L: logits (1, 0, 0)
    y = np.exp(2) / (np.exp(2) + 2)
    o = np.exp(1) / (np.exp(1) + 2)
    ad = average_drop(model, x, torch.tensor([0]), maps)
    assert ad.item() == pytest.approx((y - o) / y, abs=1e-6)
    # an increase in confidence counts as zero drop
    assert average_drop(model, x, torch.tensor([1]), maps).item() == 0.0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_average_drop_zero_for_all_ones_and_in_unit_interval(seed):
    model = TinyConv(seed=seed % 7)
    x = smooth_images(2, 3, 16, 16, seed=seed)
    t = torch.tensor([seed % 6, (seed + 1) % 6])
    assert torch.equal(average_drop(model, x, t, torch.ones(2, 16, 16)), torch.zeros(2))
    ad = average_drop(model, x, t, torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(seed)))
    assert ((ad >= 0) & (ad <= 1)).all()


def test_complexity_limits():
    values, reasons = complexity(torch.ones(2, 8, 8), return_reasons=True)
    assert torch.equal(values, torch.ones(2)) and reasons == ["", ""]
    assert torch.equal(complexity(torch.zeros(2, 8, 8)), torch.zeros(2))
    assert torch.equal(complexity(torch.ones(2, 8, 8)), torch.ones(2))
    m = torch.zeros(1, 4, 4)
    m[0, 0, :2] = 1
    assert complexity(m).item() == pytest.approx(2 / 16)


def test_coherency_matches_numpy_pearson_and_uses_x_times_l():
    model = TinyConv()
    x = smooth_images(3, 3, 16, 16)
    maps = cam_maps(3, 16, 16)
    seen = {}
    explainer = gradient_explainer(model)

    def spy(xin, target):
        seen["x"] = xin
        return explainer(xin, target)

    t = torch.tensor([0, 1, 2])
    value = coherency(x, t, maps, spy)
    assert torch.allclose(seen["x"], x * maps[:, None])
    recomputed = explainer(x * maps[:, None], t)
    for i in range(3):
        r = np.corrcoef(maps[i].flatten().numpy(), recomputed[i].flatten().numpy())[0, 1]
        assert value[i].item() == pytest.approx((r + 1) / 2, abs=1e-5)


def test_coherency_accepts_explainer_objects():
    class Explainer:
        def attribute(self, x, target):
            return channel_mean_explainer(x, target)

    x = smooth_images(2, 3, 16, 16)
    maps = cam_maps(2, 16, 16)
    t = torch.tensor([0, 1])
    assert torch.equal(coherency(x, t, maps, Explainer()), coherency(x, t, maps, channel_mean_explainer))


def test_coherency_with_the_toolkits_explainers():
    """The whole method, RefineCAM included, is recomputed on X * L through get_explainer."""
    from validation.attributions import get_explainer
    from test_metrics_helpers import resnet18
    model = resnet18(0)
    x = smooth_images(2, 3, 32, 32)
    t = torch.tensor([0, 3])
    # stage2 + stage3: at 32 px stage4 is 1x1, its map constant, and a product with it constant
    for explainer in (get_explainer("gradcam", model, layer="stage3"),
                      get_explainer("refinecam", model, base="gradcam", layers=("stage2", "stage3"))):
        maps = explainer.attribute(x, t)
        value, reasons = coherency(x, t, maps, explainer, return_reasons=True)
        assert reasons == ["", ""], (explainer, reasons)  # the comparison below must run
        direct = explainer.attribute(x * maps[:, None], t)
        for i in range(2):
            r = np.corrcoef(maps[i].flatten().numpy(), direct[i].flatten().numpy())[0, 1]
            assert value[i].item() == pytest.approx((r + 1) / 2, abs=1e-4)


def test_coherency_nan_reasons():
    x = smooth_images(2, 3, 16, 16)
    maps = cam_maps(2, 16, 16)
    maps[0] = 0.3  # constant map
    value, reasons = coherency(x, torch.tensor([0, 1]), maps, lambda xx, t: torch.zeros(2, 16, 16),
                               return_reasons=True)
    assert torch.isnan(value).all()
    assert reasons == ["constant_map", "constant_recomputed_map"]


def test_coherency_of_constant_float64_maps_is_nan_not_a_rounded_correlation():
    # the float64 mean of nine 0.1s is off by an ulp: centring left ~1e-17 everywhere instead of 0,
    # and Coherency came out as a silent (r ~ 1e-16 + 1) / 2 = 0.5 instead of NaN with a reason
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 3, generator=g)
    varied = torch.rand(2, 3, 3, generator=g, dtype=torch.float64)
    maps = varied.clone()
    maps[0] = 0.1
    recomputed = varied.clone()
    recomputed[1] = 0.1
    value, reasons = coherency(x, torch.tensor([0, 1]), maps, None, recomputed=recomputed, return_reasons=True)
    assert torch.isnan(value).all() and reasons == ["constant_map", "constant_recomputed_map"]
    value, reasons = adcc(TinyConv(), x, torch.tensor([0, 1]), maps, lambda xx, t: recomputed, return_reasons=True)
    assert torch.isnan(value).all() and reasons == ["coherency:constant_map", "coherency:constant_recomputed_map"]


def test_coherency_explainer_errors_are_clear():
    x, maps, target = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="explainer returned ndarray"):  # was numpy's "order must be str"
        coherency(x, target, maps, lambda xx, t: xx.mean(1).numpy())
    with pytest.raises(ValueError, match=r"shape \(2, 8, 16\), expected \(2, 16, 16\)"):
        coherency(x, target, maps, lambda xx, t: xx.mean(1)[:, :8])
    with pytest.raises(ValueError, match=r"recomputed: NaN or Inf maps for sample\(s\) \[1\]"):
        coherency(x, target, maps, None, recomputed=torch.stack([x[0].mean(0), torch.full((16, 16), float("nan"))]))
    with pytest.raises(ValueError, match=r"recomputed: maps of shape \(1, 16, 16\)"):
        coherency(x, target, maps, None, recomputed=x[:1].mean(1))
    # Pearson is scale-free: unnormalised recomputed maps (raw gradients) are fine
    assert torch.allclose(coherency(x, target, maps, lambda xx, t: xx.mean(1) * 5 - 2),
                          coherency(x, target, maps, lambda xx, t: xx.mean(1)))


def test_harmonic_mean_definition_clipping_and_zero():
    a, b, c = torch.tensor([0.5, 0.0, 1.2, 0.3]), torch.tensor([0.25, 0.9, 1.0, -0.1]), torch.tensor([1.0, 0.5, 1.0, 0.4])
    h = harmonic_mean(a, b, c)
    assert h[0].item() == pytest.approx(3 / (2 + 4 + 1))
    assert h[1].item() == 0.0  # a part is 0
    assert h[2].item() == pytest.approx(1.0)  # 1.2 clipped to 1
    assert h[3].item() == 0.0  # -0.1 clipped to 0
    assert torch.isnan(harmonic_mean(torch.tensor([float("nan")]), torch.tensor([0.5]), torch.tensor([0.5])))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_adcc_arcc_in_unit_interval_and_match_their_parts(seed):
    model = TinyConv(seed=seed % 5)
    x = smooth_images(2, 3, 16, 16, seed=seed)
    maps = cam_maps(2, 16, 16, seed=seed)
    t = torch.tensor([seed % 6, (seed + 3) % 6])
    explainer = gradient_explainer(model)
    a = adcc(model, x, t, maps, explainer)
    r = arcc(model, x, t, maps, explainer, noise=0.0)
    assert ((a >= 0) & (a <= 1)).all() and ((r >= 0) & (r <= 1)).all()
    chn = coherency(x, t, maps, explainer)
    cmx = complexity(maps)
    ad = average_drop(model, x, t, maps)
    rd = road(model, x, t, maps, noise=0.0)
    assert torch.allclose(a, harmonic_mean(chn, 1 - cmx, 1 - ad))
    assert torch.allclose(r, harmonic_mean(chn, 1 - cmx, rd.clamp(0, 1)))


def _harmonic_mean64(*parts):
    """3 / sum(1 / part) in float64; 0 when a part is <= 0 (its limit)."""
    parts = np.stack([np.clip(p, 0, 1) for p in parts])
    with np.errstate(divide="ignore"):
        return np.where((parts <= 0).any(0), 0.0, len(parts) / (1 / parts).sum(0))


def test_adcc_and_arcc_equal_float64_harmonic_means_and_arcc_is_zero_when_road_is_not_positive():
    """Exact values from parts re-derived in float64. Samples 0, 1: every part positive;
    sample 2: only ROAD < 0, so ARCC is exactly 0; sample 3: All1sCAM (Cmx ~ 1) keeps ADCC low."""
    model = TinyConv()
    x = smooth_images(4, 3, 16, 16)
    maps = torch.cat([cam_maps(3, 16, 16), torch.ones(1, 16, 16)])
    maps[3, 0, 0] = 0.0  # All1sCAM: not constant, so Coherency is defined
    t = torch.tensor([0, 1, 2, 3])
    ex = gradient_explainer(model)
    recomputed = ex(x * maps[:, None], t).double().numpy()
    m = maps.double().numpy()
    chn = np.array([(np.corrcoef(m[i].ravel(), recomputed[i].ravel())[0, 1] + 1) / 2 for i in range(4)])
    cmx = m.reshape(4, -1).mean(1)
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)[range(4), t].numpy()
        o = torch.softmax(model(x * maps[:, None]).double(), 1)[range(4), t].numpy()
    ad = np.maximum(p - o, 0) / p
    rd = road(model, x, t, maps).double().numpy()
    assert (chn > 0).all() and (cmx < 1).all() and (ad < 1).all()
    assert rd[0] > 0 and rd[1] > 0 and rd[2] < 0  # the cases this test is about
    np.testing.assert_allclose(adcc(model, x, t, maps, ex).numpy(), _harmonic_mean64(chn, 1 - cmx, 1 - ad),
                               rtol=1e-5, atol=0)
    ours = arcc(model, x, t, maps, ex).numpy()
    np.testing.assert_allclose(ours, _harmonic_mean64(chn, 1 - cmx, rd), rtol=1e-5, atol=0)
    assert ours[2] == 0.0 and ours[0] > 0 and ours[1] > 0
    assert adcc(model, x, t, maps, ex)[3] < 0.05  # 1 - Cmx = 1/256 dominates the harmonic mean


def test_constant_map_makes_adcc_and_arcc_nan_naming_coherency():
    model = TinyConv()
    x = smooth_images(2, 3, 16, 16)
    ex = gradient_explainer(model)
    t = torch.tensor([0, 1])
    ones = torch.ones(2, 16, 16)
    for metric in (adcc, arcc):
        value, reasons = metric(model, x, t, ones, ex, return_reasons=True)
        assert torch.isnan(value).all() and reasons == ["coherency:constant_map"] * 2


def test_evaluate_matches_functionals_and_shares_forwards():
    model = Linear()
    torch.manual_seed(0)
    x = smooth_images(3, 3, 16, 16)
    maps = cam_maps(3, 16, 16)
    gt = (maps > 0.5).float()
    t = torch.tensor([0, 1, 2])
    ex = channel_mean_explainer
    model.calls = 0
    res = evaluate(model, x, t, maps, metrics=("average_drop", "complexity", "coherency", "adcc", "road", "arcc",
                                               "gt_cosine", "sparseness", "localisation_auc"),
                   explainer=ex, gt=gt, batch_size=1000)
    assert model.calls == 1  # unperturbed + X*L + 8 ROAD images per sample in one batched forward
    assert torch.allclose(res["average_drop"], average_drop(model, x, t, maps))
    assert torch.allclose(res["road"], road(model, x, t, maps), atol=1e-6)
    assert torch.allclose(res["adcc"], adcc(model, x, t, maps, ex), atol=1e-6)
    assert torch.allclose(res["arcc"], arcc(model, x, t, maps, ex), atol=1e-6)
    assert torch.allclose(res["complexity"], complexity(maps))
    assert torch.allclose(res["coherency"], coherency(x, t, maps, ex), atol=1e-6, equal_nan=True)
    from validation.metrics import gt_cosine, localisation_auc, sparseness

    assert torch.allclose(res["gt_cosine"], gt_cosine(maps, gt))
    assert torch.allclose(res["sparseness"], sparseness(maps))
    assert torch.allclose(res["localisation_auc"], localisation_auc(maps, gt))
    assert res.road_morf.shape == (3, 4) and res.prediction.shape == (3,)
    assert set(res.reasons) == set(res)
    rows = res.records(sample_ids=["a", "b", "c"])
    assert len(rows) == 9 * 3 and rows[0]["sample"] == "a"
    with pytest.raises(ValueError, match="sample_ids has 2 entries for 3 samples"):  # zip dropped a row
        res.records(sample_ids=["a", "b"])


def test_evaluate_road_alone_and_localisation_only():
    model = TinyConv()
    x = smooth_images(3, 3, 16, 16)
    maps = cam_maps(3, 16, 16)
    t = torch.tensor([5, 0, 3])
    res = evaluate(model, x, t, maps, metrics=("road",), batch_size=4)
    assert torch.allclose(res["road"], road(model, x, t, maps), atol=1e-6)
    gt = (maps > 0.3).float()
    loc = evaluate(None, None, None, maps, metrics=("pointing_game", "sparseness"), gt=gt)
    assert loc.probability is None and set(loc) == {"pointing_game", "sparseness"}
    from validation.metrics import pointing_game, sparseness

    assert torch.equal(loc["pointing_game"], pointing_game(maps, gt))
    assert torch.allclose(loc["sparseness"], sparseness(maps))


def test_evaluate_localisation_outputs_match_their_functionals_with_options():
    """Non-default options, each of which changes a value here, must reach every functional."""
    from validation.metrics import (gt_cosine, localisation_auc, pointing_game, relevance_mass_accuracy,
                                    relevance_rank_accuracy, sparseness, topk_intersection)
    maps = cam_maps(3, 16, 16, tie_free=False)
    maps[0, 0, :4] = 1.0  # tied maxima, some inside S at threshold 0.3, none at 0.5
    gt = cam_maps(3, 16, 16, seed=7)  # soft masks: S depends on the threshold
    gt[0, 0, :2] = 0.4
    gt[0, 0, 2:4] = 0.2
    expected = {
        "gt_cosine": gt_cosine(maps, gt, return_reasons=True),
        "pointing_game": pointing_game(maps, gt, ties="fraction", threshold=0.3, return_reasons=True),
        "relevance_mass_accuracy": relevance_mass_accuracy(maps, gt, threshold=0.3, return_reasons=True),
        "relevance_rank_accuracy": relevance_rank_accuracy(maps, gt, threshold=0.3, return_reasons=True),
        "topk_intersection": topk_intersection(maps, gt, k=7, threshold=0.3, return_reasons=True),
        "localisation_auc": localisation_auc(maps, gt, threshold=0.3, return_reasons=True),
        "sparseness": sparseness(maps, return_reasons=True),
    }
    res = evaluate(None, None, None, maps, metrics=tuple(expected), gt=gt, gt_threshold=0.3, topk=7,
                   pointing_ties="fraction")
    assert set(res) == set(expected)
    for name, (values, reasons) in expected.items():
        torch.testing.assert_close(res[name], values, rtol=0, atol=0, equal_nan=True, msg=name)
        assert res.reasons[name] == reasons, name
    # the options matter for these inputs, so a dropped option would be caught above
    for name in ("pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "topk_intersection",
                 "localisation_auc"):
        assert not torch.equal(res[name], get_metric(name)(maps, gt)), name
    assert not torch.equal(res["pointing_game"], pointing_game(maps, gt, threshold=0.3))
    assert not torch.equal(res["topk_intersection"], topk_intersection(maps, gt, threshold=0.3))


def test_evaluate_reports_missing_inputs():
    x = smooth_images(1, 3, 8, 8)
    maps = cam_maps(1, 8, 8)
    with pytest.raises(ValueError, match="need an explainer"):
        evaluate(TinyConv(), x, torch.tensor([0]), maps, metrics=("coherency",))
    with pytest.raises(ValueError, match="need gt"):
        evaluate(None, x, torch.tensor([0]), maps, metrics=("pointing_game",))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(None, x, torch.tensor([0]), maps, metrics=("nope",))


def test_class_forms_accumulate():
    model = TinyConv()
    metric = AverageDrop()
    for seed in range(2):
        metric.update(model, smooth_images(2, 3, 16, 16, seed=seed), torch.tensor([0, 1]), cam_maps(2, 16, 16, seed))
    out = metric.compute()
    expected = torch.cat([average_drop(model, smooth_images(2, 3, 16, 16, seed=seed), torch.tensor([0, 1]),
                                       cam_maps(2, 16, 16, seed)) for seed in range(2)])
    assert torch.allclose(out["values"], expected) and out["nan"] == 0
    assert torch.isclose(out["mean"], out["values"].mean())
    r = ROAD(noise=0.0)
    x, maps = smooth_images(1, 3, 16, 16), cam_maps(1, 16, 16)
    assert torch.equal(r(model, x, torch.tensor([2]), maps), road(model, x, torch.tensor([2]), maps, noise=0.0))
    cmx = Complexity()
    assert torch.equal(cmx.update(maps), complexity(maps)) and cmx.compute()["values"].shape == (1,)


def test_road_class_form_accumulates_curves_with_or_without_return_curves():
    # ROAD(return_curves=True).update used to crash on RoadResult.detach
    model, target = TinyConv(), torch.tensor([0, 1, 2, 3])
    x, maps = smooth_images(4, 3, 16, 16, seed=3), cam_maps(4, 16, 16, seed=3)
    full = road(model, x, target, maps, return_curves=True)
    for options in ({}, {"return_curves": True}):
        metric = ROAD(**options)
        first = metric.update(model, x[:3], target[:3], maps[:3])
        metric.update(model, x[3:], target[3:], maps[3:])
        assert isinstance(first, torch.Tensor) != bool(options)
        out = metric.compute()
        assert torch.allclose(out["values"], full.score)
        assert torch.allclose(out["morf"], full.morf) and torch.allclose(out["lerf"], full.lerf)
        assert out["fractions"] == full.fractions and out["nan"] == 0
    with pytest.raises(ValueError, match="fractions"):
        metric.update(model, x, target, maps, fractions=(0.5,))
    metric.reset()  # forgets values, reasons and curves: other fractions are fine from here on
    empty = metric.compute()
    assert empty["values"].numel() == 0 and torch.isnan(empty["mean"]) and empty["morf"].shape == (0, 4)
    half = metric.update(model, x, target, maps, fractions=(0.5,))
    out = metric.compute()
    assert out["fractions"] == (0.5,) and torch.equal(out["values"], half.score)
    assert torch.equal(out["values"], road(model, x, target, maps, fractions=(0.5,)))


def test_every_functional_takes_return_reasons():
    """One contract for all: (values, reasons) with return_reasons=True (the class forms rely on it)."""
    import inspect
    from validation.metrics import METRICS
    missing = [n for n, f in METRICS.items() if "return_reasons" not in inspect.signature(f).parameters]
    assert not missing


def test_input_errors_name_the_sample():
    model = TinyConv()
    x = smooth_images(3, 3, 16, 16)
    maps = cam_maps(3, 16, 16)
    maps[2, 3, 3] = 1.5
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\].*outside \[0, 1\]"):
        average_drop(model, x, torch.tensor([0, 1, 2]), maps)
    with pytest.raises(ValueError, match="shape"):
        complexity(torch.rand(3, 2, 16, 16))
    with pytest.raises(ValueError, match="target"):
        average_drop(model, x, torch.tensor([0, 1]), cam_maps(3, 16, 16))
    # ImageNet-normalised images (about [-2.1, 2.6]) would be normalised twice by the model: an error
    normalised = x.clone()
    normalised[1] = (normalised[1] - 0.45) / 0.225
    for call in (lambda: average_drop(model, normalised, torch.tensor([0, 1, 2]), cam_maps(3, 16, 16)),
                 lambda: road(model, normalised, torch.tensor([0, 1, 2]), cam_maps(3, 16, 16))):
        with pytest.raises(ValueError, match=r"x: sample\(s\) \[1\] have values outside \[0, 1\]"):
            call()
    # the forwards repeat each sample (AD: twice, ROAD: 2F times); the error names the sample, not the row
    bad_class = torch.tensor([0, 6, 2])
    for call in (lambda: average_drop(model, x, bad_class, cam_maps(3, 16, 16)),
                 lambda: road(model, x, bad_class, cam_maps(3, 16, 16)),
                 lambda: evaluate(model, x, bad_class, cam_maps(3, 16, 16), metrics=["average_drop", "road"])):
        with pytest.raises(ValueError, match=r"target: sample\(s\) \[1\] have a class outside \[0, 6\)"):
            call()


def test_images_of_another_dtype_than_the_model_raise_a_clear_error():
    # torch's own "Input type (double) and bias type (float)" names neither argument nor fix
    model = TinyConv()
    x, maps, target = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16), torch.tensor([0, 1])
    for metric in (average_drop, road):
        with pytest.raises(ValueError, match=r"images x are torch.float64 but the model's weights are torch.float32"):
            metric(model, x.double(), target, maps)
    # a float64 model takes float64 images: Average Drop matches the definition written out by hand,
    # AD = clip(max(0, Y - O) / Y, 0, 1), Y = p_c(X), O = p_c(X * L), computed here in float64
    # (the metric takes its softmax in float32, hence the 1e-6)
    model64 = TinyConv(seed=3).double()
    x64, maps64 = smooth_images(4, 3, 16, 16, seed=5).double(), cam_maps(4, 16, 16, seed=5)
    target4 = torch.tensor([0, 1, 2, 5])
    with torch.no_grad():
        y_prob = torch.softmax(model64(x64), 1).gather(1, target4[:, None])[:, 0]
        o_prob = torch.softmax(model64(x64 * maps64[:, None].double()), 1).gather(1, target4[:, None])[:, 0]
    want = ((y_prob - o_prob).clamp_min(0) / y_prob).clamp(0, 1)
    assert (want > 1e-3).sum() >= 2  # not a case where every drop is zero
    got = average_drop(model64, x64, target4, maps64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="images x are torch.float64"):  # autocast casts float32 only
        road(model, x.double(), target, maps, bf16=True)

    class CastsItsInput(torch.nn.Module):  # checked only on failure: a model may cast its input
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images):
            return self.inner(images.float())

    assert torch.allclose(average_drop(CastsItsInput(), x.double(), target, maps).float(),
                          average_drop(model, x, target, maps))


_HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _count_host_syncs(monkeypatch, filename: str) -> list:
    """Record every tensor -> Python/host conversion (each is a device sync on a GPU) made
    directly from the source file ``filename``."""
    import sys

    calls = []
    for name in _HOST_SYNCS:
        def wrapper(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(filename):
                calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def test_harmonic_mean_reasons_take_a_fixed_number_of_host_syncs_whatever_the_batch(monkeypatch):
    """ADCC/ARCC reasons read the NaN flags of the whole batch at once, not one sync per sample."""
    model = TinyConv()
    ex = gradient_explainer(model)
    counts, results = [], []
    for b in (2, 8):
        x, maps = smooth_images(b, 3, 16, 16), cam_maps(b, 16, 16)
        maps[1] = 0.5  # one constant map: a NaN with a reason
        t = torch.arange(b) % 6
        with monkeypatch.context() as patch:
            calls = _count_host_syncs(patch, "validation/metrics/faithfulness.py")
            results.append(adcc(model, x, t, maps, ex, return_reasons=True))
        counts.append(len(calls))
    assert counts[0] == counts[1], counts
    for value, reasons in results:
        assert reasons[1] == "coherency:constant_map" and torch.isnan(value[1])
        assert reasons[0] == "" and not torch.isnan(value[0])
