"""ROAD: exact pixel selection, agreement with pytorch-grad-cam where it is right, properties."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from validation.metrics import ROAD, removal_masks, road, road_images
from validation.metrics.road import pixel_ranks
from test_metrics_helpers import TinyConv, cam_maps, resnet18, smooth_images


def test_exact_counts_even_when_everything_ties():
    maps = torch.zeros(3, 10, 13)
    maps[1, :4] = 1.0  # 40 % ones, 60 % zeros
    maps[2] = torch.rand(10, 13, generator=torch.Generator().manual_seed(0))
    fractions = (0.1, 0.25, 0.5, 0.77)
    masks = removal_masks(maps, fractions)
    n = 130
    for f, k in enumerate(fractions):
        expected = int(k * n + 0.5)
        assert (masks[:, f].flatten(2).sum(-1) == expected).all()
    top = masks[1, 0, 0]  # 13 pixels of the 52 ones
    assert maps[1][top].eq(1).all()
    lerf = masks[1, 3, 1]  # 100 least relevant: all 78 zeros, then 22 ones
    assert maps[1][lerf].eq(0).sum() == 78


def test_counts_round_half_up_the_decimal_fraction():
    # hand-computed: 0.29 * 50 = 14.5 and 0.35 * 90 = 31.5 round half up to 15 and 32; in binary
    # both products are 14.4999.../31.4999..., and a float k * n + 0.5 removed 14 and 31 pixels
    maps = torch.rand(2, 9, 10, generator=torch.Generator().manual_seed(0))
    assert removal_masks(maps[:, :5], (0.29,))[:, 0].flatten(2).sum(-1).tolist() == [[15, 15]] * 2
    assert removal_masks(maps, (0.35, 0.2))[:, :, 0].flatten(2).sum(-1).tolist() == [[32, 18]] * 2


def test_morf_and_lerf_are_complementary_rankings():
    maps = cam_maps(2, 16, 16, tie_free=False)  # many ReLU zeros
    ranks = pixel_ranks(maps)
    assert torch.equal(ranks.flatten(1).sort(1).values, torch.arange(256).expand(2, 256))
    masks = removal_masks(maps, (0.25, 0.75))
    assert torch.equal(masks[:, 0, 0], ~masks[:, 1, 1])  # top 25 % = complement of bottom 75 %


def test_ties_are_not_broken_by_position():
    """A constant map removes the first half of the documented tie order (a randperm of pixel
    positions from a generator seeded with ``tie_seed``), so no side of the image goes first."""
    masks = removal_masks(torch.zeros(1, 32, 32), (0.5,))[0, 0]
    order = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(1024, dtype=torch.bool)
    expected[order[:512]] = True
    assert torch.equal(masks[0].flatten(), expected)  # MoRF: the first 512 in tie order
    assert torch.equal(masks[1].flatten(), ~expected)  # LeRF: the last 512
    removed = masks[0].float()
    for half in (removed[:16], removed[16:], removed[:, :16], removed[:, 16:]):
        assert abs(half.mean().item() - 0.5) < 0.1


def test_seed_and_tie_seed_reach_the_images_of_road_and_evaluate():
    """Non-default ``tie_seed``, ``seed``, ``noise`` and ``fractions``, from their definitions:
    tied pixels rank in the order of randperm(H*W) drawn from a generator seeded with
    ``tie_seed``; removed pixels get ``noise`` times one float32 N(0, 1) field (2F, C, H, W), in
    (fraction, MoRF/LeRF) order, from a CPU generator seeded with ``seed`` (road_images'
    docstring). road() and evaluate() with the same options must score those images. Every other
    test runs with seed 0 and tie_seed 0, so a road() or evaluate() that dropped either option
    (falling back to 0) passed them all."""
    from validation.metrics import evaluate

    model = TinyConv()
    h = w = 16
    n = h * w
    x = smooth_images(2, 3, h, w, seed=4)
    maps = torch.zeros(2, h, w)  # sample 0: all tied; sample 1: 64 ranked pixels, then 192 tied zeros
    maps[1, :4] = torch.linspace(0.2, 1.0, 64).view(4, 16)
    target = torch.tensor([1, 2])
    fractions, noise, seed, tie_seed = (0.25, 0.5), 0.02, 3, 5
    opts = dict(fractions=fractions, noise=noise, seed=seed, tie_seed=tie_seed)

    tie_order = torch.randperm(n, generator=torch.Generator().manual_seed(tie_seed)).tolist()
    position = {pixel: i for i, pixel in enumerate(tie_order)}
    eps = torch.randn((2 * len(fractions), 3, h, w), generator=torch.Generator().manual_seed(seed))
    images = road_images(x, maps, **opts)                              # (B, F, 2, C, H, W)
    clean = road_images(x, maps, fractions, noise=0.0, tie_seed=tie_seed)
    for b in range(2):
        values = maps[b].flatten().tolist()
        ranking = sorted(range(n), key=lambda p: (-values[p], position[p]))  # most relevant first
        for f, k in enumerate(fractions):
            count = round(k * n)
            for side, removed in enumerate((ranking[:count], ranking[n - count:])):
                mask = torch.zeros(n, dtype=torch.bool)
                mask[removed] = True
                mask = mask.view(1, h, w)
                assert torch.equal(clean[b, f, side][:, ~mask[0]], x[b][:, ~mask[0]])  # kept pixels kept
                expected = clean[b, f, side] + noise * eps[2 * f + side] * mask
                torch.testing.assert_close(images[b, f, side], expected, rtol=0, atol=1e-7)

    with torch.no_grad():
        probs = torch.softmax(model(images.flatten(0, 2)), 1)
    probs = probs.gather(1, target.repeat_interleave(2 * len(fractions))[:, None]).view(2, len(fractions), 2)
    ours = road(model, x, target, maps, return_curves=True, **opts)
    res = evaluate(model, x, target, maps, metrics=["road"], **opts)
    for morf, lerf, score in ((ours.morf, ours.lerf, ours.score), (res.road_morf, res.road_lerf, res["road"])):
        torch.testing.assert_close(morf, probs[..., 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(lerf, probs[..., 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(score, (probs[..., 1] - probs[..., 0]).mean(1), rtol=0, atol=1e-6)
    # each option changes the curves here by far more than the tolerance: dropping one is caught
    for other in ({"seed": 0}, {"tie_seed": 0}):
        changed = road(model, x, target, maps, return_curves=True, **{**opts, **other})
        assert (changed.morf - ours.morf).abs().max() > 1e-3, other


def _gradcam_road(model, x, maps, target, percentiles, monkeypatch):
    from pytorch_grad_cam.metrics import road as gc_road
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    # switch their noise off: the imputer is built with its default noise inside ROADCombined
    monkeypatch.setattr(gc_road.NoisyLinearImputer.__init__, "__defaults__",
                        (0.0, gc_road.neighbors_weights))
    metric = ROADCombined(percentiles=percentiles)
    return metric(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in target], model)


def test_matches_grad_cam_road_combined_on_tie_free_maps(monkeypatch):
    """ours = 2 x ROADCombined with noise off. 32x32: their percentile threshold with a strict
    '<' removes exactly round(k*n) pixels here, as we do (checked below)."""
    model = resnet18(0)
    x = smooth_images(3, 3, 32, 32, seed=1)
    maps = cam_maps(3, 32, 32, seed=2, tie_free=True)
    target = torch.tensor([0, 3, 5])
    theirs = _gradcam_road(model, x, maps, target, [20, 40, 60, 80], monkeypatch)
    ours = road(model, x, target, maps, noise=0.0)
    # measured agreement 6e-8 (their float64 spsolve, our float32 solver). The scores are
    # 8.5e-5, -3.1e-3 and -1.2e-2 (this random net's probabilities barely move): the former
    # atol 2e-4 was above sample 0's whole score, so that sample could not fail, not even with
    # its sign flipped
    tolerance = 2e-6
    assert np.abs(ours.numpy()).min() > 20 * tolerance  # every sample is checked
    np.testing.assert_allclose(ours.numpy(), 2 * np.asarray(theirs), rtol=0, atol=tolerance)
    # and their selection removes the same pixel counts on tie-free maps
    for p, k in zip([20, 40, 60, 80], [0.8, 0.6, 0.4, 0.2]):
        thr = np.percentile(maps[0].numpy(), p)
        assert (maps[0].numpy() >= thr).sum() == int(k * 1024 + 0.5)


def test_tie_case_where_grad_cam_removes_everything(monkeypatch):
    """60 % ReLU zeros: grad-cam's MoRF at percentile 20/40 thresholds at 0 and removes every
    pixel (the image becomes a constant), while ROAD must remove exactly 80 % / 60 %."""
    model = resnet18(0)
    x = smooth_images(1, 3, 32, 32, seed=3)
    maps = torch.zeros(1, 32, 32)
    maps[0, :13, :] = torch.linspace(0.1, 1, 13 * 32).view(13, 32)  # 40.6 % nonzero, tie-free
    n = 1024
    threshold = np.percentile(maps[0].numpy(), 20)
    theirs_removed = (maps[0].numpy() >= threshold).sum()
    assert theirs_removed == n  # everything: the reference's pitfall
    ours_removed = removal_masks(maps, (0.8,))[0, 0, 0].sum().item()
    assert ours_removed == int(0.8 * n + 0.5)
    target = torch.tensor([1])
    ours = road(model, x, target, maps, noise=0.0, return_curves=True)
    theirs = _gradcam_road(model, x, maps, target, [20, 40, 60, 80], monkeypatch)
    assert abs(ours.score.item() - 2 * float(theirs[0])) > 1e-3  # they differ, and theirs is the wrong one
    # ours is right: our exact-count masks, imputed one image at a time by their spsolve imputer
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    imputer = NoisyLinearImputer(noise=0.0)
    masks = removal_masks(maps)[0]  # (F, 2, H, W), True = removed; theirs imputes where mask == 0
    images = torch.stack([imputer(x[0], (~masks[f, j]).float()) for f in range(4) for j in range(2)])
    with torch.no_grad():
        probs = torch.softmax(model(images), 1)[:, 1].double().view(4, 2)
    # measured agreement ~1e-7; the curves vary by ~1e-2 between fractions
    np.testing.assert_allclose(ours.morf[0].numpy(), probs[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.lerf[0].numpy(), probs[:, 1].numpy(), atol=1e-5)
    assert ours.score.item() == pytest.approx((probs[:, 1] - probs[:, 0]).mean().item(), abs=1e-5)


def test_curves_and_score_consistent():
    model = TinyConv()
    x = smooth_images(2, 3, 32, 32)
    maps = cam_maps(2, 32, 32)
    res = road(model, x, torch.tensor([0, 1]), maps, fractions=(0.1, 0.5, 0.9), return_curves=True)
    assert res.morf.shape == (2, 3) and res.lerf.shape == (2, 3) and res.fractions == (0.1, 0.5, 0.9)
    assert torch.allclose(res.score, (res.lerf - res.morf).mean(1))
    assert ((res.morf >= 0) & (res.morf <= 1)).all()


def test_noise_is_seeded_and_in_pixel_space():
    x = smooth_images(1, 3, 32, 32)
    maps = cam_maps(1, 32, 32)
    a = road_images(x, maps, seed=1)
    b = road_images(x, maps, seed=1)
    c = road_images(x, maps, noise=0.0)
    assert torch.equal(a, b)
    removed = removal_masks(maps)[:, :, :, None].expand_as(a)
    diff = (a - c)[removed]
    assert abs(diff.std().item() - 0.01) < 1e-3  # sigma 0.01 in [0, 1] units
    assert torch.equal(a[~removed], c[~removed])


def test_batching_does_not_change_results():
    model = TinyConv()
    x = smooth_images(3, 3, 32, 32)
    maps = cam_maps(3, 32, 32)
    t = torch.tensor([0, 2, 4])
    a = road(model, x, t, maps, batch_size=64, impute_batch_size=64)
    b = road(model, x, t, maps, batch_size=5, impute_batch_size=7)
    assert torch.allclose(a, b, atol=1e-6)


def test_score_does_not_depend_on_the_batch():
    """With the default noise a sample scores the same alone, in a batch, and at any position
    (the pipeline retries failed batches image by image)."""
    model = TinyConv()
    x = smooth_images(3, 3, 32, 32)
    maps = cam_maps(3, 32, 32)
    t = torch.tensor([0, 2, 4])
    together = road(model, x, t, maps)
    alone = torch.cat([road(model, x[i:i + 1], t[i:i + 1], maps[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=0, atol=1e-6)
    reversed_ = road(model, x.flip(0), t.flip(0), maps.flip(0))
    np.testing.assert_allclose(reversed_.flip(0).numpy(), together.numpy(), rtol=0, atol=1e-6)
    images = road_images(x, maps)
    for i in range(3):
        np.testing.assert_allclose(road_images(x[i:i + 1], maps[i:i + 1])[0].numpy(), images[i].numpy(),
                                   rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_does_not_depend_on_the_device():
    x = smooth_images(2, 3, 32, 32)
    maps = cam_maps(2, 32, 32)
    on_gpu = road_images(x.cuda(), maps.cuda())
    assert on_gpu.device.type == "cuda"
    # the noise is identical; only the iterative solves differ, by float32 rounding
    torch.testing.assert_close(on_gpu.cpu(), road_images(x, maps), rtol=0, atol=1e-5)


def test_bf16_forward_is_close():
    model = TinyConv()
    x = smooth_images(2, 3, 32, 32)
    maps = cam_maps(2, 32, 32)
    t = torch.tensor([0, 2])
    dtypes = []
    hook = model.conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        fp32 = road(model, x, t, maps)
        assert set(dtypes) == {torch.float32}
        dtypes.clear()
        bf16 = road(model, x, t, maps, bf16=True)
        assert set(dtypes) == {torch.bfloat16}  # the perturbed images' forwards ran in bf16
    finally:
        hook.remove()
    # bf16 rounds the logits (8 bits of mantissa), the softmax and the score stay float32
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert torch.allclose(fp32, bf16, atol=5e-3)


def test_model_mode_restored():
    model = TinyConv().train()
    road(model, smooth_images(1, 3, 16, 16), torch.tensor([0]), cam_maps(1, 16, 16))
    assert model.training


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), transform=st.sampled_from(["sqrt", "square", "affine", "pow8"]))
def test_invariant_to_strictly_increasing_transforms(seed, transform):
    # values on a 1/64 grid: the transforms keep distinct values distinct in float32
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 65, (2, 16, 16), generator=g).float() / 64
    f = {"sqrt": torch.sqrt, "square": torch.square, "affine": lambda m: 0.5 * m + 0.25,
         "pow8": lambda m: m ** 8}[transform]
    model = TinyConv()
    x = smooth_images(2, 3, 16, 16, seed=seed)
    t = torch.tensor([1, 4])
    assert torch.equal(removal_masks(maps), removal_masks(f(maps)))
    assert torch.equal(road(model, x, t, maps), road(model, x, t, f(maps)))


def test_errors_name_the_problem():
    model = TinyConv()
    x = smooth_images(2, 3, 16, 16)
    maps = cam_maps(2, 16, 16)
    bad = maps.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        road(model, x, torch.tensor([0, 1]), bad)
    with pytest.raises(ValueError, match="fractions"):
        road(model, x, torch.tensor([0, 1]), maps, fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="does not match"):
        road(model, x[:, :, :8], torch.tensor([0, 1]), maps)
    with pytest.raises(ValueError, match="class outside"):
        road(model, x, torch.tensor([0, 6]), maps)


def test_fraction_removing_every_pixel_is_rejected():
    """round(0.99 * 49) = 49: nothing would be left to impute from."""
    model = TinyConv()
    x = smooth_images(1, 3, 7, 7)
    maps = cam_maps(1, 7, 7)
    with pytest.raises(ValueError, match=r"fraction 0\.99 removes .* 49 of the 49 pixels of a 7x7 map"):
        road(model, x, torch.tensor([0]), maps, fractions=(0.5, 0.99))
    assert removal_masks(maps, (0.98,))[0, 0, 0].sum() == 48  # round(48.02): one pixel kept is fine


def test_return_reasons_and_class_form():
    model = TinyConv()
    x = smooth_images(2, 3, 16, 16)
    maps = cam_maps(2, 16, 16)
    maps[1] = 0.5  # constant: still defined (ranked by the tie order)
    t = torch.tensor([0, 1])
    values, reasons = road(model, x, t, maps, return_reasons=True)
    assert torch.equal(values, road(model, x, t, maps)) and reasons == ["", ""]
    curves, reasons = road(model, x, t, maps, return_curves=True, return_reasons=True)
    assert torch.equal(curves.score, values) and reasons == ["", ""]
    metric = ROAD()
    assert torch.equal(metric.update(model, x, t, maps), values)
    out = metric.compute()
    assert torch.equal(out["values"], values) and out["nan"] == 0 and not out["reasons"]


def test_complementary_pairs_of_fractions():
    from validation.metrics.road import complementary_pairs, removal_counts
    assert complementary_pairs(removal_counts((0.2, 0.4, 0.6, 0.8), 128, 128), 128 * 128) == \
        [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert complementary_pairs([3, 7, 3], 10) == [(0, 1), (1, 0)]  # the second 3 finds no free 7
    assert complementary_pairs([5, 5], 10) == [(0, 0), (1, 1)]  # MoRF 0.5 pairs with LeRF 0.5
    assert complementary_pairs([2, 3], 10) == []


def test_paired_imputation_equals_separate_solves(monkeypatch):
    # MoRF at k and LeRF at 1 - k are solved as one complementary system; the images must equal
    # those of separate solves (a fraction without partner, 0.3, is solved alone)
    import importlib
    road_module = importlib.import_module("validation.metrics.road")  # the package exports road()
    x = smooth_images(3, 3, 32, 32, seed=5)
    maps = cam_maps(3, 32, 32, seed=6)
    fractions = (0.2, 0.3, 0.5, 0.8)
    paired = road_images(x, maps, fractions, noise=0.0, impute_batch_size=5)
    monkeypatch.setattr(road_module, "complementary_pairs", lambda counts, pixels: [])
    separate = road_images(x, maps, fractions, noise=0.0)
    assert (paired - separate).abs().max() <= 2e-5
    removed = removal_masks(maps, fractions)[:, :, :, None].expand_as(paired)
    assert torch.equal(paired[~removed], x[:, None, None].expand_as(paired)[~removed])


def test_impute_batch_size_must_be_positive():
    x, maps = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16)
    with pytest.raises(ValueError, match="impute_batch_size must be >= 1, got 0"):
        road_images(x, maps, impute_batch_size=0)


def test_misused_arguments_get_clear_errors():
    """Integer images, a bare fraction, curves asked of ARCC: errors that name the argument and
    the fix, not torch's (or a silently truncated uint8 imputation)."""
    from validation.metrics import arcc, average_drop, evaluate

    model = TinyConv()
    x, maps, t = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16), torch.tensor([0, 1])
    as_bytes = (x * 255).to(torch.uint8)
    for call in (lambda: average_drop(model, as_bytes, t, maps), lambda: road(model, as_bytes, t, maps),
                 lambda: road_images(as_bytes, maps)):
        with pytest.raises(TypeError, match=r"x must be floating point images in \[0, 1\], got torch.uint8"):
            call()
    for bad in (0.5, "0.5"):
        with pytest.raises(TypeError, match=r"fractions must be a sequence of values in \(0, 1\)"):
            road(model, x, t, maps, fractions=bad)
    with pytest.raises(TypeError, match=r"call road\(\.\.\., return_curves=True\)"):
        arcc(model, x, t, maps, lambda images, target: maps, return_curves=True)
    # one metric may be named alone, not spelt out letter by letter
    alone = evaluate(model, x, t, maps, metrics="complexity")
    torch.testing.assert_close(alone["complexity"], evaluate(model, x, t, maps, metrics=["complexity"])["complexity"])
    torch.testing.assert_close(alone["complexity"], maps.mean((1, 2)))


