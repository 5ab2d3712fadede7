"""``shapesynth-eval report``: one self-contained HTML page (figures embedded as base64, opens
from disk without a server) plus the figures as PNG files beside it."""

from __future__ import annotations

import base64
import html
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from shapesynth.schema import atomic_write
from validation import analyze as A
from validation.pipeline.table import IDENTITY, check_merge_current, read_json

FIGURES = {
    "correlation": "Metric validity: correlation with the ground-truth cosine",
    "trivial": "Trivial maps vs real methods",
    "refinecam": "RefineCAM before / after",
    "road_curves": "ROAD curves",
    "qualitative": "Qualitative grid",
}


def load_tables(run_dir: Path, n_boot: int = 1000) -> dict[str, pd.DataFrame]:
    """The analysis tables of a run, computed now if ``analyze`` has not been run or ran before
    the last merge (the tables would describe an older ``results.parquet``)."""
    folder = run_dir / "analysis"
    check_merge_current(run_dir)
    files = [folder / f"{name}.csv" for name in A.TABLES]
    results = run_dir / "results.parquet"
    if (not all(f.exists() for f in files) or not results.exists()
            or min(f.stat().st_mtime_ns for f in files) < results.stat().st_mtime_ns):
        return A.analyze_run(run_dir, folder, n_boot=n_boot)
    return {name: read_table(folder / f"{name}.csv") for name in A.TABLES}


def read_table(path: Path) -> pd.DataFrame:
    """An analysis table written by ``analyze``; only empty cells are missing values: "n/a" (an
    expectation not checked) is a value, not NaN."""
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def grid_maps(run_dir: Path, names: list[str]) -> tuple[str | None, list[Path]]:
    """The model the qualitative grid shows, the first of the run's models with maps saved for the
    report (``--save-maps``; a model may have none in the saved range, e.g. all misclassified),
    and its maps files; (None, []) when no model has any. Listed once per report: the figure
    and its caption then name the same model even if chunks are written meanwhile."""
    for name in names:
        files = sorted((Path(run_dir) / "chunks" / name).glob("*.maps.npz"))
        if files:
            return name, files
    return None, []


def load_saved_maps(run_dir: Path, model: str, files: list[Path] | None = None) -> dict | None:
    """Concatenate the maps kept for the report (``--save-maps``) over a model's chunks
    (``files``: its maps files as `grid_maps` listed them; default: listed now)."""
    files = grid_maps(run_dir, [model])[1] if files is None else list(files)
    if not files:
        return None
    parts = [dict(np.load(f, allow_pickle=False)) for f in files]
    # a configuration that failed on a chunk's images has no maps there: the grid keeps every
    # chunk's images and shows the configurations all chunks hold, naming the others
    held = [[str(c) for c in p["configs"]] for p in parts]
    configs = [c for c in held[0] if all(c in h for h in held)]
    lacking = {c: [f.name for f, h in zip(files, held) if c not in h] for c in dict.fromkeys(sum(held, []))
               if c not in configs}
    if lacking:
        warnings.warn(f"report: {model}'s qualitative grid leaves out configurations whose maps some chunks "
                      f"lack: " + "; ".join(f"{c} (not in {', '.join(names)})" for c, names in lacking.items()),
                      stacklevel=2)
    out = {"configs": np.asarray(configs, dtype=str)}
    for key in ["images", "x", "gt", "labels"]:
        out[key] = np.concatenate([p[key] for p in parts])
    for i, c in enumerate(configs):
        out[f"map_{i}"] = np.concatenate([p[f"map_{h.index(c)}"] for p, h in zip(parts, held)])
    return out


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table_html(df: pd.DataFrame, max_rows: int = 400) -> str:
    if df is None or df.empty:
        return "<p><em>no rows: the run has no data for this table</em></p>"
    shown = df.head(max_rows)
    text = shown.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="nan", border=0,
                         classes="t", escape=True)
    if len(df) > max_rows:
        text += f"<p><em>{len(df) - max_rows} more rows in the CSV</em></p>"
    return text


