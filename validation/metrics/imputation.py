"""Noisy linear imputation (Rong et al., 2022, "ROAD"), solved for many images at once.

Every removed pixel equals the weighted mean of its in-image 8 neighbours (weight 1/6 for the
4 edge neighbours, 1/12 for the 4 diagonal ones, renormalised over the neighbours that exist);
kept pixels are fixed. That is one sparse symmetric positive definite system per image and mask
(three right-hand sides, one per channel). The reference solves it with ``scipy.sparse.linalg.spsolve``
one image at a time; here every system of a batch is solved together with conjugate gradients
preconditioned by a geometric multigrid V-cycle, all as batched tensor ops on the input's device:

* the system is scaled by 12 (integer coefficients, exact in float32); the fine operator is one
  depthwise 3x3 convolution plus masks;
* fields are packed as (C, H, W, N), the systems of a group innermost (see "Packed layout"), so
  every convolution is vectorised across systems and per-system masks broadcast over channels;
* coarse operators are Galerkin products ``P^T A P`` with bilinear prolongation ``P``, computed
  exactly by one strided convolution per level and stored as 9-point variable stencils, so
  every coarse problem is the exact projection of the fine one whatever the
  shape of the holes (single pixels, whole borders, thin lines); the coarsest 5x5 grid is
  solved with a pseudo-inverse;
* smoothing is Jacobi on the fine level and l1-Jacobi with two Chebyshev weights on coarse
  levels, post-sweeps the adjoint of the pre-sweeps and ``R = P^T``, so the V-cycle is a
  symmetric positive definite preconditioner;
* CG starts from one full-multigrid pass (coarsest solve, then prolongation plus one V-cycle per
  level) and on CPU runs on cache-sized groups of systems (``_CPU_CHUNK_VALUES``);
* CG runs on the cheap recursive residual, started from the exactly computed residual (hi/lo
  split, see ``_FineOperator.residual``), so float32 reaches ~1e-6, and checked against the
  true residual before stopping; it stops when that meets ``tol`` and the last update is below ``5 tol``
  (a small residual alone hides large smooth errors when almost nothing is kept); systems whose
  smallest eigenvalue, estimated on the coarsest grid, is tiny (long images, tiny kept sets)
  stop only on a step taken from their exact residual (see ``_ILL_CONDITIONED_BELOW``);
* images one pixel high or wide are smoothed on the fine level like the coarse levels
  (``_ONE_PIXEL_THIN_OMEGA``);
* ``linear_impute_complementary`` solves a mask and its complement (ROAD's MoRF at k and LeRF at
  1 - k) as one system on every pixel, each pixel coupled only to its own side of the mask.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from .._model_input import nonfinite_samples

__all__ = ["linear_impute", "linear_impute_complementary", "noisy_linear_impute", "imputation_system",
           "complementary_system", "reported_linear_impute", "reported_linear_impute_complementary",
           "SolveReport", "NEIGHBOUR_WEIGHTS", "DEFAULT_TOL"]

# (dy, dx) -> weight, as in the reference implementation (road_evaluation/imputations.py)
NEIGHBOUR_WEIGHTS = {
    (-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12,
    (0, -1): 1 / 6, (0, 1): 1 / 6,
    (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12,
}
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # index o = 3 * (dy + 1) + (dx + 1)
_CENTRE = 4


# The system is scaled by 12 so that every fine-level coefficient is a small integer (2 for edge,
# 1 for diagonal neighbours, 12/8/5 on the diagonal): float32 then represents the operator
# exactly and its rows sum to exactly zero inside holes. With the float32 weights 1/6 and 1/12
# the rounding acts like a mass term that the ill-conditioned large-hole systems amplify to
# ~2e-4 error; scaled, float32 solves agree with float64 spsolve to ~1e-6.
_SCALE = 12.0


def _make_neighbour_kernel() -> torch.Tensor:
    kernel = torch.zeros(3, 3, dtype=torch.float64)
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS.items():
        kernel[dy + 1, dx + 1] = round(weight * _SCALE)
    return kernel


def _make_galerkin_kernel() -> torch.Tensor:
    """Weights K[D, o, t] with A_c^D(I) = sum_{o,t} K[D, o, t] a^o(2I + t - 1): P^T A P as a conv."""
    p = _make_bilinear_kernel()
    kernel = torch.zeros(9, 9, 3, 3, dtype=torch.float64)
    for d_idx, (ddy, ddx) in enumerate(_OFFSETS):
        for o_idx, (ody, odx) in enumerate(_OFFSETS):
            for sy in (-1, 0, 1):
                for sx in (-1, 0, 1):
                    qy, qx = sy + ody - 2 * ddy, sx + odx - 2 * ddx
                    if abs(qy) <= 1 and abs(qx) <= 1:
                        kernel[d_idx, o_idx, sy + 1, sx + 1] = p[sy + 1, sx + 1] * p[qy + 1, qx + 1]
    return kernel


def _make_bilinear_kernel() -> torch.Tensor:
    k1 = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    return torch.outer(k1, k1)


# constants, built once (float64, CPU) and converted per call
_NEIGHBOUR_KERNEL = _make_neighbour_kernel()
_BILINEAR_KERNEL = _make_bilinear_kernel()
_GALERKIN_KERNEL = _make_galerkin_kernel()


def _neighbour_kernel(dtype, device) -> torch.Tensor:
    return _NEIGHBOUR_KERNEL.to(dtype=dtype, device=device)


def _bilinear_kernel(dtype, device) -> torch.Tensor:
    return _BILINEAR_KERNEL.to(dtype=dtype, device=device)


def _galerkin_kernel(dtype, device) -> torch.Tensor:
    return _GALERKIN_KERNEL.to(dtype=dtype, device=device)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """3x3 cross-correlation of every channel with ``kernel`` (channels_last: the fast CPU path)."""
    c = x.shape[1]
    return F.conv2d(x.contiguous(memory_format=torch.channels_last), _depthwise_weight(kernel, c), padding=1, groups=c)


def _shifted(field: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 8, H, W): field[p + offset] for the 8 neighbour offsets (0 outside)."""
    h, w = field.shape[-2:]
    padded = F.pad(field, (1, 1, 1, 1))
    return torch.cat([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _OFFSETS if (dy, dx) != (0, 0)],
                     dim=1)


def _odd(size: int) -> int:
    return size + 1 - size % 2


