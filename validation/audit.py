"""``shapesynth-eval audit``: judge a new metric the way ours are judged.

Contract for the user's metric (the same as this project's functional metrics)::

    def my_metric(model, x, target, maps, **kwargs) -> torch.Tensor  # shape (B,)

- ``model``: the classifier, eval mode, takes images in [0, 1] (normalisation is inside);
- ``x``: (B, 3, H, W) float32 images in [0, 1]; ``target``: (B,) int64 true classes (only
  correctly classified images are passed);
- ``maps``: (B, H, W) float32 saliency maps in [0, 1] at input resolution;
- optional keyword arguments, passed only when the function declares them (or ``**kwargs``):
  ``explainer`` (object with ``.attribute(x, target)``: the method that made the maps, for
  metrics that re-run it, like Coherency), ``gt`` ((B, H, W) ground-truth masks: a metric that
  uses it is a ground-truth score, not a faithfulness metric);
- returns one finite value per sample (NaN for a sample it cannot score, counted in the
  tables); higher must mean better unless the function has ``lower_is_better = True``.

The run's maps are recomputed with the run's own configuration and seeds (same chunks, so the
same maps), the metric is computed into ``RUN_DIR/audit/<name>/`` (resumable like ``run``),
and tables a (validity) and b (trivial maps) are rebuilt with the metric beside AD, ADCC, ROAD
and ARCC, followed by a plain verdict.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from shapesynth.schema import atomic_write
from validation import analyze as A
from validation.pipeline.table import LEGACY_DEFAULTS, load_results, read_json

COMPARED = ("average_drop", "adcc", "road", "arcc")


def load_metric(spec: str) -> Callable:
    """``package.module:function`` -> the function (clear errors for each way this can fail)."""
    if ":" not in spec:
        raise ValueError(f"--metric {spec!r}: expected package.module:function")
    module_name, func_name = spec.split(":", 1)
    if not module_name or not func_name:
        raise ValueError(f"--metric {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--metric {spec!r}: cannot import module {module_name!r} ({err}); "
                         f"is it on PYTHONPATH?") from None
    except Exception as err:  # the user's module failed while importing (SyntaxError, ...)
        raise ValueError(f"--metric {spec!r}: importing module {module_name!r} raised "
                         f"{type(err).__name__}: {err}") from err
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"--metric {spec!r}: module {module_name!r} has no function {func_name!r}")
    try:  # the contract's call: fn(model, x, target, maps), explainer= and gt= only if it names them
        inspect.signature(fn).bind(None, None, None, None)
    except TypeError:
        raise ValueError(f"--metric {spec!r}: the function must be callable as f(model, x, target, maps) "
                         f"(other parameters keyword-only or with defaults); its signature is "
                         f"{inspect.signature(fn)}") from None
    return fn


def metric_evaluator(fn: Callable, name: str) -> Callable:
    """An ``evaluate``-shaped wrapper around a user metric, checking its output."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())

    def evaluate(model, x, target, maps, metrics, explainer, gt, options):
        extra = {k: v for k, v in (("explainer", explainer), ("gt", gt)) if takes_all or k in params}
        value = fn(model, x, target, maps, **extra)
        value = torch.as_tensor(value)
        if value.shape != (x.shape[0],):
            raise ValueError(f"metric {name!r} returned shape {tuple(value.shape)}; the contract is "
                             f"one value per sample, shape ({x.shape[0]},)")
        return {name: value.detach().double()}

    return evaluate


def _paired_lines(name: str, paired: pd.DataFrame | None) -> list[str]:
    """One sentence per compared metric from the paired table (same maps, bootstrap CI)."""
    if paired is None:
        return []
    parts = []
    for versus, (d, lo, hi) in A.paired_against(paired, name).items():
        if not np.isfinite(d):
            continue
        call = ("significantly better" if lo > 0 else "significantly worse" if hi < 0 else
                "not distinguishable")
        parts.append(f"vs {versus}: {d:+.2f} (95% CI {lo:+.2f} to {hi:+.2f}, {call})")
    if not parts:
        return []
    return ["On the same maps, difference of oriented Pearson r with the ground truth: " + "; ".join(parts) + "."]