def _summary(run_dir: Path) -> str:
    man = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").exists() else {}
    cfg = man.get("config") or (read_json(run_dir / "run_config.json") if (run_dir / "run_config.json").exists() else {})
    items = []
    for name, meta in (cfg.get("model_meta") or {}).items():
        imgs = man.get("images", {}).get(name, {})
        acc = meta.get("test_accuracy")
        items.append(f"<li><b>{html.escape(name)}</b>: arch {html.escape(str(meta.get('arch')))}, "
                     f"test accuracy {acc if acc is None else f'{float(acc):.4f}'}; "
                     f"{imgs.get('evaluated', '?')} images evaluated, {imgs.get('misclassified', '?')} "
                     f"misclassified and skipped {imgs.get('misclassified_images', [])[:20]}</li>")
    rows = [
        ("data", cfg.get("data")), ("data fingerprint", cfg.get("data_fingerprint")),
        ("image range", cfg.get("image_range")), ("methods", ", ".join(cfg.get("methods", []))),
        ("layers", ", ".join(cfg.get("layers", []))), ("aggregators", ", ".join(cfg.get("mixes", []))),
        ("metrics", ", ".join(cfg.get("metrics", []))),
        ("method options (budget)", json.dumps(cfg.get("method_options", {}), sort_keys=True)),
        ("per-method grid (budget)", json.dumps(cfg.get("method_grid", {}), sort_keys=True)),
        ("RefineCAM fuses", ", ".join(cfg.get("refine_layers", []))),
        ("metric options", json.dumps(cfg.get("metric_options", {}), sort_keys=True)),
        ("rows / status", f"{man.get('rows')} rows, {man.get('status_counts')}"),
        ("compute time", f"{man.get('compute_seconds', 0):.0f} s of map+metric time (sum over chunks)"),
        ("versions", json.dumps(man.get("versions", {}), sort_keys=True)),
    ]
    # a merge with --allow-partial: the tables lack the missing chunks' images, which must be said
    chunks = man.get("chunks") or {}
    missing = chunks.get("missing") or []
    shown = ", ".join(f"{m}[{a}:{b}]" for m, a, b in missing[:20]) + (" ..." if len(missing) > 20 else "")
    if chunks:
        rows.insert(3, ("chunks merged", f"{chunks.get('merged')} of {chunks.get('expected')}"
                                         + (f"; missing: {shown}" if missing else "")))
    profile = run_dir / "profile.json"
    if profile.exists():
        rows.insert(0, ("profile", json.dumps(read_json(profile), sort_keys=True)))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    warning = (f"<p class='FAILS'>Partial run: {len(missing)} of {chunks.get('expected')} chunks were not "
               f"merged ({html.escape(shown)}); every table and figure below lacks their images.</p>"
               if missing else "")
    return f"{warning}<ul>{''.join(items)}</ul><table class='kv'>{table}</table>"