def _odd_padded(field: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An uninitialised (..., height, width) -> odd-sized tensor like ``field``, its padding zeroed."""
    out = field.new_empty(*field.shape[:-2], _odd(height), _odd(width))
    out[..., height:, :] = 0
    out[..., :, width:] = 0
    return out


def _system(images: torch.Tensor, m: torch.Tensor, complementary: bool, centred: bool = False):
    """coef (N, 9, H', W') of the scaled system on the grid zero-padded to odd sizes H', W'
    (vertex-centred coarsening), the packed rhs (C, H', W', N) and the shift (C, 1, 1, N) the
    rhs was built for: with ``centred`` (plain systems only), the mean of every channel over the
    kept pixels, subtracted from the images (see ``_impute``), else None. Every coefficient is
    written once, in place: no stacked or padded copies of the (N, 9, H, W) stencil."""
    h, w = images.shape[-2:]
    coef = _odd_padded(m.new_empty(m.shape[0], 9, h, w), h, w)
    image_part = coef[..., :h, :w]
    padded_m = F.pad(m, (1, 1, 1, 1))
    kernel = _neighbour_kernel(images.dtype, images.device)
    if complementary:
        # same side: inside (1 - m) + shifted(m) s with s = 2m - 1 (1 where both or neither are removed)
        kept, sign = 1 - m, 2 * m - 1
        inside = _shifted(torch.ones_like(m[:1]))
    else:
        negative_m = -m
    neighbours = [(o, dy, dx) for o, (dy, dx) in enumerate(_OFFSETS) if o != _CENTRE]
    for j, (o, dy, dx) in enumerate(neighbours):
        target = image_part[:, o:o + 1]
        shifted = padded_m[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        k = kernel[dy + 1, dx + 1]
        if complementary:
            torch.mul(kept, inside[:, j:j + 1] * -k, out=target)
            target.addcmul_(shifted, sign * -k)
        else:
            torch.mul(shifted, negative_m * k, out=target)
    diagonal = _diagonal(m)
    if complementary:
        image_part[:, _CENTRE:_CENTRE + 1] = diagonal
    else:
        torch.mul(m, diagonal, out=image_part[:, _CENTRE:_CENTRE + 1])
    # the right-hand side, computed in the packed layout (where the convolutions are fast) and
    # written straight into the odd-padded packed field the solver takes
    n, c = images.shape[:2]
    rhs = images.new_empty(c, _odd(h), _odd(w), n)
    rhs[:, h:] = 0
    rhs[:, :, w:] = 0
    packed_images, packed_m = _pack(images), _pack(m)
    weight = _depthwise_weight(kernel, n)
    # each side's data is the convolution of the other side's pixels alone: the shorter
    # m K(I) - s K(I m) cancels two O(12) sums to ~1e-6 where the data is zero, an error the
    # ill-conditioned systems of tiny kept sets amplify to ~1e-4
    packed_kept = 1 - packed_m
    data = packed_images * packed_kept
    shift = None
    if centred:
        shift = _pixel_sum(data) / _pixel_sum(packed_kept)
        data.addcmul_(packed_kept, shift, value=-1)
    torch.mul(packed_m, _packed_conv(data, weight), out=rhs[:, :h, :w])
    if complementary:
        rhs[:, :h, :w].addcmul_(packed_kept, _packed_conv(packed_images * packed_m, weight))
    return coef, rhs, shift


def _pixel_sum(field: torch.Tensor) -> torch.Tensor:
    """(C, H, W, N) -> (C, 1, 1, N) sums over the pixels, reduced along wide rows of W N values
    (see _system_max_abs)."""
    c, h, w, n = field.shape
    return field.view(c, h, w * n).sum(1).view(c, w, n).sum(1).view(c, 1, 1, n)


def imputation_system(images: torch.Tensor, removed: torch.Tensor):
    """The fine-level system ``A x = b`` on the full grid, scaled by 12 (integer coefficients).

    images: (N, C, H, W); removed: (N, H, W) or (N, 1, H, W), nonzero where a pixel is imputed.
    Returns (coef (N, 9, H, W), rhs (N, C, H, W)): ``coef[:, o, p]`` is the coefficient of
    ``x[p + offset_o]`` (offsets in row-major order over {-1, 0, 1}^2) in the row of pixel ``p``;
    rows of kept pixels are all zero.
    """
    h, w = images.shape[-2:]
    with _ieee_float32_convolutions():
        coef, rhs, _ = _system(images, _checked_mask(images, removed, DEFAULT_TOL, 0), complementary=False)
    return coef[..., :h, :w], _unpack(rhs)[..., :h, :w]


def complementary_system(images: torch.Tensor, removed: torch.Tensor):
    """The imputation systems of ``removed`` and of its complement as one system on every pixel
    (same scaling and layout as ``imputation_system``): a pixel is coupled to its in-image
    neighbours on its own side of the mask, and the other side's pixels are its known data."""
    h, w = images.shape[-2:]
    with _ieee_float32_convolutions():
        coef, rhs, _ = _system(images, _checked_mask(images, removed, DEFAULT_TOL, 0), complementary=True)
    return coef[..., :h, :w], _unpack(rhs)[..., :h, :w]


def _diagonal(m: torch.Tensor) -> torch.Tensor:
    """Sum of the (scaled) weights of the in-image neighbours of every pixel: 12, 8 or 5."""
    ones = torch.ones_like(m[:1])
    return _depthwise(ones, _neighbour_kernel(m.dtype, m.device))


def _pad_odd(field: torch.Tensor) -> torch.Tensor:
    """Zero-pad bottom/right of (..., H, W) to odd sizes: coarse point I then sits on fine 2I
    (vertex-centred)."""
    h, w = field.shape[-2:]
    if h % 2 and w % 2:
        return field
    return F.pad(field, (0, 1 - w % 2, 0, 1 - h % 2))


# Packed layout: every field of a group of N systems with C channels is one contiguous (C, H, W, N)
# tensor, the N systems innermost. Seen through _as_conv it is a channels_last (C, N, H, W) batch,
# so every 3x3 stencil (operator, restriction, prolongation) is one depthwise convolution
# vectorised across the N systems (with one image per batch entry, oneDNN's kernels fill 3 of 16
# vector lanes with the 3 channels: 3-4x slower per value). Per-system fields (masks, diagonals,
# coarse stencils) are (1, H, W, N) and broadcast over the outermost dimension, which keeps the
# elementwise loops long and contiguous.

def _as_conv(field: torch.Tensor) -> torch.Tensor:
    """(C, H, W, N) -> the channels_last (C, N, H, W) view that F.conv2d takes (no copy)."""
    return field.permute(0, 3, 1, 2)


def _from_conv(field: torch.Tensor) -> torch.Tensor:
    """(C, N, H, W) -> contiguous (C, H, W, N). Strided and transposed depthwise convs return NCHW
    even for channels_last input; those are copied to packed order once, here."""
    return field.permute(0, 2, 3, 1).contiguous()


def _pack(field: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (C, H, W, N)."""
    return field.permute(1, 2, 3, 0).contiguous()


def _unpack(field: torch.Tensor) -> torch.Tensor:
    """(C, H, W, N) -> (N, C, H, W) view."""
    return field.permute(3, 0, 1, 2)


def _depthwise_weight(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    return kernel.expand(channels, 1, 3, 3).contiguous(memory_format=torch.channels_last)


def _packed_conv(field: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """3x3 depthwise convolution of a packed (C, H, W, N) field, zero outside the grid."""
    return _from_conv(F.conv2d(_as_conv(field), weight, stride=stride, padding=1, groups=weight.shape[0]))


def _pad_odd_packed(field: torch.Tensor) -> torch.Tensor:
    """_pad_odd for a packed (C, H, W, N) field."""
    h, w = field.shape[1:3]
    if h % 2 and w % 2:
        return field
    return F.pad(field, (0, 0, 0, 1 - w % 2, 0, 1 - h % 2))


def _border_slices(height: int, width: int) -> list:
    """Indices of packed (C, H, W, N) fields covering the image's border pixels once each: the
    first and last rows, then the first and last columns without the corners."""
    rows = sorted({0, height - 1})
    columns = sorted({0, width - 1})
    inner = slice(1, max(1, height - 1))
    return ([(slice(None), slice(r, r + 1), slice(0, width)) for r in rows]
            + [(slice(None), inner, slice(c, c + 1)) for c in columns])


class _FineOperator:
    """The scaled 8-neighbour operator on the active pixels: A x = d x - neighbours(x).

    Plain systems (``side=None``): the active pixels are the removed ones and, for x = m x,
    neighbours(x) = K * x, one depthwise conv (callers mask it: the value on kept pixels is
    unused). Complementary pairs (``side`` = the removed mask m): every in-image pixel is active
    and sees only the neighbours on its own side of m, so one system holds both the imputation of
    m and that of its complement. With q = 1 - m and the sign s = m - q (0 off the image),
    neighbours(x) = m K(m x) + q K(q x) = (K x + s K(s x)) / 2, two convolutions with K / 2 (exact:
    the scaled weights are 2 and 1). (Subtracting a gathered list of the terms that cross the
    interface from K x was measured 2.4x slower even on tie-free CAM masks.)
    """

    def __init__(self, active: torch.Tensor, diag: torch.Tensor, image_shape: tuple,
                 side: torch.Tensor | None = None):
        self.mask, self.diag = _pack(active), _pack(diag)
        self.image_shape = image_shape
        kernel = _neighbour_kernel(active.dtype, active.device)
        self._weight = _depthwise_weight(kernel, active.shape[0])
        self.side = None if side is None else _pack(side)
        # A x = 12 x - neighbours(x) - (12 - d) x: the diagonal goes into the convolution as its
        # centre weight (12 x - K x for plain systems, (6 x - K x / 2) + s (6 s x - K(s x) / 2)
        # for pairs), and 12 - d is 0 except on the image border (d = 8 on edges, 5 in corners),
        # which thin slices correct: two full passes fewer per application, and still exact on
        # multiples of 2^-16 (the weights are multiples of 1/2; see residual)
        centre = torch.zeros_like(kernel)
        centre[1, 1] = _SCALE
        folded = centre - kernel
        if self.side is not None:
            self.sign = 2 * self.side - self.mask
            self._half_weight = self._weight / 2
            folded = folded / 2
        self._folded_weight = _depthwise_weight(folded, active.shape[0])
        self._border = _border_slices(*image_shape)
        # 12 - d on the border's active pixels; elsewhere (d = 0 off the active pixels) x is 0
        self._border_excess = [(_SCALE - self.diag[index]).contiguous() for index in self._border]

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """K * x: the weighted sum of the 8 neighbours (zero outside the image)."""
        return _packed_conv(x, self._weight)  # channels_last output already: no copy

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        if self.side is None:
            return self.conv(x)
        return self._same_side(x, self._half_weight)

    def _same_side(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Pairs: W x + s W(s x), each pixel summing only its own side's terms; zeroed on the
        odd-size padding, where it is W x (s = 0 there)."""
        total = _packed_conv(x, weight)
        total.addcmul_(self.sign, _packed_conv(self.sign * x, weight))
        h, w = self.image_shape
        total[:, h:] = 0
        total[:, :, w:] = 0
        return total

    def masked_neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """neighbours(x), zero off the active pixels (for pairs it is already)."""
        return self.mask * self.conv(x) if self.side is None else self.neighbours(x)

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        """12 x - neighbours(x) (x zero off the active pixels), before the border correction;
        for plain systems not yet masked."""
        if self.side is None:
            return _packed_conv(x, self._folded_weight)
        return self._same_side(x, self._folded_weight)

    def _correct_border(self, y: torch.Tensor, x: torch.Tensor, sign: int) -> torch.Tensor:
        """y += sign * (12 - d) x on the image border (the only pixels where d != 12)."""
        for index, excess in zip(self._border, self._border_excess):
            y[index].addcmul_(excess, x[index], value=sign)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x zero off the active pixels (every iterate, update and correction is)."""
        total = self._folded(x)
        if self.side is None:
            total.mul_(self.mask)
        return self._correct_border(total, x, -1)

    def subtract_from(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """r - A x, for x zero off the active pixels."""
        if self.side is None:
            rest = torch.addcmul(r, self.mask, self._folded(x), value=-1)
        else:
            rest = torch.sub(r, self._folded(x))
        return self._correct_border(rest, x, 1)

    def residual(self, rhs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """rhs - A x computed (almost) exactly in float32.

        x is split into hi (x rounded to 2^-16) and lo = x - hi. Every term of A hi is a small
        integer times a multiple of 2^-16, so A hi and rhs - A hi are exact in float32; A lo is
        tiny, so its rounding is negligible. Without this the float32 residual has a smooth
        rounding bias of ~1e-6 that large holes amplify into ~1e-4 errors.
        """
        if x.dtype == torch.float64:
            return self.subtract_from(rhs, x)
        hi = torch.round(x * 65536.0) / 65536.0
        return self.subtract_from(self.subtract_from(rhs, hi), x - hi)


class _StencilOperator:
    """A coarse level: a 9-point variable stencil, packed as coef (9, 1, h, w, N)."""

    def __init__(self, coef: torch.Tensor):
        self.coef = coef.permute(1, 2, 3, 0)[:, None].contiguous()
        self.diag = self.coef[_CENTRE]
        self.mask = (self.diag > 0).to(coef.dtype)

    def subtract_from(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """r - A x, accumulated onto r - diag x (no separate A x field)."""
        return self._accumulate(torch.addcmul(r, self.diag, x, value=-1), x, -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._accumulate(self.diag * x, x, 1)

    def _accumulate(self, y: torch.Tensor, x: torch.Tensor, sign: int) -> torch.Tensor:
        """y += sign * (off-diagonal part of A) x, in place."""
        h, w = x.shape[1:3]
        padded = F.pad(x, (0, 0, 1, 1, 1, 1))
        for o, (dy, dx) in enumerate(_OFFSETS):
            if o != _CENTRE:
                y.addcmul_(self.coef[o], padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w], value=sign)
        return y


def _dense(coef: torch.Tensor) -> torch.Tensor:
    """(N, 9, h, w) stencil -> (N, h*w, h*w) dense matrix (for the tiny coarsest level)."""
    n, _, h, w = coef.shape
    index = torch.arange(h * w, device=coef.device).view(h, w)
    dense = coef.new_zeros(n, h * w, h * w)
    for o, (dy, dx) in enumerate(_OFFSETS):
        rows = index[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        cols = index[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
        values = coef[:, o, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        dense[:, rows.reshape(-1), cols.reshape(-1)] = values.reshape(n, -1)
    return dense


def _pseudo_inverse(dense: torch.Tensor, mass: torch.Tensor) -> tuple:
    """Symmetric pseudo-inverse; Galerkin operators can be singular (an isolated removed pixel
    lies in the support of several coarse points), and their zero modes carry no residual.

    Also returns, per system, an estimate of the smallest eigenvalue of the fine operator: the
    least Rayleigh quotient ``lambda_k / (v_k^T M v_k)`` over the kept eigenpairs, with ``mass``
    (N, n) the diagonal of the lumped coarse mass matrix M (the fine active mask restricted to
    this grid, ``P^T m``), so that a prolonged eigenvector is weighed by the fine pixels it
    covers. Dividing by the mass, not the plain lambda_k, keeps coarse points that touch only a
    few active pixels (small diagonal, small eigenvalue, no smooth mode) from looking singular."""
    values, vectors = torch.linalg.eigh(dense)
    cutoff = values.abs().amax(-1, keepdim=True) * 1e-6
    kept = values > cutoff
    inverse = torch.where(kept, 1 / torch.where(kept, values, torch.ones_like(values)), torch.zeros_like(values))
    mode_mass = (vectors.square() * mass[:, :, None]).sum(1)
    lowest = torch.where(kept, values / mode_mass.clamp_min(1e-30), torch.full_like(values, math.inf)).amin(-1)
    return (vectors * inverse[:, None, :]) @ vectors.transpose(-1, -2), lowest


def _chebyshev_weights(sweeps: int, low: float) -> tuple:
    """Weights w_j of ``sweeps`` Richardson steps x += w_j D^-1 (r - A x) whose error polynomial
    prod_j (1 - w_j t) is the Chebyshev polynomial of [low, 1] (normalised to 1 at t = 0): it
    damps every mode with t in [low, 1] at least as much as any other polynomial of that degree,
    and stays within (0, 1) below ``low``, so the smoother converges and the V-cycle stays positive
    definite for any spectrum in (0, 1]."""
    return tuple(2 / ((1 + low) + (1 - low) * math.cos(math.pi * (2 * j + 1) / (2 * sweeps)))
                 for j in range(sweeps))


# Two coarse sweeps each way, Chebyshev on [0.1, 1]: weights 1.15 and 4.31 instead of 1.7 twice.
# Single systems on CAM holes: a V-cycle reduces the residual 30x instead of 10x (3 CG iterations
# instead of 4, the same cost each); pairs, limited by their fine level, take as many as before.
_COARSE_WEIGHTS = _chebyshev_weights(2, 0.1)


class _Multigrid:
    """Symmetric V-cycle: Jacobi smoothing, bilinear P, R = P^T, Galerkin coarse operators and an
    exact (pseudo-inverse) solve on the coarsest grid. Fields are packed (C, H, W, N)."""

    def __init__(self, fine: _FineOperator, coef: torch.Tensor, sweeps: int = 2, omega: float = 1.0,
                 coarse_weights: tuple | None = None, coarsest: int = 5):
        self.sweeps = sweeps
        self.coarse_weights = _COARSE_WEIGHTS if coarse_weights is None else tuple(coarse_weights)
        self.fine_jacobi = omega == 1.0
        self.kernel = _depthwise_weight(_bilinear_kernel(coef.dtype, coef.device), coef.shape[0])
        galerkin = _galerkin_kernel(coef.dtype, coef.device)
        self.ops = [fine]
        mass = fine.mask  # the lumped mass P^T m of each level, for lowest_eigenvalue
        while max(coef.shape[-2:]) > coarsest:
            coef = F.conv2d(_pad_odd(coef), galerkin, stride=2, padding=1)
            self.ops.append(_StencilOperator(coef))
            mass = self._restrict(mass)
        # Jacobi with omega = 1 is optimal on the fine 8-neighbour stencil (smoothing factor 1/3).
        # Galerkin stencils near holes can have off-diagonal sums above the diagonal, where plain
        # Jacobi diverges: coarse levels are smoothed with the l1 diagonal (diagonal + sum of
        # |off-diagonals|), which puts the spectrum of D_l1^-1 A in (0, 1], and Chebyshev weights
        # for that interval (see _chebyshev_weights).
        self.inv_diag = [torch.where(fine.diag > 0, omega / fine.diag.clamp_min(1e-30), torch.zeros_like(fine.diag))]
        for op in self.ops[1:-1]:
            l1 = op.coef.abs().sum(0)
            self.inv_diag.append(torch.where(l1 > 0, 1 / l1.clamp_min(1e-30), torch.zeros_like(l1)))
        # the coarsest grid (at most 5x5; the fine one itself for tiny images) is solved exactly
        # and gives the estimate of each system's smallest eigenvalue (see _pseudo_inverse)
        self.coarse_inverse, self.lowest_eigenvalue = _pseudo_inverse(_dense(coef), mass.flatten(0, 2).T)

    def _restrict(self, r: torch.Tensor) -> torch.Tensor:
        return _packed_conv(_pad_odd_packed(r), self.kernel, stride=2)

    def _prolong(self, e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Bilinear interpolation from coarse point I at fine 2I, as the adjoint of _restrict
        (a depthwise transposed conv: ~10x faster than upsample_bilinear2d)."""
        h, w = like.shape[1:3]
        fine = F.conv_transpose2d(_as_conv(e), self.kernel, stride=2, padding=1, groups=self.kernel.shape[0])
        return _from_conv(fine[..., :h, :w])

    def _coarsest(self, r: torch.Tensor) -> torch.Tensor:
        c, h, w, n = r.shape
        by_system = r.reshape(c, h * w, n).permute(2, 0, 1)  # (N, C, h*w)
        return (by_system @ self.coarse_inverse).permute(1, 2, 0).contiguous().view(c, h, w, n)

    def __call__(self, r: torch.Tensor, depth: int = 0) -> torch.Tensor:
        op = self.ops[depth]
        if depth == len(self.ops) - 1:
            return self._coarsest(r)
        if depth == 0 and self.fine_jacobi:
            return self._fine_cycle(r)
        inv_l1, weights = self.inv_diag[depth], self.coarse_weights
        x = torch.mul(inv_l1, r).mul_(weights[0])
        for weight in weights[1:]:
            x.addcmul_(inv_l1, op.subtract_from(r, x), value=weight)
        coarse_r = self._restrict(op.subtract_from(r, x))
        x.addcmul_(op.mask, self._prolong(self(coarse_r, depth + 1), x))
        for weight in reversed(weights):  # the adjoint of the pre-smoother: a symmetric V-cycle
            x.addcmul_(inv_l1, op.subtract_from(r, x), value=weight)
        return x

    def full(self, rhs: torch.Tensor) -> torch.Tensor:
        """Full multigrid (nested iteration): solve the Galerkin-restricted problem exactly on the
        coarsest grid, then on every finer level prolong that solution and correct it with one
        V-cycle. An initial guess within ~1e-3 of the solution for about two V-cycles."""
        rhs_levels = [rhs]
        for _ in self.ops[1:]:
            rhs_levels.append(self._restrict(rhs_levels[-1]))
        x = self(rhs_levels[-1], len(self.ops) - 1)
        for depth in range(len(self.ops) - 2, -1, -1):
            op, r = self.ops[depth], rhs_levels[depth]
            x = op.mask * self._prolong(x, r)
            x = x + self(op.subtract_from(r, x), depth)
        return x

    def _fine_cycle(self, r: torch.Tensor) -> torch.Tensor:
        """The fine level with undamped Jacobi, fused: with x = r / d the residual is the masked
        neighbour sum, and a sweep is x <- r / d + (1 / d) * neighbours(x) (1 / d is 0 off the
        active pixels)."""
        op, inv_diag = self.ops[0], self.inv_diag[0]
        scaled = inv_diag * r
        x = scaled
        for _ in range(self.sweeps - 1):
            x = _sweep(scaled, inv_diag, op.neighbours(x))
        coarse_r = self._restrict(op.subtract_from(r, x) if self.sweeps > 1 else op.masked_neighbours(x))
        x = torch.addcmul(x, op.mask, self._prolong(self(coarse_r, 1), x))
        for _ in range(self.sweeps):
            x = _sweep(scaled, inv_diag, op.neighbours(x))
        return x


def _sweep(scaled: torch.Tensor, inv_diag: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """scaled + inv_diag * neighbours, written over the (temporary) neighbour sum: fewer fresh
    buffers, which the allocator would otherwise hand back and page-fault in again."""
    return torch.addcmul(scaled, inv_diag, neighbours, out=neighbours)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-system inner products of packed (C, H, W, N) fields: (N,), the diagonal of the N x N
    matrix product, which reads both fields once and writes no product field (1.8x faster than
    multiply-then-sum at N = 16, the same float32 accuracy)."""
    n = a.shape[-1]
    return (a.view(-1, n).T @ b.view(-1, n)).diagonal()


def _system_max_abs(field: torch.Tensor) -> torch.Tensor:
    """max |field| of every system of a packed (C, H, W, N) field: (N,), without a |field| copy.
    Reduced over (C H) rows of W N values first: torch's column reductions are vectorised along
    a wide row (60 us at 128 px and N = 16) but not along rows of N values (aminmax: 730 us)."""
    c, h, w, n = field.shape
    rows = field.view(c * h, w * n)
    return torch.maximum(rows.amax(0).view(w, n).amax(0), rows.amin(0).view(w, n).amin(0).neg_())


# iterations in a row that fail to halve a system's best residual before its solve gives up (a
# healthy multigrid-preconditioned iteration divides it by 3-10)
_STALLED_ITERATIONS = 4


# the last CG update must change no unknown by more than this times tol (pixel units) before a
# system stops: 1e-4 for the default tol. This limit, not the residual, is what bounds the error
# (the error left is a fraction of the last update); with it fixed at 1e-4, residual tolerances
# from 1e-5 to 5e-5 gave the same worst errors on 13 stress mask families (1.6e-5 to 1.7e-5,
# each mask solved alone), while a limit scaled to 3e-4 let one of them end 8.8e-5 off
_STEP_TOL_PER_TOL = 5.0

# the default max abs residual of the scaled system; 1e-5 bought nothing measurable (on ROAD's
# pairs it forced a fifth iteration in 3 of 16 groups, taking an error of 4e-6 to 5e-7)
DEFAULT_TOL = 2e-5


# On images one pixel high or wide every removed pixel has at most its two row (or column)
# neighbours, so D^-1 A reaches 2 on the alternating mode, which undamped Jacobi leaves as it is
# and the coarse grids do not see: CG stalled there (1 x 4000 CAM holes: 14 iterations, 1.3e-4
# off, with a warning). With omega = 1/2, omega / d = 1 / (2 d) is at most the l1 diagonal's
# inverse, D_l1 = d + sum |off-diagonals| <= 2 d, so the fine level takes the coarse levels'
# Chebyshev smoothing on (0, 1] (see _Multigrid): 4-7 iterations, within 1.2e-5.
_ONE_PIXEL_THIN_OMEGA = 0.5

# Systems whose estimated smallest eigenvalue (see _pseudo_inverse) is below this stop only on a
# CG step restarted from their exact residual, whose size measures the error left. The recursive
# residual picks up a smooth float32 rounding bias (~1e-10 per pixel, from A p while the steps
# are large) that such systems turn into an error of bias / eigenvalue, unseen by the stopping
# test: 1 x 4000 holes kept at one end (eigenvalue 3e-7) ended 8.6e-4 off, 64 x 2000 with a kept
# corner (2.6e-6) 6.8e-5, an 8 x 2000 pair of half planes (1.6e-5) 2.9e-4, all without a
# warning; now all within 1.2e-5. Measured errors times eigenvalues stayed below 5e-9, so
# systems above the threshold stay within ~5e-5; ROAD's CAM holes at 64-224 px have
# estimates of 1e-3 and more and do no extra work.
_ILL_CONDITIONED_BELOW = 1e-4


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))


def _solve(op: _FineOperator, coef, rhs, tol: float, max_iter: int, report: dict) -> torch.Tensor:
    """Multigrid-preconditioned CG with residual replacement on packed fields, every system
    stopping on its own.

    A system stops when its max abs (scaled) residual is at most ``tol`` and its last CG update
    changed no unknown by more than ``_STEP_TOL_PER_TOL * tol`` (in pixel units); from then on
    its step length is 0, so its result does not depend on the other systems of its group. The
    residual alone does not bound the error: with a tiny kept set (one kept pixel in a 224 px
    image) the smooth error mode has an eigenvalue near 0, and a residual of 3e-6 hides an error
    of 4e-4. Each iteration divides the error by 4-10, so the error left is a fraction of the last
    update.

    The initial guess is one full-multigrid pass: on CAM-shaped holes it saves about three CG
    iterations against a zero start (2 instead of 5 for single systems, 4 instead of 7 for pairs),
    for about the cost of two.

    The cheap recursive residual drives the iteration; it starts from the exactly computed
    residual of the initial guess. When a system's meets ``tol``, the plain float32 residual of
    its iterate is checked (its rounding, ~1e-6, is well below ``tol``); if that fails, the
    system goes on from its exactly computed residual. A system whose estimated smallest
    eigenvalue is below ``_ILL_CONDITIONED_BELOW`` goes on from its exact residual once more,
    CG restarted, and stops only if that step also meets both limits (it may restart again);
    one that never does is reported like one that stalled.

    Fills ``report`` (merged into a ``SolveReport``): the iterations run, and which systems stopped without
    meeting both limits (stalled near float32's floor or out of iterations), with their worst
    residual and update.
    """
    # one Jacobi sweep each way on the fine level of complementary pairs (each sweep costs two
    # convolutions there): 6 cheaper iterations instead of 5, ~8 % faster; two for plain systems.
    # Images one pixel high or wide get the coarse levels' Chebyshev smoothing on the fine level
    # too (see _ONE_PIXEL_THIN_OMEGA)
    thin = min(op.image_shape) == 1
    precondition = _Multigrid(op, coef, sweeps=2 if op.side is None else 1,
                              omega=_ONE_PIXEL_THIN_OMEGA if thin else 1.0)
    step_tol = _STEP_TOL_PER_TOL * tol
    # systems whose stop is verified by a step from their exact residual (see
    # _ILL_CONDITIONED_BELOW); None where there are none, so well-conditioned groups do no more work
    verified = precondition.lowest_eigenvalue < _ILL_CONDITIONED_BELOW
    verified = verified if bool(verified.any()) else None

    def next_direction(r, p, rz, restart):
        """Preconditioned residual z = M r, then p <- z + (r.z / r_old.z_old) p (p <- z where
        ``restart``)."""
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = _safe_div(rz_new, rz)
        if restart is not None:
            beta = torch.where(restart, 0.0, beta)
        return z.addcmul_(beta, p), rz_new

    x = precondition.full(rhs)
    # exact: the float32 rounding of a plain r = b - A x would stay in the recursive residual and
    # bias every later iterate (errors up to 1e-4 on ill-conditioned systems)
    r = op.residual(rhs, x)
    z = precondition(r)
    p = z
    rz = _dot(r, z)
    residual = _system_max_abs(r)
    # the initial guess has no update to measure: at least one iteration
    step = torch.full_like(residual, math.inf)
    # near float32's floor (a max residual of ~2e-6) CG stalls and its iterates can get worse:
    # a system gives up once its residual has not halved for _STALLED_ITERATIONS iterations
    best, stalled = residual, torch.zeros_like(residual)
    done = torch.zeros_like(residual, dtype=torch.bool)  # converged or given up: step length 0
    converged = torch.zeros_like(done)
    restart = None if verified is None else torch.zeros_like(done)  # this step is from an exact residual
    best_fresh_step = torch.full_like(residual, math.inf)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        ap = op(p)
        alpha = torch.where(done, 0.0, _safe_div(rz, _dot(p, ap)))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        active = ~done
        residual = torch.where(active, _system_max_abs(r), residual)
        improved = residual < 0.5 * best
        if restart is not None and bool(restart.any()):
            # near float32's floor the residual no longer falls while the smooth error does: a
            # step from the exact residual measures the error, and its halving is progress too
            fresh_step = _system_max_abs(p) * alpha.abs()
            progress = restart & (fresh_step < 0.5 * best_fresh_step)
            best_fresh_step = torch.where(progress, fresh_step, best_fresh_step)
            improved |= progress
        best = torch.where(improved, residual, best)
        stalled = torch.where(improved, 0.0, stalled + 1)
        met = active & (residual <= tol)
        if met.any():  # the update's size, one pass over p, is needed only from then on
            step = torch.where(met, _system_max_abs(p) * alpha.abs(), step)
            met &= step <= step_tol
        if met.any():
            # the recursive residual may have drifted from the true one: check the plain float32
            # one, and where that fails go on from the exact one (a rounded residual would bias
            # every later iterate)
            true_residual = _system_max_abs(op.subtract_from(rhs, x))
            failed = met & (true_residual > tol)
            residual = torch.where(met, true_residual, residual)
            if verified is not None:
                # an ill-conditioned system stops only on a step taken from its exact residual:
                # the recursive one hides a smooth error that only the exact one shows
                failed |= met & verified & ~restart
            if failed.any():
                r = torch.where(failed, op.residual(rhs, x), r)
            met &= ~failed
            if verified is not None:
                restart = failed & verified
        elif verified is not None:
            restart = torch.zeros_like(done)
        converged |= met
        done = done | met | (stalled >= _STALLED_ITERATIONS)
        if done.all():
            break
        p, rz = next_direction(r, p, rz, restart)
    # systems that gave up or ran out of iterations: their true residual, for the warning
    unverified = None if verified is None else verified & ~converged
    unmet = ~((residual <= tol) & (step <= step_tol))
    if unverified is not None:
        unmet |= unverified
    short = bool(unmet.any())
    if short:
        residual = torch.where(unmet, _system_max_abs(op.residual(rhs, x)), residual)
        unmet = ~((residual <= tol) & (step <= step_tol))
        if unverified is not None:
            unmet |= unverified
        short = bool(unmet.any())
    report.update(iterations=iterations, unmet=unmet,
                  worst_residual=residual[unmet].max().item() if short else 0.0,
                  # inf: the update is measured only once the residual has met tol
                  worst_step=step[unmet].max().item() if short else 0.0)
    return x


class SolveReport:
    """What the solves of one call did, over all of its groups: the most iterations any group ran,
    and the samples whose systems stopped without meeting the limits (``unmet``, one flag per
    sample), with the worst residual and last update among them."""

    def __init__(self, samples: int, tol: float, device=None):
        self.tol = tol
        self.iterations = 0
        self.unmet = torch.zeros(samples, dtype=torch.bool, device=device)
        self.worst_residual = self.worst_step = 0.0

    def add(self, group, samples) -> None:
        """Merge the report of solves whose systems belong to ``samples`` (a slice or an index
        tensor of this report's samples): a ``_solve`` dict or another ``SolveReport``."""
        part = vars(group) if isinstance(group, SolveReport) else group
        self.iterations = max(self.iterations, part["iterations"])
        if torch.is_tensor(samples):  # may repeat a sample (both sides of a lopsided pair)
            self.unmet[samples[part["unmet"]]] = True
        else:
            self.unmet[samples] |= part["unmet"]
        self.worst_residual = max(self.worst_residual, part["worst_residual"])
        self.worst_step = max(self.worst_step, part["worst_step"])

    def finish(self, stats: dict | None = None) -> None:
        """Fill ``stats`` and warn once, at the first caller outside this package (the user's
        line), if any sample's solve fell short."""
        if stats is not None:
            stats["iterations"] = self.iterations
        if not bool(self.unmet.any()):
            return
        bad = self.unmet.nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        warnings.warn(f"linear imputation stopped after {self.iterations} iterations with max residual "
                      f"{self.worst_residual:.2e} (tol {self.tol:.0e}) and last update {self.worst_step:.2e} "
                      f"(limit {_STEP_TOL_PER_TOL * self.tol:.0e}) in sample(s) [{shown}] of "
                      f"{self.unmet.numel()}; their result may be inaccurate", RuntimeWarning,
                      stacklevel=_stacklevel_outside_package())


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that makes a warning raised by our caller name the first frame outside
    this package: the user's line, however deep in the library the warning was raised."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def linear_impute(images: torch.Tensor, removed: torch.Tensor, *, tol: float = DEFAULT_TOL,
                  max_iter: int = 60, stats: dict | None = None) -> torch.Tensor:
    """Fill removed pixels by linear imputation (no noise), for a whole batch at once.

    images: (N, C, H, W) float32 or float64; removed: (N, H, W) or (N, 1, H, W), nonzero/True where a pixel
    is imputed. Returns a tensor like ``images`` with kept pixels unchanged (detached: no gradient
    flows through the solve, so images that require grad are fine). The solve runs in the
    images' dtype (float32: max abs error up to ~2e-5 against the exact solution on [0,1] images
    with CAM-shaped holes and on the most ill-conditioned masks tried up to 448 px; float32's
    floor reaches 4.7e-5 for a kept 8x8 block in a 896 px image, where float64 images give 1e-7).

    A system stops when its max abs residual (of the system scaled by 12) is at most ``tol`` and
    its last update changed no pixel by more than ``5 tol``; after ``max_iter`` iterations, or
    when its residual stalls, it stops anyway and one RuntimeWarning per call names the samples
    that fell short. ``stats``, if a dict, receives ``"iterations"``: the most any group of
    systems ran.
    """
    out, report = reported_linear_impute(images, removed, tol=tol, max_iter=max_iter)
    report.finish(stats)
    return out


def reported_linear_impute(images: torch.Tensor, removed: torch.Tensor, *, tol: float = DEFAULT_TOL,
                           max_iter: int = 60) -> tuple:
    """``linear_impute`` without its warning: (imputed images, the call's ``SolveReport``), for
    callers that name the samples in their own terms (ROAD names images, not systems)."""
    images = images.detach()  # the solve writes into out= buffers, which autograd refuses
    m = _checked_mask(images, removed, tol, max_iter)
    nothing_kept = (m.flatten(1).amin(1) > 0).nonzero().flatten().tolist()
    if nothing_kept:
        raise ValueError(f"removed mask removes every pixel of sample(s) {nothing_kept}: "
                         "linear imputation needs at least one kept pixel")
    report = SolveReport(images.shape[0], tol, images.device)
    out = _in_groups(_impute, images, m, tol, max_iter, report, None, torch.empty_like(images))
    return out, report


def linear_impute_complementary(images: torch.Tensor, removed: torch.Tensor, *, tol: float = DEFAULT_TOL,
                                max_iter: int = 60, stats: dict | None = None) -> torch.Tensor:
    """Linear imputation of ``removed`` and of its complement, (N, 2, C, H, W): ``[:, 0]`` equals
    ``linear_impute(images, removed)`` and ``[:, 1]`` equals ``linear_impute(images, ~removed)``.

    The two systems touch disjoint pixels, so they are solved as one system on the whole image
    (each pixel coupled only to neighbours on its own side of the mask): half the unknowns'
    storage per pair and one multigrid hierarchy instead of two. ROAD's MoRF at fraction k and
    LeRF at 1 - k are such a pair. Pairs whose smaller side holds under 1 % of the pixels, and
    pairs on images one pixel high or wide, are solved as two single systems (see
    ``_LOPSIDED_FRACTION``). Every sample must remove at least
    one pixel and keep one. Stopping, the warning and ``stats`` are as in ``linear_impute``.
    """
    out, report = reported_linear_impute_complementary(images, removed, tol=tol, max_iter=max_iter)
    report.finish(stats)
    return out


def reported_linear_impute_complementary(images: torch.Tensor, removed: torch.Tensor, *,
                                         tol: float = DEFAULT_TOL, max_iter: int = 60) -> tuple:
    """``linear_impute_complementary`` without its warning: (both imputations, the call's
    ``SolveReport``)."""
    images = images.detach()  # the solve writes into out= buffers, which autograd refuses
    m = _checked_mask(images, removed, tol, max_iter)
    n, c, h, w = images.shape
    removed_count = (m.flatten(1) != 0).sum(1)  # exact integers
    smaller_side = torch.minimum(removed_count, h * w - removed_count)
    one_sided = (smaller_side == 0).nonzero().flatten().tolist()
    if one_sided:
        raise ValueError(f"removed mask removes every pixel or none of sample(s) {one_sided}: the "
                         "complementary imputation needs at least one removed and one kept pixel")
    out = images.new_empty(n, 2, c, h, w)
    report = SolveReport(n, tol, images.device)
    lopsided = smaller_side < _LOPSIDED_FRACTION * h * w
    if min(h, w) == 1:  # one-pixel-high or -wide images: single systems converge in fewer steps there
        lopsided = torch.ones_like(lopsided)
    if not bool(lopsided.any()):
        _in_groups(_impute_complementary, images, m, tol, max_iter, report, None, out)
    else:
        paired, alone = (~lopsided).nonzero().flatten(), lopsided.nonzero().flatten()
        if paired.numel():
            out[paired] = _in_groups(_impute_complementary, images[paired], m[paired], tol, max_iter, report,
                                     paired, out.new_empty(paired.numel(), 2, c, h, w))
        k = alone.numel()
        sides = _in_groups(_impute, images[alone].repeat(2, 1, 1, 1), torch.cat([m[alone], 1 - m[alone]]), tol,
                           max_iter, report, alone.repeat(2), images.new_empty(2 * k, c, h, w))
        out[alone] = sides.view(2, k, c, h, w).transpose(0, 1)
    return out, report


# A pair whose smaller side holds less than this fraction of the pixels is solved as two single
# systems. The pair's shared coarse grids mix the tiny side's rows into the coarse equations of
# the large side, whose nearly constant error mode they then misrepresent; the stopping test does
# not see that error. Such pairs came out up to 1.9e-4 off at 448 px (one kept pixel in a
# corner; a 4x4 block 9.8e-5, 8x8 3.9e-5, 32x32 9.5e-6), where single systems stay within 1.1e-5
# (2.5e-5 at 640 px). ROAD's fractions 0.2-0.8 never come near it.
# Pairs on images one pixel high or wide (1 x N, N x 1) are solved as single systems too. Before
# thin images were smoothed with omega 1/2, such pairs stalled (ROAD's pairs of a 1 x 64 image:
# 33 CG iterations, ~3e-3 off, with a warning); with it they stay within the contract, but single
# systems take fewer steps (1-7 CG iterations against 4-9 from 1 x 64 to 1 x 4000), so the
# routing is kept for speed.
_LOPSIDED_FRACTION = 0.01


def _checked_mask(images: torch.Tensor, removed: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """The removed mask as 0/1 in the images' dtype (N, 1, H, W); clear errors for bad input."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    given = tuple(removed.shape)
    if removed.ndim == 3:
        removed = removed[:, None]
    if removed.shape != (images.shape[0], 1, *images.shape[-2:]):
        raise ValueError(f"removed mask shape {given} does not match images "
                         f"{tuple(images.shape)}: expected (N, H, W) or (N, 1, H, W)")
    if images.dtype not in (torch.float32, torch.float64):  # half: the coarsest solve has no half eigh
        raise TypeError(f"images must be floating point, float32 or float64, got {images.dtype}"
                        + (" (pass images.float())" if images.is_floating_point() else ""))
    # a NaN spreads through the whole solve of its group
    bad = nonfinite_samples(images)
    if bad:
        raise ValueError(f"images: sample(s) {bad} contain NaN or Inf")
    return (removed != 0).to(images.dtype)


def _in_groups(impute, images: torch.Tensor, m: torch.Tensor, tol: float, max_iter: int,
               report: SolveReport, samples: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """impute(images, m, ..., out) on groups of systems, each writing its slice of ``out``;
    ``samples`` holds the index in ``report`` of every system (None: the systems are the
    report's samples, in order)."""
    n = images.shape[0]
    chunk = n if images.device.type != "cpu" else max(1, _CPU_CHUNK_VALUES // max(1, images[0:1].numel()))
    # CPU: solve cache-sized groups of systems (every CG pass then runs from cache, not memory)
    with _ieee_float32_convolutions():
        for start in range(0, n, max(1, chunk)):
            group = {}
            part = slice(start, start + chunk)
            impute(images[part], m[part], tol, max_iter, group, out[part])
            report.add(group, part if samples is None else samples[part])
    return out


@contextlib.contextmanager
def _ieee_float32_convolutions():
    """Run the block with cuDNN's float32 convolutions in full float32 (no TF32); the caller's
    setting is restored on exit, also when the block raises.

    torch lets cuDNN run float32 convolutions on TF32 tensor cores by default (Ampere and later
    GPUs; recent cuDNN versions do so for depthwise convolutions too), which round every operand
    to 11 significant bits. The solver's arithmetic is exact only in float32 (integer
    coefficients, the hi/lo residual at 2^-16, see ``_FineOperator.residual``): with TF32 the
    right-hand sides and residuals would be ~1e-3 off, no system would meet ``tol`` and every call
    would warn. The flag does nothing on CPU. Only the convolution flag is touched (torch >= 2.9:
    its per-operation precision, so that no legacy/new mix is left behind; earlier:
    ``cudnn.allow_tf32``). Matmul TF32 is off unless the user enables it, and then reaches only
    CG's inner products and the coarsest-grid solve, not the residuals the stopping test checks."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        owner, name, value = conv, "fp32_precision", "ieee"
    else:  # pragma: no cover - torch < 2.9
        owner, name, value = torch.backends.cudnn, "allow_tf32", False
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# Systems per CPU group: 16 three-channel 128 x 128 images (a few MiB of working set) measured
# ~30 % faster than one block of 64 (interleaved medians, one thread, shared cores).
_CPU_CHUNK_VALUES = 16 * 3 * 128 * 128


def _impute(images: torch.Tensor, m: torch.Tensor, tol: float, max_iter: int, report: dict,
            out: torch.Tensor) -> None:
    """The imputation of a group of systems, written into ``out`` (like images).

    Imputation commutes with adding a constant per channel (every row of the system sums to 0),
    so each system is solved for its images minus the mean of its kept pixels, which is added
    back. That keeps the unknowns small where float32 rounding matters most: a tiny kept set in
    a large image leaves a nearly constant error mode that amplifies rounding of the order of
    one ulp of x (one kept pixel in a corner of a 896 px image: 1.5e-4 off around x ~ 0.5,
    exact around 0). Pairs need no shift: both of their sides hold at least 1 % of the pixels
    (see ``_LOPSIDED_FRACTION``).
    """
    h, w = images.shape[-2:]
    coef, rhs, shift = _system(images, m, complementary=False, centred=True)
    op = _FineOperator(_pad_odd(m), coef[:, _CENTRE:_CENTRE + 1], (h, w))
    solution = _solve(op, coef, rhs, tol=tol, max_iter=max_iter, report=report).add_(shift)
    torch.where((m != 0).expand_as(images), _unpack(solution)[..., :h, :w], images, out=out)


def _impute_complementary(images: torch.Tensor, m: torch.Tensor, tol: float, max_iter: int,
                          report: dict, out: torch.Tensor) -> None:
    """Both imputations of a group of pairs, written into ``out`` (N, 2, C, H, W)."""
    h, w = images.shape[-2:]
    coef, rhs, _ = _system(images, m, complementary=True)
    op = _FineOperator(_pad_odd(torch.ones_like(m)), coef[:, _CENTRE:_CENTRE + 1], (h, w), side=_pad_odd(m))
    x = _unpack(_solve(op, coef, rhs, tol=tol, max_iter=max_iter, report=report))[..., :h, :w]
    removed = (m != 0).expand_as(images)
    torch.where(removed, x, images, out=out[:, 0])
    torch.where(removed, images, x, out=out[:, 1])


def check_noise(noise: float) -> None:
    """The noise amplitude must be a finite number >= 0: NaN passed a ``< 0`` check and then ran
    noise-free (ROAD: ``NaN > 0`` is false) or made every pixel NaN (NaN * eps * 0 on kept ones),
    as Inf did."""
    try:
        ok = bool(0 <= noise < math.inf)
    except TypeError:  # None or a string: Python's "'<=' not supported" names no argument
        ok = False
    if not ok:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")


def noisy_linear_impute(images: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01,
                        generator: torch.Generator | None = None, **solver) -> torch.Tensor:
    """Linear imputation plus N(0, noise^2) on the removed pixels only (in the images' units).

    The noise is drawn from ``generator`` (a seeded ``torch.Generator`` on any device: the draw is
    made on the generator's device and moved to the images', so a CPU generator gives the same
    noise on every device); with ``generator=None`` a generator on the images' device seeded with
    0 is used, so results are reproducible.
    """
    check_noise(noise)
    filled = linear_impute(images, removed, **solver)
    if noise == 0:
        return filled
    if generator is None:
        generator = torch.Generator(device=images.device).manual_seed(0)
    # on the generator's device: torch refuses a draw on another device than its generator's
    eps = torch.randn(filled.shape, generator=generator, device=generator.device,
                      dtype=filled.dtype).to(filled.device)
    m = (removed if removed.ndim == 4 else removed[:, None]) != 0
    return filled + noise * eps * m.to(filled.dtype)
