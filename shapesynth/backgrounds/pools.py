"""Background pools: one finite pool of base images per split, disjoint by pixel hash.

A pool holds decoded RGB uint8 bases. Each sample takes one base and applies a random crop,
flips, channel shuffle and colour jitter from its own stream (`draw_background`).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np

from shapesynth.config import SPLITS, SynthConfig
from shapesynth.streams import uniform_int


class BackgroundError(ValueError):
    """Backgrounds that cannot be used (the message names the files or the folder)."""


class BackgroundOverlapError(BackgroundError):
    """The same background (by hash of its decoded pixels) sits in two pools."""


def pixel_hash(image: np.ndarray) -> str:
    """sha256 of the decoded pixels and their shape: identical for the same picture in any file format."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h = hashlib.sha256(str(image.shape).encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class BackgroundPool:
    split: str
    images: list[np.ndarray]
    names: list[str]
    hashes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def __len__(self) -> int:
        return len(self.images)

    def digest(self) -> str:
        """One hash for the whole pool (order-independent)."""
        return hashlib.sha256("\n".join(sorted(self.hashes)).encode()).hexdigest()


def _flip_shuffle_signature(image: np.ndarray, shuffle: bool = True) -> bytes:
    """A cheap key that the per-sample flips (and channel permutations, with ``shuffle``) leave
    unchanged: the shape and the per-channel histograms, sorted with ``shuffle`` (equal for every
    image `augmentation_hash` can find equal)."""
    image = np.asarray(image, dtype=np.uint8)
    hists = [np.bincount(image[..., c].ravel(), minlength=256).tobytes() for c in range(image.shape[2])]
    return str(image.shape).encode() + b"".join(sorted(hists) if shuffle else hists)


def augmentation_hash(image: np.ndarray, flip: bool = True, shuffle: bool = True) -> str:
    """The smallest `pixel_hash` over the flips (4, with ``flip``) x channel orders (6, with
    ``shuffle``) of an image.

    Two bases with the same augmentation hash give exactly the same set of backgrounds under the
    per-sample flips and channel permutation that the config turns on (`draw_background`), so
    they are one background.
    """
    image = np.asarray(image, dtype=np.uint8)
    flips = (image, image[:, ::-1], image[::-1], image[::-1, ::-1]) if flip else (image,)
    orders = itertools.permutations(range(3)) if shuffle else [(0, 1, 2)]
    return min(pixel_hash(f[..., list(p)]) for p in orders for f in flips)


