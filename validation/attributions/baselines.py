"""Reference maps that calibrate the metrics (RefineCAM paper, Fig. 1), plus an oracle and a prior.

randomcam: uniform [0, 1] per pixel. halfcam: 0.5 everywhere except one pixel 0 and one pixel 1.
all1scam: 1 everywhere except one pixel 0. The special pixels are drawn per image (distinct
positions) from a seeded generator, so no corner is favoured. oracle: the ground truth passed as
``gt=`` (B, H, W) or (B, 1, H, W). centre: an isotropic Gaussian centred in the image,
``sigma`` a fraction of the shorter side, min-maxed like a method's map (so a constant one, as
on a 1x1 or 2x2 image, is zeros flagged degenerate, never 0/0). None looks at the model; the
others are returned as they are defined (no min-max; the oracle is clipped to [0, 1])."""

from __future__ import annotations

import torch

from .base import Explainer
from .postprocess import minmax
from .registry import register


class Baseline(Explainer):
    rectifier = None

    def __init__(self, model, *, seed: int = 0, **options):
        super().__init__(model, **options)
        self.seed = int(seed)

    def generator(self, device) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(self.seed)

    def make(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        raise NotImplementedError

    def _explain_raw(self, x, target, guard, **inputs):
        return self.make(x, **inputs), target, {}

    def postprocess(self, raw, size):  # defined maps, not normalised
        return raw, torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)


def _random_pixels(batch: int, size, count: int, gen: torch.Generator) -> torch.Tensor:
    """(B, count) distinct flat pixel indices per image."""
    n = size[0] * size[1]
    if n < count:
        raise ValueError(f"image of {size} has fewer than {count} pixels")
    return torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :count]


@register("randomcam")
class RandomCAM(Baseline):
    def make(self, x):
        B, _, H, W = x.shape
        return torch.rand(B, H, W, generator=self.generator(x.device)).to(x.device)


def _constant_with_pixels(x, fill, values, gen):
    B, _, H, W = x.shape
    maps = torch.full((B, H * W), fill, dtype=torch.float32)
    idx = _random_pixels(B, (H, W), len(values), gen)
    maps.scatter_(1, idx, torch.tensor(values, dtype=torch.float32).expand(B, -1).contiguous())
    return maps.view(B, H, W).to(x.device)


@register("halfcam")
class HalfCAM(Baseline):
    def make(self, x):
        return _constant_with_pixels(x, 0.5, [0.0, 1.0], self.generator(x.device))


@register("all1scam")
class All1sCAM(Baseline):
    def make(self, x):
        return _constant_with_pixels(x, 1.0, [0.0], self.generator(x.device))


@register("oracle")
class Oracle(Baseline):
    def make(self, x, gt=None):
        if gt is None:
            raise ValueError("oracle needs the ground truth: attribute(x, target, gt=masks)")
        gt = torch.as_tensor(gt, device=x.device, dtype=torch.float32)
        if gt.ndim == 4 and gt.shape[1] == 1:
            gt = gt[:, 0]
        B, _, H, W = x.shape
        if tuple(gt.shape) != (B, H, W):
            raise ValueError(f"gt must have shape ({B}, {H}, {W}) or ({B}, 1, {H}, {W}), got {tuple(gt.shape)}")
        return gt.clamp(0, 1)


@register("centre", "center", "centreprior")
class CentrePrior(Baseline):
    def __init__(self, model, *, sigma: float = 0.25, **options):
        super().__init__(model, **options)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)

    def make(self, x):
        B, _, H, W = x.shape
        s = self.sigma * min(H, W)
        ys = torch.arange(H, device=x.device, dtype=torch.float32) - (H - 1) / 2
        xs = torch.arange(W, device=x.device, dtype=torch.float32) - (W - 1) / 2
        g = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * s * s))
        return g.expand(B, H, W).clone()

    def postprocess(self, raw, size):
        if self.raw:
            return super().postprocess(raw, size)
        return minmax(raw)
