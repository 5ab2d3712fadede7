"""`ShapesDataModule`: shapesynth data for Lightning, from disk or rendered on the fly.

Sources (``train_source``):

- ``"stream"``: every epoch renders ``train_length`` new images with `SynthStream` (no disk);
  epoch ``e`` is a pure function of (recipe, e), so an interrupted run resumes with the very
  draws it would have seen. With ``data`` given, the recipe is that dataset's own
  ``shapesynth.json`` (same train background pool, never the test pool) and val/test come from
  disk; without ``data``, val/test are rendered from the val/test splits of ``synth``.
- ``"disk"``: the train split of ``data`` (any format the generator writes), reshuffled per
  epoch by a seeded sampler.

``train_synth`` (stream only) overrides SynthConfig fields for the train stream alone, e.g.
``{"size_band_weights": [1, 1.5, 2]}`` to over-sample small shapes; val and test keep the recipe.

An optional difficulty curriculum (stream only) moves the clutter from
``SynthConfig.with_difficulty(curriculum_start)`` to the target recipe's own knobs over the first
``curriculum_epochs`` epochs.

``train_crop`` (stream only) trains on ``train_crop`` px windows of the rendered images, each
placed at random where it holds the whole shape, for the first ``train_crop_epochs`` epochs (None:
all). Shapes and clutter keep their pixel scale (unlike rendering at a smaller image size) while
each shape fills more of the pooled features; val and test stay full size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
import pytorch_lightning as pl

from shapesynth import CLASS_NAMES, SynthConfig
from shapesynth.config import EASY_CLUTTER
from shapesynth.shapes import circumradius
from shapesynth.torchdata import ShapesDataset, SynthStream

from trainers.models import IMAGENET_MEAN, IMAGENET_STD
from trainers.precision import cuda_selected


class DataError(ValueError):
    """A dataset that cannot be used for this model (the message names path and problem)."""


class EpochPermutation(Sampler[int]):
    """A new seeded permutation of ``range(n)`` per epoch; no global RNG state."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ShapeCrops(Dataset):
    """``train_crop`` px windows of a dataset's items, each holding the item's whole shape.

    The window's offset is uniform over the positions that keep the shape (mask and enclosed
    region) inside it, drawn from a generator seeded by (seed, epoch, index): the same item of the
    same epoch always gets the same window. ``active = False`` passes items through uncropped.
    """

    def __init__(self, base: Dataset, crop: int, seed: int = 0):
        self.base, self.crop, self.seed = base, int(crop), int(seed)
        self.epoch, self.active = 0, True

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _offset(self, lo: int, hi: int, g: torch.Generator) -> int:
        return lo + int(torch.randint(hi - lo + 1, (1,), generator=g))

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if not self.active:
            return item
        h, w = item["image"].shape[-2:]
        c = self.crop
        if c > h or c > w:
            raise DataError(f"train_crop {c} px is larger than the {h}x{w} px images")
        shape = (item["mask"][0] > 0) | (item["region"][0] > 0)
        rows, cols = shape.any(1).nonzero()[:, 0], shape.any(0).nonzero()[:, 0]
        if rows.numel() == 0:
            raise DataError(f"train_crop: item {i} has an empty mask; nothing to keep inside the window")
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if y1 - y0 > c or x1 - x0 > c:
            raise DataError(f"train_crop {c} px cannot hold item {i}'s shape of {y1 - y0}x{x1 - x0} px "
                            f"(use a crop of at least the largest shape's extent)")
        # modulo 2**64 (what manual_seed takes): seeds up to TrainConfig's 2**32 - 1 overflow otherwise,
        # and every smaller key (all seeds below ~1.8 million) keeps its window
        key = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)) % 2**64
        g = torch.Generator().manual_seed(key)
        top = self._offset(max(0, y1 - c), min(y0, h - c), g)
        left = self._offset(max(0, x1 - c), min(x0, w - c), g)
        window = (..., slice(top, top + c), slice(left, left + c))
        return {**item, **{k: item[k][window] for k in ("image", "mask", "region")}}


