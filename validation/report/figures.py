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
from validation.analyze import TRIVIAL_MAPS, config_label
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


def correlation_bars(validity: pd.DataFrame):
    """Mean Pearson and Spearman r with the ground-truth cosine per metric; error bars: +- std over
    models when there are several, else the bootstrap 95 % interval."""
    s = validity[validity.model == "mean+-std"]
    levels = [lv for lv in ("pairs", "method_means") if lv in set(s.level)]
    fig = Figure(figsize=(6.5 * len(levels), 3.8))
    axes = fig.subplots(1, len(levels), squeeze=False)
    for ax, level in zip(axes[0], levels):
        t = s[s.level == level].sort_values("pearson", ascending=False)
        x = np.arange(len(t))
        for k, (col, colour) in enumerate((("pearson", "tab:blue"), ("spearman", "tab:green"))):
            if (t["n_models"] > 1).all():
                err = t[f"{col}_std"].to_numpy()
            else:
                err = np.abs(np.stack([t[col] - t[f"{col}_lo"], t[f"{col}_hi"] - t[col]]).astype(float))
            ax.bar(x + (k - 0.5) * 0.38, t[col], 0.38, yerr=err, capsize=3, color=colour,
                   label=col.capitalize())
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, t.metric, rotation=40, ha="right")
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("r with ground-truth cosine")
        n_models = int(t["n_models"].max()) if len(t) else 0
        ax.set_title(f"{level.replace('_', ' ')} (mean of {n_models} model(s))", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Metric validity (error bars: " +
                 ("+- std over models" if len(s) and (s.n_models > 1).all() else "bootstrap 95 % CI") + ")")
    return fig


def trivial_bars(per_model: pd.DataFrame):
    """Per metric: the real configurations' range (bar from worst to best, tick at the median)
    beside each trivial map's score; means over models."""
    m = per_model.groupby(["metric", "trivial"], sort=True)[
        ["real_worst", "real_median", "real_best", "trivial_score"]].mean().reset_index()
    metrics = sorted(m.metric.unique())
    ncol = min(4, max(1, len(metrics)))
    nrow = int(np.ceil(len(metrics) / ncol))
    fig = Figure(figsize=(3.2 * ncol, 2.8 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        g = m[m.metric == metric]
        lo, hi = sorted([g.real_worst.iloc[0], g.real_best.iloc[0]])
        ax.bar(0, hi - lo, bottom=lo, color="tab:blue", alpha=0.6, width=0.6)
        ax.plot([-0.3, 0.3], [g.real_median.iloc[0]] * 2, color="k", lw=1.5)
        labels = ["real range"]
        for k, t in enumerate([t for t in TRIVIAL_MAPS if t in set(g.trivial)], start=1):
            v = g[g.trivial == t].trivial_score.iloc[0]
            ax.bar(k, v, width=0.6, color=TRIVIAL_COLOURS.get(t, "grey"))
            labels.append(t)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("Trivial maps vs the range of real methods (mean over models)")
    fig.tight_layout()
    return fig


def refine_bars(refine: pd.DataFrame):
    """Base vs RefineCAM at the shallowest layer, mean over models, per metric."""
    t = refine[(refine.model == "mean") & refine.refined.notna()]
    metrics = list(dict.fromkeys(t.metric))
    fig = Figure(figsize=(5 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        g = t[t.metric == metric]
        x = np.arange(len(g))
        ax.bar(x - 0.2, g.base, 0.4, label="base", color="tab:grey")
        ax.bar(x + 0.2, g.refined, 0.4, label="RefineCAM", color="tab:green")
        ax.set_xticks(x, g.method, rotation=30, ha="right")
        ax.set_title(f"{metric} at {g.layer.iloc[0]}" if len(g) else metric, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("RefineCAM before / after (mean over models)")
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
