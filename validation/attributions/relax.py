"""RELAX (Wickstrom et al. 2023): label-free occlusion. For N random masks m_n,
s_n = cosine(embedding(x * m_n), embedding(x)); importance R = sum_n s_n m_n / sum_n m_n;
uncertainty U = sum_n m_n (s_n - R)^2 / sum_n m_n (a weighted variance; ``uncertainty="sum"``
keeps the reference code's unnormalised sum_n m_n (s_n - R)^2).

Masks: a ``cells`` x ``cells`` Bernoulli(p) grid upsampled bilinearly to the image, reflect-padded
(replicate when ``shift`` >= the image side) by ``shift`` pixels and cropped at a random offset in [0, 2 * shift] (reference: 7 cells, 3 px),
all from a seeded torch.Generator. Embedding: the input of the model's last nn.Linear (the
penultimate features) by default, or the flattened output of ``embedding_layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._model_input import check_logits
from .base import Explainer, option_int, option_number
from .layers import resolve_layer_full
from .registry import register

UNCERTAINTY = ("variance", "sum")


def check_mask_options(cells, p, shift) -> None:
    option_int("cells", cells)
    if not 0 < option_number("p", p) < 1:
        raise ValueError(f"p (probability a grid cell is kept) must be in (0, 1), got {p!r}")
    if shift is not None:
        option_int("shift", shift, minimum=0)


def relax_mask_params(n: int, generator: torch.Generator, cells: int = 7, p: float = 0.5, shift: int = 3):
    """The random part of n masks: Bernoulli grids (n, 1, cells, cells) and crop offsets (2, n)."""
    check_mask_options(cells, p, shift)
    device = generator.device
    grid = (torch.rand(n, 1, cells, cells, generator=generator, device=device) < p).float()
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator, device=device)
    return grid, offsets


def render_masks(grid: torch.Tensor, offsets: torch.Tensor, size: tuple[int, int], shift: int) -> torch.Tensor:
    """Upsample grids bilinearly to ``size``, reflect-pad (replicate when too small to reflect) by ``shift`` and crop at ``offsets``."""
    H, W = size
    n, device = grid.shape[0], grid.device
    up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    if shift > 0:
        up = F.pad(up, (shift, shift, shift, shift), mode="reflect" if shift < min(H, W) else "replicate")
    rows = offsets[0][:, None] + torch.arange(H, device=device)
    cols = offsets[1][:, None] + torch.arange(W, device=device)
    idx = torch.arange(n, device=device)[:, None, None]
    return up[:, 0][idx, rows[:, :, None], cols[:, None, :]]


def relax_masks(n: int, size: tuple[int, int], generator: torch.Generator, cells: int = 7,
                p: float = 0.5, shift: int | None = None) -> torch.Tensor:
    """(n, H, W) float32 masks on the generator's device."""
    shift = cells // 2 if shift is None else int(shift)
    grid, offsets = relax_mask_params(n, generator, cells, p, shift)
    return render_masks(grid, offsets, size, shift)


@register("relax")
class RELAX(Explainer):
    rectifier = None

    def __init__(self, model, *, n_masks: int = 3000, batch_size: int = 128, seed: int = 0, cells: int = 7,
                 p: float = 0.5, shift: int | None = None, embedding_layer=None, uncertainty: str = "variance",
                 **options):
        super().__init__(model, **options)
        option_int("n_masks", n_masks)
        option_int("batch_size", batch_size)
        if uncertainty not in UNCERTAINTY:
            raise ValueError(f"uncertainty must be one of {UNCERTAINTY}, got {uncertainty!r}")
        check_mask_options(cells, p, shift)
        self.n_masks, self.batch_size, self.seed = int(n_masks), int(batch_size), option_int("seed", seed, minimum=0)
        self.cells, self.p, self.shift, self.uncertainty = int(cells), float(p), shift, uncertainty
        self.embedding_layer = None if embedding_layer is None else resolve_layer_full(model, embedding_layer)

    def _embedding_hook(self, guard, store: list):
        if self.embedding_layer is not None:
            module = self.embedding_layer.module
            # a copy: flatten(1) of a contiguous output is a view, which an in-place op after the
            # layer (VGG's Linear -> ReLU(inplace=True)) would overwrite with another layer's values
            name = self.embedding_layer.name

            def hook(m, args, out):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"RELAX: embedding_layer {name!r} returns {type(out).__name__}, not a tensor; "
                                    "pass a layer whose output is one tensor")
                store.append(out.flatten(1).clone())

            guard.register(module.register_forward_hook(hook))
            return
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("RELAX: the model has no nn.Linear head; pass embedding_layer=")
        head = linears[-1]  # torchvision classifiers end with their classifier Linear
        guard.register(head.register_forward_hook(lambda m, args, out: store.append(args[0].flatten(1))))

    def embed(self, x: torch.Tensor, store: list) -> torch.Tensor:
        store.clear()
        check_logits(self.model(x), x.shape[0])
        if not store:
            raise RuntimeError("RELAX: the embedding layer was not called in the forward pass")
        if len(store) > 1:  # which of its outputs is the embedding? the layer methods refuse such modules too
            raise ValueError(f"RELAX: the embedding layer ran {len(store)} times in one forward pass; pass an "
                             "embedding_layer that runs once")
        return store[-1].float()

    @torch.no_grad()
    def _explain_raw(self, x, target, guard):
        store: list = []
        self._embedding_hook(guard, store)
        B, _, H, W = x.shape
        ref = F.normalize(self.embed(x, store), dim=1)
        # every random draw up front, so the masks do not depend on batch_size
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        shift = self.cells // 2 if self.shift is None else int(self.shift)
        grids, offsets = relax_mask_params(self.n_masks, gen, self.cells, self.p, shift)
        s0 = torch.zeros(H, W, dtype=torch.float64, device=x.device)       # sum_n m_n
        s1 = torch.zeros(B, H, W, dtype=torch.float64, device=x.device)    # sum_n s_n m_n
        s2 = torch.zeros(B, H, W, dtype=torch.float64, device=x.device)    # sum_n s_n^2 m_n
        per_forward = max(1, self.batch_size // B)
        done = 0
        while done < self.n_masks:
            n = min(per_forward, self.n_masks - done)
            masks = render_masks(grids[done:done + n], offsets[:, done:done + n], (H, W), shift)
            masked = (x[:, None] * masks[None, :, None]).flatten(0, 1).to(x.dtype)  # (B*n, C, H, W)
            # more images than batch_size (n = 1 when B > batch_size): forwards of batch_size images
            emb = torch.cat([self.embed(chunk, store) for chunk in masked.split(self.batch_size)])
            emb = F.normalize(emb, dim=1).view(B, n, -1)
            sim = (emb * ref[:, None]).sum(-1)                                     # (B, n)
            # float64 sums: the spread s2 - 2 R s1 + R^2 s0 is ~1 / var(s_n) times smaller than its terms
            sim, masks = sim.double(), masks.double()
            s0 += masks.sum(0)
            s1 += torch.einsum("bn,nhw->bhw", sim, masks)
            s2 += torch.einsum("bn,nhw->bhw", sim * sim, masks)
            done += n
        s0 = s0.clamp_min(torch.finfo(torch.float64).tiny)
        importance = s1 / s0
        spread = (s2 - 2 * importance * s1 + importance ** 2 * s0).clamp_min(0)  # sum_n m_n (s_n - R)^2
        uncertainty = spread / s0 if self.uncertainty == "variance" else spread
        return importance.float(), target, {"uncertainty": uncertainty.float(), "n_masks": self.n_masks}
