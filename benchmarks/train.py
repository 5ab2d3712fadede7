"""Training and inference throughput (images/s) per architecture, fp32 and bf16 side by side.

    .venv/bin/python benchmarks/train.py                      # short default: 64 px, batch 32, all archs
    .venv/bin/python benchmarks/train.py --size 128 --batch 64 --archs resnet18 vgg11_bn --steps 5

Training = forward + backward + fused AdamW step, exactly what the trainer does (channels_last,
bf16 via CPU/CUDA autocast). Inference = forward under no_grad in eval mode. Each cell: median
of ``--steps`` timed iterations after ``--warmup``. The "auto" column is what
``precision="auto"`` would choose on this machine (trainers.precision). Shared machines make
these numbers noisy: report the load average with them (printed).
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


def _bench(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(arch: str, size: int, batch: int, bf16: bool, warmup: int, steps: int, device: str) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,), generator=g).to(device)
    torch.manual_seed(0)
    model = build_model(arch, image_size=size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"

    def train_step():
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            model(x)

    model.train()
    t_train = _bench(train_step, warmup, steps)
    model.eval()
    t_infer = _bench(infer, warmup, steps)
    return batch / t_train, batch / t_infer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(available_archs()))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = resolve_precision("auto")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {args.size} px, batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.steps} after {args.warmup} warm-up; precision auto -> {auto}; load avg {load:.1f}")
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
