"""Torch datasets: `SynthStream` renders on the fly, `ShapesDataset` reads a generated folder.

Both yield ``{"image": float32 3xHxW in [0,1] (not normalised), "mask": float32 1xHxW,
"region": float32 1xHxW, "label": int64 tensor, "index": int}``.

Joint transforms: pass a ``torchvision.transforms.v2`` transform; it receives the image as a
``tv_tensors.Image`` and the masks as ``tv_tensors.Mask``, so geometric transforms move image and
masks together (masks are resampled with nearest neighbour by torchvision).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from shapesynth.config import SynthConfig
from shapesynth.render import ShapeSynth
from shapesynth.streams import as_int, check_count


def _to_item(image: np.ndarray, mask: np.ndarray, region: np.ndarray, label: int, index: int, transform: Callable | None) -> dict:
    item = {
        "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0),
        "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
        "region": torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None],
        "label": torch.tensor(int(label), dtype=torch.int64),
        "index": int(index),
    }
    if transform is not None:
        from torchvision import tv_tensors

        wrapped = {
            "image": tv_tensors.Image(item["image"]),
            "mask": tv_tensors.Mask(item["mask"]),
            "region": tv_tensors.Mask(item["region"]),
        }
        out = transform(wrapped)
        item.update({k: out[k].as_subclass(torch.Tensor) for k in wrapped})
    return item


class SynthStream(Dataset):
    """Samples rendered on the fly: no disk, any length, new draws per epoch.

    Item i of epoch e is ``ShapeSynth(cfg).sample(split, i, epoch=e, n=length)``; labels are
    exactly balanced over the `length` items of each epoch. `set_epoch(e)` changes every draw
    deterministically (with DataLoader workers, use ``persistent_workers=False`` so the workers
    see the new epoch). Background pools are built in the constructor, so forked workers share
    them.
    """

    def __init__(
        self,
        config: SynthConfig | None = None,
        split: str = "train",
        length: int | None = None,
        epoch: int = 0,
        transform: Callable | None = None,
    ):
        self.config = config if config is not None else SynthConfig()
        self.split = split
        self.length = self.config.split_size(split) if length is None else as_int("length", length)
        if self.length <= 0:
            raise ValueError(f"SynthStream needs length >= 1 (split {split!r} has {self.length})")
        self.epoch = check_count("epoch", epoch)
        self.transform = transform
        self.synth = ShapeSynth(self.config)
        self.synth.pools  # noqa: B018 - build once here, before any worker forks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_count("epoch", epoch)

    def set_config(self, config: SynthConfig) -> None:
        """Switch the recipe (e.g. a difficulty curriculum); pools are rebuilt here, once."""
        self.config = config
        self.synth = ShapeSynth(config)
        self.synth.pools  # noqa: B018

    def __len__(self) -> int:
        return self.length

    def sample(self, i: int):
        """The full `Sample` (with metadata) behind item i of the current epoch."""
        return self.synth.sample(self.split, i, epoch=self.epoch, n=self.length)

    def __getitem__(self, i: int) -> dict:
        i = as_int("index", i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for SynthStream of length {self.length}")
        s = self.sample(i)
        return _to_item(s.image, s.mask, s.region, s.label, i, self.transform)


_COUNTERFACTUALS = "counterfactuals would not match the stored images"


def _check_pools_match(path, synth: ShapeSynth, splits=None, use: str = _COUNTERFACTUALS) -> None:
    """Refuse pools of ``synth`` (those of ``splits``, default all) that differ from the ones the
    dataset at ``path`` was generated with (its ``backgrounds.json``); ``use`` says what would go wrong."""
    from shapesynth.backgrounds import relative_folders_hint
    from shapesynth.writers import OutputError

    listing_file = Path(path) / "backgrounds.json"
    if not listing_file.exists():
        return
    listing = json.loads(listing_file.read_text())
    for split, pool in synth.pools.items():
        if splits is not None and split not in splits:
            continue
        recorded = [b["sha256"] for b in listing.get(split, [])]
        if list(pool.hashes) != recorded:
            changed = sum(a != b for a, b in zip(pool.hashes, recorded)) + abs(len(pool.hashes) - len(recorded))
            raise OutputError(
                f"the backgrounds of {path} changed since it was generated: pool {split!r} now has "
                f"{len(pool.hashes)} bases, {changed} of them unlike {listing_file.name}; {use} "
                f"(restore the background files, or regenerate){relative_folders_hint(synth.config)}"
            )


def dataset_generator(path, splits=None, use: str = _COUNTERFACTUALS) -> ShapeSynth:
    """The generator of the dataset at ``path``, rebuilt from its recipe (``shapesynth.json``), with
    the background pools of ``splits`` (default all) checked against its ``backgrounds.json``.

    Background files that changed since generation, or relative background folders read from
    another current folder than the one generation ran in, would render other backgrounds than
    the dataset's; that is an error (`BackgroundError` or `OutputError` naming the dataset and the
    folder), not a silent mismatch. ``use`` says what would go wrong.
    """
    from shapesynth.backgrounds import BackgroundError, relative_folders_hint
    from shapesynth.readers import load_config

    synth = ShapeSynth(load_config(path))
    try:
        synth.pools  # noqa: B018 - built (and cached) here, to name the dataset when they cannot be
    except BackgroundError as err:
        raise BackgroundError(f"dataset {path}: cannot rebuild its background pools: {err}"
                              f"{relative_folders_hint(synth.config)}") from err
    _check_pools_match(path, synth, splits, use)
    return synth


class ShapesDataset(Dataset):
    """A split of a dataset written by `shapesynth generate`, in any of its formats."""

    def __init__(self, path, split: str = "test", transform: Callable | None = None):
        from shapesynth.readers import open_split

        self.path = path
        self.split = split
        self.transform = transform
        self.records = open_split(path, split)

    def __len__(self) -> int:
        return len(self.records)

    def metadata(self, i: int) -> dict:
        return self.records.metadata(i)

    @property
    def synth(self) -> ShapeSynth:
        """The generator of this dataset, rebuilt from its recipe (``shapesynth.json``).

        Its background pools are checked against the dataset's ``backgrounds.json``: when the
        background files changed since generation, counterfactuals could no longer match the
        stored pixels, so that is an error rather than a silent mismatch.
        """
        if getattr(self, "_synth", None) is None:
            self._synth = dataset_generator(self.path)
        return self._synth

    def counterfactual(self, i: int, label: int | None = None) -> dict:
        """Item i re-rendered as class `label` (same background, placement and colour), or, with
        label None, its background alone (mask and region all zero)."""
        self._check_index(i)
        index = int(self.records.metadata(i)["index"])
        if label is None:
            bg = self.synth.background_only(self.split, index)
            zeros = np.zeros(bg.shape[:2], np.float32)
            return _to_item(bg, zeros, zeros, -1, index, self.transform)
        s = self.synth.counterfactual(self.split, index, label)
        return _to_item(s.image, s.mask, s.region, s.label, index, self.transform)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < len(self.records):
            raise IndexError(f"index {i} out of range for split {self.split!r} of {len(self.records)} samples")

    def __getitem__(self, i: int) -> dict:
        self._check_index(i)
        image, mask, region, label, index = self.records[i]
        return _to_item(image, mask, region, label, index, self.transform)
