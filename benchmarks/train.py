"""Training and inference throughput (images/s) per architecture, fp32 and bf16 side by side.

    .venv/bin/python benchmarks/train.py                      # short default: 64 px, batch 32, all archs
    .venv/bin/python benchmarks/train.py --size 128 --batch 64 --archs resnet18 vgg11_bn --steps 5
    .venv/bin/python benchmarks/train.py --loader --size 128 --batch 64 --archs resnet18 --workers 0 1

Training = forward + backward + fused AdamW step, exactly what the trainer does (channels_last,
bf16 via CPU/CUDA autocast). Inference = forward under no_grad in eval mode. Each cell: median
of ``--steps`` timed iterations after ``--warmup``. The header line says what
``precision="auto"`` would choose on this machine (trainers.precision). Shared machines make
these numbers noisy: report the load average with them (printed).

``--loader`` instead feeds the same training step from the trainer's own data module
(`ShapesDataModule`, rendered on the fly, medium clutter, optional ``--crop`` windows) with each
``--workers`` count, and splits each iteration into waiting for the batch and the step itself:
this is what decides ``num_workers: auto`` (a rendering worker competes with torch's intra-op
threads for the cores). The fixed-batch row is the step alone, for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from trainers.models import available_archs, build_model
from trainers.precision import resolve_precision


def _synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (the one named: ``cuda:1`` is not the current device)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _bench(fn, warmup: int, steps: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)  # else the first timed step also waits for the warm-up's queued kernels
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _model_and_step(arch: str, size: int, bf16: bool, device: str):
    torch.manual_seed(0)
    model = build_model(arch, image_size=size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"

    def train_step(x, y):
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return model, train_step, kind


def measure(arch: str, size: int, batch: int, bf16: bool, warmup: int, steps: int, device: str,
            pixels: int | None = None, inference: bool = True) -> tuple[float, float | None]:
    """Training and inference images/s of a model built for ``size`` on ``pixels`` px inputs (default size).

    ``inference=False`` skips the inference timing and returns None in its place.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, pixels or size, pixels or size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), generator=g).to(device)
    model, train_step, kind = _model_and_step(arch, size, bf16, device)

    def infer():
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    model.train()
    t_train = _bench(lambda: train_step(x, y), warmup, steps, device)
    if not inference:
        return batch / t_train, None
    model.eval()
    t_infer = _bench(infer, warmup, steps, device)
    return batch / t_train, batch / t_infer


def measure_loader(arch: str, size: int, batch: int, crop: int | None, workers: int, bf16: bool,
                   warmup: int, steps: int, device: str) -> tuple[float, float]:
    """Median (wait for the batch, training step) in seconds, fed by the trainer's data module."""
    from trainers.data import ShapesDataModule

    dm = ShapesDataModule(image_size=size, batch_size=batch, train_length=batch * (warmup + steps),
                          num_workers=workers, train_crop=crop)
    dm.setup("fit")
    dm.set_epoch(0)
    model, train_step, _ = _model_and_step(arch, size, bf16, device)
    model.train()
    waits, times = [], []
    batches = iter(dm.train_dataloader())
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        item = next(batches)
        x, y = item["image"], item["label"]
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        t1 = time.perf_counter()
        train_step(x, y)
        _synchronize(device)
        t2 = time.perf_counter()
        if i >= warmup:
            waits.append(t1 - t0)
            times.append(t2 - t1)
    del batches
    return statistics.median(waits), statistics.median(times)


def _loader_table(args, bf16: bool) -> int:
    pixels = f"{args.crop} px crops of {args.size} px" if args.crop else f"{args.size} px"
    print(f"# training steps fed by ShapesDataModule ({pixels} images, {'bf16' if bf16 else 'fp32'}); ms per step")
    head = f"| {'arch':<14}| data source            | wait for batch | step | in all | images/s |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for arch in args.archs:
        train_rate, _ = measure(arch, args.size, args.batch, bf16, args.warmup, args.steps, args.device, args.crop,
                                inference=False)
        rows = [("fixed batch (step only)", 0.0, args.batch / train_rate)]
        for w in args.workers:
            wait, step = measure_loader(arch, args.size, args.batch, args.crop, w, bf16, args.warmup, args.steps,
                                        args.device)
            rows.append((f"{w} worker{'s' if w != 1 else ''}" + (" (inline)" if w == 0 else ""), wait, step))
        for name, wait, step in rows:
            print(f"| {arch:<14}| {name:<23}| {wait * 1e3:14.0f} | {step * 1e3:4.0f} | {(wait + step) * 1e3:6.0f} | "
                  f"{args.batch / (wait + step):8.1f} |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(available_archs()))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loader", action="store_true", help="time steps fed by the trainer's data module")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers (--loader)")
    p.add_argument("--crop", type=int, default=None, help="train_crop windows in px (--loader)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = resolve_precision("auto")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {args.size} px, batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.steps} after {args.warmup} warm-up; precision auto -> {auto}; load avg {load:.1f}")
    if args.loader:
        return _loader_table(args, bf16=auto == "bf16-mixed")
    head = f"| {'arch':<14}| train fp32 | train bf16 | bf16/fp32 | infer fp32 | infer bf16 | bf16/fp32 |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for arch in args.archs:
        tr32, in32 = measure(arch, args.size, args.batch, False, args.warmup, args.steps, args.device)
        tr16, in16 = measure(arch, args.size, args.batch, True, args.warmup, args.steps, args.device)
        print(f"| {arch:<14}| {tr32:10.1f} | {tr16:10.1f} | {tr16 / tr32:8.2f}x | {in32:10.1f} | {in16:10.1f} | "
              f"{in16 / in32:8.2f}x |", flush=True)
    print("images/s; higher is better")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