def resolve_num_workers(num_workers: int | str = "auto", accelerator: str = "auto") -> int:
    """DataLoader workers for ``num_workers`` ("auto" or a count >= 0).

    "auto" is 0 when training on the CPU: a rendering worker then runs on the cores that torch's
    intra-op threads use, and the oversubscription slows every step by more than rendering the
    batch inline costs (ResNet18, 128 px, batch 64, 2 cores, bf16: 885 ms per step with one
    worker against 735 ms + 44 ms of inline rendering; benchmarks/RESULTS.md). Beside a CUDA
    device the CPU is otherwise idle: min(4, CPUs - 1) workers keep the device fed.
    """
    if num_workers == "auto":
        if cuda_selected(accelerator):
            return max(1, min(4, (os.cpu_count() or 2) - 1))
        return 0
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
    return num_workers


def curriculum_config(target: SynthConfig, progress: float, start: float) -> SynthConfig:
    """``target`` with its clutter knobs moved toward ``with_difficulty(start)`` by ``1 - progress``.

    progress 0 gives the start difficulty, progress >= 1 the target exactly.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if p >= 1.0:
        return target
    easy = target.with_difficulty(start)
    knobs = {k: getattr(easy, k) + p * (getattr(target, k) - getattr(easy, k)) for k in EASY_CLUTTER}
    return target.replace(**knobs)


def dataset_class_names(path) -> tuple[str, ...]:
    """Class names a generated dataset declares (HF ClassLabel of the hub format), else shapesynth's."""
    files = sorted(Path(path).glob("data/*.parquet"))
    if files:
        import pyarrow.parquet as pq

        meta = pq.read_schema(files[0]).metadata or {}
        if b"huggingface" in meta:
            label = json.loads(meta[b"huggingface"]).get("info", {}).get("features", {}).get("label", {})
            if label.get("names"):
                return tuple(label["names"])
    return tuple(CLASS_NAMES)


def check_dataset(path, split: str, image_size: int, class_names=CLASS_NAMES, *, saved_model: bool = False) -> int:
    """Fail fast on a missing/empty split, another image size or other classes; returns its length.

    ``saved_model``: the model (and its image size) is fixed, as in ``shapesynth-train test``, so an
    image size mismatch is fixed by other data or another model, not by ``--image-size``.
    """
    from shapesynth.readers import load_config, load_metadata

    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {p} does not exist (generate it with `shapesynth generate --out {p}`)")
    try:
        n = len(ShapesDataset(p, split=split))
    except Exception as err:  # noqa: BLE001 - re-raised with the path and split named
        raise DataError(f"dataset {p}: cannot open split {split!r}: {err}") from err
    if n == 0:
        raise DataError(f"dataset {p}: split {split!r} is empty")
    try:
        size = load_config(p).image_size
    except Exception:  # noqa: BLE001 - no recipe: check a decoded image instead
        size = ShapesDataset(p, split=split)[0]["image"].shape[-1]
    if size != image_size:
        if saved_model:  # the model's size is fixed: other data, or another model
            advice = (f"evaluate data generated at {image_size} px (`shapesynth generate --out DIR --image-size "
                      f"{image_size}`), or a model trained at {size} px")
        else:
            advice = f"set --image-size {size}, or regenerate the data at {image_size} px"
        raise DataError(f"dataset {p} has {size} px images but the model expects {image_size} px ({advice})")
    names = dataset_class_names(p)
    if tuple(names) != tuple(class_names):
        raise DataError(f"dataset {p} has classes {list(names)} but the model has {list(class_names)}")
    labels = load_metadata(p, split)["label"]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"dataset {p}: split {split!r} has labels {int(labels.min())}..{int(labels.max())}, "
                        f"the model has {len(class_names)} classes")
    return n


