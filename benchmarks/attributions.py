"""Attribution speed and memory: ours beside pytorch-grad-cam (the peer) in one run.

ResNet18 (seeded random weights, 6 classes, normalisation inside), 128 px, batch 32, CAMs at
stage1 (the paper's shallowest layer) unless --layer says otherwise. For each method: median
wall time over --reps runs after one warm-up (ours and the peer interleaved, so both see the
same background load), maps/s, and peak extra memory of the run (CPU: peak RSS above the level
before the run, via /proc/self/clear_refs; CUDA: max allocated).

Score-CAM needs one forward pass per channel and image (64 x 32 at stage1), RELAX one per mask
and image: by default they run on --slow-images images (maps/s stays comparable) and RELAX with
--relax-masks masks. Use --full for the whole batch.

    python benchmarks/attributions.py                 # short default run
    python benchmarks/attributions.py --reps 5 --full --methods gradcam scorecam

After the table, the floors: the least work any implementation of the gradient CAMs (a forward
pass and the gradient to the layer) and of Score-CAM (one masked forward per image and channel)
must do on the same batch, timed beside the peer; peer / floor is the largest speed-up over the
peer that any fp32 code could reach.
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# before anything imports tqdm: it reads TQDM_* settings once, at import (the peer's Score-CAM
# prints a progress bar per call otherwise)
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from trainers import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from validation._layout import fast_layout  # noqa: E402
from validation.attributions import get_explainer, resolve_layer  # noqa: E402
from validation.attributions.base import ModelGuard, to_nchw  # noqa: E402
from validation.attributions.layers import resolve_layer_full  # noqa: E402

STAGES = ("stage1", "stage2", "stage3", "stage4")


# ---------------------------------------------------------------------------------------------
# memory

def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak extra memory (MiB) of a block: CUDA max allocated, or peak RSS on Linux CPUs."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":  # the device named, not the current one (--device cuda:1)
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak-RSS counter (VmHWM)
                self.ok = True
            except OSError:
                self.ok = False
            self.base = _proc_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        else:
            self.peak = (_proc_kib("VmHWM") * 1024 - self.base) / 2 ** 20 if self.ok else float("nan")


def _timed(fn, device) -> tuple[float, float]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds, mem.peak


def measure(fns, reps: int, device) -> list[tuple[float, float]]:
    """(median seconds, peak MiB) of each fn() after one warm-up call each. The functions run
    interleaved (ours, peer, ours, peer, ...) so both see the same background load."""
    for fn in fns:
        fn()
    runs = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, runs):
            out.append(_timed(fn, device))
    return [(statistics.median(t for t, _ in out), max(m for _, m in out)) for out in runs]


# ---------------------------------------------------------------------------------------------
# the peer

def peer_runner(method, model, x, target, layer, args):
    """(callable running pytorch-grad-cam's version of ``method``, cleanup), or None if it has none.

    The peer runs on its own copy of ``model`` (same weights): its cams hook the target layers
    for as long as they exist, and those hooks keep a CPU copy of the layer's output (and, via a
    tensor hook, of its gradient) on every forward pass through the layer. On the shared model
    they would run inside ours' and the floors' timed calls too (on a GPU, a device-to-host copy
    and a synchronisation per pass, charged to ours). cleanup removes the peer's hooks."""
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget
    except ImportError:
        return None
    model = copy.deepcopy(model)
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    if method == "shapleycam":  # ours explains ShapleyCAM's ReST score by default, as its authors do
        targets = [ClassifierOutputReST(int(t)) for t in target]
    module = resolve_layer(model, layer)
    simple = {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "layercam": pgc.LayerCAM,
              "scorecam": pgc.ScoreCAM, "shapleycam": pgc.ShapleyCAM}

    def release(*cams):
        def cleanup():
            for cam in cams:
                cam.activations_and_grads.release()
        return cleanup

    if method in simple:
        cam = simple[method](model, [module])
        if method == "scorecam":
            cam.batch_size = args.scorecam_batch
        return (lambda: cam(x, targets)), release(cam)
    if method == "refinecam":
        cam = pgc.RefineCAM(model, [resolve_layer(model, s) for s in STAGES], base_method=pgc.GradCAMPlusPlus)
        return (lambda: cam(x, targets)), release(*cam.base_cam_per_layer)
    if method == "guidedgradcam":
        gb_model = pgc.GuidedBackpropReLUModel(copy.deepcopy(model), device=x.device)
        cam = pgc.GradCAM(model, [module])

        def run():
            maps = cam(x, targets)
            # the peer's guided backprop takes one image at a time
            gbs = [gb_model(x[i:i + 1], target_category=int(t)) for i, t in enumerate(target)]
            return [m[..., None] * g for m, g in zip(maps, gbs)]
        return run, release(cam)
    return None


