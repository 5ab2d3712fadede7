"""``shapesynth-eval run``: maps and metrics for every model, correctly classified test image,
method, layer and aggregator, into the long table (see :mod:`validation.pipeline.table`).

The work is cut into fixed image chunks; each finished chunk is written atomically with a
completion marker, so an interrupted run resumes at the first unfinished chunk and a run split
over processes (``shard=(i, n)``) produces the same files as one process.

The four collaborators are injectable (``components``) so the pipeline can be tested with
small stand-ins; by default they are the project's own:
``trainers.load_model``, ``shapesynth.torchdata.ShapesDataset``,
``validation.attributions.get_explainer`` and ``validation.metrics.evaluate``.

The checks made before any work (names, options, layers, models against the dataset, the
training data) are in :mod:`validation.pipeline.checks`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from validation._rng import seeded_global_rng
from validation.pipeline.checks import (
    _method_class,
    check_layers,
    check_metric_option_values,
    check_models_fit,
    check_training_data,
    refuse_unknown_methods,
    refuse_unknown_metrics,
    wanted_layers,
)
from validation.pipeline.shards import chunk_ranges, shard_chunks
from validation.pipeline.table import (
    IDENTITY,
    MERGED_FILES,
    NO_LAYER,
    stable_config,
    chunk_is_done,
    chunk_stem,
    config_hash,
    config_label,
    merge_run,
    read_json,
    run_identity,
    sha256_file,
    write_chunk,
    write_json,
)

# Every metric of the contract of validation.metrics (faithfulness, ground truth, localisation).
DEFAULT_METRICS = ("average_drop", "complexity", "coherency", "adcc", "road", "arcc", "gt_cosine",
                   "pointing_game", "sparseness", "relevance_mass_accuracy", "relevance_rank_accuracy",
                   "topk_intersection", "localisation_auc")
# Methods that take a layer; of these, the gradient/score CAMs are refined by RefineCAM
# (the paper's Table 1). LaFAM takes a layer but is label-free and not part of the ablation.
LAYER_METHODS = ("gradcam", "gradcampp", "layercam", "scorecam", "shapleycam", "guidedgradcam", "lafam")
REFINABLE = ("gradcam", "gradcampp", "layercam", "scorecam", "shapleycam", "guidedgradcam")
# Baselines that need the ground truth to build their map.
NEEDS_GT = ("oracle",)
# Below this accuracy on the evaluated images a model has not learned the task: the run warns
# (its maps say little about what the metrics measure); results are computed as usual.
LOW_ACCURACY = 0.9


@dataclass
class RunConfig:
    data: str
    models: list[str]
    methods: list[str]
    metrics: list[str]
    layers: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage3", "stage4"])
    mixes: list[str] = field(default_factory=lambda: [IDENTITY])
    # RefineCAM at layer l fuses l and every deeper layer of this list (default: ``layers``),
    # so a run may evaluate few layers while refining over all four stages.
    refine_layers: list[str] = field(default_factory=list)
    # per-method overrides of the grid, e.g. {"scorecam": {"layers": ["stage1"], "mixes":
    # ["identity", "product"], "max_images": 64}}: budget knobs for expensive methods (max_images:
    # only the first N images of the range), stated in the report
    method_grid: dict = field(default_factory=dict)
    image_range: tuple[int, int] = (0, 200)
    split: str = "test"
    chunk_size: int = 16
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    metric_options: dict = field(default_factory=dict)
    save_maps: int = 8  # images (from the start of the range) whose maps are kept for the report
    model_names: list[str] = field(default_factory=list)
    device: str = "cpu"  # "cuda" on a GPU machine; maps and metrics stay on it
    # evaluate ``trainers.inference.inference_copy`` of each model: batch norm and VGG's pooled
    # classifier folded into their neighbours (same outputs to float rounding, VGG 1.4x faster at 64 px)
    fold: bool = True

    def __post_init__(self):
        if not self.refine_layers:
            self.refine_layers = list(self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_range"] = list(self.image_range)
        return d


@dataclass(frozen=True)
class MapConfig:
    method: str
    layer: str
    mix: str

    @property
    def label(self) -> str:
        return config_label(self.method, self.layer, self.mix)


def map_configs(methods: Sequence[str], layers: Sequence[str], mixes: Sequence[str],
                layer_methods=LAYER_METHODS, refinable=REFINABLE,
                refine_layers: Sequence[str] | None = None, method_grid: dict | None = None) -> list[MapConfig]:
    """Every (method, layer, mix) to compute. RefineCAM at layer l fuses l and all deeper layers
    of ``refine_layers`` (default ``layers``), so it is skipped at the deepest one (it would
    equal the min-max'd base map) and at layers not in ``refine_layers``. ``method_grid``
    overrides ``layers`` / ``mixes`` per method."""
    refine_layers = list(refine_layers or layers)
    method_grid = method_grid or {}
    unknown = sorted(set(method_grid) - set(methods))
    if unknown:
        raise ValueError(f"method_grid names methods that are not run: {unknown}")
    all_layers, all_mixes = layers, mixes
    unknown_mix = sorted(set(mixes).union(*[set((g or {}).get("mixes", [])) for g in (method_grid or {}).values()])
                         - {IDENTITY, "product", "geomean", "invexp"})
    if unknown_mix:
        raise ValueError(f"unknown --mix {unknown_mix}; choose from identity, product, geomean, invexp")
    out = []
    for method in methods:
        grid = method_grid.get(method) or {}
        bad = sorted(set(grid) - {"layers", "mixes", "max_images"})
        if bad:
            raise ValueError(f"method_grid[{method!r}]: unknown keys {bad}; use layers, mixes, max_images")
        layers, mixes = grid.get("layers", all_layers), grid.get("mixes", all_mixes)
        if method not in layer_methods:
            out.append(MapConfig(method, NO_LAYER, IDENTITY))
            continue
        for layer in layers:
            if IDENTITY in mixes:
                out.append(MapConfig(method, layer, IDENTITY))
            if (method in refinable and layer in refine_layers
                    and refine_layers.index(layer) < len(refine_layers) - 1):
                out.extend(MapConfig(method, layer, mix) for mix in mixes if mix != IDENTITY)
    return out


# ----------------------------------------------------------------------------- components
def _default_load_model(path):
    try:
        from trainers import load_model
    except ImportError as err:
        raise RuntimeError(f"cannot load --model {path}: trainers.load_model is unavailable ({err})") from None
    return load_model(path)


def _default_dataset(path, split):
    from shapesynth.torchdata import ShapesDataset

    return ShapesDataset(path, split=split)


def _method_accepts(method: str, option: str) -> bool:
    from validation.attributions.registry import _accepted_options

    return option in _accepted_options(_method_class(method))


def _default_explainer(model, cfg: MapConfig, layers: Sequence[str], options: dict, seed: int):
    """The project's explainer for one configuration; stochastic methods get the chunk seed."""
    from validation.attributions import get_explainer
    from validation.attributions.refine import UPSAMPLING_OPTIONS

    opts = dict(options.get(cfg.method, {}))
    if "seed" not in opts and _method_accepts(cfg.method, "seed"):
        opts["seed"] = seed
    if cfg.mix != IDENTITY:
        deeper = tuple(layers[layers.index(cfg.layer):])
        # RefineCAM upsamples the base's maps itself: the method's upsampling options are its own
        own = {k: opts.pop(k) for k in UPSAMPLING_OPTIONS if k in opts}
        return get_explainer("refinecam", model, base=cfg.method, layers=deeper, mix=cfg.mix,
                             base_options=opts, **own)
    if cfg.layer != NO_LAYER:
        opts["layer"] = cfg.layer
    return get_explainer(cfg.method, model, **opts)


def default_layer_methods() -> tuple[str, ...]:
    """Registered methods that take a layer (from the attributions registry)."""
    from validation.attributions import available_methods

    return tuple(m for m in available_methods()
                 if getattr(_method_class(m), "uses_layer", False) and m != "refinecam")


def default_refinable() -> tuple[str, ...]:
    """The layer methods RefineCAM refines: the paper's CAMs (``REFINABLE``) and every other
    registered layer method that gives maps at several layers (``_layer_maps``, which RefineCAM
    fuses), e.g. a user's CAM. LaFAM, label-free, stays out of the paper's ablation."""
    from validation.attributions.base import LayerExplainer

    return tuple(REFINABLE) + tuple(
        m for m in default_layer_methods()
        if m not in LAYER_METHODS and _method_class(m)._layer_maps is not LayerExplainer._layer_maps)


def _default_evaluate(model, x, target, maps, metrics, explainer, gt, options):
    from validation.metrics import evaluate

    return evaluate(model, x, target, maps, metrics=list(metrics), explainer=explainer, gt=gt, **options)


@dataclass
class Components:
    load_model: Callable = _default_load_model
    dataset: Callable = _default_dataset
    explainer: Callable = _default_explainer
    evaluate: Callable = _default_evaluate
    fingerprint: Callable | None = None
    # the dataset's samples fingerprint (None: shapesynth's), asked only of a model that recorded its
    # own and whose file fingerprint differs (`check_training_data`)
    samples_fingerprint: Callable | None = None
    # read from the attributions registry when the Components are made: a method registered with
    # ``validation.attributions.registry.register`` (a user's own) that takes a layer is run at
    # every layer and refined; a fixed list ran it once as layer-free, at its default layer
    layer_methods: Sequence[str] = field(default_factory=default_layer_methods)
    refinable: Sequence[str] = field(default_factory=default_refinable)


# ----------------------------------------------------------------------------- helpers
def chunk_seed(seed: int, start: int) -> int:
    """Seed of a chunk: depends on the run seed and the chunk's first image only."""
    digest = hashlib.sha256(f"{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _model_names(paths: Sequence[str], metas: Sequence[dict]) -> list[str]:
    names, seen = [], {}
    for path, meta in zip(paths, metas):
        base = str(meta.get("name") or meta.get("arch") or Path(path).stem)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _fingerprint(fn: Callable | None, shapesynth_name: str, path: str) -> str:
    """``fn(path)``, or shapesynth's function ``shapesynth_name`` where ``fn`` is None."""
    if fn is None:
        import shapesynth

        fn = getattr(shapesynth, shapesynth_name)
    return fn(path)


def _data_fingerprint(path: str, components: Components) -> str:
    try:
        return _fingerprint(components.fingerprint, "dataset_fingerprint", path)
    except Exception as err:  # recorded, not fatal: the manifest says why it is missing
        return f"unavailable: {type(err).__name__}: {err}"


def _data_samples_fingerprint(path: str, components: Components) -> str | None:
    """The dataset's samples fingerprint; None when it cannot be computed (not a shapesynth
    dataset, say): the training-data check then compares the files' fingerprints."""
    try:
        return _fingerprint(components.samples_fingerprint, "samples_fingerprint", path)
    except Exception:  # noqa: BLE001 - an unknown fingerprint only means the stricter comparison
        return None


def _error_text(where: str, err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    loc = f" at {Path(last.filename).name}:{last.lineno}" if last else ""
    stage = getattr(err, "pipeline_stage", None)
    where = f"{where} [{stage}]" if stage else where
    return f"{where}: {type(err).__name__}: {err}{loc}"[:500]


def _flatten_metric_values(result: dict, batch: int) -> dict[str, np.ndarray]:
    """evaluate()'s dict -> metric name -> float64 array (B,).

    Per-sample tensors (B,) pass through; curves given as ``{name: {fraction: Tensor(B)}}``, as
    a (B, K) tensor with ``result[name + "_fractions"]``, or as the ``road_morf`` / ``road_lerf``
    (B, F) attributes with ``road_fractions`` of validation.metrics' EvaluationResult become
    ``name@fraction`` columns (e.g. ``road_morf@0.2``).
    """
    out = {}
    fractions = getattr(result, "road_fractions", None)
    for attr in ("road_morf", "road_lerf"):
        curve = getattr(result, attr, None)
        if curve is not None and fractions is not None:
            arr = torch.as_tensor(curve).detach().double().cpu().numpy()
            for j, frac in enumerate(fractions):
                out[f"{attr}@{float(frac):g}"] = arr[:, j]
    for name, value in result.items():
        if isinstance(value, dict):
            for key, sub in value.items():
                arr = torch.as_tensor(sub).detach().double().cpu().numpy()
                if arr.shape == (batch,):
                    out[f"{name}@{key}"] = arr
            continue
        if not torch.is_tensor(value):
            continue
        arr = value.detach().double().cpu().numpy()
        if arr.shape == (batch,):
            out[name] = arr
        elif arr.ndim == 2 and arr.shape[0] == batch and f"{name}_fractions" in result:
            for j, frac in enumerate(torch.as_tensor(result[f"{name}_fractions"]).tolist()):
                out[f"{name}@{frac:g}"] = arr[:, j]
    return out


class _BoundGroundTruth:
    """An explainer that needs the ground truth (the oracle), with it bound, so metrics that
    re-run the method (Coherency) can call ``attribute(x, target)`` like any other."""

    def __init__(self, explainer, gt):
        self.explainer, self.gt = explainer, gt

    def attribute(self, x, target=None):
        # the masks belong to one batch: any other batch would get other images' ground truth
        if x.shape[0] != self.gt.shape[0]:
            raise ValueError(f"ground truth bound for {self.gt.shape[0]} images, called on {x.shape[0]}")
        return self.explainer.attribute(x, target, gt=self.gt)

    __call__ = attribute


def _subset_explainer(explainer, sl):
    """``explainer`` for the images ``sl`` of its batch (rebinds a bound ground truth)."""
    if isinstance(explainer, _BoundGroundTruth):
        return _BoundGroundTruth(explainer.explainer, explainer.gt[sl])
    return explainer


def _weights_fingerprint(path: str) -> str:
    """sha256 of the file holding a model's weights: a run folder's ``model.safetensors`` (what
    ``trainers.load_model`` reads from a folder), else the file given."""
    p = Path(path)
    if p.is_dir():
        try:
            from trainers.export import WEIGHTS
        except ImportError:
            WEIGHTS = "model.safetensors"
        p = p / WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"--model {path}: no weights file {p} to fingerprint")
    return "sha256:" + sha256_file(p)


def _warn(text: str) -> None:
    """A run-time notice on stderr (the run goes on), as the command line prints its warnings."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _canonical_method_names(config: RunConfig) -> RunConfig:
    """A copy of ``config`` with the registry's names for its methods and the keys of its method
    options and grid (``gradcam++`` -> ``gradcampp``, ``center`` -> ``centre``): an alias would
    otherwise run as a layer-free method at its default layer, and be a real method in the tables
    (the centre prior). Names the registry does not know stay as given, for the refusal that lists them."""
    from validation.attributions.registry import canonical_name

    def canon(name):
        try:
            return canonical_name(name)
        except ValueError:
            return name

    return replace(config, methods=list(dict.fromkeys(canon(m) for m in config.methods)),
                   method_options={canon(k): v for k, v in config.method_options.items()},
                   method_grid={canon(k): v for k, v in config.method_grid.items()})


# ----------------------------------------------------------------------------- the runner
class Runner:
    def __init__(self, config: RunConfig, out_dir: str | os.PathLike,
                 components: Components | None = None, progress: bool = True,
                 overwrite: bool = False, conflict_hint: str = "use another --out or --overwrite",
                 range_source: str | None = None):
        if (components or Components()).explainer is _default_explainer:
            config = _canonical_method_names(config)
        self.config = config
        self.conflict_hint = conflict_hint  # what to do when --out holds another run (audit has its own flags)
        # what set the image range, for the error when the split is smaller (default: --images a:b)
        self.range_source = range_source
        self.out = Path(out_dir)
        self.c = components or Components()
        self.progress = progress
        self.overwrite = overwrite
        self.configs = map_configs(config.methods, config.layers, config.mixes,
                                   self.c.layer_methods, self.c.refinable, config.refine_layers,
                                   config.method_grid)
        if not config.methods:
            raise ValueError("nothing to compute: no methods given")
        if not self.configs:  # methods given, but their layers and mixes leave no map to compute
            raise ValueError(
                f"nothing to compute: methods {list(config.methods)} with layers {list(config.layers)} and "
                f"mixes {list(config.mixes)} give no map ('identity' is the unrefined map; RefineCAM needs a "
                f"deeper layer of --refine-layers {list(config.refine_layers)} to fuse)")
        if not config.metrics:
            raise ValueError("nothing to compute: no metrics given")
        if not config.models:
            raise ValueError("no --model given")
        self._refuse_unknown_names_and_options()

    def _refuse_unknown_names_and_options(self):
        """With the project's own explainer and evaluate, an unknown method, metric or option is
        refused before any work (see `validation.pipeline.checks`)."""
        cfg = self.config
        if self.c.explainer is _default_explainer:
            refuse_unknown_methods(cfg.methods, cfg.method_options)
        if self.c.evaluate is _default_evaluate:
            refuse_unknown_metrics(cfg.metrics, cfg.metric_options)

    # -- setup ---------------------------------------------------------------------------
    def _load_models(self):
        models, metas = [], []
        for path in self.config.models:
            if not Path(path).exists():
                raise FileNotFoundError(f"--model {path}: no such checkpoint or run directory")
            model, meta = self.c.load_model(path)
            if self.config.fold:
                from trainers.inference import inference_copy

                model = inference_copy(model)
            models.append(model.to(self.config.device).eval())
            metas.append(dict(meta or {}))
        return models, metas

    def _prepare_config(self, metas) -> dict:
        cfg = self.config
        if not cfg.model_names:
            cfg.model_names = _model_names(cfg.models, metas)
        d = cfg.to_dict()
        d["model_meta"] = {n: {k: v for k, v in m.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
                           for n, m in zip(cfg.model_names, metas)}
        d["data_fingerprint"] = _data_fingerprint(cfg.data, self.c)
        # stable (not in VOLATILE_KEYS): chunks of other weights at the same path must not be merged
        d["model_weights"] = {n: _weights_fingerprint(p) for n, p in zip(cfg.model_names, cfg.models)}
        d["configs"] = [c.label for c in self.configs]
        return d

    def check_inputs(self) -> tuple[list, list[dict], object]:
        """Load the models and the dataset and make every check before work (image range, classes,
        layers, explainers, metric options); nothing is written. Returns (models, metas, dataset)."""
        models, metas = self._load_models()
        dataset = self.c.dataset(self.config.data, self.config.split)
        n_data = len(dataset)
        a, b = self.config.image_range
        if b > n_data:
            raise ValueError(f"{self.range_source or f'--images {a}:{b}'} asks for more images than the "
                             f"{self.config.split} split of {self.config.data} has ({n_data})")
        self._check_before_work(dataset, models, metas)
        return models, metas, dataset

    def _check_before_work(self, dataset, models, metas) -> None:
        """The checks of the loaded models and the dataset before anything is written (see
        `validation.pipeline.checks`): the layer and metric option checks hold for the project's
        own explainer and evaluate only."""
        cfg = self.config
        check_models_fit(dataset, metas, cfg.models, cfg.data, cfg.split)
        if self.c.explainer is _default_explainer:
            check_layers(cfg.models, models,
                         wanted_layers(self.configs, cfg.layers, cfg.refine_layers, cfg.method_options))
            self._check_explainers_build(models)
        if self.c.evaluate is _default_evaluate:
            check_metric_option_values(cfg.metrics, cfg.metric_options, dataset)

    def _check_explainers_build(self, models) -> None:
        """Every configuration's explainer is built for every model before any work: an option that
        its method, RefineCAM or a layer refuses (``cell_centres="model"`` at a layer whose cell
        geometry is not declared, say) would otherwise fail every image of that configuration."""
        cfg, problems = self.config, []
        for path, model in zip(cfg.models, models):
            for c in self.configs:
                try:
                    _default_explainer(model, c, cfg.refine_layers, cfg.method_options, seed=0)
                except (ValueError, TypeError) as err:
                    problems.append(f"--model {path}, {c.method} at {c.layer} ({c.mix}): {err}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError("these configurations cannot be explained: " + "; ".join(problems[:3]) + more)

    def _check_or_write_config(self, d: dict, shard: tuple[int, int], own_chunks) -> None:
        """Refuse a run directory holding another run; with ``overwrite``, discard this shard's
        chunks (all of them for an unsharded run: other shards' chunks are theirs to redo, and
        chunks of an older configuration are recomputed anyway, see `run_identity`)."""
        path = self.out / "run_config.json"
        self.run_id = run_identity(d)
        stable = stable_config(d)
        if path.exists() and not self.overwrite:
            old = read_json(path)
            old_stable = stable_config(old)
            old_w, new_w = old.get("model_weights") or {}, d.get("model_weights") or {}
            changed = sorted(n for n in new_w if n in old_w and old_w[n] != new_w[n])
            if changed:
                paths = [p for n, p in zip(self.config.model_names, self.config.models) if n in changed]
                raise ValueError(f"{path}: the weights of model(s) {changed} ({', '.join(paths)}) changed "
                                 f"since this run started; {self.conflict_hint}")
            if config_hash(old_stable) != config_hash(stable):
                diff = sorted(k for k in set(old_stable) | set(stable) if old_stable.get(k) != stable.get(k))
                legacy = ("; it was computed before models were folded for inference: resume it "
                          "with --no-fold (profile: eval.fold: false)") if "fold" in diff and "fold" not in old else ""
                raise ValueError(
                    f"{path}: this run directory holds a run with a different configuration "
                    f"(differs in {diff}){legacy}; {self.conflict_hint}")
            fp_old, fp_new = old.get("data_fingerprint"), d.get("data_fingerprint")
            if fp_old and fp_new and fp_old != fp_new:
                raise ValueError(f"{path}: the dataset changed since this run started "
                                 f"(fingerprint {fp_old} -> {fp_new}); {self.conflict_hint}")
            return
        if self.overwrite and (self.out / "chunks").exists():
            if shard[1] == 1:
                import shutil

                shutil.rmtree(self.out / "chunks")
            else:
                for name in self.config.model_names:
                    for start, stop in own_chunks:
                        stem = chunk_stem(self.out, name, start, stop)
                        for f in stem.parent.glob(f"{stem.name}.*"):
                            f.unlink()
        if self.overwrite:
            # the merged tables hold the discarded chunks' rows: kept, they would be read (analyze,
            # report, audit) as this run's until its next merge, with no chunk newer than them if
            # the run is stopped before its first chunk finishes
            for name in MERGED_FILES:
                (self.out / name).unlink(missing_ok=True)
        write_json(path, d)

    def _remove_killed_runs_temp_files(self, shard: tuple[int, int], own_chunks) -> None:
        """Remove the temp files (``.<name>.<8 chars>.tmp``) that a killed run (kill -9, out of
        memory, a power cut) left beside the files it was writing: those of this shard's chunks,
        which no other process writes, and for an unsharded run, which owns its folder, those of
        the merged tables too. Resumed after every kill, a long run would otherwise keep them all."""
        from shapesynth.schema import is_temp_file

        stems = {chunk_stem(self.out, name, s, e) for name in self.config.model_names for s, e in own_chunks}
        for folder in {stem.parent for stem in stems}:
            if folder.is_dir():
                for p in folder.iterdir():
                    # ".c0000000-0000016.results.parquet.ab12cd34.tmp" belongs to chunk c0000000-0000016
                    if is_temp_file(p) and folder / p.name[1:].split(".", 1)[0] in stems:
                        p.unlink(missing_ok=True)
        if shard[1] == 1:
            for p in self.out.iterdir():
                if is_temp_file(p):
                    p.unlink(missing_ok=True)

    # -- main ----------------------------------------------------------------------------
    def run(self, shard: tuple[int, int] = (0, 1), merge: bool | None = None) -> dict:
        """Compute this shard's unfinished chunks. Merges when the whole run is done
        (``merge=None``: only for an unsharded run). Returns a summary dict."""
        models, metas, dataset = self.check_inputs()
        cfg_dict = self._prepare_config(metas)
        self.warnings = []  # run-time notices: on stderr as they come, and in the summary
        check_training_data(self.config.data, self.config.models, metas, cfg_dict["data_fingerprint"],
                            self._note, lambda: _data_samples_fingerprint(self.config.data, self.c))
        self.out.mkdir(parents=True, exist_ok=True)
        chunks = shard_chunks(chunk_ranges(self.config.image_range, self.config.chunk_size), *shard)
        self._check_or_write_config(cfg_dict, shard, chunks)
        self._remove_killed_runs_temp_files(shard, chunks)
        todo = [(name, model, s, e) for name, model in zip(self.config.model_names, models)
                for s, e in chunks if not chunk_is_done(self.out, name, s, e, self.run_id)]
        summary = {"chunks_in_shard": len(chunks) * len(models), "chunks_computed": 0,
                   "chunks_skipped": len(chunks) * len(models) - len(todo), "errors": 0}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo) * len(self.configs), unit="map-batch",
                       desc=f"shard {shard[0]}/{shard[1]}", dynamic_ncols=True)
        try:
            for name, model, s, e in todo:
                summary["errors"] += self._run_chunk(name, model, dataset, s, e, bar,
                                                     cfg_dict["model_weights"][name])
                summary["chunks_computed"] += 1
        finally:
            if bar is not None:
                bar.close()
        summary["accuracy"] = self._check_accuracy(chunks)
        summary["warnings"] = self.warnings
        if merge or (merge is None and shard == (0, 1)):
            summary["manifest"] = merge_run(self.out)
        return summary

    def _note(self, text: str) -> None:
        self.warnings.append(text)
        _warn(text)

    def _check_accuracy(self, chunks) -> dict[str, float]:
        """Each model's accuracy over this shard's images (from the chunks' markers), with a
        warning for a model below ``LOW_ACCURACY``."""
        out = {}
        for name, path in zip(self.config.model_names, self.config.models):
            n = correct = 0
            for s, e in chunks:
                marker = Path(f"{chunk_stem(self.out, name, s, e)}.done.json")
                info = (read_json(marker) or {}) if marker.exists() else {}
                n, correct = n + int(info.get("n_images", 0)), correct + int(info.get("n_correct", 0))
            if not n:
                continue
            out[name] = round(correct / n, 4)
            if correct / n < LOW_ACCURACY:
                self._note(f"--model {path}: {correct} of {n} evaluated images classified correctly "
                           f"({correct / n:.1%}, below {LOW_ACCURACY:.0%}); the maps of a model that has "
                           "not learned the task say little about the metrics")
        return out

    def _load_batch(self, dataset, start: int, stop: int):
        items = [dataset[i] for i in range(start, stop)]
        x = torch.stack([torch.as_tensor(it["image"], dtype=torch.float32) for it in items])
        gt = torch.stack([torch.as_tensor(it["mask"], dtype=torch.float32).reshape(x.shape[-2:])
                          for it in items])
        label = torch.as_tensor([int(it["label"]) for it in items], dtype=torch.long)
        index = [int(it.get("index", start + k)) for k, it in enumerate(items)]
        if index != list(range(start, stop)):
            raise ValueError(f"dataset returned indices {index[:4]}... for images {start}:{stop}")
        device = torch.device(self.config.device)
        return x.to(device), gt.to(device), label.to(device)

    def _run_chunk(self, name: str, model, dataset, start: int, stop: int, bar, weights: str) -> int:
        x, gt, label = self._load_batch(dataset, start, stop)
        with torch.no_grad():
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
        pred = probs.argmax(dim=1)
        correct = pred == label
        p_true = probs.gather(1, label[:, None])[:, 0].cpu().tolist()
        preds = [{"model": name, "image": start + k, "label": lab, "pred": prd, "prob": p, "correct": lab == prd}
                 for k, (lab, prd, p) in enumerate(zip(label.cpu().tolist(), pred.cpu().tolist(), p_true))]
        keep = torch.nonzero(correct).flatten()
        images = [start + k for k in keep.tolist()]  # one transfer, not one sync per image
        xc, gtc, yc = x[keep], gt[keep], label[keep]
        rows, seconds, n_images, n_err = [], {}, {}, 0
        seed = chunk_seed(self.config.seed, start)
        saved = {}
        save_upto = self.config.image_range[0] + self.config.save_maps
        for cfg in self.configs:
            t0 = time.perf_counter()
            limit = self._image_limit(cfg)
            sub = [k for k, img in enumerate(images) if img < limit]
            n_images[cfg.label] = len(sub)  # max_images caps some configurations: timing per image needs it
            if sub:
                new_rows, maps = self._config_rows(name, model, cfg, xc[sub], yc[sub], gtc[sub],
                                                   [images[k] for k in sub], seed)
                rows.extend(new_rows)
                n_err += sum(r["status"] == "error" for r in new_rows)
                sel = [k for k, img in enumerate(images) if img < save_upto]
                if maps is not None and sel:
                    full = np.full((len(sel),) + tuple(xc.shape[-2:]), np.nan, np.float16)
                    pos = {k: j for j, k in enumerate(sub)}
                    rows_kept = [j for j, k in enumerate(sel) if k in pos]
                    if rows_kept:  # the saved images' maps in one transfer, not one per image
                        full[rows_kept] = maps[[pos[sel[j]] for j in rows_kept]].detach().float().cpu().numpy()
                    saved[cfg.label] = full
            seconds[cfg.label] = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
        if saved:
            sel = [k for k, img in enumerate(images) if img < save_upto]
            from shapesynth.schema import atomic_write
            import io

            buf = io.BytesIO()
            np.savez_compressed(buf, images=np.asarray([images[k] for k in sel]),
                                x=xc[sel].cpu().numpy().astype(np.float16),
                                gt=gtc[sel].cpu().numpy().astype(np.float16),
                                labels=yc[sel].cpu().numpy(), configs=np.asarray(list(saved)),
                                **{f"map_{i}": v for i, v in enumerate(saved.values())})
            atomic_write(f"{chunk_stem(self.out, name, start, stop)}.maps.npz", buf.getvalue())
        else:  # a chunk recomputed for another run may have kept maps there: the report would show them
            Path(f"{chunk_stem(self.out, name, start, stop)}.maps.npz").unlink(missing_ok=True)
        write_chunk(self.out, name, start, stop, rows, preds,
                    {"n_images": stop - start, "n_correct": len(images), "seconds": seconds,
                     "images": n_images, "errors": n_err, "seed": seed,
                     "model_weights": weights, "run_id": self.run_id})
        return n_err

    def _image_limit(self, cfg: MapConfig) -> float:
        """Images at or past this index are not computed for ``cfg`` (method_grid max_images)."""
        cap = (self.config.method_grid.get(cfg.method) or {}).get("max_images")
        return float("inf") if cap is None else self.config.image_range[0] + int(cap)

    def _config_rows(self, name, model, cfg: MapConfig, x, y, gt, images, seed):
        """Rows for one configuration on the chunk's correct images.

        Failures are isolated as finely as possible: a method failing on the batch is retried
        image by image; a failing evaluate() is retried metric by metric, then image by image,
        so one bad (image, metric) costs only its own row. Returns (rows, maps with NaN for
        images whose map failed)."""
        rows, groups = [], []
        try:
            explainer, maps = self._maps(model, cfg, x, y, gt, seed)
            groups.append((list(range(len(images))), explainer, maps))
        except Exception as batch_err:
            if len(images) == 1:
                return self._error_rows(name, cfg, images, batch_err, "method"), None
            for k, img in enumerate(images):
                try:
                    explainer, maps = self._maps(model, cfg, x[k:k + 1], y[k:k + 1], gt[k:k + 1], seed)
                    groups.append(([k], explainer, maps))
                except Exception as err:
                    rows.extend(self._error_rows(name, cfg, [img], err, "method"))
        full = torch.full((len(images),) + tuple(x.shape[-2:]), float("nan"), device=x.device)
        for idx, explainer, maps in groups:
            full[idx] = maps
            rows.extend(self._metric_rows(name, cfg, model, explainer, x[idx], y[idx], gt[idx], maps,
                                          [images[k] for k in idx], seed))
        return rows, full

    def _maps(self, model, cfg: MapConfig, x, y, gt, seed):
        # for methods that draw from torch's global generators (a user's, say): draws that depend
        # on the chunk only, and the caller's random state back afterwards
        with seeded_global_rng(seed, x.device):
            explainer = self.c.explainer(model, cfg, self.config.refine_layers, self.config.method_options, seed)
            if cfg.method in NEEDS_GT:
                explainer = _BoundGroundTruth(explainer, gt)
            maps = torch.as_tensor(explainer.attribute(x, y)).float()
        if maps.shape != (x.shape[0],) + tuple(x.shape[-2:]):
            raise ValueError(f"{cfg.label} returned maps of shape {tuple(maps.shape)}, "
                             f"expected {(x.shape[0],) + tuple(x.shape[-2:])}")
        return explainer, maps.detach()

    def _evaluate(self, model, explainer, x, y, gt, maps, metrics, seed) -> dict[str, np.ndarray]:
        with seeded_global_rng(seed, x.device):
            result = self.c.evaluate(model, x, y, maps, list(metrics), explainer, gt, self.config.metric_options)
        values = _flatten_metric_values(result, x.shape[0])
        missing = [m for m in metrics if m not in values]
        if missing:
            raise KeyError(f"evaluate() returned no per-sample values for {missing}")
        reasons = getattr(result, "reasons", None) or {}
        return values, reasons

    def _metric_rows(self, name, cfg, model, explainer, x, y, gt, maps, images, seed):
        metrics = list(self.config.metrics)
        try:
            return self._rows(name, cfg, images, *self._evaluate(model, explainer, x, y, gt, maps, metrics, seed))
        except Exception:
            pass  # isolate the failure below: metric by metric, then image by image
        # one row per (image, metric): columns that several metrics return (ROAD's curves come
        # with ROAD and with ARCC) are kept once, a value rather than an error where both exist
        rows = {}

        def keep(new_rows):
            for row in new_rows:
                key = (row["image"], row["metric"])
                if key not in rows or (rows[key]["status"] == "error" and row["status"] != "error"):
                    rows[key] = row

        for metric in metrics:
            try:
                values = self._evaluate(model, explainer, x, y, gt, maps, [metric], seed)
                keep(self._rows(name, cfg, images, *values))
                continue
            except Exception as err:
                if len(images) == 1:
                    keep(self._error_rows(name, cfg, images, err, "metrics", [metric]))
                    continue
            for k, img in enumerate(images):
                sl = slice(k, k + 1)
                try:
                    values = self._evaluate(model, _subset_explainer(explainer, sl), x[sl], y[sl], gt[sl],
                                            maps[sl], [metric], seed)
                    keep(self._rows(name, cfg, [img], *values))
                except Exception as err:
                    keep(self._error_rows(name, cfg, [img], err, "metrics", [metric]))
        return list(rows.values())

    @staticmethod
    def _rows(name, cfg: MapConfig, images, values: dict[str, np.ndarray], reasons: dict | None = None):
        rows = []
        reasons = reasons or {}
        for metric in sorted(values):
            arr = values[metric]
            why = reasons.get(metric)
            for k, img in enumerate(images):
                v = float(arr[k])
                ok = np.isfinite(v)
                reason = "" if ok else ((why[k] if why is not None and why[k] else "") or "metric returned NaN/inf")
                rows.append({"image": img, "model": name, "method": cfg.method, "layer": cfg.layer,
                             "mix": cfg.mix, "metric": metric, "value": v if ok else np.nan,
                             "status": "ok" if ok else "nan", "reason": reason})
        return rows

    def _error_rows(self, name, cfg: MapConfig, images, err, stage: str, metrics=None):
        err.pipeline_stage = stage  # read by _error_text: did the method or a metric fail?
        text = _error_text(cfg.label, err)
        return [{"image": img, "model": name, "method": cfg.method, "layer": cfg.layer, "mix": cfg.mix,
                 "metric": metric, "value": np.nan, "status": "error", "reason": text}
                for img in images for metric in (metrics or self.config.metrics)]


def run_eval(config: RunConfig, out_dir, shard=(0, 1), components: Components | None = None,
             progress: bool = True, overwrite: bool = False, merge: bool | None = None,
             conflict_hint: str = "use another --out or --overwrite", range_source: str | None = None) -> dict:
    """Functional entry point of ``shapesynth-eval run``. ``conflict_hint`` ends the error raised
    when ``out_dir`` holds a run of another configuration, ``range_source`` names what set the
    image range in the error raised when the split is smaller (default ``--images a:b``; callers
    with other flags reword both)."""
    return Runner(config, out_dir, components, progress, overwrite, conflict_hint, range_source).run(shard, merge)
