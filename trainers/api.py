"""`TrainConfig` + `fit` / `test`: the engineering around the module (Trainer, run folder, export).

Run folder (``out``)::

    config.yaml            the resolved TrainConfig (re-run: shapesynth-train fit --config out/config.yaml)
    config.json            the same config as JSON
    train_time.json        training seconds, summed over the sessions of a resumed run
    checkpoints/last.ckpt  every epoch end (resume after an interruption: rerun the same command)
    checkpoints/best.ckpt  best val_acc (ties: the later epoch)
    logs/version_N/metrics.csv  CSVLogger, one folder per session (resumes add one)
    model.safetensors      best weights (tensors only) ...
    model.json             ... and metadata: what `trainers.load_model` reads; written last, it marks
                           a finished run (a rerun with resume auto reports it and trains nothing)
    test_metrics.json      test accuracy, per class, confusion matrix
    MODEL_CARD.md          arch, image size, data fingerprints, test results, training time, hardware

Only global rank 0 writes these (DDP runs `run_plan` in every process), each file atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import signal
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from pytorch_lightning.callbacks import Callback

from shapesynth import CLASS_NAMES
from shapesynth.config import read_config_text

from trainers.checkpointing import remove_temp_checkpoints
from trainers.clock import CapForecast, TrainClock, max_time_seconds, positive_max_time
from trainers.data import ShapesDataModule, data_recipes, resolve_num_workers
from trainers.export import META, WEIGHTS, load_model, save_model, write_json, write_text
from trainers.models import _check_arch
from trainers.module import ShapeClassifierModule, per_class_accuracy
from trainers.precision import resolve_precision


# peak one-cycle lr from scratch; VGG's 120M-parameter head overshoots at 2e-3
DEFAULT_LR = {"resnet18": 2e-3, "vgg11": 5e-4, "vgg11_bn": 1e-3, "swin_t": 1e-3, "convnext_tiny": 1e-3}


@dataclass
class TrainConfig:
    """Every knob of a training run (YAML keys and ``--flags`` share these names)."""

    arch: str = "resnet18"
    image_size: int = 128
    out: str = "outputs/train/run"
    # data: a generated folder (val/test from disk; train rendered from its recipe or read), or
    # nothing: every split rendered from `synth` (SynthConfig fields)
    data: str | None = None
    train_source: str = "stream"  # "stream" (new images every epoch) or "disk"
    synth: dict = field(default_factory=dict)
    # SynthConfig overrides for the rendered training stream only (val/test keep `synth`), e.g.
    # {size_band_weights: [1, 1.5, 2]} to over-sample small shapes
    train_synth: dict = field(default_factory=dict)
    # train on windows of this many px that hold the whole shape (stream only), for the first
    # train_crop_epochs epochs (None: all); val/test stay full size. Same pixel scale, cheaper steps
    train_crop: int | None = None
    train_crop_epochs: int | None = None
    train_length: int = 8192  # images per epoch (stream)
    val_length: int = 512  # stream val size (no data)
    test_length: int = 600  # stream test size (no data)
    curriculum_epochs: int = 4  # clutter goes from curriculum_start to the recipe's over this many epochs
    curriculum_start: float = 0.0
    # model and optimisation
    pretrained: bool = False
    weights_path: str | None = None
    # warm start from one of our saved models (run folder or model.safetensors) of the same arch,
    # at any image size: progressive resizing (learn at 64 px, fine-tune at 128 px)
    init_from: str | None = None
    lr: float | None = None  # None: the arch's default peak lr (DEFAULT_LR)
    weight_decay: float = 0.05
    # drop-path rate of swin_t / convnext_tiny (None: torchvision's 0.2 / 0.1); a regulariser for
    # small data, which the rendered stream is not
    stochastic_depth: float | None = None
    pct_start: float = 0.15
    label_smoothing: float = 0.05
    # exponential moving average of the weights (and BatchNorm statistics), per optimiser step, with
    # this decay (e.g. 0.998: a ~500-step horizon); validation, checkpoints and the exported model
    # use the average. None: off
    ema_decay: float | None = None
    scheduler: str = "onecycle"
    channels_last: bool = True
    batch_size: int = 64
    eval_batch_size: int | None = None
    max_epochs: int = 20
    max_time: str | None = None  # "DD:HH:MM:SS" hard wall-clock stop (the schedule does not shrink)
    patience: int = 6  # early stopping on val_acc
    stop_at_val_acc: float | None = 1.0  # stop once val accuracy reaches this
    # engineering
    precision: str = "auto"
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    # DataLoader workers; "auto": none on CPU (rendering inline beats a worker that competes with
    # torch's threads for the same cores, see resolve_num_workers), a few beside a GPU
    num_workers: int | str = "auto"
    threads: int | None = None
    seed: int = 0
    resume: str = "auto"  # "auto": out/checkpoints/last.ckpt if present; "never"; or a .ckpt path
    progress_bar: bool = True
    log_every_n_steps: int = 10
    # Lightning's: a fraction of the batches (0.25) or a number of them (10); limit_val_batches 0
    # turns validation off (the last checkpoint is then tested and exported)
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    deterministic: bool = False

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, hints[f.name], getattr(self, f.name)))
        for name, (ok, rule) in _RULES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        _check_arch(self.arch)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.arch]
        if self.train_crop is not None and self.arch == "swin_t":
            raise ValueError(f"train_crop does not apply to swin_t: its attention window is chosen for "
                             f"image_size {self.image_size} and need not tile a {self.train_crop} px crop")
        resolve_num_workers(self.num_workers, "cpu")  # validates the value
        if self.max_time is not None:
            positive_max_time(self.max_time)  # validates the value
        # options the chosen data source would silently ignore (a default left alone is fine)
        default = {f.name: f.default for f in dataclasses.fields(self)}
        if self.train_crop_epochs is not None and self.train_crop is None:
            raise ValueError(f"train_crop_epochs {self.train_crop_epochs} needs train_crop (the crop size)")
        if self.train_source == "disk" and self.curriculum_epochs not in (0, default["curriculum_epochs"]):
            raise ValueError(f"curriculum_epochs {self.curriculum_epochs} applies to the rendered stream only, "
                             f"not to train_source 'disk' (set it to 0)")
        for name in ("train_length", "curriculum_start"):  # the disk source trains on the stored split as it is
            if self.train_source == "disk" and getattr(self, name) != default[name]:
                raise ValueError(f"{name} {getattr(self, name)} applies to the rendered stream only, not to "
                                 f"train_source 'disk' (drop {name})")
        for name in ("synth", "train_synth"):
            if "split_sizes" in getattr(self, name):  # the stream renders the lengths below instead
                raise ValueError(f"{name}.split_sizes is not used: rendered splits are sized by train_length, "
                                 f"val_length and test_length (drop split_sizes from {name})")
        for name in ("val_length", "test_length"):
            if self.data and getattr(self, name) != default[name]:
                raise ValueError(f"{name} {getattr(self, name)} sizes rendered splits; with data the "
                                 f"dataset's own split is used (drop {name})")
        # the data options as `fit` checks them (unknown or bad SynthConfig fields of synth and
        # train_synth, train_crop against the shapes, ...), short of reading the dataset: so
        # --print-config refuses what fit refuses
        data_recipes(self.image_size, self.data, self.train_source, self.synth, self.train_synth, self.train_crop)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {unknown} (known: {sorted(known)})")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path) -> "TrainConfig":
        return cls.from_dict(read_yaml_mapping(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, hint, value):
    """``value`` as the type ``hint`` of field ``name`` allows, or ValueError naming both."""
    kinds = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        if dict in kinds:  # `synth:` left empty in YAML: no overrides
            return {}
    elif isinstance(value, bool):  # a bool is an int to Python: only bool fields take one
        if bool in kinds:
            return value
    elif int in kinds and isinstance(value, int):
        return value
    elif float in kinds and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # PyYAML reads 1e-3 (no dot) as the string '1e-3'
        except ValueError:
            pass
        else:
            if not math.isfinite(number):  # lr inf passed `> 0` and reached the optimiser
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return number
    elif str in kinds and isinstance(value, (str, int)):  # YAML `devices: 2`, `precision: 32`
        return str(value)
    elif dict in kinds and isinstance(value, dict):
        return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    allowed = " or ".join(names[k] for k in kinds if k in names) + (" or null" if type(None) in kinds else "")
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _within(lo, hi, lo_open=False, hi_open=False):
    return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_BATCH_LIMIT = "a fraction in [0, 1] or a whole number of batches"
# value rules, checked once the types are right (None, where allowed, always passes)
_RULES = {
    "image_size": (lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 and >= 32"),
    "train_crop_epochs": (lambda v: v >= 0, ">= 0"),
    "train_length": _AT_LEAST_1, "val_length": _AT_LEAST_1, "test_length": _AT_LEAST_1,
    "curriculum_epochs": (lambda v: v >= 0, ">= 0"),
    "curriculum_start": (_within(0, 1), "in [0, 1]"),
    "lr": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "stochastic_depth": (_within(0, 1, hi_open=True), "in [0, 1)"),
    "pct_start": (_within(0, 1, lo_open=True, hi_open=True), "in (0, 1)"),
    "label_smoothing": (_within(0, 1, hi_open=True), "in [0, 1)"),
    "ema_decay": (_within(0, 1, lo_open=True, hi_open=True), "strictly between 0 and 1 (or None)"),
    "batch_size": _AT_LEAST_1, "eval_batch_size": _AT_LEAST_1, "max_epochs": _AT_LEAST_1,
    "patience": (lambda v: v >= 0, ">= 0"),
    "stop_at_val_acc": (_within(0, 1, lo_open=True), "in (0, 1] (or None)"),
    "accelerator": (lambda v: v in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
                    "one of auto, cpu, gpu, cuda, mps, tpu"),
    # Lightning's forms: a count, -1 (all GPUs) or a comma-separated list of GPU indices
    "devices": (lambda v: v == "auto" or re.fullmatch(r"-1|\d+|\d+(,\d+)*,?", v.replace(" ", "")) is not None,
                "'auto', a count, -1 or GPU indices such as '0,1'"),
    "num_nodes": _AT_LEAST_1, "threads": _AT_LEAST_1, "log_every_n_steps": _AT_LEAST_1,
    "seed": (_within(0, 2**32 - 1), "in [0, 2**32 - 1]"),  # numpy's seed range (seed_everything's)
    "scheduler": (lambda v: v in ("onecycle", "constant"), "'onecycle' or 'constant'"),
    "train_source": (lambda v: v in ("stream", "disk"), "'stream' or 'disk'"),
    "limit_train_batches": (lambda v: v > 0 and (v <= 1 or v % 1 == 0), _BATCH_LIMIT + " (not 0)"),
    "limit_val_batches": (lambda v: v >= 0 and (v <= 1 or v % 1 == 0), _BATCH_LIMIT),
}


def read_yaml_mapping(path) -> dict:
    """The mapping a YAML config file holds (empty: {}); ValueError naming the file otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = read_config_text(p, "a YAML file")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {p} is not valid YAML: {' '.join(str(err).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {p} must hold a mapping of options, got {type(values).__name__}")
    return values


# ---------------------------------------------------------------------------------------------


def _datamodule(cfg: TrainConfig, stage: str) -> ShapesDataModule:
    return ShapesDataModule(
        image_size=cfg.image_size, data=cfg.data, train_source=cfg.train_source if stage == "fit" else "stream",
        synth=cfg.synth, train_length=cfg.train_length, val_length=cfg.val_length, test_length=cfg.test_length,
        curriculum_epochs=cfg.curriculum_epochs, curriculum_start=cfg.curriculum_start,
        batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        num_workers=resolve_num_workers(cfg.num_workers, cfg.accelerator),
        seed=cfg.seed, class_names=CLASS_NAMES, train_synth=cfg.train_synth if stage == "fit" else None,
        train_crop=cfg.train_crop if stage == "fit" else None, train_crop_epochs=cfg.train_crop_epochs)


def _trainer(cfg: TrainConfig, out: Path, callbacks=(), logger=True, **overrides):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from .checkpointing import AtomicCheckpointIO, LatestBestCheckpoint

    # enable_version_counter=False: the files keep their names (best.ckpt, last.ckpt) whatever the
    # folder holds, never best-v1.ckpt beside a stale best.ckpt that a later resume would pick up
    ckpt = LatestBestCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val_acc", mode="max",
                                save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning >= 2.5 writes save_last only when a top-k save happened in the same step, so
    # "last" is its own unmonitored checkpoint, rewritten at every epoch end (what resume reads)
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, auto_insert_metric_name=False, enable_version_counter=False)
    # Lightning stops only when the metric EXCEEDS the threshold; "reaches" is what we mean
    threshold = None if cfg.stop_at_val_acc is None else cfg.stop_at_val_acc - 1e-6  # > float32 eps
    # validation off (limit_val_batches 0): val_acc is never logged, so early stopping must not
    # demand it (strict); the last checkpoint is then the one tested and exported
    stop = EarlyStopping(monitor="val_acc", mode="max", patience=cfg.patience, stopping_threshold=threshold,
                         strict=cfg.limit_val_batches != 0)
    # rerunning the same command finishes the interrupted run as it was; an explicit --resume CKPT
    # continues a checkpoint (a finished run's too), so training goes on there
    keep_stop = [_ResumedEarlyStop(stop)] if cfg.resume == "auto" else []
    if cfg.ema_decay is not None:
        from pytorch_lightning.callbacks import EMAWeightAveraging

        # Lightning swaps the average in for validation and writes it as the checkpoints' state_dict
        # (the raw weights travel as current_model_state, which resume restores)
        callbacks = (EMAWeightAveraging(decay=cfg.ema_decay), *callbacks)
    kwargs = dict(
        default_root_dir=str(out), max_epochs=cfg.max_epochs, max_time=cfg.max_time,
        precision=resolve_precision(cfg.precision, cfg.accelerator), accelerator=cfg.accelerator,
        devices=cfg.devices if cfg.devices == "auto" else _devices(cfg.devices), num_nodes=cfg.num_nodes,
        strategy=cfg.strategy, callbacks=[ckpt, last, stop, *keep_stop, *callbacks],
        plugins=[AtomicCheckpointIO()],
        # one version folder per session: a resumed run keeps the interrupted session's log
        logger=CSVLogger(str(out), name="logs") if logger else False,
        enable_progress_bar=cfg.progress_bar, log_every_n_steps=cfg.log_every_n_steps,
        deterministic=cfg.deterministic, enable_model_summary=False)
    if cfg.limit_train_batches is not None:
        kwargs["limit_train_batches"] = cfg.limit_train_batches
    if cfg.limit_val_batches is not None:
        kwargs["limit_val_batches"] = cfg.limit_val_batches
    kwargs.update(overrides)
    return pl.Trainer(**kwargs), ckpt


def _devices(devices):
    s = str(devices)
    return int(s) if s.isdigit() else s


def _resume_path(cfg: TrainConfig, out: Path) -> str | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        last = out / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    p = Path(cfg.resume)
    if not p.is_file():
        raise FileNotFoundError(f"resume checkpoint {p} does not exist")
    return str(p)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}){gpu}"


