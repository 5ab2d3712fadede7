"""Localisation metrics: Quantus on tie-free maps, sklearn for AUC with ties, hand-made tie cases."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from validation.metrics import (default_topk, gt_cosine, localisation_auc, pointing_game, relevance_mass_accuracy,
                                relevance_rank_accuracy, sparseness, topk_intersection)


def _tie_free(b=6, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, h, w, generator=g)
    gt = torch.zeros(b, h, w)
    for i in range(b):
        y, x = torch.randint(0, h - 6, (2,), generator=g).tolist()
        gt[i, y:y + 3 + i % 4, x:x + 4] = 1.0
    return maps, gt


def _quantus(metric, maps, gt, **kw):
    import quantus
    m = getattr(quantus, metric)(disable_warnings=True, display_progressbar=False, normalise=False, abs=False, **kw)
    a = maps[:, None].numpy().astype(np.float64)
    s = gt[:, None].numpy()
    x = np.repeat(a, 3, axis=1)
    y = np.zeros(len(a), dtype=int)
    return np.asarray(m(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s), dtype=np.float64)


@pytest.mark.parametrize("name, ours, kw", [
    ("PointingGame", pointing_game, {}),
    ("TopKIntersection", lambda m, g: topk_intersection(m, g, k=20), {"k": 20}),
    ("RelevanceMassAccuracy", relevance_mass_accuracy, {}),
    ("RelevanceRankAccuracy", relevance_rank_accuracy, {}),
    ("AUC", localisation_auc, {}),
])
def test_match_quantus_on_tie_free_maps(name, ours, kw):
    maps, gt = _tie_free()
    theirs = _quantus(name, maps, gt, **kw)
    np.testing.assert_allclose(ours(maps, gt).double().numpy(), theirs, atol=1e-5)


def test_sparseness_matches_quantus():
    import quantus
    maps, _ = _tie_free()
    a = maps[:, None].numpy().astype(np.float64)
    metric = quantus.Sparseness(disable_warnings=True, display_progressbar=False, normalise=False, abs=False)
    theirs = np.asarray(metric(model=None, x_batch=np.repeat(a, 3, 1), y_batch=np.zeros(6, int), a_batch=a.copy()))
    np.testing.assert_allclose(sparseness(maps).double().numpy(), theirs, atol=1e-5)  # they add 1e-7


def test_auc_with_ties_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 4, (5, 12, 12), generator=g).float() / 3  # heavy ties
    gt = (torch.rand(5, 12, 12, generator=g) < 0.3).float()
    ours = localisation_auc(maps, gt)
    for i in range(5):
        assert ours[i].item() == pytest.approx(roc_auc_score(gt[i].flatten().numpy(), maps[i].flatten().numpy()),
                                               abs=1e-6)


def test_topk_and_rank_accuracy_expected_value_over_ties():
    # 4x4 map: two pixels at 1.0 (one in S), four tied at 0.5 (one in S), the rest 0
    maps = torch.zeros(1, 4, 4)
    gt = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = maps[0, 0, 1] = 1.0
    maps[0, 1, :] = 0.5
    gt[0, 0, 0] = 1
    gt[0, 1, 0] = 1
    gt[0, 3, 3] = 1
    # k = 4: both 1.0 pixels (1 hit) + 2 of the 4 tied (expected 2 * 1/4 hits) -> 1.5 / 4
    assert topk_intersection(maps, gt, k=4).item() == pytest.approx(1.5 / 4)
    # |S| = 3: two 1.0 pixels (1 hit) + 1 of 4 tied (1/4) -> 1.25 / 3
    assert relevance_rank_accuracy(maps, gt).item() == pytest.approx(1.25 / 3)


def test_expected_value_equals_average_over_all_tie_orders():
    """Brute force: the mean of the Quantus-style score over many random tie orders."""
    g = torch.Generator().manual_seed(2)
    maps = torch.randint(0, 3, (1, 5, 5), generator=g).float() / 2
    gt = (torch.rand(1, 5, 5, generator=g) < 0.4).float()
    flat, s = maps.flatten().numpy(), gt.flatten().numpy().astype(bool)
    rng = np.random.default_rng(0)
    k = 7
    scores = []
    for _ in range(20000):
        jitter = rng.random(flat.size) * 1e-3
        top = np.argsort(-(flat + jitter))[:k]
        scores.append(s[top].mean())
    assert topk_intersection(maps, gt, k=k).item() == pytest.approx(np.mean(scores), abs=0.005)


def test_pointing_game_tie_policies():
    maps = torch.zeros(1, 4, 4)
    gt = torch.zeros(1, 4, 4)
    maps[0, 0, :4] = 1.0  # four tied maxima, one inside S
    gt[0, 0, 0] = 1
    assert pointing_game(maps, gt).item() == 1.0
    assert pointing_game(maps, gt, ties="fraction").item() == 0.25
    with pytest.raises(ValueError, match="ties"):
        pointing_game(maps, gt, ties="first")


def test_nan_with_reasons():
    maps = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(3))
    gt = torch.zeros(4, 6, 6)
    gt[:, :2, :2] = 1
    maps[1] = 0.0  # zero map (also constant)
    maps[2] = 0.7  # constant map
    gt[3] = 0.0  # empty mask
    v, r = pointing_game(maps, gt, return_reasons=True)
    assert r == ["", "constant_map", "constant_map", "empty_mask"] and torch.isnan(v[1:]).all()
    v, r = topk_intersection(maps, gt, k=3, return_reasons=True)
    assert r == ["", "constant_map", "constant_map", "empty_mask"]
    v, r = relevance_mass_accuracy(maps, gt, return_reasons=True)
    assert r == ["", "zero_map", "", "empty_mask"] and v[2].item() == pytest.approx(4 / 36)
    v, r = localisation_auc(maps, gt, return_reasons=True)
    assert r == ["", "", "", "empty_mask"] and v[1].item() == 0.5 and v[2].item() == 0.5
    v, r = sparseness(maps, return_reasons=True)
    assert r == ["", "zero_map", "", ""] and v[2].item() == pytest.approx(0.0, abs=1e-6)
    v, r = gt_cosine(maps, gt, return_reasons=True)
    assert r == ["", "zero_map", "", "empty_mask"]
    full = torch.ones(1, 6, 6)
    v, r = localisation_auc(maps[:1], full, return_reasons=True)
    assert r == ["full_mask"] and torch.isnan(v).all()


def test_gt_cosine_hand_computed():
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert gt_cosine(maps, gt).item() == pytest.approx(1.0 / (np.sqrt(1.25) * np.sqrt(2)))



def test_gt_cosine_uses_the_soft_mask_itself():
    """The ground-truth score of the meta-evaluation is the cosine with the anti-aliased alpha
    mask G as given (docs/metrics.md), not with S = G >= 0.5: float64 numpy on soft masks whose
    edges hold every alpha in (0, 1). Every other check of gt_cosine used a 0/1 mask, where the
    two agree."""
    maps, _ = _tie_free(b=3, h=16, w=16, seed=4)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    radius = torch.tensor([3.2, 4.7, 6.1]).view(3, 1, 1)
    distance = ((yy - 7.3) ** 2 + (xx - 8.1) ** 2).sqrt()[None]
    gt = (radius + 0.5 - distance).clamp(0, 1) * torch.tensor([1.0, 0.8, 0.6]).view(3, 1, 1)  # soft disc edges
    assert ((gt > 0) & (gt < 1)).sum() > 50
    a, g = maps.flatten(1).double().numpy(), gt.flatten(1).double().numpy()
    expected = (a * g).sum(1) / np.sqrt((a * a).sum(1) * (g * g).sum(1))
    np.testing.assert_allclose(gt_cosine(maps, gt).numpy(), expected, rtol=1e-6, atol=0)
    binary = (g >= 0.5).astype(np.float64)
    thresholded = (a * binary).sum(1) / np.sqrt((a * a).sum(1) * binary.sum(1))
    assert np.abs(thresholded - expected).min() > 1e-3  # a thresholded mask would be caught


def test_gt_cosine_of_float32_maps_makes_no_float64_copy_of_the_maps():
    """Metrics are computed in float32: only the (B,) sums are widened, never a (B, H*W) tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float64Outputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.sizes.append(t.numel())
            return out

    maps, gt = _tie_free(b=4, h=32, w=32)
    with Float64Outputs() as mode:
        value = gt_cosine(maps, gt)
    assert value.dtype == torch.float32
    assert max(mode.sizes, default=0) <= maps.shape[0], mode.sizes
    a, b = maps.flatten(1).double().numpy(), gt.flatten(1).double().numpy()
    expect = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    np.testing.assert_allclose(value.numpy(), expect, rtol=1e-6, atol=0)  # float32 sums: ~2e-7 seen


