"""Pixel attributions through captum: LIME, KernelShap (superpixel features), DeepLift,
InputXGradient, IntegratedGradients. Attributions (B, 3, H, W) are reduced to a map by
``reduce`` (default |sum over channels|, as the RefineCAM paper's code), then min-maxed.

LIME/KernelShap features: SLIC superpixels (scikit-image, 100 segments, compactness 10,
sigma 1, as the paper's code) or a square ``grid``. Their sampling draws from torch's global
generator inside captum, so each image is fitted from that generator seeded with ``seed`` and
restored afterwards (``validation._rng.seeded_global_rng``): results are reproducible, a batch
equals its images one at a time (captum would fit a batch's images one after another from one
stream), and the caller's random state, CUDA's included, is left untouched.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from .._rng import seeded_global_rng
from .._model_input import check_logits
from .base import Explainer, ModelGuard, compute_dtype, option_int, option_number, resolve_target
from .pixel import check_reduction, reduce_channels
from .registry import register

SUPERPIXELS = ("slic", "grid")


def grid_segments(batch: int, size: tuple[int, int], cells: int, device) -> torch.Tensor:
    """(B, 1, H, W) long feature ids 0..n-1 of a cells x cells grid (at most one cell per pixel
    along a side shorter than ``cells``)."""
    H, W = size
    # captum takes max id + 1 as the number of features: ids skipped where cells > a side (row *
    # cells + column) became features that no pixel holds, sampled and fitted for nothing
    cells_h, cells_w = min(cells, H), min(cells, W)
    rows = (torch.arange(H, device=device) * cells_h) // H
    cols = (torch.arange(W, device=device) * cells_w) // W
    ids = rows[:, None] * cells_w + cols[None, :]
    return ids.expand(batch, 1, H, W).clone()


def slic_segments(x: torch.Tensor, n_segments: int = 100, compactness: float = 10.0, sigma: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) long SLIC superpixel ids, 0..n-1 per image (scikit-image runs on the CPU)."""
    from skimage.segmentation import slic

    images = x.detach().permute(0, 2, 3, 1).cpu().double().numpy()
    segs = []
    for img in images:  # SLIC is a per-image CPU algorithm
        s = slic(img, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
                 channel_axis=-1)
        _, s = np.unique(s, return_inverse=True)  # contiguous ids
        segs.append(s.reshape(img.shape[:2]))
    return torch.as_tensor(np.stack(segs), dtype=torch.long, device=x.device)[:, None]


# the module types captum DeepLift gives a nonlinear rule (its SUPPORTED_NON_LINEAR): it keeps
# each one's input and output on the module itself, so one module object must run once per pass
# (matched by exact type, as captum does: a subclass may compute something else)
DEEPLIFT_NONLINEAR = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax,
                      nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _fresh_copy(module: nn.Module) -> nn.Module:
    # a ReLU copy runs out of place: captum's rule needs the input the in-place one overwrites
    return nn.ReLU() if type(module) is nn.ReLU else copy.deepcopy(module)


class _PerCall(nn.Module):
    """Stands in for one nonlinear module that a forward pass calls n times: call i uses copy i,
    so hook-based methods (captum DeepLift) see a distinct module per use."""

    def __init__(self, module: nn.Module, n: int):
        super().__init__()
        self.copies = nn.ModuleList(_fresh_copy(module) for _ in range(n))
        self.calls = 0

    def forward(self, x):
        module = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return module(x)


def split_reused_nonlinearities(model: nn.Module, x: torch.Tensor, guard: ModelGuard) -> int:
    """Give every registration and every use of a module DeepLift has a rule for (ReLU, max-pool,
    ...) its own fresh module (restored by ``guard``): one module called twice per forward (ResNet's
    ReLUs) or registered under two names would have its stored input overwritten, and captum
    would hook it once per name. Returns the number of modules swapped."""
    counts: dict[nn.Module, int] = {}
    nonlinear = [m for m in model.modules() if type(m) in DEEPLIFT_NONLINEAR]
    handles = [m.register_forward_hook(lambda m, a, o: counts.__setitem__(m, counts.get(m, 0) + 1))
               for m in nonlinear]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    swapped = []
    # `_modules`, not `named_children()`, which lists a module registered twice under one parent once
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) in DEEPLIFT_NONLINEAR:
                replacement = _PerCall(child, max(1, counts.get(child, 1)))
                guard.swap(parent, name, replacement)
                swapped.append(replacement)

    def reset(module, args):
        for r in swapped:
            r.calls = 0
    guard.register(model.register_forward_pre_hook(reset))
    return len(swapped)