def _check_resume_compatible(cfg: TrainConfig, out: Path) -> None:
    """The checkpoint to resume must hold this arch at this image size. Its own hyper-parameters
    decide (config.yaml is rewritten by every session, whatever checkpoint it left behind)."""
    path = _resume_path(cfg, out)
    if path is None:
        return
    try:  # mmap: only the few bytes read are loaded, not the weights and optimiser state
        hp = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {}
    except Exception as err:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"resume checkpoint {path} cannot be read ({' '.join(str(err).split())}); if it is "
                         "damaged, --resume never starts over and --resume FILE.ckpt continues another "
                         "checkpoint") from None
    if "arch" not in hp or "image_size" not in hp:
        raise ValueError(f"resume checkpoint {path} holds no arch / image_size: not a shapesynth-train checkpoint")
    if (hp["arch"], int(hp["image_size"])) != (cfg.arch, cfg.image_size):
        raise ValueError(f"{path} holds a {hp['arch']} run at {hp['image_size']} px; cannot resume it as "
                         f"{cfg.arch} at {cfg.image_size} px (use another --out or --resume never)")


# config fields that do not change what a finished run trained
_ENGINEERING = {"out", "resume", "progress_bar", "threads", "num_workers", "log_every_n_steps", "accelerator",
                "devices", "num_nodes", "strategy", "max_time"}
