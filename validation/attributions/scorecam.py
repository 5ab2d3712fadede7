"""Score-CAM (Wang et al. 2020). L = ReLU(sum_k w_k A_k) with w_k the model's response to the
input masked by channel k's upsampled, min-max normalised activation.

variant="official" (default, the authors' code): masks upsampled bilinearly
(align_corners=False); w_k = softmax probability of the target class for x * mask_k; constant
channels are skipped (w_k = 0, no forward pass spent on them). The final map is
minmax(ReLU(sum_k w_k Up(A_k))): the raw map sum_k w_k A_k is upsampled before the ReLU, as the
authors sum upsampled channels (ReLU and upsampling do not commute where the sum changes sign).
A model with one output is refused (the softmax of one logit is 1 whatever the input).
variant="pytorch-grad-cam": masks upsampled with align_corners=True and normalised as
(u - min) / (max - min + 1e-8), no skipping; w = softmax over channels of the target logits.
With ``cell_centres="model"`` (official variant only) the masks and the map put each cell where
the model centres it.

All masked forwards of the batch run in chunks of ``batch_size`` images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._model_input import check_logits
from .base import LayerExplainer, option_int, resolve_target, to_nchw
from .layers import CellGeometry
from .postprocess import minmax, rectify, upsample
from .registry import register

VARIANTS = ("official", "pytorch-grad-cam")


@register("scorecam")
class ScoreCAM(LayerExplainer):
    def __init__(self, model, layer="stage1", *, variant: str = "official", batch_size: int = 64, **options):
        super().__init__(model, layer, **options)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant != "official" and self.cell_centres != "stride":
            # that variant reproduces pytorch-grad-cam's corner-aligned masks, which place cells
            # neither by the stride convention nor where the model centres them
            raise ValueError(f"scorecam variant={variant!r} upsamples its masks with align_corners=True; "
                             f"cell_centres={self.cell_centres!r} needs variant='official'")
        self.variant = variant
        self.batch_size = option_int("batch_size", batch_size)

    def _masks(self, acts: torch.Tensor, size, cells: CellGeometry | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsampled normalised masks (n, H, W) for low-res maps (n, h, w), and which are usable;
        ``cells``: where the cells land (``cell_centres="model"``, official variant)."""
        official = self.variant == "official"
        if cells is not None:
            up = upsample(acts, tuple(size), "bilinear", cells)
        else:
            up = F.interpolate(acts[:, None], size=size, mode="bilinear", align_corners=not official)[:, 0]
        lo = up.flatten(1).amin(1)[:, None, None]
        hi = up.flatten(1).amax(1)[:, None, None]
        if official:
            usable = (hi > lo).flatten()
            masks = (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        else:
            usable = torch.ones(acts.shape[0], dtype=torch.bool, device=acts.device)
            masks = (up - lo) / (hi - lo + 1e-8)
        return masks, usable

    @torch.no_grad()
    def channel_scores(self, x: torch.Tensor, target: torch.Tensor, A: torch.Tensor,
                       cells: CellGeometry | None = None) -> torch.Tensor:
        """Model response (B, C) to x masked by each channel of A (B, C, h, w), its cells placed by
        ``cells`` (None: stretched over the image)."""
        B, C = A.shape[:2]
        official = self.variant == "official"
        scores = torch.zeros(B, C, device=x.device, dtype=A.dtype)  # compute_dtype: float32 or float64
        pairs = torch.arange(B * C, device=x.device)
        if official:  # constant channels are skipped before any forward pass
            flat = A.flatten(2)
            pairs = pairs[(flat.amax(2) > flat.amin(2)).flatten()]
        for chunk in pairs.split(self.batch_size):
            b, k = chunk // C, chunk % C
            masks, usable = self._masks(A[b, k], x.shape[-2:], cells)
            # masks are in A's dtype: the masked images go back to the images' (the model's) dtype
            out = check_logits(self.model((x[b] * masks[:, None]).to(x.dtype)), len(chunk))
            s = out.to(A.dtype)
            s = s.softmax(1) if official else s
            s = s.gather(1, target[b][:, None])[:, 0]
            scores[b, k] = torch.where(usable, s, torch.zeros_like(s))
        return scores if official else scores.softmax(dim=1)

    def _layer_maps(self, x, target, layers, guard):
        capture = guard.capture(layers)
        with torch.no_grad():
            logits = check_logits(self.model(x), x.shape[0])
            if self.variant == "official" and logits.shape[1] == 1:
                # the softmax of a single logit is 1 for every masked image: all weights equal, the
                # map would not depend on the model's response at all
                raise ValueError("scorecam variant='official' weighs channels by the softmax probability of "
                                 "the target class, which is 1 for every input of a model with one output "
                                 f"(logits of shape {tuple(logits.shape)}); use variant='pytorch-grad-cam' "
                                 "(softmax over channels of the logit) or a model with two outputs")
            target = resolve_target(target, logits)
            acts = [to_nchw(a, layer, x.shape[-2:]) for a, layer in zip(capture.raw(), layers)]
            rank = capture.depth_rank()
            capture.enabled = False  # the masked forwards below must not be recorded
            maps = []
            for A, layer in zip(acts, layers):
                w = self.channel_scores(x, target, A, self.cells(layer))
                maps.append((w[:, :, None, None] * A).sum(dim=1))
        return maps, target, rank

    def postprocess(self, raw, size, cells: CellGeometry | None = None):
        if self.raw or self.variant != "official":
            return super().postprocess(raw, size, cells)
        cells = self.cells(self.layer) if cells is None else cells
        # Up(sum_k w_k A_k) = sum_k w_k Up(A_k) (interpolation is linear): the authors' sum
        return minmax(rectify(upsample(raw.detach(), size, self.interpolation, cells), "relu"))
