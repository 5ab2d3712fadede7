"""Behaviour of the ROAD imputation (validation/metrics/imputation.py) that the mutation audit
found untested: the default noise generator's seed, images that require grad, masks given as
any nonzero value, float64 solves staying float64, the warning for a solve stopped before any
update, the mapping of lopsided pairs' single systems back to their samples in the warning, and
``stats["iterations"]`` over several CPU groups. Every value is checked against an independent
reference (scipy's float64 spsolve, a re-drawn generator, a solve of each system alone)."""
import re
import warnings

import numpy as np
import pytest
import torch

from test_metrics_helpers import smooth_images, spsolve_impute
from validation.metrics import imputation
from validation.metrics.imputation import linear_impute, linear_impute_complementary, noisy_linear_impute


def _random_mask(n, h, w, fraction, seed):
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < fraction


def _spsolve_errors(x, removed, out):
    return [np.abs(out[i].double().numpy() - spsolve_impute(x[i].double().numpy(), removed[i].numpy())).max()
            for i in range(len(removed))]


def test_default_noise_is_drawn_from_a_generator_seeded_with_zero():
    # the docstring promises reproducible noise without a generator: a CPU generator seeded with 0
    x = smooth_images(2, 3, 16, 16, seed=3)
    removed = _random_mask(2, 16, 16, 0.5, seed=4)
    out = noisy_linear_impute(x, removed, noise=0.05)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    expected = linear_impute(x, removed) + 0.05 * eps * removed[:, None].float()
    assert torch.equal(out, expected)


def test_images_that_require_grad_are_imputed_like_detached_ones():
    # the solve writes into out= buffers, which autograd refuses for tensors that require grad
    x = smooth_images(2, 3, 16, 16, seed=5)
    removed = _random_mask(2, 16, 16, 0.4, seed=6)
    removed[:, 0, 0] = False
    removed[:, -1, -1] = True
    leaf = x.clone().requires_grad_(True)
    single = linear_impute(leaf, removed)
    both = linear_impute_complementary(leaf, removed)
    assert not single.requires_grad and not both.requires_grad
    assert torch.equal(single, linear_impute(x, removed))
    assert torch.equal(both, linear_impute_complementary(x, removed))


def test_any_nonzero_mask_value_marks_a_removed_pixel():
    # "nonzero/True where a pixel is imputed": negative and fractional weights count as removed
    x = smooth_images(2, 3, 16, 16, seed=7)
    removed = _random_mask(2, 16, 16, 0.5, seed=8)
    removed[:, 0, 0] = False
    removed[:, -1, -1] = True
    values = torch.where(removed, torch.tensor(-0.5), torch.tensor(0.0))
    assert torch.equal(linear_impute(x, values), linear_impute(x, removed))
    assert torch.equal(linear_impute_complementary(x, values), linear_impute_complementary(x, removed))
    generator = torch.Generator().manual_seed(1)
    noisy = noisy_linear_impute(x, values, noise=0.1, generator=generator)
    assert torch.equal(noisy, noisy_linear_impute(x, removed, noise=0.1, generator=torch.Generator().manual_seed(1)))


def test_float64_images_are_solved_in_float64():
    # float64 images get a float64 result as accurate as float64 allows (float32's floor is ~1e-6)
    h = w = 24
    x = smooth_images(3, 3, h, w, seed=9).double()
    removed = _random_mask(3, h, w, 0.6, seed=10)
    removed[:, 0, 0] = False
    removed[:, -1, -1] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 meets tol 1e-10
        single = linear_impute(x, removed, tol=1e-10)
        both = linear_impute_complementary(x, removed, tol=1e-10)
    assert single.dtype == both.dtype == torch.float64
    assert max(_spsolve_errors(x, removed, single)) <= 1e-9
    assert max(_spsolve_errors(x, removed, both[:, 0])) <= 1e-9
    assert max(_spsolve_errors(x, ~removed, both[:, 1])) <= 1e-9


def test_a_solve_stopped_before_any_update_warns_even_when_its_residual_meets_tol():
    # max_iter=0 returns the multigrid initial guess: its residual (~1e-3) meets tol=1, but no CG
    # update has been measured, so the stop is not verified and must be reported
    x = smooth_images(2, 3, 32, 32, seed=13)
    removed = _random_mask(2, 32, 32, 0.6, seed=14)
    with pytest.warns(RuntimeWarning, match=r"stopped after 0 iterations .* sample\(s\) \[0, 1\] of 2;"):
        linear_impute(x, removed, max_iter=0, tol=1.0)
    with pytest.warns(RuntimeWarning, match=r"stopped after 0 iterations .* sample\(s\) \[0, 1\] of 2;"):
        linear_impute_complementary(x, removed, max_iter=0, tol=1.0)