_CAPPED = "the max_time cap"  # stop_reason's words for a run cut by max_time


def _finished_run(cfg: TrainConfig, out: Path) -> dict | None:
    """The recorded metadata when ``out`` holds a finished run that ``resume: auto`` would otherwise
    train on (Lightning does not persist an early stop, and would re-test and re-export a
    completed run): its ``model.json``, written last, marks the end. A run cut by the max_time cap
    is not finished: it resumes (with a larger --max-time)."""
    meta_path = out / META
    if cfg.resume != "auto" or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if str(meta.get("stopped_by", "")).startswith(_CAPPED):
        return None
    recorded = meta.get("config") or {}
    current = json.loads(json.dumps(cfg.to_dict(), default=str))  # as model.json stores it
    differ = sorted(k for k in recorded if k not in _ENGINEERING and k in current and recorded[k] != current[k])
    if differ:
        raise ValueError(f"{out} holds a finished run whose config differs in {', '.join(differ)}: use another "
                         f"--out, --resume never to train it again from scratch, or --resume "
                         f"{out / 'checkpoints' / 'last.ckpt'} to continue its checkpoint")
    return meta


class _ResumedEarlyStop(Callback):
    """Ends a resumed run at once when its checkpoint was written after early stopping fired.

    Lightning saves the early stop with the checkpoint (`EarlyStopping`'s state) but does not act
    on it when it resumes: a run killed after stopping early, while testing or exporting, would
    train on until the criterion fired again, and end elsewhere than the uninterrupted run.
    """

    def __init__(self, stop):
        self.stop = stop

    def on_train_start(self, trainer, pl_module) -> None:  # after the checkpoint's states are restored
        from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

        if self.stop.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            trainer.should_stop = True


