"""``shapesynth-train`` (= ``python -m trainers``): ``fit`` (alias ``train``), ``test``, ``archs``,
``recipes``.

``fit`` takes a YAML recipe (``--config``, or a bundled one by name: ``--recipe quick_resnet18``)
and ``--flags`` named after every `TrainConfig` field; flags win over the YAML. Examples::

    shapesynth-train fit --recipe quick_resnet18 --out outputs/models/resnet18
    shapesynth-train train --arch vgg11_bn --data outputs/data64 --out outputs/models/vgg11_bn --image-size 64
    shapesynth-train test --model outputs/models/resnet18 --data outputs/data64   # data at the model's size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import sys
import typing
from pathlib import Path

import yaml

from shapesynth.cli import nonempty

RECIPES = Path(__file__).parent / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _bool(text: str) -> bool:
    t = str(text).lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _none_or(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _int_or_word(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def _number(text: str):
    """An int where the text is one (Lightning's batch count), else a float (its fraction)."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _yaml_mapping(text: str) -> dict:
    """``--synth '{clutter: 0.4}'``: a YAML/JSON mapping, or an argparse error (exit 2) saying why."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML ({' '.join(str(err).split())}): {text!r}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{clutter: 0.4}}', got {text!r}")
    return value


# what a TrainConfig flag means (docs/trainers.md has the long form); fields not named here show their
# default only
_FLAG_HELP = {
    "arch": "architecture (see `shapesynth-train archs`)",
    "image_size": "image side in px, a multiple of 32",
    "out": "run folder",
    "data": "a generated dataset folder: val/test are its splits",
    "train_source": "'stream' (train images rendered per epoch) or 'disk' (the dataset's train split)",
    "synth": "SynthConfig overrides as YAML/JSON for the rendered splits, e.g. '{clutter: 0.4}'",
    "train_synth": "SynthConfig overrides as YAML/JSON for the training stream only, e.g. '{clutter: 0.4}'",
    "train_crop": "train on windows of this many px that hold the whole shape (stream only)",
    "train_crop_epochs": "epochs trained on train_crop windows",
    "train_length": "training images rendered per epoch (stream)",
    "val_length": "rendered val images (without --data)",
    "test_length": "rendered test images (without --data)",
    "curriculum_epochs": "stream only: epochs over which clutter rises from curriculum_start to the recipe's",
    "curriculum_start": "clutter difficulty the curriculum starts at, in [0, 1]",
    "pretrained": "start from torchvision's ImageNet weights (offline: the torch hub cache or --weights-path); "
                  "--pretrained alone means true",
    "weights_path": "ImageNet weights file to load (implies --pretrained)",
    "init_from": "warm start from a saved model (run folder or model.safetensors) of the same arch",
    "lr": "peak learning rate",
    "weight_decay": "AdamW weight decay",
    "stochastic_depth": "drop-path rate of swin_t / convnext_tiny",
    "pct_start": "fraction of the one-cycle schedule spent warming up",
    "label_smoothing": "cross-entropy label smoothing",
    "ema_decay": "decay of an exponential moving average of the weights, e.g. 0.998",
    "scheduler": "'onecycle' or 'constant'",
    "channels_last": "train with the model and batches in torch's channels_last memory format",
    "batch_size": "training images per step",
    "eval_batch_size": "images per validation/test batch",
    "max_epochs": "epochs of the schedule",
    "max_time": "wall-clock cap DD:HH:MM:SS, more than zero",
    # Lightning's EarlyStopping counts epochs whose val_acc is not above the best so far and stops
    # when the count reaches patience: 0 and 1 both stop at the first such epoch
    "patience": "early stopping: epochs in a row without a better val_acc before training stops "
                "(0 stops at the first one, as 1 does)",
    "stop_at_val_acc": "stop once val accuracy reaches this (none: never)",
    "precision": "'auto' or a Lightning precision such as 32-true, bf16-mixed",
    "accelerator": "auto, cpu, gpu, cuda, mps or tpu",
    "devices": "'auto', a count, -1 or GPU indices such as '0,1'",
    "num_nodes": "machines (Lightning)",
    "strategy": "Lightning strategy, e.g. ddp",
    "num_workers": "DataLoader workers: an integer or 'auto' (none on the CPU, a few beside a GPU)",
    "threads": "torch intra-op threads for the run",
    "seed": "random seed",
    "resume": "'auto' (OUT/checkpoints/last.ckpt if present), 'never', or a .ckpt path",
    "progress_bar": "show Lightning's progress bar; --progress-bar false hides it",
    "log_every_n_steps": "CSV log interval in optimiser steps",
    "limit_train_batches": "train on a number of batches (10) or a fraction of them (0.25) per epoch",
    "limit_val_batches": "validate on a number of batches (10) or a fraction of them (0.25); 0 turns validation off",
    "deterministic": "Lightning's deterministic=True: deterministic torch algorithms only (may be slower); "
                     "--deterministic alone means true",
}
# what None (a field's default) means, said instead of "None"
_NONE_MEANS = {
    "data": "none: every split rendered from --synth",
    "train_crop": "none: full images",
    "train_crop_epochs": "none: all epochs",
    "weights_path": "none: the torch hub cache, with --pretrained",
    "init_from": "none",
    "stochastic_depth": "none: torchvision's 0.2 for swin_t, 0.1 for convnext_tiny",
    "ema_decay": "none: off",
    "eval_batch_size": "none: --batch-size",
    "max_time": "none: no cap",
    "threads": "none: torch's current count",
    "limit_train_batches": "none: all",
    "limit_val_batches": "none: all",
}


def _default_text(f: dataclasses.Field) -> str:
    from trainers.api import DEFAULT_LR

    if f.name == "lr":
        return "per arch: " + ", ".join(f"{a} {v:g}" for a, v in DEFAULT_LR.items())
    if f.default is dataclasses.MISSING:
        return str(f.default_factory())
    if f.default is None:
        return _NONE_MEANS.get(f.name, "none")
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from trainers.api import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        # argparse's %-formatting: a literal % in help text must be doubled
        text = f"{_FLAG_HELP.get(f.name, '')} (default {_default_text(f)})".strip().replace("%", "%%")
        if f.name in ("synth", "train_synth"):
            p.add_argument(flag, dest=f.name, type=_yaml_mapping, default=argparse.SUPPRESS, help=text)
        elif hints[f.name] is bool:
            # --pretrained alone means true; --pretrained false also works
            p.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                           metavar="BOOL", help=text)
        elif "int" in hint and "str" in hint:  # num_workers: a count or "auto"
            p.add_argument(flag, dest=f.name, type=_int_or_word, default=argparse.SUPPRESS, help=text)
        elif "int" in hint and "float" in hint:  # limit_*_batches: a count or a fraction
            p.add_argument(flag, dest=f.name, type=_none_or(_number), default=argparse.SUPPRESS, help=text)
        else:
            kind = int if "int" in hint else float if "float" in hint else nonempty
            kind = _none_or(kind) if "None" in hint else kind
            p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapesynth-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fit", "train"):
        p = sub.add_parser(name, help="train, test the best checkpoint, export model + card",
                           description="Train, test the best checkpoint, export model + card. The defaults shown "
                                       "are TrainConfig's: --config and --recipe set their own values, and flags "
                                       "win over both (--print-config shows the result).")
        p.add_argument("--config", type=nonempty, help="YAML recipe (TrainConfig fields)")
        p.add_argument("--recipe", type=nonempty, help=f"bundled recipe name: {', '.join(available_recipes())}")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _add_config_flags(p)
    t = sub.add_parser("test", help="evaluate a saved model (run folder or model file)")
    t.add_argument("--model", type=nonempty, required=True, help="a run folder, a .safetensors file or a .ckpt")
    t.add_argument("--data", type=nonempty, help="a generated dataset folder at the model's image size (default: a split "
                                  "rendered from the recipe the model was trained with, from its metadata; the "
                                  "default recipe if it has none)")
    t.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate (default test)")
    t.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    t.add_argument("--length", type=int, default=600, help="rendered split size when no --data (default 600)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    t.add_argument("--out", type=nonempty, help="write the results JSON here")
    sub.add_parser("archs", help="list the architectures")
    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


# settings of the rendered val/test splits (and their recipe): with a dataset, its own splits are used
RENDERED_SPLIT_FIELDS = ("synth", "val_length", "test_length")


def resolve_config(args: argparse.Namespace):
    """The TrainConfig of a recipe, a config file and the flags (flags win).

    ``--data`` on the command line drops the rendered-split settings (`RENDERED_SPLIT_FIELDS`) that the
    recipe or config file set, with a note on stderr: ``--recipe quick_resnet18 --data DIR`` trains
    with the recipe on the dataset. The same settings given as flags beside ``--data`` stay an error.
    """
    from trainers.api import TrainConfig, read_yaml_mapping
    from trainers.clock import positive_max_time

    values: dict = {}
    origin: dict = {}  # field -> the file that set it
    if args.recipe:
        path = RECIPES / f"{args.recipe}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {args.recipe!r}; bundled: {', '.join(available_recipes())}")
        values.update(read_yaml_mapping(path))
        origin.update(dict.fromkeys(values, f"recipe {args.recipe}"))
    if args.config:
        more = read_yaml_mapping(args.config)
        values.update(more)
        origin.update(dict.fromkeys(more, f"config {args.config}"))
    skip = {"command", "config", "recipe", "print_config"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    if flags.get("data") is not None:
        defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                    for f in dataclasses.fields(TrainConfig)}
        dropped = {}
        for name in RENDERED_SPLIT_FIELDS:
            if name in values and name not in flags:
                value = values.pop(name)
                if value not in (None, defaults[name]):
                    dropped.setdefault(origin[name], []).append(name)
        if dropped:
            print("shapesynth-train: note: with --data the dataset's own splits and recipe are used; dropped "
                  + "; ".join(f"{', '.join(names)} of {where}" for where, names in dropped.items()), file=sys.stderr)
    values.update(flags)
    if values.get("max_time") is not None:  # checked here to name where the value came from
        positive_max_time(values["max_time"], "--max-time" if "max_time" in flags
                          else f"max_time (from {origin.get('max_time')})")
    return TrainConfig.from_dict(values)


def _check_run_folder(out) -> None:
    """The run folder must be a folder, or not exist yet below one: a file there got past every
    check, and the trainer was built for it."""
    path = Path(out)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(f"out {out}: {existing} is a file, not a folder")
            return


def _usage_error(err: Exception) -> int:
    """Bad input: one line naming the problem on stderr, exit code 2 (no traceback)."""
    print(f"shapesynth-train: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (``| head``); poll reports POLLERR then."""
    if not hasattr(select, "poll"):
        return True
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, closed)
        return False