def make_figures(run_dir: Path, tables: dict, fig_dir: Path,
                 grid: tuple[str | None, list[Path]] | None = None) -> dict[str, Path]:
    """The report's figures; ``grid``: the qualitative grid's model and maps files (`grid_maps`,
    listed here when not given)."""
    from validation.report import figures as F

    cfg = read_json(run_dir / "run_config.json") if (run_dir / "run_config.json").exists() else {}
    layers = cfg.get("layers") or []
    shallow = layers[0] if layers else None
    made = {}
    if len(tables.get("a_validity", [])):
        made["correlation"] = F.save(F.correlation_bars(tables["a_validity"]), fig_dir / "correlation.png")
    if len(tables.get("b_trivial", [])):
        made["trivial"] = F.save(F.trivial_bars(tables["b_trivial"]), fig_dir / "trivial.png")
    refine = tables.get("c_refinecam", pd.DataFrame())
    if len(refine) and refine["refined"].notna().any():
        made["refinecam"] = F.save(F.refine_bars(tables["c_refinecam"]), fig_dir / "refinecam.png")
    if len(tables.get("f_road_curves", [])):
        made["road_curves"] = F.save(F.road_curves(tables["f_road_curves"], shallow), fig_dir / "road_curves.png")
    model, files = grid if grid is not None else grid_maps(run_dir, cfg.get("model_names") or [])
    saved = load_saved_maps(run_dir, model, files) if model is not None else None
    if saved is not None:
        configs = [str(c) for c in saved["configs"]]
        # one map per method: the unrefined map at the shallowest layer (or layer-free)
        columns, seen = [], set()
        for c in configs:
            method = c.split("@")[0].split("+")[0]
            if "+" in c or method in seen or ("@" in c and shallow and not c.endswith(f"@{shallow}")):
                continue
            seen.add(method)
            columns.append(c)
        pair = None
        for base in ("gradcampp", "gradcam", "layercam", "scorecam", "shapleycam"):
            if shallow and f"{base}@{shallow}+product" in configs:
                pair = (f"{base}@{shallow}", f"{base}@{shallow}+product")
                break
        made["qualitative"] = F.save(F.qualitative_grid(saved, columns, pair), fig_dir / "qualitative.png", dpi=90)
    # a figure an earlier report made that this run has no data for (another configuration since,
    # no saved maps) would stay beside this report's figures as if it were one of them
    for name in FIGURES.keys() - made.keys():
        (fig_dir / f"{name}.png").unlink(missing_ok=True)
    return made


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table.t,table.kv{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}
table.t td,table.t th,table.kv td,table.kv th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.kv th{text-align:left;background:#f4f4f4}table.kv td{text-align:left;word-break:break-all}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ddd;margin-top:2em}
.holds{color:#070}.FAILS{color:#b00;font-weight:bold}"""


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, n_boot: int = 1000) -> Path:
    """Write ``index.html`` and ``figures/*.png`` into ``out_dir`` (default RUN_DIR/report)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    tables = load_tables(run_dir, n_boot=n_boot)
    config = run_dir / "run_config.json"
    grid = grid_maps(run_dir, (read_json(config) if config.exists() else {}).get("model_names") or [])
    figs = make_figures(run_dir, tables, out_dir / "figures", grid)
    exp = tables.get("expectations", pd.DataFrame())
    exp_rows = "".join(
        f"<tr><td>{html.escape(str(r.expectation))}</td><td>{html.escape(str(r.found))}</td>"
        f"<td class='{html.escape(str(r.status))}'>{html.escape(str(r.status))}</td></tr>"
        for r in exp.itertuples()) if len(exp) else ""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>shapesynth meta-evaluation: "
             f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Meta-evaluation report: {html.escape(run_dir.name)}</h1>",
             "<p>Do attribution metrics agree with pixel-exact ground truth, and can a trivial map fool "
             "them? Every number below comes from this run's long table (<code>results.parquet</code>); "
             "the tables are in <code>analysis/</code> as CSV.</p>",
             "<h2>Run</h2>", _summary(run_dir),
             "<h2>Expectations from the papers, as found</h2>",
             "<table class='t'><tr><th>expectation</th><th>found</th><th>status</th></tr>" + exp_rows + "</table>"
             if exp_rows else "<p><em>no expectations could be checked</em></p>"]
    sections = [
        ("a_validity", "correlation"), ("a_paired", None), ("b_trivial_verdict", "trivial"), ("b_trivial", None),
        ("c_refinecam", "refinecam"), ("d_aggregators", None), ("e_localisation", None),
        ("f_road_curves", "road_curves"),
    ]
    for name, fig in sections:
        parts.append(f"<h2>{html.escape(name)}: {html.escape(A.TABLES[name])}</h2>")
        if fig in figs:
            parts.append(_img_tag(figs[fig], FIGURES[fig]))
        table = tables.get(name, pd.DataFrame())
        if name == "f_road_curves" and len(table):
            table = table[table["mix"] == IDENTITY]
        parts.append(_table_html(table))
    timing = run_dir / "timing.csv"
    if timing.exists():
        t = pd.read_csv(timing)
        if len(t):
            t["s_per_image"] = t["seconds"] / t["images"].clip(lower=1)
            piv = t.pivot_table(index="config", columns="model", values="s_per_image").reset_index()
            parts.append("<h2>Cost per configuration</h2><p>Seconds per image for the map and all its "
                         "metrics (wall time inside the run, summed over chunks; other jobs may have shared "
                         "the machine).</p>" + _table_html(piv))
    if "qualitative" in figs:
        parts.append(f"<h2>Qualitative grid</h2><p>Model {html.escape(str(grid[0]))}: image, ground truth, each "
                     "method's unrefined map at the shallowest layer (layer-free methods as they are), then base "
                     "vs RefineCAM (product).</p>")
        parts.append(_img_tag(figs["qualitative"], FIGURES["qualitative"]))
    parts.append("</body></html>")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    atomic_write(path, "\n".join(parts))
    return path


__all__ = ["write_report", "make_figures", "load_tables", "load_saved_maps", "grid_maps"]