def augmentation_twins(images: list[np.ndarray], flip: bool = True, shuffle: bool = True) -> dict[int, str]:
    """`augmentation_hash` of every image that shares its flip/shuffle signature with another
    (by position in `images`); images that match nothing are left out, so the hashes are only
    computed for the few candidates. Nothing when neither augmentation is on (the pixel hash
    alone decides then)."""
    if not (flip or shuffle):
        return {}
    groups: dict[bytes, list[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault(_flip_shuffle_signature(im, shuffle), []).append(k)
    return {k: augmentation_hash(images[k], flip, shuffle) for ks in groups.values() if len(ks) > 1 for k in ks}


def check_disjoint(pools: dict[str, BackgroundPool], flip: bool = True, shuffle: bool = True) -> None:
    """Refuse pools that share a background, naming every offending file.

    Shared means the same decoded pixels, or pixels one flip and/or channel permutation apart
    where the config's per-sample augmentation (``flip``: `bg_flip`, ``shuffle``:
    `bg_channel_shuffle`) turns such a pair into the very same backgrounds.
    """
    seen: dict[str, tuple[str, str]] = {}
    clashes: list[str] = []
    for split, pool in pools.items():
        for name, h in zip(pool.names, pool.hashes):
            if h in seen and seen[h][0] != split:
                clashes.append(f"{seen[h][1]} ({seen[h][0]}) == {name} ({split})")
            seen.setdefault(h, (split, name))
    entries = [(split, name, h, im) for split, pool in pools.items()
               for name, h, im in zip(pool.names, pool.hashes, pool.images)]
    first: dict[str, tuple[str, str, str]] = {}
    for k, key in sorted(augmentation_twins([e[3] for e in entries], flip, shuffle).items()):
        split, name, h, _ = entries[k]
        if key in first and first[key][0] != split and first[key][2] != h:  # exact copies are listed above
            clashes.append(f"{first[key][1]} ({first[key][0]}) == {name} ({split}) up to a flip or channel permutation")
        first.setdefault(key, (split, name, h))
    if clashes:
        listed = "\n  ".join(clashes[:50])
        more = f"\n  ... and {len(clashes) - 50} more" if len(clashes) > 50 else ""
        raise BackgroundOverlapError(
            f"{len(clashes)} background(s) appear in two pools (same decoded pixels, up to a flip or "
            f"channel permutation):\n  {listed}{more}"
        )


def fit_to_crop(image: np.ndarray, side: int, policy: str, name: str) -> np.ndarray:
    """Make sure a base can give a side x side crop: upscale or refuse, as the policy says."""
    h, w = image.shape[:2]
    if min(h, w) >= side:
        return image
    if policy == "refuse":
        raise BackgroundError(
            f"background {name} is {w}x{h}, smaller than the {side}x{side} image; "
            "pass --small-backgrounds upscale (bg_small='upscale') to upscale such files"
        )
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


def draw_background(pool: BackgroundPool, u: np.ndarray, cfg: SynthConfig) -> tuple[np.ndarray, dict]:
    """A fresh image_size x image_size background from the pool, plus what was drawn.

    `u` holds 11 independent uniforms in [0, 1): base, crop y and x, two flips, three for the
    channel permutation, three for the jitter.
    """
    side = cfg.image_size
    base_id = uniform_int(u[0], 0, len(pool))
    base = pool.images[base_id]
    h, w = base.shape[:2]
    y, x = uniform_int(u[1], 0, h - side + 1), uniform_int(u[2], 0, w - side + 1)
    crop = base[y : y + side, x : x + side]
    flip_h = bool(cfg.bg_flip and u[3] < 0.5)
    flip_v = bool(cfg.bg_flip and u[4] < 0.5)
    if flip_h or flip_v:
        crop = cv2.flip(crop, -1 if (flip_h and flip_v) else (1 if flip_h else 0))
    perm = np.argsort(u[5:8], kind="stable") if cfg.bg_channel_shuffle else np.arange(3)
    j = cfg.bg_jitter
    brightness, contrast, saturation = (1.0 + j * (2.0 * u[8:11] - 1.0)).tolist()
    # channel shuffle, saturation, contrast and brightness are one affine colour map:
    # p' = contrast * (grey + saturation * (p - grey) - mean) + brightness * mean,
    # with grey the channel mean of p and mean the mean grey of the crop; cv2.transform applies
    # it in one rounding, saturating pass.
    matrix = contrast * (saturation * np.eye(3) + (1.0 - saturation) / 3.0)
    matrix = matrix @ np.eye(3)[perm]
    mean = float(np.mean(cv2.mean(crop)[:3]))
    offset = (brightness - contrast) * mean
    affine = np.concatenate([matrix, np.full((3, 1), offset)], axis=1)
    crop = cv2.transform(np.ascontiguousarray(crop), affine)
    meta = {
        "bg_pool": pool.split,
        "bg_id": base_id,
        "bg_name": pool.names[base_id],
        "bg_crop": [x, y],
        "bg_flip": [flip_h, flip_v],
        "bg_channels": perm.tolist(),
        "bg_jitter": [brightness, contrast, saturation],
    }
    return crop, meta


# ---------------------------------------------------------------------- user images
def to_rgb(image) -> np.ndarray:
    """A PIL image in any mode (grey, RGBA, palette, 16-bit, float) as RGB uint8 (H, W, 3)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image)
        if image.mode.startswith("I;16"):
            arr = arr.astype(np.float64) / 65535.0
        else:  # 32-bit int or float: scale by the range the values actually span
            arr = arr.astype(np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        grey = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # transparent pixels become the colour stored under them
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@dataclass
class Candidate:
    """A user background before pooling: a name (file or row) and its decoded RGB pixels."""

    name: str
    image: np.ndarray
    hash: str


def decode_candidates(items, strict: bool) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Decode (name, opener) pairs; failures are errors under `strict`, else skipped and listed."""
    good, skipped = [], []
    for name, opener in items:
        try:
            with opener() as img:
                img.load()
                rgb = to_rgb(img)
            if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
                raise ValueError(f"decoded to shape {rgb.shape}")
        except Exception as err:  # noqa: BLE001 - any decoder failure means an unusable file
            reason = f"{type(err).__name__}: {err}"
            if strict:
                raise BackgroundError(f"cannot read background {name}: {reason}") from err
            skipped.append((name, reason))
            continue
        good.append(Candidate(name, rgb, pixel_hash(rgb)))
    return good, skipped


def _dedupe(cands: list[Candidate], skipped: list[tuple[str, str]], cfg: SynthConfig) -> list[Candidate]:
    """Keep the first of every group of candidates that are one background: the same pixels,
    or pixels a flip and/or channel permutation apart where the config's augmentation makes
    them one (see `augmentation_hash`)."""
    twins = augmentation_twins([c.image for c in cands], cfg.bg_flip, cfg.bg_channel_shuffle)
    first: dict[str, tuple[str, str]] = {}
    unique = []
    for k, c in enumerate(cands):
        key = twins.get(k, c.hash)
        if key in first:
            name, h = first[key]
            how = "same pixels" if h == c.hash else "same pixels up to a flip or channel permutation"
            skipped.append((c.name, f"duplicate of {name} ({how})"))
            continue
        first[key] = (c.name, c.hash)
        unique.append(c)
    return unique


def hash_split(
    cands: list[Candidate], fractions: dict[str, float], where: str, pools: tuple[str, ...] = SPLITS
) -> dict[str, list[Candidate]]:
    """Deal backgrounds into `pools` by their pixel hash (independent of file names and order).

    Each background goes to the split whose cumulative fraction covers its hash, read as a
    uniform number; every pool then gets at least one by moving the lowest-hash members if
    needed, and too few backgrounds overall is an error. A pool without a fraction > 0 is an
    error (`bg_pool_fractions`): every split draws from a pool of its own.
    """
    unshared = [s for s in pools if not fractions.get(s, 0) > 0]
    if unshared:
        raise BackgroundError(
            f"bg_pool_fractions {dict(fractions)} gives the {unshared} pool(s) no share of the backgrounds in "
            f"{where}: every split draws its backgrounds from a pool of its own, so each of {list(pools)} "
            "needs a fraction > 0"
        )
    # the pools' order on the unit interval must not follow the mapping's key order: a config read
    # back from shapesynth.json (keys sorted) would otherwise deal the same files differently
    rank = {s: k for k, s in enumerate(SPLITS)}
    splits = sorted((s for s in fractions if fractions[s] > 0), key=lambda s: (rank.get(s, len(rank)), s))
    if len(cands) < len(splits):
        raise BackgroundError(
            f"too few backgrounds in {where}: {len(cands)} usable image(s) for the {len(splits)} "
            f"pools {splits}; need at least one per pool"
        )
    total = sum(fractions[s] for s in splits)
    edges = np.cumsum([fractions[s] / total for s in splits])
    pools: dict[str, list[Candidate]] = {s: [] for s in splits}
    for c in sorted(cands, key=lambda c: c.hash):
        u = int(c.hash[:13], 16) / 16.0**13
        pools[splits[min(int(np.searchsorted(edges, u, side="right")), len(splits) - 1)]].append(c)
    for s in splits:  # tiny folders: make sure no pool is empty, deterministically
        if not pools[s]:
            donor = max(splits, key=lambda k: len(pools[k]))
            pools[s].append(pools[donor].pop(0))
    return pools


def make_pools(groups: dict[str, list[Candidate]], skipped: list[tuple[str, str]], cfg: SynthConfig) -> dict[str, BackgroundPool]:
    """Fit every candidate to the crop size and wrap the groups as pools."""
    side = cfg.image_size
    pools = {}
    for split, cands in groups.items():
        images = [fit_to_crop(c.image, side, cfg.bg_small, c.name) for c in cands]
        pools[split] = BackgroundPool(
            split=split,
            images=images,
            names=[c.name for c in cands],
            hashes=[c.hash for c in cands],
            skipped=list(skipped) if split == "train" else [],
        )
    return pools


def pools_from_candidates(
    single: list[Candidate] | None,
    per_split: dict[str, list[Candidate]] | None,
    skipped: list[tuple[str, str]],
    cfg: SynthConfig,
    where: str,
) -> dict[str, BackgroundPool]:
    """Pools from one collection (dealt by hash) or from per-split collections (checked)."""
    if single is not None:
        groups = hash_split(_dedupe(single, skipped, cfg), cfg.bg_pool_fractions, where)
    else:
        groups = {s: _dedupe(c, skipped, cfg) for s, c in per_split.items()}
        if "val" not in groups and "train" in groups:
            # no val collection: deal a val pool out of train, by hash
            fr = {"train": cfg.bg_pool_fractions.get("train", 0.8), "val": cfg.bg_pool_fractions.get("val", 0.05)}
            groups.update(hash_split(groups.pop("train"), fr, f"{where} (train, to carve val)", pools=("train", "val")))
        for s, c in groups.items():
            if not c:
                raise BackgroundError(f"too few backgrounds: the {s!r} pool from {where} is empty")
    return make_pools(groups, skipped, cfg)