def check_train_backgrounds(path, recipe: SynthConfig) -> None:
    """A training stream renders its images from the dataset's ``recipe``, over the train background
    pool that recipe rebuilds: refuse one of background files (``folder``, ``hf``) that is not the
    pool the dataset was generated with (its ``backgrounds.json``). Files changed since generation,
    or a relative background folder read from another current folder, would train on other
    backgrounds than the dataset's train split holds, and on any mixed in from its val or test
    pools. (Procedural pools are seeded per split: they cannot mix, and need no files.)"""
    from shapesynth.backgrounds import BackgroundError
    from shapesynth.torchdata import dataset_generator
    from shapesynth.writers import OutputError

    if recipe.background == "procedural":
        return
    try:
        dataset_generator(path, splits=("train",), use="the training stream (train_source 'stream') would "
                          "render other backgrounds than the dataset's train split")
    except (BackgroundError, OutputError) as err:
        raise DataError(f"{err} (or train on the stored images: --train-source disk)") from err


def data_recipes(image_size: int, data: str | None = None, train_source: str = "stream", synth: dict | None = None,
                 train_synth: dict | None = None, train_crop: int | None = None,
                 recipe: SynthConfig | None = None) -> tuple[SynthConfig | None, SynthConfig | None]:
    """The recipes of the rendered splits and of the training stream, ``(synth_config, train_target)``,
    after every check of these options that needs no dataset files: `ShapesDataModule` runs it, and
    `TrainConfig` too, so ``--print-config`` refuses what ``fit`` refuses. Without ``data`` the recipe
    is ``synth`` at ``image_size``; with ``data`` it is the dataset's own, ``recipe`` (None: not read,
    or ``train_source`` 'disk'; the checks that need it are skipped and ``(None, None)`` returned)."""
    if train_source not in ("stream", "disk"):
        raise DataError(f"train_source must be 'stream' or 'disk', got {train_source!r}")
    if train_source == "disk" and not data:
        raise DataError("train_source='disk' needs a dataset folder (--data)")
    if train_crop is not None and train_source != "stream":
        raise DataError("train_crop crops rendered training images; it needs train_source='stream'")
    if data and synth:
        raise DataError("give either a dataset folder (--data, whose recipe is used) or synth overrides, not both")
    train_synth = dict(train_synth or {})
    if train_synth:
        if train_source != "stream":
            raise DataError("train_synth changes rendered training images; it needs train_source='stream'")
        if "image_size" in train_synth:
            raise DataError("train_synth cannot change image_size (train and test must share it)")
    if data:
        synth_config = recipe
        if synth_config is None:
            return None, None
    else:
        overrides = dict(synth or {})
        size = overrides.pop("image_size", image_size)
        if int(size) != int(image_size):
            raise DataError(f"synth.image_size {size} disagrees with image_size {image_size}")
        synth_config = SynthConfig.from_dict({**overrides, "image_size": int(image_size)})
    train_target = synth_config
    if train_synth:
        try:
            train_target = SynthConfig.from_dict({**synth_config.to_dict(), **train_synth})
        except ValueError as err:
            raise DataError(f"train_synth {train_synth}: {err}") from err
    if train_crop is not None:
        crop = int(train_crop)
        if not 16 <= crop <= int(image_size):
            raise DataError(f"train_crop must be between 16 and image_size {image_size} px, got {crop}")
        largest = max(train_target.band_px(b)[1] for b in range(len(train_target.size_bands)))
        # any rotation of any class fits in the circumcircle; +2 px of anti-aliased edge
        need = math.ceil(2 * circumradius(largest)) + 2
        if need > crop:
            raise DataError(f"train_crop {crop} px cannot hold the largest shapes: {largest} px "
                            f"shapes need windows of {need} px at any rotation (image_size {image_size})")
    return synth_config, train_target


