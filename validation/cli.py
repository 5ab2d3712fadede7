"""``shapesynth-eval`` (= ``python -m validation``): run, merge, analyze, audit, report, reproduce.

See docs/evaluation.md for the workflow, the table schema and scale-out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shapesynth.cli import nonempty

DEFAULT_LAYERS = "stage1,stage2,stage3,stage4"
DEFAULT_MIXES = "identity,product,geomean,invexp"
DEFAULT_N_IMAGES = 200


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: ...)" to an option's help when it has a default worth showing (not
    None or False) and its help does not state one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "(default" not in text  # `is`: a default of 0 is shown
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def csv_list(text: str) -> list[str]:
    """A comma-separated flag value as its names (blanks dropped)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _options(text: str | None, flag: str) -> dict:
    """JSON text, or a path to a JSON/YAML file: ``{"lime": {"n_samples": 100}}``; what is neither
    is a ValueError naming ``flag`` (one line and exit status 2, as every other bad argument)."""
    if not text:
        return {}
    path = Path(text)
    if path.exists():
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{flag} {text!r}: cannot read the file as JSON or YAML "
                             f"({' '.join(str(err).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {text!r}: neither a file nor valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {text!r}: expected a mapping, got {type(data).__name__}")
    return data


def all_methods() -> list[str]:
    from validation.attributions import available_methods

    # refinecam is reached through --mix (any layer method refined with any aggregator)
    return [m for m in available_methods() if m not in ("refinecam",)]


def all_metrics() -> list[str]:
    from validation.pipeline.run import DEFAULT_METRICS

    return list(DEFAULT_METRICS)


