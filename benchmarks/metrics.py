"""Speed and accuracy of validation.metrics beside the peers, in one run.

    .venv/bin/python benchmarks/metrics.py            # default: ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/metrics.py --images 16 --gradcam-images 4 --maps 256

Prints three tables:
1. noisy linear imputation per image and fraction: ours (one call for all images x 8 masks, and
   one for ROAD's complementary pairs: MoRF at k with LeRF at 1 - k) beside scipy's spsolve on
   the same masks (system built vectorised, only the solve timed), a faster SuperLU use (minimum
   degree on A + A^T, symmetric mode) and the reference implementation (pytorch-grad-cam's
   NoisyLinearImputer: Python build + spsolve), with our max abs error against spsolve;
2. ROAD per image on ResNet18 at 128 px: ours fp32 and bf16 beside pytorch-grad-cam's
   ROADCombined (fp32, percentiles 20/40/60/80), the imputation share, and the floor of 8
   forward passes (fp32 NCHW, fp32 channels_last input as ours runs, bf16 channels_last);
   "vs floor" divides by the faster of the two fp32 floors;
3. six localisation metrics on N maps beside Quantus.
Imputation and ROAD timings are medians over --repeats runs (torch rows after a warm-up call),
with all rows interleaved in each repeat (the cores are shared: interleaving makes load changes
hit every row alike), ROADCombined's the median of up to 3 runs after them and its own warm-up
(it is slow); scipy solves every mask (all fractions, MoRF and LeRF) of --spsolve-images images.
Localisation: ours the minimum over --repeats runs, Quantus a single run (~16 s for 256 maps).
Peers are imported here only (they are oracles, never runtime dependencies).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_metrics_helpers import resnet18, spsolve_impute, spsolve_system  # noqa: E402  (shared reference code)

from validation.metrics import (localisation_auc, pointing_game, relevance_mass_accuracy,  # noqa: E402
                                relevance_rank_accuracy, removal_masks, road, sparseness, topk_intersection)
from validation.metrics import road_images  # noqa: E402
from validation.metrics.imputation import linear_impute, linear_impute_complementary  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def images_and_maps(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(n, 3, size, size, generator=g), 5, 1, 2, count_include_pad=False)
    low = torch.rand(n, 1, 7, 7, generator=g)
    maps = torch.relu(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0] - 0.4)
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-6).view(-1, 1, 1)  # CAM-like, 40-60 % ReLU zeros
    return x, maps


def scipy_system(image, removed):
    """The reference system (A, b) for one image and mask (built outside the timed solve)."""
    a, b, _ = spsolve_system(image, removed)
    return a, b


def spsolve_only(system):
    """scipy's spsolve (SuperLU, COLAMD ordering) on a prebuilt system: the issue's reference."""
    import scipy.sparse.linalg as sla
    return _timed(lambda: sla.spsolve(*system))


def splu_symmetric_only(system):
    """A faster use of SuperLU for this SPD system: minimum degree on A + A^T, symmetric mode."""
    import scipy.sparse.linalg as sla
    a, b = system
    return _timed(lambda: sla.splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                   options=dict(SymmetricMode=True)).solve(b))


def bench_imputation(args):
    x, maps = images_and_maps(args.images, args.size)
    masks = removal_masks(maps).flatten(1, 2)  # (B, 8, H, W): 4 fractions x MoRF/LeRF
    xs = x[:, None].expand(-1, 8, -1, -1, -1).flatten(0, 1).contiguous()
    ms = masks.flatten(0, 1)
    n = ms.shape[0]
    out = linear_impute(xs, ms)
    references = [spsolve_impute(xs[i].double().numpy(), ms[i].numpy()) for i in range(n)]
    err = max(np.abs(out[i].double().numpy() - references[i]).max() for i in range(n))
    # ROAD's pairs: MoRF at k (even mask index 2f) with LeRF at 1 - k (odd index 2(F-1-f)+1)
    fractions = masks.shape[1] // 2
    morf_index = [8 * b + 2 * f for b in range(args.images) for f in range(fractions)]
    lerf_index = [8 * b + 2 * (fractions - 1 - f) + 1 for b in range(args.images) for f in range(fractions)]
    assert torch.equal(~ms[morf_index], ms[lerf_index])
    pair_x, pair_m = xs[morf_index], ms[morf_index]
    pairs = linear_impute_complementary(pair_x, pair_m)
    pair_err = max(np.abs(pairs[k, side].double().numpy() - references[index[k]]).max()
                   for side, index in ((0, morf_index), (1, lerf_index)) for k in range(len(morf_index)))
    # scipy on every mask (all fractions, MoRF and LeRF: system sizes 20 % to 80 % of the pixels)
    # of the first --spsolve-images images; the systems are prebuilt, only the solves are timed
    sub = range(min(n, 8 * args.spsolve_images))
    systems = [scipy_system(xs[i].double().numpy(), ms[i].numpy()) for i in sub]
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    imputer = NoisyLinearImputer(noise=0.0)
    times = {"ours": [], "pairs": [], "spsolve": [], "splu": [], "reference": []}
    for _ in range(args.repeats):  # interleaved, so that load changes hit every method alike
        times["ours"].append(_timed(lambda: linear_impute(xs, ms)) / n)
        times["pairs"].append(_timed(lambda: linear_impute_complementary(pair_x, pair_m)) / n)
        times["spsolve"].append(np.mean([spsolve_only(s) for s in systems]))
        times["splu"].append(np.mean([splu_symmetric_only(s) for s in systems]))
        times["reference"].append(np.mean([_timed(lambda i=i: imputer(xs[i], (~ms[i]).float())) for i in sub]))
    ours, paired, sps, splu, ref = (float(np.median(times[k]))
                                    for k in ("ours", "pairs", "spsolve", "splu", "reference"))
    print(f"\n## Noisy linear imputation, {args.size} px, {args.images} images x 8 masks (CAM-like maps), "
          f"median of {args.repeats} interleaved repeats")
    print("| method | ms per image and fraction | speed-up vs spsolve | max abs error vs spsolve |")
    print("|---|---:|---:|---:|")
    print(f"| ours (FMG + MG-preconditioned CG, one call for {n} systems) | {1000 * ours:.2f} | {sps / ours:.1f}x | {err:.1e} |")
    print(f"| ours, ROAD's complementary pairs (MoRF k with LeRF 1-k: one call for {n // 2} pairs) | "
          f"{1000 * paired:.2f} | {sps / paired:.1f}x | {pair_err:.1e} |")
    print(f"| scipy spsolve (prebuilt CSC, solve only, {len(systems)} systems) | {1000 * sps:.2f} | 1.0x | 0 |")
    print(f"| scipy splu, MMD(A+A^T) symmetric mode (solve only) | {1000 * splu:.2f} | {sps / splu:.1f}x | - |")
    print(f"| reference NoisyLinearImputer (build + spsolve) | {1000 * ref:.2f} | {sps / ref:.2f}x | - |")


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_road(args):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    model = resnet18(0)
    x, maps = images_and_maps(args.images, args.size, seed=1)
    target = torch.arange(args.images) % 6
    batch = x[:, None].expand(-1, 8, -1, -1, -1).flatten(0, 1).contiguous()
    batch_cl = batch.contiguous(memory_format=torch.channels_last)  # oneDNN then runs NHWC throughout

    def forwards(net, images, bf16=False):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with torch.no_grad(), autocast:
            for s in range(0, images.shape[0], 64):
                net(images[s:s + 64])

    runs = {
        "ours": lambda: road(model, x, target, maps),
        "ours_bf16": lambda: road(model, x, target, maps, bf16=True),
        "imputation": lambda: road_images(x, maps),
        "floor": lambda: forwards(model, batch),
        "floor_cl": lambda: forwards(model, batch_cl),
        "floor_cl_bf16": lambda: forwards(model, batch_cl, bf16=True),
    }
    for fn in runs.values():  # warm-up: a first call pays one-off costs (oneDNN primitives, allocations)
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, medians: load changes hit every row alike
        for name, fn in runs.items():
            times[name].append(_timed(fn) / args.images)
    t = {name: float(np.median(v)) for name, v in times.items()}
    k = args.gradcam_images
    metric = ROADCombined(percentiles=[20, 40, 60, 80])
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in target[:k]]
    # the peer is slow (~0.6-0.8 s per image): the median of up to 3 runs after a warm-up, as its
    # single runs varied by 30 % between benchmark invocations
    metric(x[:k], maps[:k].numpy(), targets, model)
    theirs = float(np.median([_timed(lambda: metric(x[:k], maps[:k].numpy(), targets, model)) / k
                              for _ in range(min(3, args.repeats))]))
    floor_t = min(t["floor"], t["floor_cl"])
    print(f"\n## ROAD per image, ResNet18 at {args.size} px, fractions 0.2/0.4/0.6/0.8, MoRF + LeRF "
          f"(median of {args.repeats} interleaved repeats; ROADCombined: median of {min(3, args.repeats)} runs)")
    print("| method | s per image | vs ROADCombined | vs floor |")
    print("|---|---:|---:|---:|")
    print(f"| ours fp32 ({args.images} images in one call) | {t['ours']:.4f} | {theirs / t['ours']:.1f}x faster | "
          f"{t['ours'] / floor_t:.2f}x |")
    print(f"| of which imputation + noise (road_images) | {t['imputation']:.4f} | - | {t['imputation'] / floor_t:.2f}x |")
    print(f"| ours bf16 forward | {t['ours_bf16']:.4f} | {theirs / t['ours_bf16']:.1f}x faster | "
          f"{t['ours_bf16'] / floor_t:.2f}x |")
    print(f"| floor: 8 fp32 forwards per image, NCHW | {t['floor']:.4f} | - | {t['floor'] / floor_t:.2f}x |")
    print(f"| floor: 8 fp32 forwards, channels_last input (as ours runs) | {t['floor_cl']:.4f} | - | "
          f"{t['floor_cl'] / floor_t:.2f}x |")
    print(f"| floor: 8 bf16 forwards, channels_last input | {t['floor_cl_bf16']:.4f} | - | "
          f"{t['floor_cl_bf16'] / floor_t:.2f}x |")
    print(f"| pytorch-grad-cam ROADCombined fp32 ({k} images) | {theirs:.4f} | 1.0x | {theirs / floor_t:.1f}x |")


def bench_localisation(args):
    import quantus
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(args.maps, args.size, args.size, generator=g)
    gt = torch.zeros_like(maps)
    # a 50 x 50 block at 128 px and k = 327 (2 % of the pixels), scaled with --size
    scale = args.size / 128
    gt[:, round(30 * scale):round(80 * scale), round(40 * scale):round(90 * scale)] = 1.0
    k = max(1, round(327 * scale ** 2))
    ours_fns = [pointing_game, lambda m, s: topk_intersection(m, s, k=k), relevance_mass_accuracy,
                relevance_rank_accuracy, localisation_auc, lambda m, s: sparseness(m)]
    ours = best_of(lambda: [f(maps, gt) for f in ours_fns], args.repeats)
    a = maps[:, None].numpy()
    s = gt[:, None].numpy()
    xb = np.repeat(a, 3, axis=1)
    yb = np.zeros(args.maps, dtype=int)
    common = dict(disable_warnings=True, display_progressbar=False, normalise=False, abs=False)
    peers = [quantus.PointingGame(**common), quantus.TopKIntersection(k=k, **common),
             quantus.RelevanceMassAccuracy(**common), quantus.RelevanceRankAccuracy(**common),
             quantus.AUC(**common), quantus.Sparseness(**common)]

    def run_quantus():
        for m in peers:
            m(model=None, x_batch=xb, y_batch=yb, a_batch=a.copy(), s_batch=s, batch_size=args.maps)
    theirs = best_of(run_quantus, 1)
    print(f"\n## Localisation metrics (Pointing Game, Top-K, RMA, RRA, AUC, Sparseness), {args.maps} maps at {args.size} px")
    print("| method | s total | speed-up |")
    print("|---|---:|---:|")
    ratio = theirs / ours
    print(f"| ours | {ours:.3f} | {ratio:.0f}x |" if ratio >= 10 else f"| ours | {ours:.3f} | {ratio:.2f}x |")
    print(f"| Quantus {quantus.__version__} | {theirs:.3f} | 1x |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=8, help="images for imputation and our ROAD")
    parser.add_argument("--spsolve-images", type=int, default=2,
                        help="images whose 8 masks scipy solves (all fractions, MoRF and LeRF)")
    parser.add_argument("--gradcam-images", type=int, default=2, help="images for ROADCombined (slow)")
    parser.add_argument("--maps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", choices=["imputation", "road", "localisation"], default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.1f}' for v in __import__('os').getloadavg())}")
    for name, fn in [("imputation", bench_imputation), ("road", bench_road), ("localisation", bench_localisation)]:
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
