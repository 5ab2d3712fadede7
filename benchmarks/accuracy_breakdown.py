"""Where does a trained model fail? Accuracy per background pool, clutter difficulty and size band.

Renders ``--images`` fresh samples for each row (same seeds in every row, so rows differ only in
what the row names) with the model's own recipe, and prints one markdown table:

- one row per background pool (``train``, ``val``, ``test``): a model as wrong on the bases it
  trained on as on unseen ones is not over-fitting the backgrounds;
- one row per ``--difficulty`` on the test pool (``SynthConfig.with_difficulty``: 0 easy,
  0.5 the defaults, 1 hard): how much of the error the clutter causes.

    .venv/bin/python benchmarks/accuracy_breakdown.py --model outputs/ref/r18_128_e10
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from shapesynth import SynthConfig
from shapesynth.torchdata import SynthStream
from trainers import load_model


def accuracy_by_band(model, cfg: SynthConfig, split: str, n: int, batch_size: int) -> tuple[float, list[float]]:
    stream = SynthStream(cfg, split, n)
    # the placement alone names the band: no second render of each image
    bands = torch.tensor([stream.synth.placement(split, i, epoch=stream.epoch, n=n).band for i in range(n)])
    hits = []
    with torch.inference_mode():
        for batch in DataLoader(stream, batch_size=batch_size):
            hits.append(model(batch["image"]).argmax(1) == batch["label"])
    hit = torch.cat(hits).float()
    per_band = [hit[bands == b].mean().item() if (bands == b).any() else float("nan")
                for b in range(len(cfg.size_bands))]
    return hit.mean().item(), per_band


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained run folder (shapesynth-train fit --out)")
    p.add_argument("--images", type=int, default=600, help="rendered images per row")
    p.add_argument("--difficulty", type=float, nargs="*", default=[0.25, 0.0],
                   help="extra test rows at these clutter difficulties")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, meta = load_model(args.model)
    cfg = SynthConfig(image_size=meta["image_size"], **(meta["config"].get("synth") or {}))
    bands = [f"{lo}-{hi} px" for lo, hi in (cfg.band_px(b) for b in range(len(cfg.size_bands)))]
    print(f"# {args.model}: {meta['arch']} at {meta['image_size']} px, {args.images} rendered images per row")
    print("| images from | accuracy | " + " | ".join(bands) + " |")
    print("|---|---:|" + "---:|" * len(bands))
    rows = [(f"{split} pool, recipe clutter", cfg, split) for split in ("train", "val", "test")]
    rows += [(f"test pool, difficulty {d}", cfg.with_difficulty(d), "test") for d in args.difficulty]
    for name, row_cfg, split in rows:
        acc, per_band = accuracy_by_band(model, row_cfg, split, args.images, args.batch_size)
        print(f"| {name} | {100 * acc:.1f} % | " + " | ".join(f"{100 * a:.1f} %" for a in per_band) + " |",
              flush=True)


if __name__ == "__main__":
    main()
