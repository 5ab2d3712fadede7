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
import sys
import typing
from pathlib import Path

import yaml

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


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from trainers.api import DEFAULT_LR, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        if f.name in ("synth", "train_synth"):
            p.add_argument(flag, dest=f.name, type=_yaml_mapping, default=argparse.SUPPRESS,
                           help="SynthConfig overrides as YAML/JSON, e.g. '{clutter: 0.4}'"
                           + (" (training stream only)" if f.name == "train_synth" else ""))
        elif hints[f.name] is bool:
            # --pretrained alone means true; --pretrained false also works
            p.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=argparse.SUPPRESS)
        elif "int" in hint and "str" in hint:  # num_workers: a count or "auto"
            p.add_argument(flag, dest=f.name, type=_int_or_word, default=argparse.SUPPRESS,
                           help=f"an integer or 'auto' (default {f.default})")
        elif "int" in hint and "float" in hint:  # limit_*_batches: a count or a fraction
            p.add_argument(flag, dest=f.name, type=_none_or(_number), default=argparse.SUPPRESS,
                           help=f"a number of batches (10) or a fraction of them (0.25) (default {f.default})")
        else:
            kind = int if "int" in hint else float if "float" in hint else str
            kind = _none_or(kind) if "None" in hint else kind
            default = f.default if f.default is not dataclasses.MISSING else "{}"
            if f.name == "lr":
                default = "per arch: " + ", ".join(f"{a} {v:g}" for a, v in DEFAULT_LR.items())
            p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, help=f"(default {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapesynth-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fit", "train"):
        p = sub.add_parser(name, help="train, test the best checkpoint, export model + card")
        p.add_argument("--config", help="YAML recipe (TrainConfig fields)")
        p.add_argument("--recipe", help=f"bundled recipe name: {', '.join(available_recipes())}")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _add_config_flags(p)
    t = sub.add_parser("test", help="evaluate a saved model (run folder or model file)")
    t.add_argument("--model", required=True)
    t.add_argument("--data", help="dataset folder (default: a split rendered from the recipe the model "
                                  "was trained with, from its metadata; the default recipe if it has none)")
    t.add_argument("--split", default="test", choices=("val", "test"))
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--length", type=int, default=600, help="rendered split size when no --data")
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--out", help="write the results JSON here")
    sub.add_parser("archs", help="list the architectures")
    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


def resolve_config(args: argparse.Namespace):
    from trainers.api import TrainConfig, read_yaml_mapping

    values: dict = {}
    if args.recipe:
        path = RECIPES / f"{args.recipe}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {args.recipe!r}; bundled: {', '.join(available_recipes())}")
        values.update(read_yaml_mapping(path))
    if args.config:
        values.update(read_yaml_mapping(args.config))
    skip = {"command", "config", "recipe", "print_config"}
    values.update({k: v for k, v in vars(args).items() if k not in skip})
    return TrainConfig.from_dict(values)


def _usage_error(err: Exception) -> int:
    """Bad input: one line naming the problem on stderr, exit code 2 (no traceback)."""
    print(f"shapesynth-train: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
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
