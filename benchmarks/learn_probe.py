"""Does an architecture start to learn on the easiest shapesynth data? A few hundred AdamW steps.

Prints the mean training loss and accuracy every 20 steps for one arch on rendered images with
the easiest clutter (``with_difficulty(0.0)``: a smooth colour field), constant lr, no warm-up,
no curriculum. Chance is ln 6 = 1.792. Used to tell a slow start from no start (RESULTS.md,
"ConvNeXt-T and Swin-T from scratch").

``--task toy`` replaces the data by the simplest shape task there is: one white disc or one
white square of the same area on black, at a random place (two classes; chance ln 2 = 0.693).

    .venv/bin/python benchmarks/learn_probe.py --arch convnext_tiny --steps 480 --bands large
    .venv/bin/python benchmarks/learn_probe.py --arch convnext_tiny --task toy --image-size 32 --steps 300
    .venv/bin/python benchmarks/learn_probe.py --arch convnext_tiny --task toy --image-size 32 --steps 200 --fixed-batch
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from shapesynth import SynthConfig
from shapesynth.torchdata import SynthStream
from trainers import available_archs, build_model
from trainers.module import weight_decay_groups

BANDS = {"large": ((0.31, 0.39),), "quick": ((0.31, 0.39), (0.16, 0.19))}


def toy_batches(image_size: int, batch: int, steps: int, seed: int):
    """Disc (label 0) or square of equal area (label 1), white on black, radius 15-28 % of the side."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.arange(image_size, dtype=torch.float32)
    yy, xx = grid[:, None], grid[None, :]
    lo, hi = max(2, round(0.15 * image_size)), max(3, round(0.28 * image_size))
    for _ in range(steps):
        label = torch.randint(0, 2, (batch,), generator=gen)
        radius = torch.randint(lo, hi + 1, (batch, 1, 1), generator=gen).float()
        centre = hi + torch.rand(batch, 2, generator=gen) * (image_size - 1 - 2 * hi)
        dy, dx = yy - centre[:, 0, None, None], xx - centre[:, 1, None, None]
        disc = dy ** 2 + dx ** 2 <= radius ** 2
        half_side = radius * (math.pi ** 0.5 / 2)  # same area as the disc
        square = (dy.abs() <= half_side) & (dx.abs() <= half_side)
        image = torch.where(label[:, None, None] == 0, disc, square).float()
        yield {"image": image[:, None].expand(-1, 3, -1, -1), "label": label}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="convnext_tiny", choices=available_archs())
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--task", choices=["shapes", "toy"], default="shapes",
                   help="shapes: shapesynth's easiest data; toy: white disc vs square on black")
    p.add_argument("--bands", choices=sorted(BANDS), default="quick",
                   help="large: 31-39 %% of the side only; quick: the quick recipe's two bands")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layer-scale", type=float, help="ConvNeXt: set every layer scale to this at init")
    p.add_argument("--stochastic-depth", type=float, default=None)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-batch", action="store_true",
                   help="train on the first batch at every step: can the arch fit (memorise) it at all?")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=2 if args.task == "toy" else 6, image_size=args.image_size,
                        stochastic_depth=args.stochastic_depth)
    if args.layer_scale is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layer_scale"):
                    param.fill_(args.layer_scale)
    cfg = SynthConfig(image_size=args.image_size, size_bands=BANDS[args.bands], seed=args.seed).with_difficulty(0.0)
    if args.task == "toy":
        loader = toy_batches(args.image_size, args.batch, args.steps, args.seed)
    else:
        loader = DataLoader(SynthStream(cfg, "train", args.steps * args.batch), batch_size=args.batch)
    if args.fixed_batch:
        first = next(iter(loader))
        loader = (first for _ in range(args.steps))
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=args.lr)  # the trainer's groups
    model.train()
    start, losses, hits = time.time(), [], []
    data, chance = (("toy disc vs square", "loss 0.693, accuracy 0.5") if args.task == "toy"
                    else (f"bands {args.bands}", "loss 1.792, accuracy 0.167"))
    if args.fixed_batch:
        data += ", one fixed batch"
    print(f"# {args.arch} {args.image_size} px, {data}, lr {args.lr} constant, batch {args.batch}, "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, layer scale {args.layer_scale}, "
          f"stochastic depth {args.stochastic_depth}; chance: {chance}")
    print("| steps | mean train loss (last <= 20) | accuracy (last <= 20) | seconds |")
    print("|---:|---:|---:|---:|")
    for step, batch in enumerate(loader, 1):
        with torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32):
            logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hits.append((logits.argmax(1) == batch["label"]).float().mean().item())
        if step % 20 == 0 or step == args.steps:
            last = min(20, len(losses))
            print(f"| {step} | {sum(losses[-last:]) / last:.3f} | {sum(hits[-last:]) / last:.3f} | "
                  f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
