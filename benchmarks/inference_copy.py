"""How much faster is ``trainers.inference.inference_copy`` than the model as loaded?

Prints, per arch and image size, forward and forward+backward (gradient to the input, as the
gradient methods need) milliseconds per image for the original and the folded copy, interleaved,
medians, and the largest logit difference. Random weights with batch-norm statistics moved off
their init (folding a fresh batch norm would be nearly the identity).

    .venv/bin/python benchmarks/inference_copy.py
    .venv/bin/python benchmarks/inference_copy.py --archs vgg11_bn --sizes 64 128 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from trainers import build_model
from trainers.inference import inference_copy


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.3)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)


def _forward(model, x):
    with torch.no_grad():
        model(x)


def _forward_backward(model, x):
    x = x.detach().requires_grad_(True)
    torch.autograd.grad(model(x)[:, 0].sum(), x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "vgg11_bn", "vgg11"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"# batch {args.batch}, {args.threads} thread(s), channels_last input, medians of "
          f"{args.repeats} interleaved repeats after a warm-up; ms per image")
    print("| arch | px | forward as loaded | forward folded | speed-up | fwd+bwd as loaded | fwd+bwd folded "
          "| speed-up | max logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        for size in args.sizes:
            torch.manual_seed(0)
            model = build_model(arch, image_size=size).eval()
            _randomise_batchnorm(model, gen)
            fast = inference_copy(model)
            x = torch.rand(args.batch, 3, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                diff = (model(x) - fast(x)).abs().max().item()
            times = {key: [] for key in ("f0", "f1", "b0", "b1")}
            for rep in range(args.repeats + 1):
                for key, fn, net in (("f0", _forward, model), ("f1", _forward, fast),
                                     ("b0", _forward_backward, model), ("b1", _forward_backward, fast)):
                    start = time.perf_counter()
                    fn(net, x)
                    if rep:  # the first round warms up
                        times[key].append((time.perf_counter() - start) / args.batch * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {arch} | {size} | {med['f0']:.2f} | {med['f1']:.2f} | {med['f0'] / med['f1']:.2f}x "
                  f"| {med['b0']:.2f} | {med['b1']:.2f} | {med['b0'] / med['b1']:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
