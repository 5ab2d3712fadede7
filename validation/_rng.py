"""Torch's global generators seeded for one block and put back afterwards.

Our own code draws from explicit ``torch.Generator`` objects. Some libraries (captum's LIME and
KernelShap samplers, a user's method or metric) draw from torch's global generators instead; this
makes their draws reproducible without changing the caller's random state.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu"):
    """Run the block with torch's global CPU generator, and that of ``device`` if it is a CUDA
    device, seeded with ``seed``; both are restored on exit, also when the block raises.

    No other generator is touched: ``torch.manual_seed`` would also (re)seed every CUDA device,
    including the seed queued for one not yet initialised, and that would outlive the block.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