def verdict_text(name: str, validity: pd.DataFrame, verdicts: pd.DataFrame, lower_is_better=(),
                 paired: pd.DataFrame | None = None) -> str:
    """Plain-language verdict on the audited metric from tables a and b.

    Correlations are oriented (sign flipped for lower-is-better metrics such as AD) so that
    positive always means "agrees with the ground truth"."""
    summary = validity[(validity.model == "mean+-std") & (validity.level == "pairs")].set_index("metric").copy()
    sign = np.array([A.orientation(m, lower_is_better) for m in summary.index])
    for col in ("pearson", "spearman"):
        summary[col] = summary[col] * sign
    lo, hi = summary["pearson_lo"] * sign, summary["pearson_hi"] * sign
    summary["pearson_lo"], summary["pearson_hi"] = np.minimum(lo, hi), np.maximum(lo, hi)
    lines = []
    if name not in summary.index or not np.isfinite(summary.loc[name, "pearson"]):
        lines.append(f"{name}: no correlation with the ground truth could be computed "
                     f"(too few finite values).")
    else:
        row = summary.loc[name]
        r, s = row["pearson"], row["spearman"]
        kind = ("tracks the ground truth" if r >= 0.5 else
                "tracks the ground truth only weakly" if r >= 0.2 else
                "does not track the ground truth" if r > -0.2 else
                "runs AGAINST the ground truth")
        ranked = summary["pearson"].dropna().sort_values(ascending=False)
        rank = list(ranked.index).index(name) + 1
        oriented = " (oriented: lower is better, sign flipped)" if A.orientation(name, lower_is_better) < 0 else ""
        lines.append(f"{name} {kind}: Pearson r = {r:.2f}{oriented} (95% CI {row['pearson_lo']:.2f} to "
                     f"{row['pearson_hi']:.2f}), Spearman rho = {s:.2f}, over (image, method) pairs, "
                     f"mean of {int(row['n_models'])} model(s); rank {rank} of {len(ranked)} metrics.")
        # oriented like the line above: table a shows lower-is-better metrics (AD) with their own sign
        peers = [f"{m} r = {summary.loc[m, 'pearson']:.2f}" for m in COMPARED if m in summary.index]
        if peers:
            lines.append("For comparison (oriented: positive = agrees with the ground truth; table a "
                         "keeps lower-is-better metrics' own sign): " + ", ".join(peers) + ".")
        # our metrics that have a correlation: a NaN one (constant, no finite pair) is no rival
        best = [m for m in COMPARED if m in summary.index and np.isfinite(summary.loc[m, "pearson"])]
        if best:
            top = max(best, key=lambda m: summary.loc[m, "pearson"])
            better = r > summary.loc[top, "pearson"]
            lines.append(f"It is {'better' if better else 'not better'} than the best of our metrics "
                         f"here ({top}).")
        lines.extend(_paired_lines(name, paired))
        if "method_means" in set(validity.level):
            mm = validity[(validity.model == "mean+-std") & (validity.level == "method_means")
                          & (validity.metric == name)]
            if len(mm) and np.isfinite(mm.iloc[0]["spearman"]):
                rho = mm.iloc[0]["spearman"] * A.orientation(name, lower_is_better)
                lines.append(f"Ranking methods by their mean score: Spearman rho = "
                             f"{rho:.2f} with the ground-truth ranking.")
    mine = verdicts[verdicts.metric == name] if len(verdicts) else verdicts
    if len(mine):
        found = list(zip(mine.trivial, mine.verdict))
        fooled = [f"{t} ({v})" for t, v in found if v.startswith(("fooled", "mixed"))]
        unscored = [f"{t} ({v})" for t, v in found if not A.trivial_verdict_complete(v)]
        clean = [t for t, v in found if v == "not fooled"]
        if fooled:
            lines.append("Trivial maps that fool it: " + ", ".join(fooled) +
                         " (a trivial map scores at least as well as the worst real method).")
        if clean:
            lines.append(f"Not fooled by: {', '.join(clean)}.")
        if unscored:
            lines.append("Not checked on every model (no finite score: NaN or errors): " + ", ".join(unscored) + ".")
    else:
        lines.append("No trivial-map check was possible: the run has no trivial maps "
                     f"({', '.join(A.TRIVIAL_MAPS)}).")
    return "\n".join(lines)


def metric_source_hash(fn: Callable) -> str:
    """sha256 of the metric function's source (its bytecode and constants when the source cannot
    be read), so that editing the function invalidates the audit's cached chunks. Helpers it
    calls are not covered: after editing those, pass ``overwrite``."""
    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)).encode() if code is not None else repr(fn).encode()
    return "sha256:" + hashlib.sha256(text).hexdigest()


def _refuse_missing_inputs(run_dir: Path, cfg: dict, data: bool = True) -> None:
    """The audit recomputes the run's maps from the models and dataset its ``run_config.json``
    names, as the run was given them: say so when one is missing, rather than blame a ``--model``
    or ``--data`` flag the audit does not have (a relative path is read from the current folder)."""
    named = [("model", p) for p in cfg.get("models", [])]
    if data and cfg.get("data"):
        named.append(("dataset", cfg["data"]))
    for kind, path in named:
        if not Path(path).exists():
            where = ("" if Path(path).is_absolute() else
                     f" from {Path.cwd()} (the run recorded it relative to the folder it was started in: "
                     f"audit from that folder)")
            raise FileNotFoundError(f"{run_dir / 'run_config.json'}: the run's {kind} {path} does not exist"
                                    f"{where}; the audit recomputes the run's maps with it")