def config_fingerprint(cfg: SynthConfig) -> str:
    return "synth-" + hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16]


class ShapesDataModule(pl.LightningDataModule):
    def __init__(self, image_size: int = 128, data: str | None = None, train_source: str = "stream",
                 synth: dict | None = None, train_length: int = 8192, val_length: int = 512,
                 test_length: int = 600, curriculum_epochs: int = 0, curriculum_start: float = 0.0,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, class_names=CLASS_NAMES, train_synth: dict | None = None,
                 train_crop: int | None = None, train_crop_epochs: int | None = None,
                 saved_model: bool = False):
        super().__init__()
        self.image_size, self.data, self.train_source = int(image_size), data, train_source
        self.train_length, self.val_length, self.test_length = int(train_length), int(val_length), int(test_length)
        self.curriculum_epochs, self.curriculum_start = int(curriculum_epochs), float(curriculum_start)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.class_names = tuple(class_names)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # applied inside the model; recorded here
        recipe = None
        if data:
            # the option checks that need no dataset files first (`data_recipes`, which TrainConfig runs too)
            data_recipes(image_size, data, train_source, synth, train_synth, train_crop)
            self.split_sizes = {s: check_dataset(data, s, self.image_size, self.class_names, saved_model=saved_model)
                                for s in (("train", "val", "test") if train_source == "disk" else ("val", "test"))}
            from shapesynth.readers import load_config

            recipe = load_config(data) if train_source == "stream" else None
        # with a dataset, train_synth and train_crop are checked against its recipe here
        self.synth_config, self.train_target = data_recipes(image_size, data, train_source, synth, train_synth,
                                                            train_crop, recipe)
        self.train_synth = dict(train_synth or {})
        self.train_crop = None if train_crop is None else int(train_crop)
        self.train_crop_epochs = None if train_crop_epochs is None else int(train_crop_epochs)
        self.epoch = 0
        self.train_set = self.val_set = self.test_set = None
        self._train_backgrounds_checked = False
        self.skipped_backgrounds: list[tuple[str, str]] = []  # (file, reason): rendered splits' pools

    def check_train_backgrounds(self) -> None:
        """Before training: a stream rendered from a dataset's recipe draws on the dataset's own
        train background pool (`check_train_backgrounds`); without a dataset, the background files
        of `synth` / `train_synth` must give pools (`check_rendered_backgrounds`). `plan_fit` calls
        it before anything is written; ``setup("fit")`` too, for a trainer driven directly."""
        if self._train_backgrounds_checked:
            return
        if self.data and self.train_source == "stream":
            check_train_backgrounds(self.data, self.synth_config)
        elif not self.data:
            self.check_rendered_backgrounds("model.json lists them (data.skipped_backgrounds)")
        self._train_backgrounds_checked = True

    def check_rendered_backgrounds(self, listed: str) -> None:
        """Without a dataset, every split is rendered from `synth` (and the training stream from
        `train_synth`): background files (folder, hf) that are missing or unreadable are bad input,
        found here rather than once training or testing has started (the pools are memoised, so the
        streams reuse them); procedural pools need no files. Skipped files (unreadable, duplicates)
        are counted and listed, as `shapesynth generate` lists them in its summary and
        backgrounds.json: in `skipped_backgrounds` (`describe`) and in a warning on stderr that ends
        with ``listed``, where the caller records them (`fit`: model.json; `evaluate`: its results)."""
        from pytorch_lightning.utilities.rank_zero import rank_zero_warn

        from shapesynth.backgrounds import build_pools

        skipped = {}
        for cfg in (self.synth_config, self.train_target):
            if cfg.background != "procedural":
                for pool in build_pools(cfg).values():
                    skipped.update({name: reason for name, reason in pool.skipped if name not in skipped})
        self.skipped_backgrounds = sorted(skipped.items())
        if skipped:
            name, reason = self.skipped_backgrounds[0]
            rank_zero_warn(f"{len(skipped)} background file(s) skipped (e.g. {name}: {reason}); {listed}")

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """What the test numbers refer to: the dataset's fingerprint, or the hash of the recipe with
        the size of the rendered test split (a split's labels depend on its length, so another
        `test_length` is another test set; the recipe's own split_sizes are not what was rendered)."""
        if self.data:
            from shapesynth import dataset_fingerprint

            return dataset_fingerprint(self.data)
        rendered = {**self.synth_config.split_sizes, "test": self.test_length}
        return config_fingerprint(self.synth_config.replace(split_sizes=rendered))

    def samples_fingerprint(self) -> str | None:
        """The dataset's `shapesynth.samples_fingerprint`, the same for a copy of it in another
        storage format (None without a dataset: `fingerprint` names the rendered recipe)."""
        if not self.data:
            return None
        from shapesynth import samples_fingerprint

        return samples_fingerprint(self.data)

    def describe(self) -> dict:
        return {"data": self.data, "train_source": self.train_source, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "class_names": list(self.class_names),
                "train_length": self.train_length if self.train_source == "stream" else None,
                # rendered val/test sizes (with data, the dataset's splits are used)
                "val_length": None if self.data else self.val_length,
                "test_length": None if self.data else self.test_length,
                "train_synth": self.train_synth or None,
                "train_crop": self.train_crop, "train_crop_epochs": self.train_crop_epochs,
                "synth": self.synth_config.to_dict() if self.synth_config is not None else None,
                **({"skipped_backgrounds": [list(s) for s in self.skipped_backgrounds]}
                   if self.skipped_backgrounds else {})}

    # ------------------------------------------------------------------ epochs and curriculum
    def train_config(self, epoch: int) -> SynthConfig:
        if self.curriculum_epochs <= 0:
            return self.train_target
        return curriculum_config(self.train_target, epoch / self.curriculum_epochs, self.curriculum_start)

    def crops_in_epoch(self, epoch: int) -> bool:
        return self.train_crop is not None and (self.train_crop_epochs is None or epoch < self.train_crop_epochs)

    def set_epoch(self, epoch: int) -> None:
        """New draws (stream) or a new order (disk) for ``epoch``; called by the module each epoch."""
        self.epoch = int(epoch)
        stream = self.train_set.base if isinstance(self.train_set, ShapeCrops) else self.train_set
        if isinstance(stream, SynthStream):
            cfg = self.train_config(epoch)
            if cfg is not stream.config and cfg != stream.config:
                stream.set_config(cfg)
            stream.set_epoch(epoch)
        if isinstance(self.train_set, ShapeCrops):
            self.train_set.set_epoch(epoch)
            self.train_set.active = self.crops_in_epoch(epoch)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.check_train_backgrounds()
            if self.train_source == "stream":
                self.train_set = SynthStream(self.train_config(self.epoch), "train", self.train_length, self.epoch)
                if self.train_crop is not None:
                    self.train_set = ShapeCrops(self.train_set, self.train_crop, self.seed)
                    self.set_epoch(self.epoch)
            else:
                self.train_set = ShapesDataset(self.data, "train")
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._eval_set("val", self.val_length)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._eval_set("test", self.test_length)

    def _eval_set(self, split: str, length: int) -> Dataset:
        if self.data:
            return ShapesDataset(self.data, split)
        return SynthStream(self.synth_config, split, length, epoch=0)

    def _loader(self, ds: Dataset, batch_size: int, sampler=None) -> DataLoader:
        # persistent_workers=False: workers are forked per epoch and see the epoch's draws
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=False, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # a stream is already in a seeded random class order; a disk split is reshuffled per epoch
        sampler = EpochPermutation(len(self.train_set), self.seed) if self.train_source == "disk" else None
        if sampler is not None:
            sampler.set_epoch(self.epoch)
        return self._loader(self.train_set, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, self.eval_batch_size)