def test_a_nan_score_from_non_finite_logits_has_a_reason():
    """A model whose logits are Inf for some images (e.g. an overflow) gives NaN probabilities:
    ROAD's NaN had the reason "" (meaning "defined"), and so had ARCC's; now "nan" and "road:nan",
    as Average Drop already said "nan"."""
    from validation.metrics import arcc, evaluate

    class InfOnBlue(torch.nn.Module):  # Inf logits for images whose blue channel is bright
        def __init__(self):
            super().__init__()
            self.inner = TinyConv()

        def forward(self, images):
            logits = self.inner(images)
            bright = images[:, 2].mean((1, 2))[:, None] > 0.8
            return torch.where(bright, torch.full_like(logits, float("inf")), logits)

    model = InfOnBlue()
    x, maps, target = smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16), torch.tensor([0, 1])
    x[1, 2] = 0.95  # every perturbed copy keeps a bright blue channel: all of sample 1's forwards are Inf
    values, reasons = road(model, x, target, maps, return_reasons=True)
    assert torch.isfinite(values[0]) and torch.isnan(values[1]) and reasons == ["", "nan"]
    curves, reasons = road(model, x, target, maps, return_curves=True, return_reasons=True)
    assert reasons == ["", "nan"] and torch.isnan(curves.morf[1]).all()
    explainer = lambda images, t: images.mean(1)  # noqa: E731
    values, reasons = arcc(model, x, target, maps, explainer, return_reasons=True)
    assert torch.isfinite(values[0]) and torch.isnan(values[1]) and reasons == ["", "road:nan"]
    res = evaluate(model, x, target, maps, metrics=["road", "arcc"], explainer=explainer)
    assert res.reasons == {"road": ["", "nan"], "arcc": ["", "road:nan"]}
    metric = ROAD()
    metric.update(model, x, target, maps)
    assert metric.compute()["reasons"] == {"nan": 1}


def test_noise_that_is_not_a_finite_non_negative_number_is_refused():
    """noise=NaN (e.g. read from a config) passed the `noise < 0` check and then `noise > 0` was
    false: ROAD ran silently noise-free; noise=Inf made every pixel NaN (0 * Inf)."""
    from validation.metrics import evaluate

    model, x, maps, t = TinyConv(), smooth_images(2, 3, 16, 16), cam_maps(2, 16, 16), torch.tensor([0, 1])
    for noise in (float("nan"), float("inf"), -0.01):
        for call in (lambda: road_images(x, maps, noise=noise), lambda: road(model, x, t, maps, noise=noise),
                     lambda: evaluate(model, x, t, maps, metrics=["road"], noise=noise)):
            with pytest.raises(ValueError, match=f"noise must be a finite number >= 0, got {noise}"):
                call()