class _CtrlC(Callback):
    """Notes a Ctrl+C: Lightning reports it to the callbacks (``on_exception``), then ends the fit
    with ``SystemExit(1)`` (pytorch_lightning/trainer/call.py), which says nothing about why."""

    seen = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.seen = isinstance(exception, KeyboardInterrupt)


@dataclasses.dataclass
class FitPlan:
    """What `fit` checked and built before training: nothing is written yet."""

    cfg: TrainConfig
    datamodule: ShapesDataModule
    module: ShapeClassifierModule
    resumed_from: str | None
    trainer: object  # pl.Trainer
    best_checkpoint: object  # its ModelCheckpoint on val_acc
    clock: TrainClock
    # the recorded metadata of a finished run in cfg.out (resume auto): nothing is built or trained
    finished: dict | None = None
    # the caller's process-wide torch settings that building the trainer changed, put back by run_plan
    torch_flags: tuple | None = None


def _torch_flags() -> tuple:
    """The process-wide settings Lightning's Trainer sets from ``deterministic`` (deterministic
    algorithms and their warn-only mode, cuDNN benchmark, ``CUBLAS_WORKSPACE_CONFIG``), as they are."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _restore_torch_flags(flags: tuple) -> None:
    deterministic, warn_only, benchmark, cublas = flags
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def plan_fit(cfg: TrainConfig, callbacks=(), trainer_overrides: dict | None = None) -> FitPlan:
    """Every check `fit` runs before training (arch, dataset, image size, classes, resume
    compatibility, warm start, trainer options), the seeded model and the trainer. Bad input raises
    ValueError (DataError) or FileNotFoundError here, never once training has started. A finished
    run in ``cfg.out`` (``resume: auto``) gives a plan with ``finished`` set and nothing built."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    out = Path(cfg.out)
    _check_resume_compatible(cfg, out)
    dm = _datamodule(cfg, "fit")  # validates the dataset before anything heavy
    finished = _finished_run(cfg, out)
    if finished is not None:
        return FitPlan(cfg, dm, None, None, None, None, None, finished=finished)
    dm.check_train_backgrounds()  # what it trains on: a finished run, reported above, needs none
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    resumed_from = _resume_path(cfg, out)
    # a resumed run takes every weight from its checkpoint: the ImageNet file it started from is not
    # read again (it may be gone by now); its hyper-parameters still record that it was used
    load_imagenet = resumed_from is None
    module = ShapeClassifierModule(
        arch=cfg.arch, image_size=cfg.image_size, class_names=CLASS_NAMES,
        pretrained=cfg.pretrained and load_imagenet, weights_path=cfg.weights_path if load_imagenet else None,
        lr=cfg.lr, weight_decay=cfg.weight_decay, pct_start=cfg.pct_start,
        label_smoothing=cfg.label_smoothing, channels_last=cfg.channels_last, scheduler=cfg.scheduler,
        stochastic_depth=cfg.stochastic_depth, train_crop=cfg.train_crop)
    module.hparams.update(pretrained=cfg.pretrained, weights_path=cfg.weights_path)
    # what it trains on travels in every checkpoint, so a .ckpt evaluated on other data is noticed as
    # a model.json is; computed once here (a pass over the data each), model.json records the same.
    # Plain JSON values, as model.json holds them: weights_only loading refuses any other object
    module.hparams.update(data=json.loads(json.dumps(dm.describe(), default=str)),
                          dataset_fingerprint=dm.fingerprint(), dataset_samples_fingerprint=dm.samples_fingerprint())
    if cfg.init_from and resumed_from is None:
        warm_start(module.model, cfg.init_from, cfg.arch)
    clock = TrainClock()  # its seconds travel in the checkpoints: a resumed run adds earlier sessions'
    callbacks = (clock, _CtrlC(), *callbacks)
    if cfg.max_time is not None:
        full_from = cfg.train_crop_epochs if cfg.train_crop is not None else None
        callbacks = (*callbacks, CapForecast(clock, cfg.max_epochs, max_time_seconds(cfg.max_time), full_from))
    # Lightning's Trainer sets process-wide torch flags from ``deterministic`` (False included:
    # it turns a caller's deterministic algorithms off); run_plan puts the caller's back
    flags = _torch_flags()
    try:
        trainer, ckpt = _trainer(cfg, out, callbacks, **(trainer_overrides or {}))
    except (TypeError, ImportError, MisconfigurationException) as err:
        _restore_torch_flags(flags)
        # Lightning's own checks of accelerator, devices, strategy and precision, as bad input
        raise ValueError(f"trainer options (accelerator {cfg.accelerator!r}, devices {cfg.devices!r}, "
                         f"strategy {cfg.strategy!r}, precision {cfg.precision!r}): {err}") from err
    except BaseException:
        _restore_torch_flags(flags)
        raise
    return FitPlan(cfg, dm, module, resumed_from, trainer, ckpt, clock, torch_flags=flags)