def audit_run(run_dir: str | Path, spec: str, name: str | None = None, n_images: int | None = None,
              n_boot: int = 1000, components=None, progress: bool = True,
              lower_is_better: bool | None = None, overwrite: bool = False) -> dict:
    """Compute the metric ``spec`` on the run's maps and judge it (tables a, b and a verdict).

    ``lower_is_better`` overrides the function's own ``lower_is_better`` attribute. Chunks
    already computed in ``RUN_DIR/audit/<name>/`` are reused when the audit's configuration
    (image range, ...) and the function's source are unchanged; edited source recomputes them,
    another configuration is refused unless ``overwrite`` (which discards them)."""
    from validation.pipeline.run import Components, RunConfig, _weights_fingerprint, run_eval

    run_dir = Path(run_dir)
    if n_images is not None and n_images < 1:
        raise ValueError(f"--n-images must be >= 1, got {n_images}")
    if n_boot < 1:  # checked before the metric is computed, not after
        raise ValueError(f"--n-boot (bootstrap replicates) must be >= 1, got {n_boot}")
    fn = load_metric(spec)
    name = name or fn.__name__
    if "@" in name:  # "@" marks the curve columns (road_morf@0.2), which the tables leave out
        raise ValueError(f"metric name {name!r}: '@' is reserved for curve columns; pass another --name")
    base = load_results(run_dir)
    if A.REFERENCE_METRIC not in set(base.metric):  # refused before the metric is computed, not after
        raise ValueError(f"the run {run_dir} has no {A.REFERENCE_METRIC} rows, the ground truth a metric is "
                         f"judged against; rerun it with {A.REFERENCE_METRIC} among its --metrics")
    if name in set(base.metric):
        raise ValueError(f"metric name {name!r} already exists in the run; pass --name")
    cfg = read_json(run_dir / "run_config.json")
    _refuse_missing_inputs(run_dir, cfg, data=components is None)
    # the maps are recomputed: other weights than the run's would judge the metric on other maps
    for model, path in zip(cfg.get("model_names", []), cfg.get("models", [])):
        was = (cfg.get("model_weights") or {}).get(model)
        if was and Path(path).exists() and _weights_fingerprint(path) != was:
            raise ValueError(f"{path}: the weights of model {model!r} changed since the run "
                             f"{run_dir} was computed; the audit would score other maps")
    # a key the run's config predates takes the value that run had implicitly (e.g. unfolded models)
    cfg = {**LEGACY_DEFAULTS, **cfg}
    keep = {k: cfg[k] for k in RunConfig.__dataclass_fields__ if k in cfg}
    # the audit evaluator takes no options; the function's identity goes in their place, so the
    # run's config check (stable part) tells cached chunks of edited code from current ones
    source = {"audited_metric": {"source": metric_source_hash(fn)}}
    keep.update(metrics=[name], save_maps=0, metric_options=source)
    if n_images is not None:
        start = keep["image_range"][0]
        keep["image_range"] = [start, min(start + n_images, keep["image_range"][1])]
    config = RunConfig(**keep)
    comps = components or Components()
    comps = dataclasses.replace(comps, evaluate=metric_evaluator(fn, name))  # every other component kept
    out_dir = run_dir / "audit" / name
    previous = out_dir / "run_config.json"
    if not overwrite and previous.exists():
        old = read_json(previous).get("metric_options", {}).get("audited_metric", {})
        overwrite = old.get("source") != source["audited_metric"]["source"]  # edited code: recompute
    run_eval(config, out_dir, components=comps, progress=progress, overwrite=overwrite,
             conflict_hint="pass --overwrite to recompute it, or --name to audit beside it")
    mine = load_results(out_dir)
    if len(mine) and (mine.status == "error").all():  # nothing to judge: say why, not "too few values"
        reason = mine.reason.value_counts().index[0]
        raise ValueError(f"metric {name!r} failed on every map ({len(mine)} rows); the most common "
                         f"error: {reason}")
    df = pd.concat([base[base.image.isin(set(mine.image))] if n_images else base, mine],
                   ignore_index=True)
    metrics = [m for m in (name,) + COMPARED if m in set(df.metric)]
    lower_flag = getattr(fn, "lower_is_better", False) if lower_is_better is None else lower_is_better
    lower = {name} if lower_flag else set()
    validity = A.table_validity(df[df.metric.isin(metrics + [A.REFERENCE_METRIC])], n_boot=n_boot,
                                lower_is_better=lower)
    per_model, verdicts = A.table_trivial(df, metrics=metrics, lower_is_better=lower)
    # the paired comparison: against AD, ADCC, ROAD and ARCC, or every other metric of a run without them
    rivals = [m for m in COMPARED if m in set(df.metric)] or [
        m for m in A.scalar_metrics(df) if m not in (name, A.REFERENCE_METRIC)]
    paired = A.table_paired(df, n_boot=n_boot, pairs=[(name, m) for m in rivals], lower_is_better=lower)
    text = verdict_text(name, validity, verdicts, lower, paired)
    tables = {"a_validity": validity, "a_paired": paired, "b_trivial": per_model, "b_trivial_verdict": verdicts}
    A.write_tables(tables, out_dir)
    atomic_write(out_dir / "verdict.md", f"# Audit of `{spec}` as `{name}`\n\n{text}\n")
    return {"verdict": text, "out_dir": str(out_dir), "tables": tables}