class _EachModuleOnce(nn.Module):
    """The model for captum DeepLift: captum registers its hooks through ``model.apply``, which
    visits a submodule shared by two parents once per parent, and a module hooked twice fails
    (its stored input is gone the second time). Here ``apply`` visits every distinct module once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def apply(self, fn):
        for module in self.model.modules():
            fn(module)
        fn(self)
        return self


class CaptumExplainer(Explainer):
    rectifier = None  # the reduction sets the sign convention
    needs_split_nonlinearities = False
    needs_gradients = True

    def __init__(self, model, *, reduce: str = "sum_abs", **options):
        super().__init__(model, **options)
        self.reduce = check_reduction(reduce)

    def _captum(self, x: torch.Tensor):
        """The captum attribution object for a call on the images ``x``."""
        raise NotImplementedError

    def _attribute(self, method, x, target):
        raise NotImplementedError

    def _explain_raw(self, x, target, guard):
        with torch.no_grad():
            logits = check_logits(self.model(x), x.shape[0])
        target = resolve_target(target, logits)
        if self.needs_split_nonlinearities:
            split_reused_nonlinearities(self.model, x, guard)
        with torch.enable_grad(), warnings.catch_warnings():
            # captum's notices about hooks on activations and per-example LIME models are expected
            warnings.filterwarnings("ignore", module=r"captum\.")
            warnings.filterwarnings("ignore", message=r".*(non-linear|multiple inputs|required_grads).*")
            attr = self._attribute(self._captum(x), x.clone().requires_grad_(True), target)
        return reduce_channels(attr.detach().to(compute_dtype(attr.dtype)), self.reduce), target, {}


# captum DeepLift's default: an input difference smaller than this counts as zero (the rule then
# uses the plain gradient instead of delta_out / delta_in)
CAPTUM_DEEPLIFT_EPS = 1e-10


def deeplift_eps(model: nn.Module, x: torch.Tensor) -> float:
    """captum DeepLift's ``eps`` for a model: its default 1e-10, or, where a floating dtype of the
    model's parameters and buffers (the images' dtype for a model without any) has no positive
    value that small (float16: its smallest is 6e-8), that dtype's smallest positive value, so
    that ``|delta_in| < eps`` still means delta_in == 0. captum compares in the activations'
    dtype, where 1e-10 rounds to 0: in float16 every ReLU or max-pool input that the baseline
    leaves unchanged gave 0 / 0 = NaN, and every map came back as zeros flagged degenerate."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()} or {x.dtype}
    return max([CAPTUM_DEEPLIFT_EPS, *(torch.finfo(d).tiny * torch.finfo(d).eps for d in dtypes)])


def check_baseline(value):
    """A baseline is a number or a tensor that broadcasts to the images (checked per call)."""
    return value if isinstance(value, torch.Tensor) else option_number("baseline", value)


def _baseline(value, x):
    if isinstance(value, torch.Tensor):
        try:
            return value.to(x.device, x.dtype).expand_as(x)
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(value.shape)} does not broadcast to the images "
                             f"{tuple(x.shape)}") from None
    return torch.full_like(x, value)


@register("deeplift")
class DeepLift(CaptumExplainer):
    """captum DeepLift (Rescale rule), baseline ``baseline`` (a value or an image; default 0 = black).
    Reused ReLU and max-pool modules are split per call so the rule sees each use. ``batch_size`` images per
    captum call (None: all at once): captum keeps every ReLU's input and output for the images and
    their baselines, ~110 MB per image for ResNet18 at 224 px."""

    needs_split_nonlinearities = True

    def __init__(self, model, *, baseline=0.0, batch_size: int | None = 16, **options):
        super().__init__(model, **options)
        self.baseline = check_baseline(baseline)
        self.batch_size = None if batch_size is None else option_int("batch_size", batch_size)

    def _captum(self, x):
        from captum.attr import DeepLift as _DeepLift
        return _DeepLift(_EachModuleOnce(self.model), eps=deeplift_eps(self.model, x))

    def _attribute(self, method, x, target):
        baselines = _baseline(self.baseline, x)
        size = self.batch_size or x.shape[0]
        if x.shape[0] <= size:
            return method.attribute(x, baselines=baselines, target=target)
        # each image's attribution depends only on itself and its baseline (the model runs in eval
        # mode), so chunks give the same maps with a bounded memory
        return torch.cat([method.attribute(xs.detach().requires_grad_(True), baselines=bs, target=ts)
                          for xs, bs, ts in zip(x.split(size), baselines.split(size), target.split(size))])