def fit(cfg: TrainConfig, callbacks=(), trainer_overrides: dict | None = None) -> dict:
    """Train, test the best checkpoint, export ``model.safetensors`` + ``model.json`` + card.

    Every check runs before training (`plan_fit`). Returns the metadata written to ``model.json``;
    for a finished run in ``cfg.out`` (``resume: auto``), the recorded one, without training.
    """
    return run_plan(plan_fit(cfg, callbacks, trainer_overrides))


def run_plan(plan: FitPlan) -> dict:
    """The training, test and export half of `fit`, for a plan from `plan_fit`. A finished run
    (``plan.finished``) is reported and its recorded metadata returned, without training."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    cfg = plan.cfg
    if plan.finished is not None:
        rank_zero_info(f"{cfg.out} holds a finished run (stopped by {plan.finished.get('stopped_by', 'its end')}); "
                       f"nothing to train (--resume never trains it again from scratch)")
        return plan.finished
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_test_export(plan)
    finally:  # the caller's thread count and torch flags, not this run's
        torch.set_num_threads(threads)
        if plan.torch_flags is not None:
            _restore_torch_flags(plan.torch_flags)


# what a run folder holds besides its config and logs; model.json is written last and marks the end
_EXPORTS = (WEIGHTS, META, "test_metrics.json", "MODEL_CARD.md")


def _prepare_folder(cfg: TrainConfig, out: Path) -> None:
    """Before training (global rank 0): the config, and no previous export, which would otherwise
    mark this unfinished run as finished; ``resume: never`` also clears the old checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    stale = [out / name for name in _EXPORTS]
    if cfg.resume == "never":  # start over: no old last.ckpt for a later `resume: auto` to pick up
        stale += [*(out / "checkpoints").glob("*.ckpt"), out / "train_time.json"]
    for path in stale:
        path.unlink(missing_ok=True)
    remove_temp_checkpoints(out / "checkpoints")  # a run killed while writing a checkpoint left one
    write_json(out / "config.json", cfg.to_dict())
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _restore_sigint(handler) -> None:
    # Lightning ignores SIGINT from its Ctrl+C handler on; the caller's process gets its own back
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)


