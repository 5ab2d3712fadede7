"""``precision="auto"``: bf16-mixed where the hardware runs it fast, else 32-bit. Measured, not assumed.

- CUDA: ``bf16-mixed`` when ``torch.cuda.is_bf16_supported()``, else ``16-mixed``.
- CPU: bf16 needs native instructions (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo on
  Linux; elsewhere torch's ``get_cpu_capability`` must report AMX/bf16) AND a measured probe:
  a small conv stack (the shape of the work in our models) must run at least ``MIN_SPEEDUP``
  times faster under bf16 autocast than in fp32. Otherwise ``32-true``: emulated bf16 is slower
  than fp32 and only costs accuracy.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

MIN_SPEEDUP = 1.15


def cpu_has_native_bf16() -> bool:
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "AMX" in cap or "BF16" in cap


def _time(fn, reps: int) -> float:
    fn()  # warm-up (oneDNN kernel selection)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def cpu_bf16_speedup(reps: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv stack's forward and backward (~0.2 s)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    # Conv2d's initialisation draws from the global RNG: fork it, or the first (cached) probe of a
    # process would shift every seeded draw after it and two equal fits would differ
    with torch.random.fork_rng(devices=[]):
        net = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(64, 64, 3, padding=1)).to(memory_format=torch.channels_last)

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            net(x).float().sum().backward()

    fp32 = min(_time(lambda: step(False), reps) for _ in range(2))
    bf16 = min(_time(lambda: step(True), reps) for _ in range(2))
    return fp32 / bf16


@functools.lru_cache(maxsize=None)
def _cpu_auto() -> str:
    if not cpu_has_native_bf16():
        return "32-true"
    return "bf16-mixed" if cpu_bf16_speedup() >= MIN_SPEEDUP else "32-true"


def cuda_selected(accelerator: str = "auto") -> bool:
    """Whether Lightning's ``accelerator`` setting trains on a CUDA device on this machine."""
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str = "auto", accelerator: str = "auto") -> str:
    """The Lightning precision string for ``precision`` ("auto" is decided here, once per process)."""
    precision = str(precision)
    if precision != "auto":
        return precision
    if cuda_selected(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return _cpu_auto()