def _add_run(sub):
    p = sub.add_parser("run", help="maps and metrics for every model, image, method, layer and mix",
                       formatter_class=_HelpFormatter)
    p.add_argument("--data", type=nonempty, required=True, help="dataset folder written by `shapesynth generate`")
    p.add_argument("--model", type=nonempty, action="append", required=True, dest="models",
                   help="checkpoint or training run folder (repeat for several models)")
    p.add_argument("--methods", default="all", help="comma list, or 'all' (default)")
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="comma list, shallow to deep")
    p.add_argument("--refine-layers", help="layers RefineCAM fuses, shallow to deep (default: --layers)")
    p.add_argument("--mix", default=DEFAULT_MIXES,
                   help="RefineCAM aggregators; 'identity' = the unrefined method")
    p.add_argument("--metrics", default="all", help="comma list, or 'all' (default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--n-images", type=int,
                   help=f"first N images of the split (default: {DEFAULT_N_IMAGES}, unless --images is given)")
    g.add_argument("--images", help="image index range start:stop")
    p.add_argument("--split", default="test", help="dataset split whose images are explained")
    p.add_argument("--chunk-size", type=int, default=16,
                   help="images per batch and per resumable chunk (part of the run's identity)")
    p.add_argument("--seed", type=int, default=0,
                   help="run seed; each chunk's stochastic methods (and a metric of your own drawing from torch's "
                        "global generators) get a seed derived from it; the built-in metrics' draws (ROAD's "
                        "noise and tie-breaking) take --metric-options' seed and tie_seed instead")
    p.add_argument("--method-options", help="JSON text or a JSON/YAML file: {method: {option: value}}")
    p.add_argument("--metric-options", help="JSON text or a JSON/YAML file: options passed to evaluate()")
    p.add_argument("--method-grid", help="JSON text or a JSON/YAML file: per-method {layers, mixes, max_images} overrides")
    p.add_argument("--save-maps", type=int, default=8, help="keep the maps of the first N images for the report")
    p.add_argument("--shard", help="i/n: compute only shard i of n (merge afterwards)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--no-fold", action="store_true",
                   help="evaluate the models as loaded, without folding batch norm and VGG's pooled "
                        "classifier into their neighbours (folding: same outputs to float rounding, faster)")
    p.add_argument("--out", type=nonempty, required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing run in --out (with --shard i/n: only this shard's chunks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_run(args) -> int:
    import torch

    from validation.pipeline.run import RunConfig, run_eval
    from validation.pipeline.shards import parse_range, parse_shard

    if args.n_images is not None and args.n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {args.n_images}")
    for flag, value, least in (("--chunk-size", args.chunk_size, 1), ("--save-maps", args.save_maps, 0),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:  # before any model is loaded or folder made
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.images:
        image_range, range_source = parse_range(args.images), None  # the run names --images a:b
    elif args.n_images is not None:
        image_range, range_source = (0, args.n_images), f"--n-images {args.n_images}"
    else:
        image_range = (0, DEFAULT_N_IMAGES)
        range_source = f"--n-images {DEFAULT_N_IMAGES} (its default: neither --n-images nor --images was given)"
    config = RunConfig(
        data=args.data, models=args.models,
        methods=all_methods() if args.methods == "all" else csv_list(args.methods),
        metrics=all_metrics() if args.metrics == "all" else csv_list(args.metrics),
        layers=csv_list(args.layers), mixes=csv_list(args.mix), image_range=image_range,
        refine_layers=csv_list(args.refine_layers) if args.refine_layers else [],
        split=args.split, chunk_size=args.chunk_size, seed=args.seed,
        method_options=_options(args.method_options, "--method-options"),
        metric_options=_options(args.metric_options, "--metric-options"),
        method_grid=_options(args.method_grid, "--method-grid"), device=args.device,
        save_maps=args.save_maps, fold=not args.no_fold)
    shard = parse_shard(args.shard)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run_eval(config, args.out, shard=shard, progress=not args.no_progress,
                       overwrite=args.overwrite, range_source=range_source)
    summary.pop("manifest", None)
    print(json.dumps(summary))
    if shard != (0, 1):
        print(f"shard {shard[0]}/{shard[1]} done; when all shards are done: shapesynth-eval merge {args.out}")
    return 0


def cmd_merge(args) -> int:
    from validation.pipeline.table import merge_run

    man = merge_run(args.run_dir, allow_partial=args.allow_partial)
    print(f"merged {man['chunks']['merged']}/{man['chunks']['expected']} chunks, {man['rows']} rows "
          f"-> {Path(args.run_dir) / 'results.parquet'}")
    return 0


def cmd_analyze(args) -> int:
    from validation.analyze import analyze_run

    out = Path(args.out) if args.out else Path(args.run_dir) / "analysis"
    tables = analyze_run(args.run_dir, out, n_boot=args.n_boot, seed=args.seed)
    print(f"wrote {len(tables)} tables to {out} (tables.md, *.csv)")
    _warn_partial(args.run_dir)
    return 0


def _warn_partial(run_dir) -> None:
    """Say so when the merged table lacks chunks (``merge --allow-partial``)."""
    from validation.pipeline.table import read_json

    path = Path(run_dir) / "manifest.json"
    chunks = (read_json(path).get("chunks") or {}) if path.exists() else {}
    if chunks.get("missing"):
        print(f"warning: partial run: {len(chunks['missing'])} of {chunks.get('expected')} chunks were not "
              f"merged (merge --allow-partial); the tables lack their images", file=sys.stderr)


def cmd_audit(args) -> int:
    from validation.audit import audit_run

    result = audit_run(args.run_dir, args.metric, name=args.name, n_images=args.n_images,
                       n_boot=args.n_boot, progress=not args.no_progress,
                       lower_is_better=True if args.lower_is_better else None, overwrite=args.overwrite)
    print(result["verdict"])
    print(f"tables: {result['out_dir']}")
    return 0


def cmd_report(args) -> int:
    from validation.report import write_report

    path = write_report(args.run_dir, out_dir=args.out)
    print(f"report: {path}")
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def cmd_reproduce(args) -> int:
    import signal

    from validation.reproduce import reproduce

    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C, so the trainer and shard workers
    # this command started are stopped with it rather than left running
    steps = csv_list(args.steps) if args.steps is not None else None
    if steps == []:  # reproduce() would read "no steps" as all of them
        raise ValueError(f"--steps {args.steps!r} names no step: give a subset of generate,train,run,analyze,"
                         "report, or leave --steps out for all")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        result = reproduce(args.profile, args.out, steps=steps,
                           progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps({k: v for k, v in result.items() if k != "timings"}, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shapesynth-eval",
        description="Meta-evaluation of attribution metrics against pixel-exact ground truth.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    p = sub.add_parser("merge", help="merge finished chunks (of all shards) into the run's tables",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--allow-partial", action="store_true", help="merge although chunks are missing")
    p = sub.add_parser("analyze", help="tables a-f (validity, trivial maps, RefineCAM, ...)",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for the tables (default RUN_DIR/analysis)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p = sub.add_parser("audit", help="place a new metric beside ours in tables a and b",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--metric", required=True, help="package.module:function (see docs/evaluation.md)")
    p.add_argument("--name", help="column name (default: the function's name)")
    p.add_argument("--n-images", type=int,
                   help="audit on the first N images of the run only (default: all the run's images)")
    p.add_argument("--lower-is-better", action="store_true",
                   help="the metric is better when lower (like Average Drop)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (>= 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard this metric's earlier audit (e.g. to change --n-images)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("report", help="self-contained HTML page and PNG figures",
                       formatter_class=_HelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder (default RUN_DIR/report)")
    p = sub.add_parser("reproduce", help="generate, train, run, analyze and report from a profile",
                       formatter_class=_HelpFormatter)
    # the bundled profiles' names, read without importing validation.reproduce (pandas) for --help
    bundled = " | ".join(sorted(f.stem for f in Path(__file__).with_name("profiles").glob("*.yaml")))
    p.add_argument("--profile", default="quick", help=f"{bundled} | path to a profile YAML")
    p.add_argument("--out", type=nonempty, required=True)
    p.add_argument("--steps", help="subset of generate,train,run,analyze,report (default all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


COMMANDS = {"run": cmd_run, "merge": cmd_merge, "analyze": cmd_analyze, "audit": cmd_audit,
            "report": cmd_report, "reproduce": cmd_reproduce}


# what rerunning an interrupted command keeps (commands not listed simply start again)
RESUMES = {"run": "rerun the same command to resume from the finished chunks",
           "audit": "rerun the same command to resume from the finished chunks",
           "reproduce": "rerun the same command to resume: the data, finished models and finished chunks "
                        "are reused"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    # user errors: one clear line (the OSErrors: a path under a file, a file where a folder belongs)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            ValueError, RuntimeError) as err:
        print(f"shapesynth-eval {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever it landed
        hint = RESUMES.get(args.command)
        if hint and getattr(args, "overwrite", False):  # rerun as it was, it would recompute everything
            hint = hint.replace("the same command", "the same command without --overwrite", 1)
        print(f"\nshapesynth-eval {args.command}: interrupted" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


if __name__ == "__main__":
    raise SystemExit(main())
