"""Upsampling of maps to the input size against hand-derived index arithmetic (numpy), at scale
factors that are not integers: there, centre-aligned nearest (``nearest-exact``, docs/attributions.md)
and corner-aligned nearest (torch's plain ``nearest``) pick different source pixels, as do
half-pixel bilinear (``align_corners=False``) and ``align_corners=True``. At the integer factors
the other tests use (16 -> 64, 8 -> 64) the nearest variants coincide."""

from __future__ import annotations

import numpy as np
import torch

from test_attributions_common import build, images, np_bilinear
from validation.attributions import explain
from validation.attributions.postprocess import finalize


def _nearest_centre_index(out: int, n: int) -> np.ndarray:
    """Source index of each output pixel: the input pixel whose extent holds the output pixel's
    centre, floor((i + 0.5) * n / out)."""
    return np.minimum(np.floor((np.arange(out) + 0.5) * n / out).astype(int), n - 1)


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def test_nearest_upsampling_is_centre_aligned_by_hand():
    # 3 -> 4 rows: centres (i + 0.5) * 3/4 = 0.375, 1.125, 1.875, 2.625 -> rows 0, 1, 1, 2
    # (corner-aligned nearest, floor(i * 3/4), gives 0, 0, 1, 2); 3 -> 5 columns: 0, 0, 1, 2, 2
    assert _nearest_centre_index(4, 3).tolist() == [0, 1, 1, 2]
    assert _nearest_centre_index(5, 3).tolist() == [0, 0, 1, 2, 2]
    raw = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]])
    maps, degenerate = finalize(raw, (4, 5), interpolation="nearest")
    expected = torch.tensor([[0, 0, 1, 2, 2], [3, 3, 4, 5, 5], [3, 3, 4, 5, 5], [6, 6, 7, 8, 8]],
                            dtype=torch.float32) / 8
    assert not degenerate.any()
    torch.testing.assert_close(maps[0], expected, rtol=0, atol=0)


def test_bilinear_upsampling_uses_half_pixel_centres_at_a_non_integer_factor():
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    maps, _ = finalize(raw, (7, 12), rectifier=None)
    for b in range(2):
        expected = _minmax(np_bilinear(raw[b].numpy(), 7, 12))
        np.testing.assert_allclose(maps[b].numpy(), expected, rtol=0, atol=1e-12)


def test_lafam_nearest_at_a_non_integer_factor_is_its_formula():
    """LaFAM's protocol, Up(N(mean_k A_k)) with nearest upsampling, at 36 px: ResNet18's stage2 is
    5x5, so each map pixel covers 7.2 input pixels; the reference upsamples with numpy indexing."""
    model = build("resnet18", wrapped=True)
    x = images(2, 36, seed=3)
    acts = []
    handle = model.backbone.layer2.register_forward_hook(lambda m, a, o: acts.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    mean = acts[0].double().mean(1).numpy()                                          # (2, 5, 5)
    assert mean.shape == (2, 5, 5)
    rows = cols = _nearest_centre_index(36, 5)
    ours = explain(model, x, None, method="lafam", layer="stage2", interpolation="nearest")
    for b in range(2):
        expected = _minmax(mean[b])[rows][:, cols]
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=0, atol=1e-5)
    # and bilinear, half-pixel, then min-max: N(Up(mean A))
    ours = explain(model, x, None, method="lafam", layer="stage2")
    for b in range(2):
        expected = _minmax(np_bilinear(mean[b], 36, 36))
        np.testing.assert_allclose(ours[b].numpy(), expected, rtol=0, atol=1e-5)
