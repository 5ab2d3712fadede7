"""Checks made before any work of ``shapesynth-eval run``: unknown names and options, models
that do not fit the dataset, layers no model has, metric option values the metrics refuse, and
a dataset other than the one a model was trained on (a warning).

Plain functions of what they check (the run's configuration, its models and their metadata,
the dataset): :class:`validation.pipeline.run.Runner` calls them and decides which apply (the
name and layer checks only hold for the project's own explainer and evaluate). This module
does not import the runner.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from validation._rng import seeded_global_rng
from validation.pipeline.table import IDENTITY, NO_LAYER, read_json

# SynthConfig fields that do not change the distribution of the images (which images are drawn,
# how many, how failures are handled): a model's recipe and the dataset's may differ in these.
RECIPE_NEUTRAL = ("seed", "split_sizes", "bg_pool_sizes", "bg_pool_fractions", "bg_strict", "max_colour_tries")


def _method_class(method: str):
    from validation.attributions.registry import METHODS, canonical_name

    return METHODS[canonical_name(method)]


# ----------------------------------------------------------------------------- names and options
def refuse_unknown_methods(methods: Sequence[str], method_options: dict) -> None:
    """With the project's own explainer, an unknown method or method option is refused before
    any work: each would fail on every image, after the image-by-image retries (a misspelt
    method among the method options would silently leave the defaults)."""
    from validation.attributions.registry import canonical_name, unknown_options

    for method in methods:
        canonical_name(method)  # ValueError listing the available methods
    # options may name methods this run leaves out (a profile's, say), but real ones
    for method, options in method_options.items():
        try:
            canonical_name(method)
        except ValueError as err:
            raise ValueError(f"method options: {err}") from None
        if not isinstance(options, dict):
            raise ValueError(f"method options for {method!r}: expected a mapping of option to "
                             f"value, got {options!r}")
        if "layer" in options:
            raise ValueError(f"method options for {method!r}: the run sets the layer from its "
                             "layers (--layers), not from the method options")
        unknown, accepted = unknown_options(_method_class(method), options)
        if unknown:
            raise ValueError(f"method options for {method!r}: unknown option(s) {unknown}; "
                             f"accepted: {accepted}")


def refuse_unknown_metrics(metrics: Sequence[str], metric_options: dict) -> None:
    """With the project's own evaluate, an unknown metric or metric option is refused before any
    work: each would fail on every image."""
    from validation.metrics import METRIC_NAMES, evaluate

    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {list(METRIC_NAMES)}")
    accepted = sorted(name for name, p in inspect.signature(evaluate).parameters.items()
                      if p.kind is p.KEYWORD_ONLY)
    unknown = sorted(set(metric_options) - set(accepted))
    if unknown:
        raise ValueError(f"metric options: unknown option(s) {unknown}; accepted: {accepted}")


# ----------------------------------------------------------------------------- models and dataset
def _dataset_classes(dataset, path: str) -> tuple[str, ...]:
    """The dataset's class names: its ``class_names`` attribute, else what the generated folder
    declares (trainers' reader, the one training checks against)."""
    names = getattr(dataset, "class_names", None)
    if names is None:
        from trainers.data import dataset_class_names

        names = dataset_class_names(path)
    return tuple(names)


def check_models_fit(dataset, metas: Sequence[dict], model_paths: Sequence[str], data: str, split: str) -> None:
    """Every model must take the dataset's image size and predict its classes."""
    n = len(dataset)
    if n == 0:
        return  # an empty split: the range check above has refused every non-empty range
    height, width = (int(v) for v in torch.as_tensor(dataset[0]["image"]).shape[-2:])
    classes = _dataset_classes(dataset, data)
    where = f"{data} ({split} split)"
    for path, meta in zip(model_paths, metas):
        missing = [k for k in ("image_size", "class_names") if k not in meta]
        if missing:
            raise ValueError(f"--model {path}: its metadata has no {missing}, so it cannot be "
                             f"checked against {where}")
        size = int(meta["image_size"])
        if (size, size) != (height, width):
            raise ValueError(f"--model {path}: the model takes {size} px images but {where} has "
                             f"{height} x {width} px images")
        if tuple(meta["class_names"]) != classes:
            raise ValueError(f"--model {path}: the model's classes {list(meta['class_names'])} differ "
                             f"from the classes of {where}: {list(classes)}")


# ----------------------------------------------------------------------------- layers
def wanted_layers(configs, layers: Sequence[str], refine_layers: Sequence[str],
                  method_options: dict) -> dict[str, str]:
    """Every layer spec the run's explainers will resolve -> the flag that named it.
    ``configs``: the run's MapConfigs (method, layer, mix)."""
    wanted = {}

    def add(layer, source):
        if isinstance(layer, str):
            wanted.setdefault(layer, source)

    for c in configs:
        if c.layer == NO_LAYER:
            continue
        add(c.layer, "--layers" if c.layer in layers else f"method grid of {c.method!r}")
        if c.mix != IDENTITY:  # RefineCAM also resolves every deeper layer it fuses
            for layer in refine_layers[refine_layers.index(c.layer):]:
                add(layer, "--refine-layers")
    for method in dict.fromkeys(c.method for c in configs):  # e.g. RELAX's embedding_layer
        for key, value in (method_options.get(method) or {}).items():
            if key.endswith("layer"):
                add(value, f"method options of {method!r} ({key})")
    return wanted


def check_layers(model_paths: Sequence[str], models, wanted: dict[str, str]) -> None:
    """With the project's own explainer, every layer (``wanted``: spec -> the flag that named
    it, see `wanted_layers`) is resolved in every (loaded) model before any work: a misspelt one
    would fail every map of every layer method."""
    from validation.attributions.layers import resolve_layer_full, stage_names

    problems = []
    for path, model in zip(model_paths, models):
        bad = []
        for layer, source in wanted.items():
            try:
                resolve_layer_full(model, layer)
            except (ValueError, TypeError):
                bad.append(f"{layer!r} ({source})")
        if not bad:
            continue
        aliases = stage_names(model)
        names = [n for n, _ in model.named_modules() if n]
        dotted = [n for n in names if "." in n] or names
        alias_text = (f"its stage aliases {', '.join(f'{a} (= {n})' for a, n in aliases.items())}"
                      if aliases else "no stage aliases (architecture not recognised)")
        problems.append(f"--model {path}: unknown layer {', '.join(bad)}; accepted: {alias_text}, "
                        f"or any of its {len(names)} module names (dotted, e.g. {', '.join(dotted[:3])})")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------- metric option values
def _dry_evaluate(metrics: Sequence[str], options: dict, shape: tuple[int, ...]) -> None:
    """The project's evaluate() of ``metrics`` with ``options`` on one stand-in image of
    ``shape`` (C, H, W), a linear model and a ramp map; raises what the metrics' checks raise.
    Draws nothing from the caller's random state."""
    from validation.metrics import evaluate

    c, h, w = shape
    # seeded_global_rng, not torch.manual_seed: that would also reseed every CUDA generator
    # (queued for a device not yet initialised), which fork_rng(devices=[]) does not put back
    with seeded_global_rng(0):
        model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, 2))
        x = torch.rand(1, c, h, w)
        ramp = torch.linspace(0, 1, h * w).view(1, h, w)
        evaluate(model.eval(), x, torch.zeros(1, dtype=torch.long), ramp, metrics=list(metrics),
                 explainer=lambda images, target=None: ramp.expand(images.shape[0], h, w),
                 gt=(ramp > 0.5).float(), **options)