def test_gt_cosine_of_a_map_of_tiny_values_is_its_cosine_not_zero():
    """Squares of values below ~1e-19 underflow in float32: the cosine is taken scale-free."""
    maps, gt = _tie_free(b=3)
    tiny = maps * 1e-30
    assert (tiny > 0).all()
    v, r = gt_cosine(tiny, gt, return_reasons=True)
    assert r == ["", "", ""]
    torch.testing.assert_close(v, gt_cosine(maps, gt), rtol=2e-7, atol=0)


def test_gt_cosine_of_half_maps_is_computed_in_float32():
    """Half maps are checked into float32 first: a float16 sum of squares would overflow past
    65504 (256 x 256 ones: inf / inf)."""
    ones = torch.ones(2, 256, 256, dtype=torch.float16)
    gt = ones.clone()
    gt[1, :128] = 0  # cosine of all-ones with half of them: sqrt(1/2)
    v = gt_cosine(ones, gt)
    torch.testing.assert_close(v.float(), torch.tensor([1.0, 0.5 ** 0.5]), rtol=1e-3, atol=0)


def test_default_topk_scales_with_area():
    assert default_topk(224, 224) == 1000
    assert default_topk(128, 128) == 327
    assert default_topk(32, 32) == 20


def test_gt_must_match_maps():
    with pytest.raises(ValueError, match="gt shape"):
        pointing_game(torch.rand(2, 8, 8), torch.ones(2, 8, 7))