def _train_test_export(plan: FitPlan) -> dict:
    cfg, dm, module, resumed_from = plan.cfg, plan.datamodule, plan.module, plan.resumed_from
    trainer, ckpt, clock = plan.trainer, plan.best_checkpoint, plan.clock
    out = Path(cfg.out)
    # one writer under DDP (every process runs this); Lightning knows the ranks once the Trainer exists
    if trainer.is_global_zero:
        _prepare_folder(cfg, out)

    ctrl_c = next((c for c in trainer.callbacks if isinstance(c, _CtrlC)), None)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resumed_from)
    except SystemExit:
        if ctrl_c is None or not ctrl_c.seen:
            raise
        _restore_sigint(sigint)
        last = out / "checkpoints" / "last.ckpt"
        hint = (f"rerun the same command to resume from {last}" if last.is_file()
                else "no epoch had finished, so rerunning starts over")
        raise KeyboardInterrupt(f"training interrupted; {hint}") from None
    seconds = clock.seconds
    if trainer.is_global_zero:
        write_json(out / "train_time.json", {"seconds": seconds})

    # no val_acc was ever logged (limit_val_batches 0): the last checkpoint, recorded as such
    best = ckpt.best_model_path or str(out / "checkpoints" / "last.ckpt")
    # the checkpoint holds every weight: the ImageNet file the run started from (pretrained,
    # weights_path) is not read again, and need not exist any more
    best_module = ShapeClassifierModule.load_from_checkpoint(best, map_location="cpu", weights_only=True,
                                                             pretrained=False, weights_path=None)
    # same trainer: under DDP every rank tests a shard and the confusion matrices are summed
    # (the distributed sampler may repeat up to world_size - 1 images to even the shards)
    trainer.test(best_module, datamodule=dm, verbose=False)
    if not trainer.is_global_zero:
        return {}
    results = _test_results(best_module, trainer, ckpt)
    # every key save_model writes to model.json: fit returns what load_model and a rerun return
    meta = {"arch": cfg.arch, "image_size": cfg.image_size, "num_classes": len(CLASS_NAMES),
            "class_names": list(CLASS_NAMES),
            "mean": list(dm.mean), "std": list(dm.std), "dataset_fingerprint": module.hparams.dataset_fingerprint,
            "dataset_samples_fingerprint": module.hparams.dataset_samples_fingerprint,
            "test_accuracy": results["test_accuracy"], "test_images": results["test_images"],
            "per_class_accuracy": results["per_class_accuracy"],
            "confusion_matrix": results["confusion_matrix"], "best_val_accuracy": results["best_val_accuracy"],
            "epochs": trainer.current_epoch, "max_epochs": cfg.max_epochs, "stopped_by": stop_reason(trainer, cfg),
            "global_step": trainer.global_step, "train_seconds": round(seconds, 1),
            # False: resumed from a checkpoint written before the clock existed (last session only)
            "train_seconds_complete": resumed_from is None or clock.restored,
            "precision": str(trainer.precision), "hardware": hardware(), "data": dm.describe(),
            # weights_path alone loads the ImageNet weights too (build_model), so it counts as pretrained
            "pretrained": bool(cfg.pretrained or cfg.weights_path), "init_from": cfg.init_from, "config": cfg.to_dict(),
            "checkpoint": str(best), "torch": torch.__version__}
    write_json(out / "test_metrics.json", results)
    write_text(out / "MODEL_CARD.md", model_card(meta))
    # last: model.json (written atomically after the weights) marks the run as finished
    save_model(best_module.model.to(memory_format=torch.contiguous_format), out, meta)
    return meta