def main(argv=None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except KeyboardInterrupt:  # Ctrl+C outside training (`test`, building the data): one line, 128 + SIGINT
        print("shapesynth-train: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # some other pipe: a fault
        # the reader stopped reading (`--print-config | head -3`): end quietly, as a tool killed by
        # SIGPIPE would; stdout to devnull so that Python's flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "archs":
        from trainers.models import available_archs

        print("\n".join(available_archs()))
        return 0
    if args.command == "recipes":
        print("\n".join(available_recipes()))
        return 0
    if args.command == "test":
        from trainers.api import evaluate

        from trainers.data import DataError

        try:
            res = evaluate(args.model, data=args.data, split=args.split, batch_size=args.batch_size,
                           length=args.length, num_workers=args.num_workers, out=args.out)
        except (DataError, ValueError, FileNotFoundError) as err:
            return _usage_error(err)
        print(json.dumps({k: v for k, v in res.items() if k != "confusion_matrix"}, indent=2))
        return 0
    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError) as err:
        return _usage_error(err)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from trainers.api import plan_fit, run_plan

    # bad input is found before training starts (DataError is a ValueError); an error raised once
    # training runs is a fault, not a usage error, and keeps its traceback
    try:
        _check_run_folder(cfg.out)
        plan = plan_fit(cfg)
    except (ValueError, FileNotFoundError) as err:
        return _usage_error(err)
    try:
        meta = run_plan(plan)
    except KeyboardInterrupt as err:  # Ctrl+C: how to resume, no traceback; 128 + SIGINT
        print(f"shapesynth-train: {err or 'training interrupted'}", file=sys.stderr)
        return 130
    if meta:
        earlier = "; finished earlier, not retrained" if plan.finished is not None else ""
        print(f"test accuracy {meta['test_accuracy']:.4f} ({cfg.arch}, {cfg.image_size} px{earlier}); "
              f"model: {cfg.out}/model.safetensors, card: {cfg.out}/MODEL_CARD.md")
    return 0