@settings(max_examples=20, deadline=None)
@given(h=st.integers(2, 12), w=st.integers(2, 12), pos=st.integers(0, 10_000))
def test_gini_of_one_hot_and_constant(h, w, pos):
    n = h * w
    one_hot = torch.zeros(1, h, w)
    one_hot.view(-1)[pos % n] = 1.0
    assert sparseness(one_hot).item() == pytest.approx((n - 1) / n, abs=1e-6)
    assert sparseness(torch.full((1, h, w), 0.3)).item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=20, deadline=None)
@given(value=st.floats(0, 1), seed=st.integers(0, 1000))
def test_auc_of_constant_map_is_half(value, seed):
    gt = (torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(seed)) < 0.5).float()
    gt[0, 0, 0], gt[0, 0, 1] = 1.0, 0.0
    assert localisation_auc(torch.full((1, 8, 8), value), gt).item() == 0.5


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_scores_in_unit_interval_and_per_sample(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 5, (3, 8, 8), generator=g).float() / 4
    gt = (torch.rand(3, 8, 8, generator=g) < 0.3).float()
    gt[:, 0, 0] = 1
    for fn in (pointing_game, topk_intersection, relevance_rank_accuracy, relevance_mass_accuracy,
               localisation_auc, gt_cosine):
        v = fn(maps, gt)
        finite = v[~torch.isnan(v)]
        assert ((finite >= 0) & (finite <= 1 + 1e-6)).all(), fn.__name__
        # per-sample: scaling one map does not change another sample's value
        scaled = maps.clone()
        scaled[0] = scaled[0] * 0.5
        assert torch.equal(fn(scaled, gt)[1:].nan_to_num(-1), v[1:].nan_to_num(-1)), fn.__name__