def warm_start(model: torch.nn.Module, source, arch: str) -> None:
    """Copy the weights of a saved model (``trainers.load_model`` path) of the same arch and classes
    into ``model``, whatever image size it was trained at."""
    donor, meta = load_model(source)
    if meta["arch"] != arch:
        raise ValueError(f"init_from {source}: a {meta['arch']} model cannot initialise {arch}")
    if tuple(meta["class_names"]) != tuple(CLASS_NAMES):
        raise ValueError(f"init_from {source}: its classes {meta['class_names']} differ from {list(CLASS_NAMES)}")
    try:
        model.load_state_dict(donor.state_dict(), strict=True)
    except RuntimeError as err:  # e.g. Swin-T's window (and position tables) depend on the image size
        raise ValueError(f"init_from {source}: its {meta['image_size']} px {arch} weights do not fit this "
                         f"model: {err}") from err


def _test_results(module, trainer, ckpt) -> dict:
    cm = module.test_confusion
    acc = float(cm.diagonal().sum() / cm.sum().clamp_min(1))
    per = per_class_accuracy(cm).tolist()
    best = ckpt.best_model_score
    return {"test_accuracy": acc, "test_images": int(cm.sum()),
            "per_class_accuracy": dict(zip(module.class_names, per)),
            "confusion_matrix": cm.tolist(), "best_val_accuracy": None if best is None else float(best)}


def evaluate(model_path, data: str | None = None, split: str = "test", batch_size: int = 128,
         synth: dict | None = None, length: int = 600, num_workers: int = 0, out: str | None = None) -> dict:
    """Evaluate a saved model on ``data``, or without data on a rendered split of ``synth`` (default:
    the recipe the model was trained with, from its metadata; shapesynth's default recipe at the
    model's image size when none is recorded, e.g. a model trained from disk); checks size and
    classes first. The caller's random state is left as it was."""
    # the module's initialisation (overwritten by the weights) and the loaders' base seeds draw
    # from the global RNG; evaluation is not a random event for the caller
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model_path, data, split, batch_size, synth, length, num_workers, out)


def _evaluate(model_path, data, split, batch_size, synth, length, num_workers, out) -> dict:
    import pytorch_lightning as pl

    model, meta = load_model(model_path)
    if data is None and synth is None and (meta.get("data") or {}).get("synth"):
        synth = meta["data"]["synth"]  # no data given: the model's own training recipe, rendered
    dm = ShapesDataModule(image_size=int(meta["image_size"]), data=data, synth=synth, train_source="stream",
                          test_length=length, val_length=length, batch_size=batch_size,
                          num_workers=num_workers, class_names=tuple(meta["class_names"]), saved_model=True)
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if data is None:  # rendered: its background files checked (and skipped ones reported) as fit does
        dm.check_rendered_backgrounds("the results list them (skipped_backgrounds)")
    module = ShapeClassifierModule(arch=meta["arch"], image_size=int(meta["image_size"]),
                                   class_names=meta["class_names"], channels_last=False)
    module.model.load_state_dict(model.state_dict())
    if split == "val":
        dm.setup("validate")
        dm.test_set = dm.val_set
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         precision="32-true", accelerator="cpu", devices=1)
    trainer.test(module, datamodule=dm, verbose=False)
    cm = module.test_confusion
    res = {"model": str(model_path), "data": data, "split": split,
           "dataset_fingerprint": dm.fingerprint(), "test_accuracy": float(cm.diagonal().sum() / cm.sum()),
           "test_images": int(cm.sum()), "per_class_accuracy": dict(zip(meta["class_names"], per_class_accuracy(cm).tolist())),
           "confusion_matrix": cm.tolist()}
    if dm.skipped_backgrounds:
        res["skipped_backgrounds"] = [list(s) for s in dm.skipped_backgrounds]
    if out:
        write_json(Path(out), res)
    return res


def _origin(meta: dict) -> str:
    if meta.get("init_from"):
        return f"warm-started from `{meta['init_from']}`, then trained here"
    return "ImageNet-pretrained, fine-tuned" if meta.get("pretrained") else "trained from scratch"


def stop_reason(trainer, cfg: TrainConfig) -> str:
    """Why training ended: the schedule's end, early stopping (with Lightning's reason) or the time cap."""
    from pytorch_lightning.callbacks import EarlyStopping, Timer
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

    stop = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if stop is not None and stop.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
        return f"early stopping ({stop.stopping_reason_message or stop.stopping_reason.name.lower()})"
    if trainer.current_epoch >= cfg.max_epochs:
        return "the schedule's end"
    remaining = next((c.time_remaining() for c in trainer.callbacks if isinstance(c, Timer)), None)
    if remaining is not None and remaining <= 0.0:
        return f"{_CAPPED} ({cfg.max_time}), before the schedule's end"
    return "before the schedule's end (a step or batch limit)"