def check_metric_option_values(metrics: Sequence[str], options: dict, dataset) -> None:
    """With the project's own evaluate, metric options are tried once on a tiny stand-in
    (one image of the dataset's size, a linear model): a value the metrics' own checks refuse
    (``fractions: 0.5``, say) is refused now, naming the option, not on every row."""
    if not options or len(dataset) == 0:
        return
    shape = tuple(torch.as_tensor(dataset[0]["image"]).shape[-3:])

    def refusal(opts):
        try:
            _dry_evaluate(metrics, opts, shape)
        except Exception as err:  # TypeError, ValueError, ...: whatever a real row would record
            return f"{type(err).__name__}: {err}"
        return None

    whole = refusal(options)
    if whole is None or refusal({}) is not None:  # the stand-in fails without options: no verdict
        return
    for name, value in options.items():
        why = refusal({name: value})
        if why is not None:
            raise ValueError(f"metric options: {name}={value!r} is refused by the metrics ({why})")
    raise ValueError(f"metric options {options} are refused by the metrics together ({whole})")


# ----------------------------------------------------------------------------- training data
def _recipe(d: dict) -> dict:
    """A SynthConfig dict with its defaults filled in and its values as JSON holds them."""
    try:
        from shapesynth.config import SynthConfig

        d = SynthConfig.from_dict(d).to_dict()
    except Exception:  # shapesynth unavailable, or a recipe of another version: compare as recorded
        pass
    return json.loads(json.dumps(d))


