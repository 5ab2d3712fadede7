"""`generate`: render a config to disk in any format, resumable and spreadable over machines."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from shapesynth.backgrounds import build_pools
from shapesynth.config import SynthConfig
from shapesynth.writers import (
    MANIFEST,
    OutputError,
    Shard,
    get_format,
    manifest_for,
    prepare_output,
    recipe_differences,
    shard_plan,
    write_shards,
)


@dataclass
class GenerateSummary:
    out: Path
    format: str
    written: int = 0  # samples rendered and written by this run
    resumed_shards: int = 0  # shards found finished and left alone
    written_shards: int = 0
    complete: bool = False  # every shard of every split exists (card written)
    seconds: float = 0.0
    skipped_backgrounds: list[tuple[str, str]] = field(default_factory=list)
    audit_passed: bool | None = None  # None: a split was too small to audit (not passed) or not complete
    not_audited: list[str] = field(default_factory=list)  # splits too small to audit
    fingerprint: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"output      {self.out} ({self.format})",
            f"written     {self.written} samples in {self.written_shards} shard(s), {self.seconds:.1f} s ({rate:.0f} samples/s)",
            f"resumed     {self.resumed_shards} finished shard(s) kept",
            "splits      " + ", ".join(f"{k}={v}" for k, v in self.counts.items()),
            f"backgrounds {len(self.skipped_backgrounds)} file(s) skipped",
        ]
        out += [f"  skipped {name}: {reason}" for name, reason in self.skipped_backgrounds[:20]]
        if len(self.skipped_backgrounds) > 20:
            out.append(f"  ... and {len(self.skipped_backgrounds) - 20} more (see backgrounds.json)")
        if self.complete:
            out.append(f"audit       {audit_verdict(self.audit_passed, self.not_audited, self.counts)}")
            out.append(f"fingerprint {self.fingerprint}")
        else:
            out.append("card        not written yet: other shards are missing (run the remaining --shard parts)")
        return out


def audit_verdict(passed: bool | None, not_audited: list[str], counts: dict[str, int]) -> str:
    """The summary's audit line: "passed" only when every split was audited and passed."""
    skipped = f"not run for {', '.join(not_audited)} (too few samples)"
    if passed is False:
        return "FAILED: see the card" + (f"; {skipped}" if not_audited else "")
    if not not_audited:
        return "passed"
    audited = [s for s, n in counts.items() if n > 0 and s not in not_audited]
    return skipped + (f"; {', '.join(audited)} passed" if audited else "")


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise OutputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise OutputError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def missing_shards(out: Path, cfg: SynthConfig, fmt: str, samples_per_shard: int) -> list[Shard]:
    """The shards of the recipe that are not (yet) in `out`."""
    writer = get_format(fmt)
    return [s for s in shard_plan(cfg, samples_per_shard) if not writer.done(out, s)]


def finished_shards(out: Path, cfg: SynthConfig, fmt: str, samples_per_shard: int) -> tuple[int, int] | None:
    """(finished, all) shards of the recipe in `out`; None when `out` holds no run of this recipe."""
    try:
        old = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or recipe_differences(old, manifest_for(cfg, fmt, samples_per_shard)):
        return None
    total = len(shard_plan(cfg, samples_per_shard))
    return total - len(missing_shards(out, cfg, fmt, samples_per_shard)), total


def finish(
    out: Path, cfg: SynthConfig, fmt: str, samples_per_shard: int, pools: dict, alpha: float = 0.01,
    progress: bool = True,
) -> dict | None:
    """Finalize the format and write the card once every shard is in `out` (None: some are missing).

    Both `generate` and `shapesynth card` end here, so a folder merged from `--shard` runs gets
    the same finishing step (e.g. the arrow conversion) whichever of them runs last.
    """
    from shapesynth.card import write_card

    if missing_shards(out, cfg, fmt, samples_per_shard):
        return None
    get_format(fmt).finalize(out, cfg, shard_plan(cfg, samples_per_shard), progress=progress)
    return write_card(out, cfg, pools, fmt, alpha=alpha, samples_per_shard=samples_per_shard)


def generate(
    cfg: SynthConfig,
    out: str | Path,
    fmt: str = "hub",
    num_proc: int = 1,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    resume: bool = False,
    samples_per_shard: int = 500,
    progress: bool = True,
    alpha: float = 0.01,
) -> GenerateSummary:
    """Write the dataset of `cfg` to `out`; returns what was done (see `GenerateSummary`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    writer = get_format(fmt)
    if num_proc < 1:
        raise OutputError(f"--num-proc must be >= 1, got {num_proc}")
    index, count = shard
    if not (_is_int(index) and _is_int(count) and count >= 1 and 0 <= index < count):
        raise OutputError(f"shard (--shard i/n) must be two ints with n >= 1 and 0 <= i < n, got {shard!r}")
    plan = shard_plan(cfg, samples_per_shard)
    start = time.perf_counter()
    pools = build_pools(cfg, num_proc=num_proc)  # bad backgrounds fail here, before the output folder is touched
    # a plain --shard run joins a folder other machines may be writing to: only an explicit
    # --resume may treat temp files found there as left by a killed run
    prepare_output(out, manifest_for(cfg, fmt, samples_per_shard, pools), overwrite=overwrite,
                   resume=resume or (count > 1 and not overwrite), clean_temp=resume, sharded=count > 1)
    mine = [s for k, s in enumerate(plan) if k % count == index]
    todo = [s for s in mine if not writer.done(out, s)]
    summary = GenerateSummary(out=out, format=fmt, resumed_shards=len(mine) - len(todo))
    summary.skipped_backgrounds = [s for p in pools.values() for s in p.skipped]
    summary.counts = {s: cfg.split_size(s) for s in ("train", "val", "test")}
    bar = tqdm(total=sum(s.stop - s.start for s in todo), unit="img", desc=f"generate {out.name}", disable=not progress)

    def on_done(_shard, n):
        summary.written += n
        summary.written_shards += 1
        bar.update(n)

    try:
        write_shards(cfg, out, fmt, todo, num_proc, on_done)
    finally:
        bar.close()
    card = finish(out, cfg, fmt, samples_per_shard, pools, alpha=alpha, progress=progress)
    if card is not None:
        summary.complete = True
        summary.audit_passed = card["audit_passed"]
        summary.not_audited = card["not_audited"]
        summary.fingerprint = card["fingerprint"]
    summary.seconds = time.perf_counter() - start
    return summary