def test_the_warning_names_the_samples_of_lopsided_pairs_that_fell_short(monkeypatch):
    # lopsided pairs (samples 0 and 2 here) are solved as 2 x 2 single systems after the balanced
    # pair (sample 1): a shortfall of those systems must be reported against samples 0 and 2,
    # not against the systems' positions 0-3 among the single systems
    real_impute = imputation._impute

    def every_system_falls_short(images, m, tol, max_iter, report, out):
        real_impute(images, m, tol, max_iter, report, out)
        report.update(unmet=torch.ones_like(report["unmet"]), worst_residual=1.0, worst_step=1.0)

    monkeypatch.setattr(imputation, "_impute", every_system_falls_short)
    h = w = 16
    x = smooth_images(3, 3, h, w, seed=15)
    removed = torch.zeros(3, h, w, dtype=torch.bool)
    removed[0, 3, 4] = True  # one removed pixel: under 1 % of the pixels, lopsided
    removed[1, :, : w // 2] = True  # balanced: the pair path
    removed[2] = True
    removed[2, 5, 5] = False  # one kept pixel: lopsided
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = linear_impute_complementary(x, removed)
    assert len(caught) == 1
    assert re.search(r"sample\(s\) \[0, 2\] of 3;", str(caught[0].message)), str(caught[0].message)
    for i in range(3):  # each sample's two imputations in its own slot
        assert max(_spsolve_errors(x[i:i + 1], removed[i:i + 1], both[i:i + 1, 0])) <= 2e-5
        assert max(_spsolve_errors(x[i:i + 1], ~removed[i:i + 1], both[i:i + 1, 1])) <= 2e-5


def test_stats_report_the_most_iterations_any_group_ran(monkeypatch):
    # with one system per CPU group, "iterations" is the most any group ran: the hardest system
    # first, so a merge that kept the last group's count would report fewer
    h = w = 32
    x = smooth_images(3, 3, h, w, seed=17)
    removed = torch.zeros(3, h, w, dtype=torch.bool)
    removed[0] = _random_mask(1, h, w, 0.7, seed=18)[0]  # scattered holes: several iterations
    removed[1, 10, 12] = True  # one isolated pixel: exact after one iteration
    removed[2, 20, 3] = True
    alone = []
    for i in range(3):
        one = {}
        linear_impute(x[i:i + 1], removed[i:i + 1], stats=one)
        alone.append(one["iterations"])
    assert alone[0] > max(alone[1:])
    monkeypatch.setattr(imputation, "_CPU_CHUNK_VALUES", 3 * h * w)  # one system per group
    stats = {}
    linear_impute(x, removed, stats=stats)
    assert stats["iterations"] == alone[0]


def _dense_rows(coef, h, w):
    """(9, H, W) stencil of one image -> dense (H W, H W) matrix, rows and columns in row-major
    pixel order (offsets in row-major order over {-1, 0, 1}^2, as documented)."""
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    dense = np.zeros((h * w, h * w))
    for o, (dy, dx) in enumerate(offsets):
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    dense[y * w + x, (y + dy) * w + x + dx] = coef[o, y, x]
                else:
                    assert coef[o, y, x] == 0, "no coefficient may point outside the image"
    return dense


def test_public_system_builders_return_twelve_times_the_spsolve_system():
    # imputation_system / complementary_system are public: their (coef, rhs) must be 12 (A, b)
    # of the reference system on the images as given (no per-channel shift, no side swapped)
    from test_metrics_helpers import spsolve_system
    from validation.metrics.imputation import complementary_system, imputation_system
    h, w = 7, 9
    x = smooth_images(2, 3, h, w, seed=19) + 0.25
    removed = _random_mask(2, h, w, 0.5, seed=20)
    removed[:, 0, 0], removed[:, -1, -1] = True, False
    plain_coef, plain_rhs = imputation_system(x, removed)
    pair_coef, pair_rhs = complementary_system(x, removed)
    for i in range(2):
        sides = []
        for mask in (removed[i], ~removed[i]):
            a, b, idx = spsolve_system(x[i].double().numpy(), mask.numpy())
            sides.append((12 * a.toarray(), 12 * b, idx))
        (a, b, idx), (a_rest, b_rest, idx_rest) = sides
        dense = _dense_rows(plain_coef[i].double().numpy(), h, w)
        np.testing.assert_allclose(dense[np.ix_(idx, idx)], a, atol=1e-12)
        assert not dense[np.ix_(idx, idx_rest)].any() and not dense[idx_rest].any()
        np.testing.assert_allclose(plain_rhs[i].double().numpy().reshape(3, -1)[:, idx], b.T, atol=1e-5)
        assert not plain_rhs[i].reshape(3, -1)[:, idx_rest].any()
        # the pair: each pixel's row is its own side's system, coupled to nothing across the mask
        dense = _dense_rows(pair_coef[i].double().numpy(), h, w)
        pair_b = pair_rhs[i].double().numpy().reshape(3, -1)
        for (side_a, side_b, side_idx), other in ((sides[0], idx_rest), (sides[1], idx)):
            np.testing.assert_allclose(dense[np.ix_(side_idx, side_idx)], side_a, atol=1e-12)
            assert not dense[np.ix_(side_idx, other)].any()
            np.testing.assert_allclose(pair_b[:, side_idx], side_b.T, atol=1e-5)


def test_a_system_that_stopped_is_not_moved_by_the_rest_of_its_group():
    # the two-kept-pixel system stops after one iteration, its neighbour in the group after two:
    # from its stop on its step length must be 0, so it equals its solve alone up to float32
    # rounding (6e-8); a second CG step taken for it anyway moved it by 2.4e-6
    h = w = 64
    x = smooth_images(2, 3, h, w, seed=3)
    removed = torch.ones(2, h, w, dtype=torch.bool)
    removed[0] = _random_mask(1, h, w, 0.5, seed=21)[0]
    removed[1, 0, 0] = removed[1, 0, 1] = False
    iterations, alone = [], []
    for i in range(2):
        one = {}
        alone.append(linear_impute(x[i:i + 1], removed[i:i + 1], stats=one))
        iterations.append(one["iterations"])
    assert iterations[1] < iterations[0]  # the group runs on after system 1 has stopped
    together = linear_impute(x, removed)
    moved = (together - torch.cat(alone)).abs().max().item()
    assert moved <= 3e-7, f"moved by {moved:.1e} by the rest of its group"