@register("inputxgradient")
class InputXGradient(CaptumExplainer):
    def _captum(self, x):
        from captum.attr import InputXGradient as _IxG
        return _IxG(self.model)

    def _attribute(self, method, x, target):
        return method.attribute(x, target=target)


@register("integratedgradients", "ig")
class IntegratedGradients(CaptumExplainer):
    """captum IntegratedGradients, ``n_steps`` Gauss-Legendre steps from ``baseline`` (default 0),
    ``internal_batch_size`` scaled images per forward (None: all B * n_steps at once)."""

    def __init__(self, model, *, baseline=0.0, n_steps: int = 50, internal_batch_size: int | None = 64,
                 **options):
        super().__init__(model, **options)
        self.baseline, self.n_steps = check_baseline(baseline), option_int("n_steps", n_steps)
        self.internal_batch_size = (None if internal_batch_size is None
                                    else option_int("internal_batch_size", internal_batch_size))

    def _captum(self, x):
        from captum.attr import IntegratedGradients as _IG
        return _IG(self.model)

    def _attribute(self, method, x, target):
        return method.attribute(x, baselines=_baseline(self.baseline, x), target=target, n_steps=self.n_steps,
                                internal_batch_size=self.internal_batch_size)


class _SuperpixelExplainer(CaptumExplainer):
    """Shared by LIME and KernelShap: superpixel features, ``n_samples`` perturbations evaluated
    ``perturbations_per_eval`` at a time, removed features set to ``baseline`` (default 0)."""

    needs_gradients = False  # forward passes only
    # KernelShap: captum cannot sample the coalitions of one feature (its kernel has no weight
    # to draw from and it fails deep inside torch.distributions), but the Shapley value of a
    # single player is exact: the whole change f(x) - f(baseline)
    exact_single_feature = False

    def __init__(self, model, *, superpixels: str = "slic", n_segments: int = 100, grid_cells: int = 8,
                 n_samples: int = 200, perturbations_per_eval: int = 50, baseline=0.0, seed: int = 0, **options):
        super().__init__(model, **options)
        if superpixels not in SUPERPIXELS:
            raise ValueError(f"superpixels must be one of {SUPERPIXELS}, got {superpixels!r}")
        self.superpixels = superpixels
        self.n_segments, self.grid_cells = option_int("n_segments", n_segments), option_int("grid_cells", grid_cells)
        self.n_samples = option_int("n_samples", n_samples)
        self.perturbations_per_eval = option_int("perturbations_per_eval", perturbations_per_eval)
        self.baseline, self.seed = check_baseline(baseline), option_int("seed", seed, minimum=0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.superpixels == "grid":
            return grid_segments(x.shape[0], tuple(x.shape[-2:]), self.grid_cells, x.device)
        return slic_segments(x, self.n_segments)

    def _attribute(self, method, x, target):
        mask, baseline = self.features(x), _baseline(self.baseline, x)
        maps = []
        # captum fits the images of a call one after another from one random stream; reseeding per
        # image makes an image's map independent of the others in its batch (captum loops anyway)
        for i in range(x.shape[0]):
            if self.exact_single_feature and bool(mask[i].amin() == mask[i].amax()):
                maps.append(self._single_feature(x[i:i + 1], baseline[i:i + 1], target[i:i + 1]))
                continue
            with seeded_global_rng(self.seed, x.device):
                maps.append(method.attribute(x[i:i + 1], baselines=baseline[i:i + 1], target=target[i:i + 1],
                                             feature_mask=mask[i:i + 1], n_samples=self.n_samples,
                                             perturbations_per_eval=self.perturbations_per_eval))
        return torch.cat(maps)

    def _single_feature(self, x, baseline, target):
        """Attributions of an image that is one feature (a 1x1 image, grid_cells=1, n_segments=1):
        its Shapley value f(x) - f(baseline) of the target's logit on every pixel and channel."""
        with torch.no_grad():
            logits = check_logits(self.model(torch.cat([x, baseline]).detach()), 2)
        value = logits[0, target[0]] - logits[1, target[0]]
        return value.to(x.dtype).expand_as(x).clone()


@register("lime")
class Lime(_SuperpixelExplainer):
    def _captum(self, x):
        from captum.attr import Lime as _Lime
        return _Lime(self.model)


@register("kernelshap")
class KernelShap(_SuperpixelExplainer):
    exact_single_feature = True

    def _captum(self, x):
        from captum.attr import KernelShap as _KernelShap
        return _KernelShap(self.model)
