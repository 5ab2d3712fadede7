"""Device readiness of the metrics and attribution methods: what would fail or silently differ on
CUDA, checked on the CPU where it can be (flags recorded during the solve, draws refused the way
CUDA refuses them, data-independent helpers run on the ``meta`` device), and CPU-vs-CUDA
comparisons that run where a GPU is available."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from validation.attributions import finalize, get_explainer, mix_maps
from validation.attributions.base import class_score
from validation.attributions.captum_methods import grid_segments
from validation.metrics import (evaluate, imputation, linear_impute, linear_impute_complementary,
                                noisy_linear_impute, road_images)
from validation.metrics.imputation import complementary_system, imputation_system
from validation.metrics.road import pixel_ranks, removal_masks
from test_attributions_common import build, images
from test_metrics_helpers import TinyConv, cam_maps, smooth_images

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TF32_API = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def _conv_tf32_setting():
    """The cuDNN convolution TF32 setting as the solver sets it (torch >= 2.9: per operation)."""
    if NEW_TF32_API:
        return torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cudnn.allow_tf32


def _set_conv_tf32(value):
    """Set the cuDNN convolution TF32 setting; returns the previous one."""
    saved = _conv_tf32_setting()
    if NEW_TF32_API:
        torch.backends.cudnn.conv.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32 = value
    return saved


ALLOWED, OFF = ("tf32", "ieee") if NEW_TF32_API else (True, False)


@pytest.fixture
def tf32_convolutions():
    """cuDNN TF32 convolutions allowed (torch's default), whatever an earlier test left; restored."""
    saved = _set_conv_tf32(ALLOWED)
    yield ALLOWED
    _set_conv_tf32(saved)


@pytest.fixture
def full_float32():
    """cuDNN convolutions in full float32, so that a model's CPU and CUDA outputs agree to float
    rounding (TF32 is what a user may choose for a model; it is not what is compared here)."""
    saved = _set_conv_tf32(OFF)
    yield
    _set_conv_tf32(saved)


@pytest.fixture
def record_conv_tf32(monkeypatch):
    """Every conv2d / conv_transpose2d call records the cuDNN TF32 setting it ran under."""
    seen = []
    for name in ("conv2d", "conv_transpose2d"):
        original = getattr(F, name)

        def recording(*args, _original=original, **kwargs):
            seen.append(_conv_tf32_setting())
            return _original(*args, **kwargs)

        monkeypatch.setattr(F, name, recording)
    return seen


def _masks(b=3, h=24, w=20):
    return removal_masks(cam_maps(b, h, w), (0.3, 0.7))[:, 0]  # (B, 2, H, W): 30 % and 70 % removed


# ---------------------------------------------------------------------------------------------
# the imputation solver runs its convolutions in full float32, not TF32

@pytest.mark.parametrize("solve", ["linear_impute", "complementary", "imputation_system",
                                   "complementary_system", "road_images"])
def test_imputation_convolutions_run_without_tf32(solve, tf32_convolutions, record_conv_tf32):
    # On CUDA torch lets cuDNN use TF32 for float32 convolutions by default (11-bit operands): the
    # solver's exact integer arithmetic would be ~1e-3 off and no system would meet tol
    x = smooth_images(3, 3, 24, 20)
    removed = _masks()[:, 0]
    if solve == "linear_impute":
        linear_impute(x, removed)
    elif solve == "complementary":
        linear_impute_complementary(x, removed)
    elif solve == "imputation_system":
        imputation_system(x, removed)
    elif solve == "complementary_system":
        complementary_system(x, removed)
    else:
        road_images(x, cam_maps(3, 24, 20))
    assert record_conv_tf32 and set(record_conv_tf32) == {OFF}
    assert _conv_tf32_setting() == tf32_convolutions  # the caller's setting is back


def test_tf32_setting_is_restored_when_the_solve_raises(tf32_convolutions, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("solver failed")

    monkeypatch.setattr(imputation, "_solve", failing)
    with pytest.raises(RuntimeError, match="solver failed"):
        linear_impute(smooth_images(2, 3, 16, 16), _masks(2, 16, 16)[:, 0])
    assert _conv_tf32_setting() == tf32_convolutions


@pytest.mark.skipif(not NEW_TF32_API, reason="torch < 2.9 has one cuDNN TF32 flag")
def test_legacy_tf32_flag_reads_the_same_after_a_solve():
    # a user who switched TF32 off the legacy way must be able to read it back (torch raises on
    # a mix of legacy and per-operation settings, so the solver must restore exactly what it read)
    saved = torch.backends.cudnn.allow_tf32
    try:
        for value in (False, True):
            torch.backends.cudnn.allow_tf32 = value
            linear_impute(smooth_images(2, 3, 16, 16), _masks(2, 16, 16)[:, 0])
            assert torch.backends.cudnn.allow_tf32 is value
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def test_solve_is_unchanged_on_cpu(tf32_convolutions):
    # the flag does nothing on the CPU: a solve under either setting is bitwise the same
    x = smooth_images(3, 3, 24, 20)
    removed = _masks()[:, 0]
    allowed = linear_impute(x, removed)
    saved = _set_conv_tf32(OFF)
    try:
        off = linear_impute(x, removed)
    finally:
        _set_conv_tf32(saved)
    assert torch.equal(allowed, off)


# ---------------------------------------------------------------------------------------------
# noisy_linear_impute: a generator on another device than the images

def _refuse_cross_device_draws(monkeypatch):
    """torch.randn refusing a generator on another device than the draw, as CUDA does."""
    original = torch.randn

    def randn(*args, generator=None, device=None, **kwargs):
        if generator is not None:
            target = torch.device(device if device is not None else "cpu")
            if generator.device.type != target.type:
                raise RuntimeError(f"Expected a '{target.type}' device type for generator but found "
                                   f"'{generator.device.type}'")
        return original(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)


def test_noisy_linear_impute_takes_a_generator_on_another_device(monkeypatch):
    # images on another device (meta stands in for CUDA) with a CPU generator: the old code drew
    # on the images' device from the CPU generator, which CUDA refuses
    _refuse_cross_device_draws(monkeypatch)
    monkeypatch.setattr(imputation, "linear_impute", lambda images, removed, **solver: images.clone())
    x = torch.empty(2, 3, 8, 8, device="meta")
    removed = torch.empty(2, 8, 8, dtype=torch.bool, device="meta")
    out = noisy_linear_impute(x, removed, noise=0.1, generator=torch.Generator().manual_seed(1))
    assert out.device.type == "meta" and out.shape == x.shape


def test_noisy_linear_impute_noise_comes_from_the_generator():
    # CPU: the noise is the generator's standard normal field on the removed pixels, unchanged
    x = smooth_images(2, 3, 16, 16)
    removed = _masks(2, 16, 16)[:, 0]
    out = noisy_linear_impute(x, removed, noise=0.1, generator=torch.Generator().manual_seed(4))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    expected = linear_impute(x, removed) + 0.1 * eps * removed[:, None].float()
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# data-independent helpers stay on the input's device (meta: any factory call without device=
# would put a CPU tensor next to a meta one and fail)

def test_pixel_ranks_on_the_maps_device():
    ranks = pixel_ranks(torch.empty(2, 5, 7, device="meta"))
    assert ranks.device.type == "meta" and ranks.shape == (2, 5, 7) and ranks.dtype == torch.long


def test_postprocessing_on_the_maps_device():
    maps, degenerate = finalize(torch.empty(2, 4, 4, device="meta"), (8, 8))
    assert maps.device.type == degenerate.device.type == "meta" and maps.shape == (2, 8, 8)
    assert mix_maps(torch.empty(3, 2, 8, 8, device="meta"), "invexp").device.type == "meta"


def test_score_and_grid_features_on_the_input_device():
    logits = torch.empty(3, 5, device="meta")
    target = torch.zeros(3, dtype=torch.long, device="meta")
    for score in ("logit", "softmax", "log_softmax", "rest"):
        assert class_score(logits, target, score).device.type == "meta"
    assert grid_segments(2, (9, 7), 3, "meta").device.type == "meta"


# ---------------------------------------------------------------------------------------------
# on a GPU: results on the input's device and equal to the CPU's (run by a user with CUDA)

@cuda
def test_linear_impute_on_cuda_matches_cpu_with_torch_default_tf32(tf32_convolutions):
    x = smooth_images(4, 3, 48, 40)
    removed = removal_masks(cam_maps(4, 48, 40), (0.2, 0.6))[:, :, 0].flatten(0, 1)
    x = x.repeat_interleave(2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a solve that falls short warns: TF32 made every one do
        on_gpu = linear_impute(x.cuda(), removed.cuda())
        pairs = linear_impute_complementary(x.cuda(), removed.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), linear_impute(x, removed), rtol=0, atol=2e-5)
    torch.testing.assert_close(pairs.cpu(), linear_impute_complementary(x, removed), rtol=0, atol=2e-5)


@cuda
def test_noisy_linear_impute_with_a_cpu_generator_on_cuda():
    x = smooth_images(2, 3, 16, 16)
    removed = _masks(2, 16, 16)[:, 0]
    on_gpu = noisy_linear_impute(x.cuda(), removed.cuda(), generator=torch.Generator().manual_seed(2))
    assert on_gpu.device.type == "cuda"
    on_cpu = noisy_linear_impute(x, removed, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-5)


@cuda
def test_evaluate_on_cuda_matches_cpu(full_float32):
    model = TinyConv()
    x = smooth_images(3, 3, 32, 32)
    maps = cam_maps(3, 32, 32)
    gt = (cam_maps(3, 32, 32, seed=1) > 0.3).float()
    target = torch.tensor([0, 2, 5])
    explainer = get_explainer("gradcam", model, layer="conv")
    metrics = ("average_drop", "complexity", "coherency", "adcc", "road", "arcc", "gt_cosine", "pointing_game",
               "sparseness", "relevance_mass_accuracy", "relevance_rank_accuracy", "topk_intersection",
               "localisation_auc")
    on_cpu = evaluate(model, x, target, maps, metrics, explainer=explainer, gt=gt)
    model.cuda()
    try:
        on_gpu = evaluate(model, x.cuda(), target.cuda(), maps.cuda(), metrics, explainer=explainer, gt=gt.cuda())
    finally:
        model.cpu()
    for name in metrics:
        assert on_gpu[name].device.type == "cuda", name
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=0, atol=1e-4, equal_nan=True,
                                   msg=name)
        assert on_gpu.reasons[name] == on_cpu.reasons[name], name


CUDA_METHODS = [("gradcam", {}), ("gradcampp", {}), ("layercam", {}), ("shapleycam", {}), ("scorecam", {}),
                ("lafam", {}), ("guidedbackprop", {}), ("guidedgradcam", {}), ("refinecam", {}),
                ("deeplift", {}), ("inputxgradient", {}), ("integratedgradients", {"n_steps": 8}),
                ("lime", {"superpixels": "grid", "n_samples": 40}),
                ("kernelshap", {"superpixels": "grid", "n_samples": 40}),
                ("randomcam", {}), ("halfcam", {}), ("all1scam", {}), ("centre", {})]


@cuda
@pytest.mark.parametrize("method, options", CUDA_METHODS, ids=[m for m, _ in CUDA_METHODS])
def test_explainers_on_cuda_match_cpu(method, options, full_float32):
    model = build("resnet18")
    x = images(2, 64)
    target = torch.tensor([1, 4])
    on_cpu = get_explainer(method, model, **options).attribute(x, target)
    model.cuda()
    try:
        on_gpu = get_explainer(method, model, **options).attribute(x.cuda(), target.cuda())
    finally:
        model.cpu()
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-3)


@cuda
def test_relax_on_cuda_stays_on_the_device():
    # RELAX draws its masks on x's device (documented: CPU and CUDA generators differ)
    model = build("resnet18").cuda()
    maps = get_explainer("relax", model, n_masks=16, batch_size=8).explain(images(2, 32).cuda(), None)
    assert maps.maps.device.type == "cuda" and maps.extras["uncertainty"].device.type == "cuda"


def test_coherency_names_an_explainer_that_returns_maps_on_another_device():
    """A user's callable returning CPU maps for CUDA images met torch's generic device error deep
    inside Pearson; ``meta`` stands in for the other device."""
    from validation.metrics import coherency

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"explainer returned maps on meta for images on cpu"):
        coherency(x, [0, 1], maps, lambda images, target: torch.rand(2, 8, 8, device="meta"))