@pytest.mark.parametrize("h, w", [(128, 128), (256, 260)])  # 256 x 260 > 2^16 pixels: the float64 path
def test_full_size_maps_match_float64_references(h, w):
    """The fast float32 paths (exact integer sums, float32 reductions) at full image sizes against
    sklearn's AUC and float64 numpy re-derivations of RMA and the Gini index, with heavy ties."""
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(h + w)
    maps = torch.relu(torch.rand(3, h, w, generator=g) - 0.4).mul(1.3).clamp(max=0.7) / 0.7  # ReLU zeros, a tied top
    gt = torch.zeros(3, h, w)
    gt[:, h // 4:h // 2, w // 3:w // 2 + 7] = 1.0
    auc, rma, gini = localisation_auc(maps, gt), relevance_mass_accuracy(maps, gt), sparseness(maps)
    for i in range(3):
        a, s = maps[i].double().flatten().numpy(), gt[i].flatten().numpy() > 0.5
        assert auc[i].item() == pytest.approx(roc_auc_score(s, a), abs=2e-7)
        assert rma[i].item() == pytest.approx(a[s].sum() / a.sum(), rel=1e-6)
        srt, n = np.sort(a), a.size
        assert gini[i].item() == pytest.approx(((2 * np.arange(1, n + 1) - n - 1) * srt).sum() / (n * srt.sum()),
                                               rel=1e-6)


def test_float64_maps_stay_float64():
    maps, gt = _tie_free()
    for metric in (relevance_mass_accuracy, localisation_auc, pointing_game, topk_intersection):
        ours64, ours32 = metric(maps.double(), gt), metric(maps, gt)
        assert ours64.dtype == torch.float64
        np.testing.assert_allclose(ours64.numpy(), ours32.double().numpy(), atol=1e-6)
    a = maps.double().flatten(1).numpy()
    srt, n = np.sort(a, axis=1), a.shape[1]
    gini = ((2 * np.arange(1, n + 1) - n - 1) * srt).sum(1) / (n * srt.sum(1))
    np.testing.assert_allclose(sparseness(maps.double()).numpy(), gini, rtol=1e-12)


def test_auc_exact_on_large_tied_maps():
    """Large tie groups make the summed sorted positions ~n^2/2 (> 2^24 at 128 px), where a plain
    float32 sum would round: a constant map is exactly 0.5 and a two-level map matches sklearn."""
    from sklearn.metrics import roc_auc_score
    gt = torch.zeros(2, 128, 128)
    gt[:, 20:90, 10:100] = 1.0
    maps = torch.stack([torch.full((128, 128), 0.25), (torch.arange(128.0)[:, None] >= 64).float().expand(128, 128)])
    auc = localisation_auc(maps, gt)
    assert auc[0].item() == 0.5
    assert auc[1].item() == pytest.approx(roc_auc_score(gt[1].flatten().numpy() > 0.5, maps[1].flatten().numpy()),
                                          abs=1e-7)


def test_auc_keeps_float64_values_apart():
    """0.5 + 1e-10 rounds to 0.5 in float32: a float64 map must still rank that pixel first."""
    from sklearn.metrics import roc_auc_score
    maps = torch.full((2, 8, 8), 0.5, dtype=torch.float64)
    maps[:, 3, 5] = 0.5 + 1e-10
    maps[1, 6, 1] = 0.5 - 1e-12
    gt = torch.zeros(2, 8, 8, dtype=torch.float64)
    gt[:, 3, 5] = 1.0  # the only pixel in S of sample 0
    gt[1, 0, 0] = 1.0  # ties 61 negatives, beats the 0.5 - 1e-12 one: AUC (62 + 30.5 + 1) / 124
    auc = localisation_auc(maps, gt)
    assert auc[0].item() == 1.0 and auc[1].item() == 93.5 / 124
    for i in range(2):
        assert auc[i].item() == roc_auc_score(gt[i].flatten().numpy() > 0.5, maps[i].flatten().numpy())
    assert localisation_auc(maps.float(), gt)[0].item() == 0.5  # float32 maps really tie


@pytest.mark.parametrize("n", [128 * 128, 2 ** 16, 2 ** 16 + 3])
def test_position_sums_are_exact(n):
    """sum_j j * w_j for 0/+-1 weights: exact (int64 reference) where a float32 dot would round."""
    from validation.metrics.localisation import _position_sums
    g = torch.Generator().manual_seed(n)
    weights = torch.randint(0, 2, (4, n), generator=g)  # 0/1 rows: sums ~ n^2/4 with arbitrary low bits
    weights[0] = 1  # the largest sum, n(n - 1)/2
    weights[3] -= torch.randint(0, 2, (n,), generator=g)  # -1/0/1, as localisation_auc uses it
    exact = (weights * torch.arange(n)).sum(1)
    assert torch.equal(_position_sums(weights.float()), exact.double())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
def test_row_sort_and_kth_largest_match_torch_on_any_thread_count(threads, dtype):
    # the CPU path sorts/partitions blocks of rows in parallel threads; every row must come back in
    # place (67 rows: blocks of unequal size) and the input must stay untouched
    from validation.metrics.localisation import _kth_largest, sort_rows

    g = torch.Generator().manual_seed(5)
    flat = (torch.rand(67, 301, generator=g, dtype=torch.float64) * 50).round().to(dtype)  # many ties
    before = flat.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(sort_rows(flat), flat.sort(dim=1).values)
        for k in (1, 7, 301):
            assert torch.equal(_kth_largest(flat, k), flat.topk(k, dim=1).values[:, -1:])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("threads, path", [(1, "numpy"), (2, "numpy"), (2, "torch")])
def test_per_row_kth_largest_and_auc_on_row_blocks(threads, path, monkeypatch):
    # the CPU paths of rank accuracy (per-row k) and AUC sort blocks of rows in parallel threads and
    # reduce each block there: 37 rows give blocks of unequal size, heavy ties exercise the keys;
    # "torch" is the path other devices take (no numpy view)
    from sklearn.metrics import roc_auc_score

    from validation.metrics import localisation
    from validation.metrics.localisation import _kth_largest

    if path == "torch":
        monkeypatch.setattr(localisation, "_numpy_view", lambda flat: None)

    g = torch.Generator().manual_seed(11)
    maps = torch.randint(0, 5, (37, 9, 11), generator=g).float() / 4
    gt = (torch.rand(37, 9, 11, generator=g) < 0.3).float()
    gt[0] = 0
    gt[0, 4, 4] = 1  # a one-pixel mask: k = 1
    flat = maps.flatten(1)
    k = gt.flatten(1).sum(1).long()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kth = _kth_largest(flat, k)
        auc = localisation_auc(maps, gt)
    finally:
        torch.set_num_threads(old)
    expected_kth = torch.stack([flat[i].sort(descending=True).values[k[i] - 1] for i in range(37)])
    assert torch.equal(kth[:, 0], expected_kth)
    for i in range(37):
        assert auc[i].item() == pytest.approx(roc_auc_score(gt[i].flatten().numpy(), flat[i].numpy()), abs=1e-6)


def test_half_precision_maps_are_computed_in_float32():
    # float16 sums of 1024 values keep ~3 digits; the metrics convert half maps to float32
    maps, gt = _tie_free()
    half = maps.half()
    for metric in (relevance_mass_accuracy, localisation_auc, pointing_game, topk_intersection, sparseness):
        args = (half,) if metric is sparseness else (half, gt)
        out = metric(*args)
        assert out.dtype == torch.float32, metric.__name__
        ref = metric(*((half.float(),) if metric is sparseness else (half.float(), gt)))
        assert torch.equal(out, ref), metric.__name__


def test_option_errors():
    # each used to return numbers: k=2.5 ran as k=2, threshold 0 put every pixel in S
    maps, gt = _tie_free()
    with pytest.raises(ValueError, match="k must be an integer, got 2.5"):
        topk_intersection(maps, gt, k=2.5)
    for threshold in (0.0, 1.5, -0.1):
        for metric in (relevance_mass_accuracy, localisation_auc, pointing_game):
            with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
                metric(maps, gt, threshold=threshold)
    assert torch.equal(topk_intersection(maps, gt, k=20.0), topk_intersection(maps, gt, k=20))
