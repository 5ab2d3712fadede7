"""The report's figures: each function takes analysis tables and returns a matplotlib Figure;
``save`` writes it as a PNG. Figures are built without pyplot, so no backend is selected and
the caller's matplotlib state (a notebook's backend, open figures) is left alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from shapesynth.schema import atomic_write
from validation.analyze import TRIVIAL_MAPS, config_label, models_left_out
from validation.pipeline.table import IDENTITY, NO_LAYER

TRIVIAL_COLOURS = {"randomcam": "tab:orange", "halfcam": "tab:red", "all1scam": "tab:purple"}


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    # rendered in memory, then written atomically: a report killed mid-way (or two reports of one
    # run at once) leaves no half-written PNG or temp file of a fixed name behind
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, buf.getvalue())
    return path


def _of_models(label: str, n_models: int, run_models: int) -> str:
    """``label``, marked ``(n/N models)`` when its mean rests on fewer models than the run has."""
    return label if n_models >= run_models else f"{label} ({n_models}/{run_models} models)"


def _mean_row_labels(rows: pd.DataFrame, label: pd.Series) -> pd.DataFrame:
    """``rows`` (mean rows of table a, c or d) with ``run_models`` (those averaged plus those named
    in ``models_nan``) and ``label`` marked where the mean rests on fewer models than that."""
    rows = rows.assign(label=label)
    if "n_models" not in rows:  # a table written before mean rows counted their models: unmarked
        return rows.assign(run_models=np.nan)
    n = rows["n_models"].astype(int)
    rows["run_models"] = n + rows["models_nan"].map(lambda v: len(models_left_out(v)))
    rows["label"] = [_of_models(text, k, total) for text, k, total in zip(label, n, rows["run_models"])]
    return rows


def correlation_bar_data(validity: pd.DataFrame) -> pd.DataFrame:
    """The summary rows of table a the correlation bars draw, each metric labelled with its model
    count where it rests on fewer models than the run has (a model without a correlation)."""
    s = validity[validity.model == "mean+-std"]
    return _mean_row_labels(s, s["metric"].astype(str))


def correlation_bars(validity: pd.DataFrame):
    """Mean Pearson and Spearman r with the ground-truth cosine per metric; error bars: +- std over
    models when every mean rests on several, else (all bars) the bootstrap 95 % interval, as the
    title says. A metric whose mean rests on fewer models than the run has is marked ``(n/N models)``."""
    s = correlation_bar_data(validity)
    levels = [lv for lv in ("pairs", "method_means") if lv in set(s.level)]
    # one kind of error bar for every panel, the one the title names: the std where every mean
    # rests on several models, else the bootstrap interval (a one-model mean has no std)
    use_std = bool(len(s)) and bool((s["n_models"] > 1).all())
    fig = Figure(figsize=(6.5 * len(levels), 3.8))
    axes = fig.subplots(1, len(levels), squeeze=False)
    for ax, level in zip(axes[0], levels):
        t = s[s.level == level].sort_values("pearson", ascending=False)
        x = np.arange(len(t))
        for k, (col, colour) in enumerate((("pearson", "tab:blue"), ("spearman", "tab:green"))):
            if use_std:
                err = t[f"{col}_std"].to_numpy()
            else:
                err = np.abs(np.stack([t[col] - t[f"{col}_lo"], t[f"{col}_hi"] - t[col]]).astype(float))
            ax.bar(x + (k - 0.5) * 0.38, t[col], 0.38, yerr=err, capsize=3, color=colour,
                   label=col.capitalize())
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, t.label, rotation=40, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("r with ground-truth cosine")
        n_models = int(t["run_models"].max()) if len(t) else 0
        ax.set_title(f"{level.replace('_', ' ')} (mean of {n_models} model(s), fewer where marked)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Metric validity (error bars: " +
                 ("+- std over models" if use_std else "bootstrap 95 % CI") + ")")
    return fig


def trivial_bar_data(per_model: pd.DataFrame) -> pd.DataFrame:
    """What the trivial-map figure draws: one row per (metric, trivial map) with the real
    configurations' range (``real_worst``, ``real_median``, ``real_best``) and the trivial map's
    ``trivial_score``, all means over the models where that trivial map has a verdict (``fooled``
    set), as in the verdict table; ``n_models`` counts them, ``models`` the models with the trivial
    map. ``shared_range``: every trivial map of the metric rests on the same models, so one real
    range stands for all of them; otherwise each trivial map is drawn beside its own range."""
    keys = ["metric", "trivial"]
    columns = ["real_worst", "real_median", "real_best", "trivial_score"]
    scored = per_model[per_model["fooled"].notna()]
    means = scored.groupby(keys, sort=True)[columns].mean()
    out = per_model.groupby(keys, sort=True).size().rename("models").to_frame().join(means)
    out["n_models"] = scored.groupby(keys).size().reindex(out.index, fill_value=0)
    out["scored_models"] = scored.groupby(keys)["model"].agg(lambda m: ",".join(sorted(map(str, m))))
    out["scored_models"] = out["scored_models"].reindex(out.index).fillna("")
    out = out.reset_index()
    out["shared_range"] = out.groupby("metric")["scored_models"].transform("nunique") == 1
    return out[keys + columns + ["n_models", "models", "scored_models", "shared_range"]]


def _real_range(ax, x: float, row, width: float, label: bool) -> None:
    lo, hi = sorted([row.real_worst, row.real_best])
    ax.bar(x, hi - lo, bottom=lo, color="tab:blue", alpha=0.35 if not label else 0.6, width=width)
    ax.plot([x - width / 2, x + width / 2], [row.real_median] * 2, color="k", lw=1.5)


def trivial_bars(per_model: pd.DataFrame):
    """Per metric: the real configurations' range (bar from worst to best, tick at the median)
    beside each trivial map's score; means over the models where the trivial map has a score, as
    the verdict table (`trivial_bar_data`). When the trivial maps of a metric rest on different
    models, no single range fits them all: each is drawn inside its own range (pale bar), and a
    trivial map scored on fewer models than have it is marked ``(n/N models)``."""
    m = trivial_bar_data(per_model)
    metrics = sorted(m.metric.unique())
    ncol = min(4, max(1, len(metrics)))
    nrow = int(np.ceil(len(metrics) / ncol))
    fig = Figure(figsize=(3.2 * ncol, 2.8 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        g = m[m.metric == metric].set_index("trivial")
        trivials = [t for t in TRIVIAL_MAPS if t in g.index] + [t for t in g.index if t not in TRIVIAL_MAPS]
        shared = bool(g.shared_range.iloc[0])
        labels = []
        if shared:
            _real_range(ax, 0, g.loc[trivials[0]], 0.6, label=True)
            labels.append(_of_models("real range", int(g.n_models.iloc[0]), int(g.models.max())))
        for k, t in enumerate(trivials, start=len(labels)):
            row = g.loc[t]
            if not shared:
                _real_range(ax, k, row, 0.8, label=False)
            ax.bar(k, row.trivial_score, width=0.6 if shared else 0.35, color=TRIVIAL_COLOURS.get(t, "grey"))
            labels.append(_of_models(t, int(row.n_models), int(row.models)))
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric if shared else f"{metric} (pale: real range on the same models)", fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Trivial maps vs the range of real methods (mean over the models where the trivial map has a score)")
    fig.tight_layout()
    return fig


def refine_bar_data(refine: pd.DataFrame) -> pd.DataFrame:
    """The mean rows of table c with a refined score, each method labelled with its model count
    where its mean rests on fewer models than the run has (``run_models``)."""
    t = refine[(refine.model == "mean") & refine.refined.notna()]
    return _mean_row_labels(t, t["method"].astype(str))


def refine_bars(refine: pd.DataFrame):
    """Base vs RefineCAM at the shallowest layer, mean over models, per metric; a method whose
    mean rests on fewer models than the run has is marked ``(n/N models)``."""
    t = refine_bar_data(refine)
    metrics = list(dict.fromkeys(t.metric))
    fig = Figure(figsize=(5 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        g = t[t.metric == metric]
        x = np.arange(len(g))
        ax.bar(x - 0.2, g.base, 0.4, label="base", color="tab:grey")
        ax.bar(x + 0.2, g.refined, 0.4, label="RefineCAM", color="tab:green")
        ax.set_xticks(x, g.label, rotation=30, ha="right")
        ax.set_title(f"{metric} at {g.layer.iloc[0]}" if len(g) else metric, fontsize=10)
        ax.legend(fontsize=8)
    n_models = t["run_models"].max() if len(t) else np.nan
    over = f"{int(n_models)} model(s), fewer where marked" if np.isfinite(n_models) else "models"
    fig.suptitle(f"RefineCAM before / after (mean over {over})")
    fig.tight_layout()
    return fig


def road_curves(curves: pd.DataFrame, layer: str | None = None):
    """Class probability vs fraction removed, MoRF (solid) and LeRF (dashed); one panel per
    model, unrefined methods at ``layer`` (layer-free methods always)."""
    c = curves[(curves["mix"] == IDENTITY) & ((curves.layer == NO_LAYER) | (curves.layer == layer))]
    models = sorted(c.model.unique())
    fig = Figure(figsize=(5.5 * max(1, len(models)), 4))
    axes = fig.subplots(1, max(1, len(models)), squeeze=False)
    cmap = matplotlib.colormaps["tab20"]
    for ax, model in zip(axes[0], models):
        g = c[c.model == model]
        for k, ((method, lay), h) in enumerate(g.groupby(["method", "layer"], sort=True)):
            colour = cmap(k % 20)
            for order, style in (("MORF", "-"), ("LERF", "--")):
                o = h[h.order == order].sort_values("fraction")
                ax.plot(o.fraction, o.prob, style, color=colour, marker=".",
                        label=config_label(method, lay, IDENTITY) if order == "MORF" else None)
        ax.set_xlabel("fraction of pixels removed")
        ax.set_ylabel("p(target class)")
        ax.set_title(f"{model}: MoRF solid, LeRF dashed", fontsize=10)
        ax.set_ylim(0, 1.02)
    if models:
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def qualitative_grid(saved: dict, columns: list[str], refined_pair: tuple[str, str] | None = None,
                     max_images: int = 4):
    """Rows: images; columns: image, ground truth, each configuration's map, base vs refined."""
    x, gt, configs = saved["x"], saved["gt"], list(saved["configs"])
    cols = [c for c in columns if c in configs]
    if refined_pair and all(p in configs for p in refined_pair):
        cols += [c for c in refined_pair if c not in cols]
    n = min(max_images, len(x))
    fig = Figure(figsize=(1.35 * (2 + len(cols)), 1.45 * n))
    axes = fig.subplots(n, 2 + len(cols), squeeze=False)
    for i in range(n):
        img = np.clip(np.asarray(x[i], np.float32).transpose(1, 2, 0), 0, 1)
        axes[i][0].imshow(img)
        axes[i][1].imshow(np.asarray(gt[i], np.float32), cmap="gray", vmin=0, vmax=1)
        for j, c in enumerate(cols):
            m = np.asarray(saved[f"map_{configs.index(c)}"][i], np.float32)
            axes[i][2 + j].imshow(img * 0.35 + 0.65 * matplotlib.colormaps["jet"](m)[..., :3])
        for j, title in enumerate(["image", "ground truth"] + cols):
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
            if i == 0:
                axes[i][j].set_title(title, fontsize=6, rotation=20)
    fig.tight_layout(pad=0.2)
    return fig