def distribution_differences(model_recipe: dict, data_recipe: dict) -> dict[str, tuple]:
    """field -> (model's, dataset's) for the fields that change the image distribution."""
    a, b = _recipe(model_recipe), _recipe(data_recipe)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RECIPE_NEUTRAL and a.get(k) != b.get(k)}


def check_training_data(data: str, model_paths: Sequence[str], metas: Sequence[dict], fingerprint,
                        note: Callable[[str], None],
                        samples_fingerprint: Callable[[], str | None] | None = None) -> None:
    """A warning (``note``, once per model) when the dataset ``data`` is not what the model was
    trained on: its recorded rendering recipe (``meta["data"]["synth"]``) differs from the
    dataset's in a field that changes the images, or it was trained from disk on a dataset of
    another fingerprint. Evaluating on a shifted distribution is legitimate: a notice, not an error.

    The fingerprint (``dataset_fingerprint``) hashes the data files, so a copy of the training
    data in another storage format (hub, imagefolder, arrow) has another one. When the model also
    recorded the samples fingerprint of its data (``dataset_samples_fingerprint``), the
    dataset's, from ``samples_fingerprint()`` (called at most once, only then; None: unknown),
    decides instead: the same samples in other files are not another dataset, and say nothing.
    Models without it, or a dataset whose samples cannot be fingerprinted, compare the files."""
    manifest = Path(data) / "shapesynth.json"
    try:
        data_recipe = (read_json(manifest) or {}).get("config") if manifest.is_file() else None
    except (OSError, ValueError):
        data_recipe = None
    usable_fp = isinstance(fingerprint, str) and not fingerprint.startswith("unavailable")
    data_samples = []  # the dataset's samples fingerprint, once computed

    def same_samples(recorded) -> bool:
        if not isinstance(recorded, str) or samples_fingerprint is None:
            return False
        if not data_samples:
            data_samples.append(samples_fingerprint())
        return data_samples[0] == recorded

    for path, meta in zip(model_paths, metas):
        trained_on = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        notes = []
        recipe = trained_on.get("synth")
        if isinstance(recipe, dict) and isinstance(data_recipe, dict):
            diff = distribution_differences(recipe, data_recipe)
            if diff:
                notes.append("the dataset's recipe differs from the one it was trained with in "
                             + ", ".join(f"{k} ({a} -> {b})" for k, (a, b) in diff.items())
                             + " (model's -> dataset's)")
        source, fp = trained_on.get("data"), meta.get("dataset_fingerprint")
        if (source and fp and usable_fp and fp != fingerprint
                and not same_samples(meta.get("dataset_samples_fingerprint"))):
            notes.append(f"it was trained on another dataset ({source}, fingerprint {fp}) than "
                         f"{data} (fingerprint {fingerprint})")
        if notes:
            note(f"--model {path}: {'; '.join(notes)}; the maps and metrics describe it on a "
                 "shifted distribution")