def _epochs_text(meta: dict) -> str:
    if "max_epochs" not in meta:  # written before the schedule and stop reason were recorded
        return f"{meta['epochs']} / {meta['global_step']}"
    return f"{meta['epochs']} of {meta['max_epochs']} / {meta['global_step']} (stopped by {meta['stopped_by']})"


def _train_time_text(meta: dict) -> str:
    text = f"{meta['train_seconds'] / 60:.1f} min"
    if meta.get("train_seconds_complete", True):
        return text
    return text + " (last session only: resumed from a checkpoint that predates the training clock)"


def _train_synth_text(data: dict) -> str:
    text = ""
    if data.get("train_synth"):
        text += ("\nTraining images were rendered with these overrides (val and test use the recipe above): "
                 f"`{json.dumps(data['train_synth'], sort_keys=True)}`.\n")
    if data.get("train_crop"):
        epochs = data.get("train_crop_epochs")
        when = "every epoch" if epochs is None else f"the first {epochs} epochs, full images after"
        text += (f"\nTraining used {data['train_crop']} px crops holding the whole shape for {when}; "
                 "val and test images are full size.\n")
    return text


def _precision_text(precision: str) -> str:
    # the test step turns mixed precision's autocast off; "-true" precisions hold half weights
    if "mixed" in precision:
        return f"{precision} in training; the test in fp32"
    return precision if precision.startswith(("32", "64")) else f"{precision} (training and test)"


def _tested_text(meta: dict) -> str:
    if meta["best_val_accuracy"] is None:  # validation off: no best checkpoint to choose
        return "last checkpoint: no validation ran"
    return f"best checkpoint by val accuracy, {meta['best_val_accuracy']}"


def _recipe_block(data: dict) -> str:
    """The card's data recipe: the rendered recipe as JSON, or where a dataset's recipe is kept."""
    if data["synth"]:
        return f"```json\n{json.dumps(data['synth'], indent=1, sort_keys=True)}\n```"
    return "The recipe is the dataset's own: `shapesynth.json` in the dataset folder."


def _samples_fingerprint_text(meta: dict) -> str:
    fp = meta.get("dataset_samples_fingerprint")
    if fp is not None:
        return f"`{fp}` (the dataset's samples, the same in any storage format)"
    if not (meta.get("data") or {}).get("data"):
        return "none: no dataset on disk (the fingerprint above is the rendered recipe's)"
    return "not recorded"


def model_card(meta: dict) -> str:
    names = meta["class_names"]
    rows = "\n".join(f"| {n} | {meta['per_class_accuracy'][n]:.4f} |" for n in names)
    cm_head = "| true \\ predicted | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    cm_rows = "\n".join(f"| {n} | " + " | ".join(str(v) for v in row) + " |"
                        for n, row in zip(names, meta["confusion_matrix"]))
    data = meta["data"]
    if data["data"]:
        source = (f"`{data['data']}` (val/test from disk; train "
                  f"{'rendered on the fly from its recipe' if data['train_source'] == 'stream' else 'from disk'})")
    else:
        source = "all splits rendered on the fly from the recipe below (no disk; val/test from their own background pools"
        if data.get("test_length") is not None:  # the recipe's split_sizes are not what was rendered
            source += (f"; {data['train_length']} training images per epoch, {data['val_length']} val and "
                       f"{data['test_length']} test images, whatever the recipe's split_sizes say")
        source += ")"
    tested_on = f" on {meta['test_images']} images" if meta.get("test_images") is not None else ""
    return f"""# Model card: {meta['arch']} on shapesynth ({meta['image_size']} px)

| | |
|---|---|
| architecture | `{meta['arch']}` (torchvision; {_origin(meta)}) |
| input | {meta['image_size']} x {meta['image_size']} RGB in [0, 1]; normalisation inside the model (mean {meta['mean']}, std {meta['std']}) |
| classes | {', '.join(names)} |
| data | {source} |
| dataset fingerprint | `{meta['dataset_fingerprint']}` |
| samples fingerprint | {_samples_fingerprint_text(meta)} |
| **test accuracy** | **{meta['test_accuracy']:.4f}**{tested_on} ({_tested_text(meta)}) |
| epochs / steps | {_epochs_text(meta)} |
| training time | {_train_time_text(meta)} |
| precision | {_precision_text(meta['precision'])} |
| hardware | {meta['hardware']} |
| torch | {meta['torch']} |

## Per-class test accuracy

| class | accuracy |
|---|---|
{rows}

## Confusion matrix (test)

{cm_head}
{cm_rows}

## Data recipe

{_recipe_block(data)}
{_train_synth_text(data)}
Load: `model, meta = trainers.load_model("<this folder>")` (safetensors, no code execution).
The full training configuration is in `config.yaml`; the learning curves in `logs/version_*/metrics.csv`.
"""
