"""Command line: `shapesynth generate`, `shapesynth preview`, `shapesynth card`, `shapesynth push`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shapesynth.config import SPLITS, ConfigError, SynthConfig, difficulty_knobs, read_config_text


def _load_config(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    text = read_config_text(p, "a JSON/YAML file (a dataset's config is its shapesynth.json)")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {p} is not valid JSON: {err}") from None
    data = data.get("config", data) if isinstance(data, dict) else data  # a dataset's shapesynth.json works too
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping")
    return data


def nonempty(text: str) -> str:
    """argparse type of a path, name or word flag (all three CLIs): an empty value would silently
    mean the current folder, the default, or nothing."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("an empty value names nothing")
    return text


def _difficulty(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _size_bands(text: str) -> tuple[tuple[float, float], ...]:
    """'0.31-0.39,0.16-0.19' -> ((0.31, 0.39), (0.16, 0.19)): fractions of the image side."""
    try:
        bands = tuple(tuple(float(v) for v in part.split("-")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size bands look like 0.31-0.39,0.16-0.19 (got {text!r})") from None
    if any(len(b) != 2 for b in bands):
        raise argparse.ArgumentTypeError(f"each size band is low-high (got {text!r})")
    return bands


def _weights(text: str) -> tuple[float, ...]:
    """'1,1,2' -> (1.0, 1.0, 2.0)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights look like 1,1,2 (got {text!r})") from None


def _pool_sizes(text: str) -> dict[str, int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != len(SPLITS):
        raise argparse.ArgumentTypeError(f"pool sizes are three integers train,val,test (got {text!r})")
    return dict(zip(SPLITS, sizes))


def config_from_args(args) -> SynthConfig:
    d = _load_config(args.config)
    if args.difficulty is not None:  # over the config file's knobs, under the explicit knob flags below
        d.update(difficulty_knobs(args.difficulty))
    flags = {
        "image_size": args.image_size,
        "seed": args.seed,
        "background": args.backgrounds_source,
        "bg_small": args.small_backgrounds,
        "min_contrast": args.min_contrast,
        "clutter": args.clutter,
        "clutter_contrast": args.clutter_contrast,
        "size_bands": args.size_bands,
        "size_band_weights": args.size_band_weights,
        "stroke_fraction": args.stroke_fraction,
        "bg_pool_sizes": args.pool_sizes,
    }
    d.update({k: v for k, v in flags.items() if v is not None})
    sizes = d.get("split_sizes", SynthConfig().split_sizes)
    if not isinstance(sizes, dict):
        raise ConfigError(f"split_sizes must map split names to sizes, got {sizes!r}")
    sizes = dict(sizes)
    for split in SPLITS:
        v = getattr(args, f"{split}_size")
        if v is not None:
            sizes[split] = v
    d["split_sizes"] = sizes
    split_paths = {s: getattr(args, f"backgrounds_{s}") for s in SPLITS if getattr(args, f"backgrounds_{s}")}
    if args.backgrounds is not None and split_paths:
        raise ConfigError(
            "--backgrounds and --backgrounds-train/--backgrounds-val/--backgrounds-test exclude each other: "
            "give one folder to deal into pools, or one folder per split"
        )
    if args.backgrounds_source == "procedural" and (args.backgrounds is not None or split_paths):
        raise ConfigError("--backgrounds-source procedural reads no files: drop it, or drop the background folders")
    # a background flag replaces the config file's backgrounds; without --backgrounds-source, a
    # file's procedural source becomes folder (a dataset's shapesynth.json always names one)
    if args.backgrounds is not None:
        d["bg_path"] = args.backgrounds
        d.pop("bg_split_paths", None)
    if split_paths:
        d["bg_split_paths"] = split_paths
        d.pop("bg_path", None)
    if (args.backgrounds is not None or split_paths) and d.get("background", "procedural") == "procedural":
        d["background"] = "folder"
    if args.strict:
        d["bg_strict"] = True
    return SynthConfig.from_dict(d)


def _add_generate(sub) -> None:
    d = SynthConfig()
    p = sub.add_parser(
        "generate", help="render a dataset to disk (Hub parquet layout by default)",
        description="Render a dataset to disk. The recipe defaults shown are SynthConfig's; a --config "
        "file replaces them, and flags override the file.",
    )
    p.add_argument("--out", type=nonempty, required=True, help="output folder")
    p.add_argument("--config", type=nonempty, help="SynthConfig as JSON/YAML (or a dataset's shapesynth.json); flags override it")
    p.add_argument("--format", default="hub", choices=["hub", "imagefolder", "arrow"], help="output layout (default: %(default)s)")
    p.add_argument("--image-size", type=int, help=f"image side in px (default: {d.image_size})")
    p.add_argument("--seed", type=int, help=f"seed of every random draw (default: {d.seed})")
    for split in SPLITS:
        p.add_argument(f"--{split}-size", type=int, help=f"samples in the {split} split (default: {d.split_sizes[split]})")
    p.add_argument(
        "--size-bands", type=_size_bands,
        help="shape size bands as fractions of the image side, e.g. 0.31-0.39,0.16-0.19 (default: the paper's 80-99, 40-49 and 20-24 px of 256, i.e. 0.3125-0.38671875,0.15625-0.19140625,0.078125-0.09375)",
    )
    p.add_argument("--size-band-weights", type=_weights,
                   help="odds of each size band, e.g. 1,1,2 (default: equal)")
    p.add_argument("--stroke-fraction", type=float, help=f"stroke width of empty shapes / size (default: {d.stroke_fraction})")
    p.add_argument("--pool-sizes", type=_pool_sizes, help="procedural background bases per split: train,val,test "
                   f"(default: {','.join(str(d.bg_pool_sizes[s]) for s in SPLITS)})")
    p.add_argument("--backgrounds", type=nonempty, help="a folder of background images (or an HF dataset with --backgrounds-source hf)")
    for split in SPLITS:
        p.add_argument(f"--backgrounds-{split}", type=nonempty, help=f"a separate folder of {split} backgrounds")
    p.add_argument("--backgrounds-source", choices=["procedural", "folder", "hf"],
                   help=f"(default: {d.background}, or folder when background folders are given)")
    p.add_argument("--small-backgrounds", choices=["refuse", "upscale"],
                   help=f"backgrounds smaller than the image (default: {d.bg_small})")
    p.add_argument("--strict", action="store_true", help="unreadable background files are an error, not skipped")
    p.add_argument(
        "--difficulty", type=_difficulty,
        help="procedural clutter preset: easy, medium (default), hard, or a number in [0, 1]",
    )
    p.add_argument("--min-contrast", type=float,
                   help=f"least mean colour distance of a shape to the background under it, in [0, 1) (default: {d.min_contrast})")
    p.add_argument("--clutter", type=float, help=f"procedural clutter density (default: {d.clutter}, the medium preset; hard = 1)")
    p.add_argument("--clutter-contrast", type=float, help=f"procedural clutter contrast in [0, 1] (default: {d.clutter_contrast})")
    p.add_argument(
        "--num-proc", type=int, default=min(os.cpu_count() or 1, 8),
        help="worker processes (default: the CPU count, at most 8); the output is the same for any value",
    )
    p.add_argument("--shard", help="i/n: write only every n-th shard starting at i (spread over machines)")
    p.add_argument("--samples-per-shard", type=int, default=500,
                   help="samples per output file, the unit of --resume and --shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds data")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run, keeping finished shards")
    p.add_argument("--push-to-hub", type=nonempty, metavar="REPO_ID", help="upload the finished folder to this dataset repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--no-progress", action="store_true")


def _cmd_generate(args) -> int:
    from shapesynth.generate import generate, parse_shard

    cfg = config_from_args(args)
    summary = generate(
        cfg,
        args.out,
        fmt=args.format,
        num_proc=args.num_proc,
        shard=parse_shard(args.shard),
        overwrite=args.overwrite,
        resume=args.resume,
        samples_per_shard=args.samples_per_shard,
        progress=not args.no_progress,
    )
    print("\n".join(summary.lines()))
    if args.push_to_hub:
        if not summary.complete:
            print("not pushing: the dataset is incomplete (other shards missing)", file=sys.stderr)
            return 1
        from shapesynth.hub import push_to_hub

        print(f"pushed      {push_to_hub(args.out, args.push_to_hub, private=args.private)}")
    return 0


def _interrupted_hint(args) -> str:
    """What an interrupted `generate` left in --out and how to go on from there."""
    from shapesynth.generate import finished_shards
    from shapesynth.writers import OutputError

    out = Path(args.out)
    try:
        state = finished_shards(out, config_from_args(args), args.format, args.samples_per_shard)
    except (ConfigError, OutputError):
        state = None
    if state is None:
        return " before anything was written; run the same command again"
    done, total = state
    shared = args.shard is not None and not args.shard.endswith("/1")
    if getattr(args, "overwrite", False):  # rerun as it was, it would delete what is finished
        again = ("the same command without --overwrite" if shared
                 else "the same command with --resume instead of --overwrite")
    else:
        again = "the same command" if shared or args.resume else "the same command with --resume"
    if done == 0:
        return f" before any shard was finished; {again} starts over in {out}"
    return f"; {done} of {total} shard(s) are finished in {out}, and {again} continues from them"


def _cmd_preview(args) -> int:
    from shapesynth.preview import write_preview

    path = write_preview(args.data, args.out, split=args.split, per_class=args.per_class, scale=args.scale)
    print(f"wrote {path}")
    return 0


def _cmd_card(args) -> int:
    from shapesynth.backgrounds import BackgroundError, build_pools, relative_folders_hint
    from shapesynth.generate import finish, missing_shards
    from shapesynth.writers import MANIFEST, OutputError, pools_digest

    out = Path(args.data)
    if not (out / MANIFEST).exists():
        raise OutputError(f"{out} has no {MANIFEST}: not a folder written by `shapesynth generate`")
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        fmt, per_shard, cfg = manifest["format"], manifest["samples_per_shard"], SynthConfig.from_dict(manifest["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise OutputError(f"{out / MANIFEST} is damaged ({type(err).__name__}: {err})") from None
    missing = missing_shards(out, cfg, fmt, per_shard)
    if missing:
        raise OutputError(
            f"{out} is incomplete: {len(missing)} shard(s) missing (e.g. {', '.join(s.stem for s in missing[:3])}); "
            "run the remaining `--shard i/n` parts or copy their folders in"
        )
    try:
        pools = build_pools(cfg)
    except BackgroundError as err:
        raise BackgroundError(f"{out}: cannot rebuild its background pools: {err}{relative_folders_hint(cfg)}") from err
    recorded = manifest.get("backgrounds")
    if recorded is not None and recorded != pools_digest(pools):
        raise OutputError(
            f"the background files of {out} differ from those it was generated from (see {MANIFEST}): "
            "the card would list other pools than the data was drawn from; restore them, or regenerate"
            f"{relative_folders_hint(cfg)}"
        )
    result = finish(out, cfg, fmt, per_shard, pools)
    print(json.dumps(result))
    return 0


def _cmd_push(args) -> int:
    from shapesynth.hub import push_to_hub

    print(push_to_hub(args.data, args.repo_id, private=args.private))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapesynth",
        description="Synthetic shapes over clutter with pixel-exact explanation ground truth.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    p = sub.add_parser("preview", help="a PNG grid of samples with mask contours")
    p.add_argument("--data", type=nonempty, required=True, help="a folder written by `shapesynth generate`")
    p.add_argument("--out", type=nonempty, required=True, help="PNG file to write")
    p.add_argument("--split", default="train", choices=list(SPLITS), help="(default: %(default)s)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default: %(default)s)")
    p.add_argument("--scale", type=int, default=2, help="pixel magnification (default: %(default)s)")
    p = sub.add_parser("card", help="(re)write the dataset card of a finished folder")
    p.add_argument("--data", type=nonempty, required=True)
    p = sub.add_parser("push", help="upload a finished folder to the Hub")
    p.add_argument("--data", type=nonempty, required=True)
    p.add_argument("repo_id", type=nonempty)
    p.add_argument("--private", action="store_true")
    return parser


def main(argv=None) -> int:
    from shapesynth.backgrounds import BackgroundError
    from shapesynth.writers import OutputError

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"generate": _cmd_generate, "preview": _cmd_preview, "card": _cmd_card, "push": _cmd_push}
    try:
        return handlers[args.command](args)
    # NotADirectoryError etc.: --out under a file, a folder that cannot be written
    except (ConfigError, BackgroundError, OutputError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as err:
        print(f"shapesynth {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: one line saying what is kept, not a traceback
        hint = _interrupted_hint(args) if args.command == "generate" else ""
        print(f"shapesynth {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
