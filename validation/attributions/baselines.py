"""Reference maps that calibrate the metrics (RefineCAM paper, Fig. 1), plus an oracle and a prior.

randomcam: uniform [0, 1] per pixel. halfcam: 0.5 everywhere except one pixel 0 and one pixel 1.
all1scam: 1 everywhere except one pixel 0. The special pixels are drawn per image (distinct
positions), so no corner is favoured. Each image draws from its own CPU generator, seeded with
``seed`` and the image's float32 bytes: an image's map depends only on it and the seed (a batch
equals its images one at a time, on any device), and different images get different maps.
oracle: the ground truth passed as ``gt=`` (B, H, W) or (B, 1, H, W). centre: an isotropic
Gaussian centred in the image, ``sigma`` a fraction of the shorter side, min-maxed like a
method's map (so a constant one, as on a 1x1 or 2x2 image, is zeros flagged degenerate, never
0/0). None looks at the model; the others are returned as they are defined (no min-max; the
oracle is clipped to [0, 1])."""

from __future__ import annotations

import hashlib

import torch

from .base import Explainer, option_int, option_number
from .postprocess import minmax
from .registry import register


class Baseline(Explainer):
    rectifier = None

    def __init__(self, model, *, seed: int = 0, **options):
        super().__init__(model, **options)
        self.seed = option_int("seed", seed, minimum=0)

    def image_generators(self, x: torch.Tensor) -> list[torch.Generator]:
        """One CPU generator per image of ``x``, seeded with ``seed`` and the image's float32 bytes."""
        images = x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        seeds = [hashlib.sha256(b"%d:" % self.seed + image.tobytes()).digest() for image in images]
        return [torch.Generator(device="cpu").manual_seed(int.from_bytes(d[:8], "little") >> 1) for d in seeds]

    def make(self, x: torch.Tensor, **inputs) -> torch.Tensor:
        raise NotImplementedError

    def _explain_raw(self, x, target, guard, **inputs):
        return self.make(x, **inputs), target, {}

    def postprocess(self, raw, size):  # defined maps, not normalised
        return raw, torch.zeros(raw.shape[0], dtype=torch.bool, device=raw.device)


@register("randomcam")
class RandomCAM(Baseline):
    def make(self, x):
        size = tuple(x.shape[-2:])
        return torch.stack([torch.rand(size, generator=g) for g in self.image_generators(x)]).to(x.device)


def _constant_with_pixels(x, fill, values, generators):
    """``fill`` everywhere but len(values) distinct random pixels per image, set to ``values``."""
    B, _, H, W = x.shape
    if H * W < len(values):
        raise ValueError(f"image of {(H, W)} has fewer than {len(values)} pixels")
    idx = torch.stack([torch.randperm(H * W, generator=g)[:len(values)] for g in generators])
    maps = torch.full((B, H * W), fill, dtype=torch.float32)
    maps.scatter_(1, idx, torch.tensor(values, dtype=torch.float32).expand(B, -1).contiguous())
    return maps.view(B, H, W).to(x.device)


@register("halfcam")
class HalfCAM(Baseline):
    def make(self, x):
        return _constant_with_pixels(x, 0.5, [0.0, 1.0], self.image_generators(x))


@register("all1scam")
class All1sCAM(Baseline):
    def make(self, x):
        return _constant_with_pixels(x, 1.0, [0.0], self.image_generators(x))


@register("oracle")
class Oracle(Baseline):
    call_inputs = ("gt",)

    def make(self, x, gt=None):
        if gt is None:
            raise ValueError("oracle needs the ground truth: attribute(x, target, gt=masks)")
        gt = torch.as_tensor(gt, device=x.device, dtype=torch.float32)
        if gt.ndim == 4 and gt.shape[1] == 1:
            gt = gt[:, 0]
        B, _, H, W = x.shape
        if tuple(gt.shape) != (B, H, W):
            raise ValueError(f"gt must have shape ({B}, {H}, {W}) or ({B}, 1, {H}, {W}), got {tuple(gt.shape)}")
        bad = ~torch.isfinite(gt).flatten(1).all(1)
        if bad.any():  # clamp would pass NaN through as a map
            raise ValueError(f"gt of sample(s) {bad.nonzero().flatten().tolist()} holds NaN or Inf")
        return gt.clamp(0, 1)


@register("centre", "center", "centreprior")
class CentrePrior(Baseline):
    def __init__(self, model, *, sigma: float = 0.25, **options):
        super().__init__(model, **options)
        if not option_number("sigma", sigma) > 0:
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