def floor_runners(model, x, layer, args) -> dict:
    """The least work any implementation of a method family must do on this batch, as callables:
    a layer-gradient CAM needs one forward pass and the gradient of the class scores with respect
    to the layer's output (no parameter gradients, nothing below the layer); Score-CAM needs one
    forward pass of a masked input per image and channel of the layer (the masks' values do not
    change the cost). Timing these beside the peer bounds the speed-up any fp32 code can reach.
    Inputs go in the fastest layout (``fast_layout``, as ours runs), so a floor is never slower
    than it needs to be."""
    resolved = resolve_layer_full(model, layer)
    module = resolved.module
    x = fast_layout(x)
    with torch.no_grad(), ModelGuard(model) as guard:
        capture = guard.capture([resolved], stop_early=True)
        capture.forward(model, x[:1])
        channels = to_nchw(capture.raw()[0], resolved).shape[1]  # Swin-T's stages are (B, h, w, C)
    n_score = min(args.slow_images, args.batch) if not args.full else args.batch
    masked = fast_layout(torch.rand(args.scorecam_batch, *x.shape[1:],
                                    generator=torch.Generator().manual_seed(1)).to(x.device))

    def gradient_to_layer():
        leaf = {}

        def hook(m, i, out):
            leaf["a"] = out.detach().requires_grad_()
            return leaf["a"]
        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                scores = model(x)[:, 0].sum()
                torch.autograd.grad(scores, leaf["a"])
        finally:
            handle.remove()

    def masked_forwards():
        with torch.no_grad():
            for start in range(0, n_score * channels, args.scorecam_batch):
                model(masked[:min(args.scorecam_batch, n_score * channels - start)])

    return {"gradient": (x.shape[0], gradient_to_layer), "scorecam": (n_score, masked_forwards)}


def print_floors(model, x, args, peer_seconds_per_map: dict, device) -> None:
    """Floors beside the peer: peer / floor is the largest speed-up over the peer possible."""
    floors = floor_runners(model, x, args.layer, args)
    families = [("gradient", ("gradcam", "gradcampp", "layercam"),
                 f"forward + gradient to {args.layer} (no parameter gradients)"),
                ("scorecam", ("scorecam",), f"images x channels masked forwards (batches of {args.scorecam_batch})")]
    rows = [(key, methods, what) for key, methods, what in families
            if any(m in peer_seconds_per_map for m in methods)]
    if not rows:
        return
    timings = measure([floors[key][1] for key, _, _ in rows], args.reps, device)
    print("\nFloors: the least work any fp32 implementation must do (interleaved, same batch)")
    print("| floor | images | maps/s | peer method | peer maps/s | peer / floor (largest possible speed-up) |")
    print("|" + "---|" * 6)
    for (key, methods, what), (seconds, _) in zip(rows, timings):
        n = floors[key][0]
        for method in (m for m in methods if m in peer_seconds_per_map):
            peer = peer_seconds_per_map[method]
            print(f"| {what} | {n} | {n / seconds:.1f} | {method} | {1 / peer:.1f} | {peer * n / seconds:.2f}x |")


def _probe_memory(conn, method, lib, argv):
    """Child process: peak RSS increase (MiB) of one call, measured from a fresh heap."""
    args, model, x_all, t_all = setup(argv)
    n = n_images(method, args)
    x, t = x_all[:n], t_all[:n]
    if lib == "ours":
        ex = get_explainer(method, model, **options_for(method, args))
        fn = lambda: ex.attribute(x, t)  # noqa: E731
    else:
        fn, _ = peer_runner(method, model, x, t, args.layer, args)
    with PeakMemory(args.device) as mem:
        fn()
    conn.send(mem.peak)


