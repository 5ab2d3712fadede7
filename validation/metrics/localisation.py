"""Localisation metrics against a ground-truth mask S (LaFAM's evaluation, Quantus definitions),
per sample, with a written tie policy.

S = gt >= ``threshold`` (0.5 by default: the anti-aliased alpha mask's half-coverage contour).

Tie policy (ties are the normal case for CAMs: ReLU zeros, nearest upsampling):

* Top-K intersection and relevance rank accuracy take the expected value over a uniformly random
  order of tied pixels: pixels strictly above the k-th largest value t all count, the r tied
  pixels needed to reach k contribute r * |{L = t} & S| / |{L = t}|.
* Pointing Game: ``ties="any"`` is a hit when any tied maximum lies in S (Quantus);
  ``ties="fraction"`` scores the fraction of tied maxima inside S.
* AUC is the ROC AUC with ties counting half (the Mann-Whitney U statistic, as sklearn's
  roc_curve + auc computes it).

Undefined values are NaN with a reason: ``empty_mask`` (no pixel in S), ``full_mask`` (AUC: no
pixel outside S), ``zero_map`` (no relevance at all: RMA, Sparseness), ``constant_map`` (no
ranking at all: Pointing Game, Top-K, rank accuracy). A constant map has the defined AUC 0.5.
Nothing is normalised across the batch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._checks import CONSTANT_MAP, EMPTY_MASK, FULL_MASK, ZERO_MAP, check_int, check_maps, finish

__all__ = ["pointing_game", "topk_intersection", "relevance_mass_accuracy", "relevance_rank_accuracy",
           "localisation_auc", "sparseness", "default_topk", "ground_truth_set"]


def ground_truth_set(gt: torch.Tensor, maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Validated (B, H*W) float32 0/1 mask S = gt >= threshold (float: reductions on it are fast)."""
    try:
        ok = bool(0 < threshold <= 1)  # 0 puts every pixel in S, above 1 none: always a mistake
    except TypeError:  # None or a string: Python's "'<' not supported" names no argument
        ok = False
    if not ok:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    gt = check_maps(gt, "gt", shape=maps.shape, device=maps.device)
    return _indicator(torch.ge, gt.flatten(1), threshold)


# Speed notes (CPU, 256 x 128^2 maps; benchmarks/metrics.py): comparisons write straight into
# float32 outputs (bool -> float conversion costs ~5x the comparison), row dot products use
# linalg.vecdot (~3x faster than a batched matmul of vectors), and large float64 temporaries are
# avoided (a float64 copy costs more than the float32 reduction it feeds). Every sum below is
# either exact in float32 (integer counts < 2^24) or a float32 reduction whose relative error is
# ~1e-7, below the float32 resolution of the returned value. The exception is the Gini numerator
# sum_i (2i - n - 1) a_(i), which cancels: near-uniform maps (Gini ~ 3e-3 at 224 px) are off by
# ~2e-7 absolute (relative ~5e-5); pass float64 maps where that matters.


def _indicator(compare, a: torch.Tensor, b) -> torch.Tensor:
    """compare(a, b) as float32 0/1, written straight into a float32 tensor."""
    return compare(a, b, out=torch.empty(a.shape, dtype=torch.float32, device=a.device))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[i, j] * b[i, j] per row."""
    return torch.linalg.vecdot(a, b)


def default_topk(height: int, width: int) -> int:
    """k = round(1000 * H * W / 224^2), at least 1: LaFAM's k = 1000 at 224 px, scaled to area."""
    return max(1, int(1000 * height * width / 224 ** 2 + 0.5))


def _flat(maps):
    return maps.flatten(1)


def _numpy_view(flat: torch.Tensor):
    """A zero-copy numpy view of a CPU tensor numpy can sort, else None."""
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
        return flat.detach().contiguous().numpy()
    return None


def _on_row_blocks(fn, *arrays: np.ndarray) -> list:
    """``fn`` on aligned blocks of the ``arrays``' rows in parallel threads (numpy's sort and
    partition run on one core and release the GIL): torch's intra-op thread count, at least 8 rows
    per thread. Returns the blocks' results in row order."""
    rows = len(arrays[0])
    threads = min(torch.get_num_threads(), rows // 8)
    if threads < 2:
        return [fn(*arrays)]
    splits = [np.array_split(array, threads) for array in arrays]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, *splits))


def _rows_result(fn, *arrays: np.ndarray) -> torch.Tensor:
    """``fn`` on blocks of rows (``_on_row_blocks``), its per-row results concatenated."""
    return torch.from_numpy(np.concatenate(_on_row_blocks(fn, *arrays)))


