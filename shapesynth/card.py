"""The dataset card (README.md with HF YAML metadata) and `backgrounds.json`.

Filled from the template in ``data_cards/dataset_card.md`` with counts read back from the
written data, the background pools with their hashes, an example grid and the shortcut audit.
Nothing in it depends on how many processes or machines wrote the data.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd

from shapesynth import CLASS_NAMES
from shapesynth.audit import audit_passed, shortcut_audit
from shapesynth.backgrounds import BackgroundPool
from shapesynth.config import SPLITS, SynthConfig
from shapesynth.preview import write_preview
from shapesynth.readers import dataset_fingerprint, load_metadata
from shapesynth.schema import atomic_write
from shapesynth.writers import get_format

TEMPLATE_DIRS = (Path(__file__).resolve().parents[1] / "data_cards", Path(__file__).resolve().parent / "templates")


def template_text(name: str = "dataset_card.md") -> str:
    for d in TEMPLATE_DIRS:
        if (d / name).exists():
            return (d / name).read_text()
    raise FileNotFoundError(f"dataset card template {name} not found in {[str(d) for d in TEMPLATE_DIRS]}")


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.3g}") -> str:
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return floatfmt.format(v)
        return str(v)

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def _counts(metas: dict[str, pd.DataFrame]) -> tuple[str, str]:
    rows = []
    for split, m in metas.items():
        counts = m["label"].value_counts().reindex(range(len(CLASS_NAMES)), fill_value=0)
        rows.append([split, *counts.tolist(), int(counts.sum())])
    counts = pd.DataFrame(rows, columns=["split", *CLASS_NAMES, "total"])
    allm = pd.concat(list(metas.values()), ignore_index=True)
    band = pd.crosstab(allm["size_band"], allm["label"]).reindex(columns=range(len(CLASS_NAMES)), fill_value=0)
    band.columns = list(CLASS_NAMES)
    band.insert(0, "size band", band.index)
    return _md_table(counts), _md_table(band.reset_index(drop=True))


def _band_words(cfg: SynthConfig) -> str:
    return ", ".join(f"band {k}: {lo}-{hi} px" for k, (lo, hi) in enumerate(cfg.band_px(b) for b in range(len(cfg.size_bands))))


def _backgrounds(cfg: SynthConfig, pools: dict[str, BackgroundPool]) -> tuple[str, dict]:
    rows, listing = [], {}
    skipped = [s for p in pools.values() for s in p.skipped]
    for split in SPLITS:
        p = pools[split]
        rows.append([split, len(p), p.digest()[:16]])
        listing[split] = [{"name": n, "sha256": h} for n, h in zip(p.names, p.hashes)]
    # what draw_background applies per sample: only the augmentations the config turns on
    augment = ["a random crop"] + [name for name, on in (
        ("flips", cfg.bg_flip), ("channel permutation", cfg.bg_channel_shuffle), ("colour jitter", cfg.bg_jitter > 0)) if on]
    text = [
        f"Source: `{cfg.background}`" + (f" (`{cfg.bg_path or cfg.bg_split_paths}`)" if cfg.background != "procedural" else "")
        + ". Pools are disjoint by sha256 of the decoded pixels, up to the flips and channel "
        "permutations the config applies (checked before generation); each sample "
        f"takes one base with {', '.join(augment[:-1]) + ' and ' + augment[-1] if len(augment) > 1 else augment[0]}.",
        "",
        _md_table(pd.DataFrame(rows, columns=["pool", "bases", "pool digest"])),
        "",
        "Every base with its hash: `backgrounds.json`.",
    ]
    if skipped:
        text += ["", f"{len(skipped)} background file(s) were skipped as unreadable or duplicate:", ""]
        text += [f"- `{name}`: {reason}" for name, reason in skipped[:50]]
    listing["skipped"] = [{"name": n, "reason": r} for n, r in skipped]
    return "\n".join(text), listing


def _audit(metas: dict[str, pd.DataFrame], alpha: float) -> tuple[str, bool | None, list[str]]:
    """(card text, verdict, the splits too small to audit).

    The verdict is False when an audited split fails, None when none fails but a split was too
    small to audit (that does not count as passed), True when every split was audited and passed.
    """
    parts, ok, not_audited = [], True, []
    for split, m in metas.items():
        if len(m) < 2 * len(CLASS_NAMES):
            parts.append(f"**{split}**: too few samples ({len(m)}) to audit.\n")
            not_audited.append(split)
            continue
        tests = shortcut_audit(m, alpha=alpha)
        ok &= audit_passed(tests)
        df = pd.DataFrame(
            [[t.variable, t.view, t.method, t.statistic, t.p_value, "independent" if t.passed else "DEPENDENT"] for t in tests],
            columns=["variable", "view", "test", "statistic", "p-value", "verdict"],
        )
        verdict = "passes" if audit_passed(tests) else "FAILS"
        parts.append(f"**{split}** ({len(m)} samples) {verdict}:\n\n{_md_table(df)}\n")
    head = (
        f"Null hypothesis per row: the label is independent of the variable. A row fails when its "
        f"p-value is below {alpha} / (number of rows) (Bonferroni). Chi-square tests use "
        "contingency tables label x category; Kruskal-Wallis tests compare the variable's "
        "distribution across the six classes."
    )
    if not ok:
        overall = "**Overall: FAILED** (see the splits below)."
    elif not_audited:
        overall = (f"**Overall: incomplete**: {', '.join(not_audited)} not audited (fewer than "
                   f"{2 * len(CLASS_NAMES)} samples), which does not count as passed.")
    else:
        overall = "**Overall: passed.**"
    return head + "\n\n" + overall + "\n\n" + "\n".join(parts), (False if not ok else None if not_audited else True), not_audited


def write_card(
    out: str | Path,
    cfg: SynthConfig,
    pools: dict[str, BackgroundPool],
    fmt: str,
    alpha: float = 0.01,
    samples_per_shard: int = 500,
) -> dict:
    """Write README.md, examples.png and backgrounds.json; return the audit verdict and counts."""
    out = Path(out)
    metas = {s: load_metadata(out, s) for s in SPLITS if cfg.split_size(s) > 0}
    counts_table, band_table = _counts(metas)
    bg_text, listing = _backgrounds(cfg, pools)
    atomic_write(out / "backgrounds.json", json.dumps(listing, indent=1, sort_keys=True) + "\n")
    audit_text, audit_ok, not_audited = _audit(metas, alpha)
    preview_split = next(s for s in ("train", "test", "val") if s in metas and len(metas[s]))
    write_preview(out, out / "examples.png", split=preview_split, per_class=3, scale=2 if cfg.image_size < 96 else 1)
    writer = get_format(fmt)
    configs_yaml = "\n".join(f"  - split: {s}\n    path: {writer.data_files(s)}" for s in metas)
    load = {
        "hub": 'from datasets import load_dataset\nds = load_dataset("path/or/repo_id")  # splits: ' + ", ".join(metas),
        "imagefolder": 'from datasets import load_dataset\nds = load_dataset("imagefolder", data_dir="path")',
        "arrow": 'from datasets import load_from_disk\nds = load_from_disk("path")',
    }[fmt]
    load += "\n# or, as torch tensors with joint transforms:\nfrom shapesynth.torchdata import ShapesDataset\ntest = ShapesDataset(\"path\", split=\"test\")"
    total = sum(len(m) for m in metas.values())
    fields = {
        "pretty_name": f"shapesynth shapes ({cfg.image_size} px, {cfg.background} backgrounds)",
        "size_category": size_category(total),
        "configs_yaml": configs_yaml,
        "class_list": ", ".join(CLASS_NAMES),
        "background_words": {"procedural": "built-in procedural clutter", "folder": "the user's background images", "hf": "a Hugging Face image dataset"}[cfg.background],
        "fingerprint": dataset_fingerprint(out),
        "load_snippet": load,
        "counts_table": counts_table + f"\n\nSize bands: {_band_words(cfg)} (image {cfg.image_size} px).",
        "band_table": band_table,
        "background_section": bg_text,
        "audit_section": audit_text,
        "config_json": cfg.to_json(),
        "regen_command": f"shapesynth generate --config shapesynth.json --out DIR --format {fmt} --samples-per-shard {samples_per_shard}",
    }
    atomic_write(out / "README.md", string.Template(template_text()).substitute(fields))
    return {"audit_passed": audit_ok, "not_audited": not_audited, "samples": total,
            "fingerprint": fields["fingerprint"]}