def memory_in_fresh_process(method, lib, argv) -> float:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_probe_memory, args=(child, method, lib, argv))
    proc.start()
    proc.join()
    return parent.recv() if proc.exitcode == 0 and parent.poll() else float("nan")


# ---------------------------------------------------------------------------------------------

def options_for(method, args):
    return {"scorecam": {"batch_size": args.scorecam_batch, "layer": args.layer},
            "relax": {"n_masks": args.relax_masks, "batch_size": 128},
            "refinecam": {"base": "gradcampp", "layers": STAGES},
            "integratedgradients": {"n_steps": args.ig_steps, "internal_batch_size": 128},
            "lime": {"n_samples": args.lime_samples, "perturbations_per_eval": 64},
            "kernelshap": {"n_samples": args.lime_samples, "perturbations_per_eval": 64},
            }.get(method, {"layer": args.layer} if method in LAYER_METHODS else {})


LAYER_METHODS = {"gradcam", "gradcampp", "layercam", "shapleycam", "guidedgradcam", "lafam", "scorecam"}
SLOW = {"scorecam", "relax", "lime", "kernelshap", "integratedgradients"}
DEFAULT = ["gradcam", "gradcampp", "layercam", "shapleycam", "refinecam", "scorecam", "guidedgradcam", "lafam",
           "relax", "deeplift", "inputxgradient", "integratedgradients", "randomcam"]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--layer", default="stage1")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--slow-images", type=int, default=4, help="images for Score-CAM/RELAX/LIME/IG (default 4)")
    p.add_argument("--full", action="store_true", help="run slow methods on the whole batch too")
    p.add_argument("--scorecam-batch", type=int, default=64)
    p.add_argument("--relax-masks", type=int, default=256)
    p.add_argument("--ig-steps", type=int, default=50)
    p.add_argument("--lime-samples", type=int, default=200)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--no-floor", action="store_true", help="skip the floor table (least work any code must do)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (one process each)")
    return p.parse_args(argv)


def setup(argv):
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet18", num_classes=6, image_size=args.size).eval().to(device)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(args.batch, 3, args.size, args.size, generator=gen).to(device)
    t_all = torch.randint(0, 6, (args.batch,), generator=gen).to(device)
    return args, model, x_all, t_all


def n_images(method, args):
    return args.batch if (args.full or method not in SLOW) else min(args.slow_images, args.batch)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, model, x_all, t_all = setup(argv)
    device = x_all.device
    print(f"# ResNet18 {args.size}px batch {args.batch} layer {args.layer} device {device} "
          f"threads {torch.get_num_threads()} torch {torch.__version__} reps {args.reps}")
    print("| method | images | ours maps/s | ours peak MiB | peer maps/s | peer peak MiB | speed-up |")
    print("|" + "---|" * 7)
    results, peer_results = {}, {}
    for method in args.methods:
        n = n_images(method, args)
        x, t = x_all[:n], t_all[:n]
        ex = get_explainer(method, model, **options_for(method, args))
        peer = None if args.no_peer else peer_runner(method, model, x, t, args.layer, args)
        fns = [lambda: ex.attribute(x, t)] + ([peer[0]] if peer is not None else [])
        try:
            timings = measure(fns, args.reps, device)
        finally:
            if peer is not None:
                peer[1]()
        mem = {}
        for lib in ["ours"] + (["peer"] if peer is not None else []):
            mem[lib] = float("nan") if args.no_memory else memory_in_fresh_process(method, lib, argv)
        ours_s = timings[0][0]
        peer_txt = "- | - | -"
        if peer is not None:
            peer_s = timings[1][0]
            peer_results[method] = peer_s / n
            peer_txt = f"{n / peer_s:.1f} | {mem['peer']:.0f} | {peer_s / ours_s:.2f}x"
        results[method] = ours_s / n
        print(f"| {method} | {n} | {n / ours_s:.1f} | {mem['ours']:.0f} | {peer_txt} |", flush=True)
    if "refinecam" in results and "gradcampp" in results:
        print(f"\nRefineCAM (4 layers) / Grad-CAM++ (1 layer) time: {results['refinecam'] / results['gradcampp']:.2f}")
    if not args.no_floor:
        print_floors(model, x_all, args, peer_results, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