def sort_rows(flat: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On CPU numpy's vectorised sort (a zero-copy view, no transfer)
    is 2-12x faster than torch.sort here (0.06-0.08 s vs 0.16-0.74 s for 256 x 128^2), on blocks
    of rows in parallel; elsewhere torch.sort."""
    array = _numpy_view(flat)
    if array is not None:
        out = array.copy()
        _on_row_blocks(lambda block: block.sort(axis=1), out)  # in place, on views of the copy
        return torch.from_numpy(out)
    return flat.sort(dim=1).values


def _kth_largest(flat: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """(B, 1) k-th largest value of every row; k is an int or a (B,) tensor of per-row k >= 1.

    On CPU numpy in parallel row blocks: one introselect for a common k (~3x faster than topk),
    for per-row k a sort whose k-th values are picked in the same thread (the sorted rows are
    never gathered into one tensor)."""
    array = _numpy_view(flat)
    n = flat.shape[1]
    if isinstance(k, int):
        if array is not None:
            return _rows_result(lambda a: np.partition(a, n - k, axis=1)[:, n - k:n - k + 1], array)
        return flat.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    position = (n - k.long().clamp_min(1))[:, None]
    if array is not None:
        return _rows_result(lambda a, i: np.take_along_axis(np.sort(a, axis=1), i, axis=1),
                            array, position.cpu().numpy())
    return flat.sort(dim=1).values.gather(1, position)


def _constant(flat: torch.Tensor) -> torch.Tensor:
    return flat.amax(1) == flat.amin(1)


def _expected_topk_hits(flat: torch.Tensor, inside: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """E|top_k(L) & S| under a uniformly random order of ties; k is an int or (B,) tensor >= 1."""
    t = _kth_largest(flat, k)
    above = _indicator(torch.gt, flat, t)
    tied = _indicator(torch.eq, flat, t)
    n_above, n_tied = above.sum(1).double(), tied.sum(1).double()
    hits_above, hits_tied = _rowdot(above, inside).double(), _rowdot(tied, inside).double()
    needed = (torch.as_tensor(k, device=flat.device).double() - n_above).clamp_min(0)
    return hits_above + needed * hits_tied / n_tied.clamp_min(1)


def pointing_game(maps: torch.Tensor, gt: torch.Tensor, *, ties: str = "any", threshold: float = 0.5,
                  return_reasons: bool = False):
    """1 if the maximum of L lies in S; see the module docstring for ``ties``."""
    maps = check_maps(maps)
    inside = ground_truth_set(gt, maps, threshold)
    flat = _flat(maps)
    if ties not in ("any", "fraction"):
        raise ValueError(f"ties must be 'any' or 'fraction', got {ties!r}")
    top = _indicator(torch.eq, flat, flat.amax(1, keepdim=True))
    hits = _rowdot(top, inside)
    value = (hits > 0).to(maps.dtype) if ties == "any" else (hits.double() / top.sum(1).double()).to(maps.dtype)
    return finish(value, [(EMPTY_MASK, inside.sum(1) == 0), (CONSTANT_MAP, _constant(flat))], return_reasons)


def topk_intersection(maps: torch.Tensor, gt: torch.Tensor, *, k: int | None = None, threshold: float = 0.5,
                      return_reasons: bool = False):
    """|top_k(L) & S| / k (expected value over tie orders); k defaults to ``default_topk(H, W)``."""
    maps = check_maps(maps)
    inside = ground_truth_set(gt, maps, threshold)
    flat = _flat(maps)
    n = flat.shape[1]
    # int(2.5) would silently be 2; int(NaN) raised an error naming no argument
    k = default_topk(*maps.shape[-2:]) if k is None else check_int("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, H*W = {n}], got {k}")
    value = (_expected_topk_hits(flat, inside, k) / k).to(maps.dtype)
    return finish(value, [(EMPTY_MASK, inside.sum(1) == 0), (CONSTANT_MAP, _constant(flat))], return_reasons)


def relevance_rank_accuracy(maps: torch.Tensor, gt: torch.Tensor, *, threshold: float = 0.5,
                            return_reasons: bool = False):
    """|top_|S|(L) & S| / |S| (expected value over tie orders)."""
    maps = check_maps(maps)
    inside = ground_truth_set(gt, maps, threshold)
    flat = _flat(maps)
    size = inside.sum(1)
    value = (_expected_topk_hits(flat, inside, size.clamp_min(1)) / size.clamp_min(1).double()).to(maps.dtype)
    return finish(value, [(EMPTY_MASK, size == 0), (CONSTANT_MAP, _constant(flat))], return_reasons)


def relevance_mass_accuracy(maps: torch.Tensor, gt: torch.Tensor, *, threshold: float = 0.5,
                            return_reasons: bool = False):
    """sum(L inside S) / sum(L)."""
    maps = check_maps(maps)
    inside = ground_truth_set(gt, maps, threshold)
    flat = _working_precision(_flat(maps))
    total = flat.sum(1).double()
    within = _rowdot(flat, inside.to(flat.dtype)).double()
    value = (within / torch.where(total > 0, total, torch.ones_like(total))).to(maps.dtype)
    return finish(value, [(EMPTY_MASK, inside.sum(1) == 0), (ZERO_MAP, total <= 0)], return_reasons)


def _working_precision(flat: torch.Tensor) -> torch.Tensor:
    """float32 or float64 as given; half precisions are widened to float32 for the sums."""
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def _position_sums(weights: torch.Tensor) -> torch.Tensor:
    """sum_j j * weights[i, j] per row as float64, exact for small-integer float32 weights.

    j = 256 q + r with q, r < 256: both partial sums stay below 2^24 for |weights| <= 1 and rows
    of up to 2^16 pixels, where float32 adds integers exactly; longer rows use float64.
    """
    n = weights.shape[1]
    j = torch.arange(n, device=weights.device)
    if n > 2 ** 16:
        return weights.double() @ j.double()
    digits = torch.stack([j // 256, j % 256], dim=1).to(weights.dtype)
    partial = (weights @ digits).double()
    return partial[:, 0] * 256 + partial[:, 1]


def _odd_key_position_difference(keys: torch.Tensor) -> torch.Tensor:
    """(B,) float64: per row, the summed positions of the odd keys in the row sorted ascending,
    minus the same for ``keys ^ 1`` (exact). On CPU both sorts and sums run in the row-block
    threads, with int64 sums; elsewhere torch.sort and ``_position_sums``."""
    array = _numpy_view(keys)
    if array is None:
        odd = (keys.sort(dim=1).values & 1) - ((keys ^ 1).sort(dim=1).values & 1)
        return _position_sums(odd.float())
    j = np.arange(keys.shape[1], dtype=np.int64)

    def block(rows):
        ordered = np.sort(rows, axis=1)
        first = np.einsum("ij,j->i", ordered & 1, j)
        np.bitwise_xor(rows, 1, out=ordered)
        ordered.sort(axis=1)
        return first - np.einsum("ij,j->i", ordered & 1, j)

    return _rows_result(block, array).double()


def localisation_auc(maps: torch.Tensor, gt: torch.Tensor, *, threshold: float = 0.5,
                     return_reasons: bool = False):
    """ROC AUC of L as a score for S, ties counting half (0.5 for a constant map)."""
    maps = check_maps(maps)
    inside = ground_truth_set(gt, maps, threshold)
    # Mann-Whitney U with ties counting half, without tie-group bookkeeping: sort (value, label)
    # keys twice, once with negatives first inside a tie, once with positives first. Summed sorted
    # positions of the positives then give sum #{neg <= v} and sum #{neg < v} (+ npos(npos-1)/2).
    # Bit patterns of non-negative floats order like the values (+ 0.0 turns -0.0 into +0.0):
    # below 2^30 for float32 in [0, 1], so key = 2 * bits + label fits int32; float64 keeps its
    # own bits in int64 (below 2^62), since rounding to float32 would merge distinct values.
    flat = _working_precision(_flat(maps)) + 0.0
    key_dtype = torch.int64 if flat.dtype == torch.float64 else torch.int32
    keys = flat.contiguous().view(key_dtype) * 2 + inside.to(key_dtype)  # negatives first in a tie
    n = keys.shape[1]
    n_pos = inside.sum(1).double()
    n_neg = n - n_pos
    # keys ^ 1 puts the positives first in a tie; the second order's odd keys are its negatives,
    # and sum_j j = n(n - 1)/2 turns their positions into the positives'
    rank_sum = _odd_key_position_difference(keys) + n * (n - 1) / 2
    u = rank_sum / 2 - n_pos * (n_pos - 1) / 2
    value = (u / (n_pos * n_neg).clamp_min(1)).to(maps.dtype)
    return finish(value, [(EMPTY_MASK, n_pos == 0), (FULL_MASK, n_neg == 0)], return_reasons)


def sparseness(maps: torch.Tensor, *, return_reasons: bool = False):
    """Gini index of |L|: sum_i (2i - n - 1) a_(i) / (n sum a), a ascending (0 constant, (n-1)/n one-hot)."""
    maps = check_maps(maps)
    flat = _working_precision(_flat(maps))  # in [0, 1] after check_maps: |L| = L
    n = flat.shape[1]
    i = torch.arange(1, n + 1, device=flat.device, dtype=flat.dtype)
    total = flat.sum(1).double()
    value = (sort_rows(flat) @ (2 * i - n - 1)).double() / (n * torch.where(total > 0, total, torch.ones_like(total)))
    return finish(value.to(maps.dtype), [(ZERO_MAP, total <= 0)], return_reasons)
