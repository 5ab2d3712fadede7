"""``shapesynth-eval reproduce --profile quick|paper --out DIR``: generate, train, run, analyze
and report from one YAML profile, reusing whatever already exists.

Layout under ``DIR``::

    DIR/data/                   the generated dataset (reused when it loads and is large enough)
    DIR/models/<arch>/          one training run per architecture (reused when it loads)
    DIR/run/                    the evaluation run (finished chunks are reused: resume)
    DIR/run/analysis/, DIR/run/report/index.html
    DIR/reproduce.json          what each step did and how long it took

Generation and training are the other packages' command lines, run as subprocesses with the
argument lists the profile gives (placeholders ``{data}``, ``{model_dir}``, ``{arch}``,
``{image_size}``, ``{python}``), so a profile states exactly what was run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from validation.pipeline.table import LEGACY_DEFAULTS, read_json, write_json

PROFILE_DIR = Path(__file__).with_name("profiles")
STEPS = ("generate", "train", "run", "analyze", "report")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> dict:
    """A built-in profile by name (``quick``, ``paper``) or a YAML file path.

    ``extends: NAME_OR_PATH`` starts from that profile (a relative path is read from this
    profile's folder): each section of this one is merged into
    the base's section one level deep (a key given here replaces the base's value whole, so
    ``train: {models: {resnet18: null}}`` keeps only ResNet18); ``name`` and ``description`` are
    never inherited.
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"profile {name_or_path!r}: no such file {path}; built-in profiles: "
                                f"{', '.join(available_profiles())}")
    try:
        profile = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"profile {path}: not valid YAML ({err})") from None
    if not isinstance(profile, dict):  # empty, or a list: "extends" in None raised a TypeError
        raise ValueError(f"profile {path}: expected a mapping with sections data, train, eval; "
                         f"got {type(profile).__name__}")
    sources = _sources(profile, path)
    if "extends" in profile:
        base = {k: v for k, v in load_profile(_extended(profile.pop("extends"), path)).items()
                if k not in ("name", "description")}
        base_sources = base.pop("_sources")
        for key, value in profile.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:  # replaced whole: none of the base's keys of this section remain
                base[key] = value
                base_sources = {k: v for k, v in base_sources.items() if k.split(".")[0] != key}
        profile, sources = base, {**base_sources, **sources}
    for key in ("data", "train", "eval"):
        if key not in profile:
            raise ValueError(f"profile {path}: missing section {key!r}")
        if not isinstance(profile[key], dict):  # `eval:` left empty, say: every lookup failed on None
            raise ValueError(f"profile {sources.get(key, path)}: section {key!r} must be a mapping, "
                             f"got {profile[key]!r}")
    profile.setdefault("name", path.stem)
    profile["_sources"] = sources
    return profile


def _extended(name_or_path, child: Path) -> str:
    """``extends``' value: a built-in name as given; a relative file path from the folder of the
    profile that names it (as an include), so the pair works from any working directory."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"profile {child}: extends must name a profile or a YAML file, got {name_or_path!r}")
    target = Path(name_or_path).expanduser()
    if not target.suffix:
        return name_or_path
    return str(target if target.is_absolute() else child.parent / target)


def _sources(profile: dict, path: Path) -> dict[str, str]:
    """Each section and ``section.key`` of ``profile`` -> its file, for errors about the values
    (with ``extends``, a key may come from the base profile's file)."""
    out = {}
    for section, value in profile.items():
        out[section] = str(path)
        if isinstance(value, dict):
            out.update({f"{section}.{key}": str(path) for key in value})
    return out


class ProfileValueError(ValueError):
    """A bad profile value; the message names its key and the profile file."""


# The `shapesynth-eval run` flags the profile's settings become (the shard workers' command line,
# `Reproduction._worker_flags`) -> the profile key each comes from. The run's checks name flags in
# their errors ("unknown --mix", "(--layers)"); reproduce reports those errors under the keys.
RUN_FLAG_KEYS = {
    "--methods": "eval.methods", "--metrics": "eval.metrics", "--layers": "eval.layers",
    "--refine-layers": "eval.refine_layers", "--mix": "eval.mixes", "--images": "eval.n_images",
    "--split": "eval.split", "--chunk-size": "eval.chunk_size", "--seed": "eval.seed",
    "--method-options": "eval.method_options", "--metric-options": "eval.metric_options",
    "--method-grid": "eval.method_grid", "--save-maps": "eval.save_maps", "--threads": "eval.threads",
    "--device": "eval.device", "--no-fold": "eval.fold",
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def _flag_keys(message: str) -> tuple[str, ...]:
    """The profile keys of the run flags a message names, in order."""
    return tuple(dict.fromkeys(RUN_FLAG_KEYS[f] for f in _FLAG.findall(message) if f in RUN_FLAG_KEYS))


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(args, **values) -> list[str]:
    """The arguments with each placeholder ``{name}`` replaced by its value. Other braces stay as
    written: an argument such as ``--synth '{size_bands: [[0.31, 0.39]]}'`` (a YAML mapping) is
    passed on unchanged, where ``str.format`` raised a KeyError on it."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"unknown placeholder {{{name}}} in {match.string!r}; "
                             f"placeholders: {', '.join(f'{{{k}}}' for k in sorted(values))}")
        return str(values[name])

    return [_PLACEHOLDER.sub(value, str(a)) for a in args]


def _stop(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """Terminate the child processes still running (SIGTERM, then SIGKILL after ``grace`` s).

    A reproduction stopped by an exception, Ctrl-C or SIGTERM must not leave its trainer or
    shard workers running: a rerun would then train or evaluate beside them."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _child_setup(parent: int):
    """``preexec_fn`` of the children: SIGTERM when this process dies (Linux).

    `_stop` covers every end this process sees; a SIGKILL (an OOM kill, a scheduler's hard stop)
    it does not, and the trainer or shard workers would run on, beside the rerun that resumes
    their work. Elsewhere the children are left as they are.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:  # looked up here: the child, between fork and exec, only makes the call
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def setup() -> None:
        if prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0 and os.getppid() != parent:  # 1: PR_SET_PDEATHSIG
            os.kill(os.getpid(), signal.SIGTERM)  # the parent died before the request took effect

    return setup


def _run_command(cmd: list[str], log: Path, source: str = "") -> None:
    """Run ``cmd`` with its output in ``log``; a failure is a RuntimeError with the log's last
    lines, starting with ``source`` (the profile key and file that gave the command)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, preexec_fn=_child_setup(os.getpid()))
        try:
            returncode = proc.wait()
        finally:
            _stop([proc])
    if returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{source}{': ' if source else ''}command failed (exit {returncode}): {' '.join(cmd)}\n"
                           f"--- last lines of {log} ---\n{tail}")


def _worker_errors(log: Path, start: int) -> list[str]:
    """The one-line errors a ``shapesynth-eval run`` worker wrote to ``log`` after byte ``start``."""
    marker = "shapesynth-eval run: error: "
    try:
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return [line.split(marker, 1)[1].strip() for line in text.splitlines() if marker in line]


def _dataset_ready(data: Path, split: str, n_needed: int) -> bool:
    # the card (README.md) is the last thing `shapesynth generate` writes, once every shard of every
    # split is in (and an arrow dataset converted): without it a generation was cut short, and the
    # generate command (--resume) finishes it
    if not (data / "README.md").is_file():
        return False
    try:
        from shapesynth.torchdata import ShapesDataset

        return len(ShapesDataset(str(data), split=split)) >= n_needed
    except Exception:  # unreadable or partial: regenerate
        return False


def _model_ready(checkpoint: Path):
    """(ready, meta). A model is reused when it loads; its accuracy, image size and classes are
    checked separately (``Reproduction.train``)."""
    if not checkpoint.exists():
        return False, None
    try:
        from trainers import load_model

        _, meta = load_model(str(checkpoint))
    except Exception:  # absent, partial or unreadable: (re)run the training command, which resumes
        return False, None
    # a run folder holding only an intermediate checkpoint has no test accuracy yet: not finished
    return (meta or {}).get("test_accuracy") is not None, meta


def _resumes(cmd: list[str], model_dir: Path) -> bool:
    """Whether the training command continues an interrupted training: the trainers' ``resume:
    auto`` (their default) picks up ``<model_dir>/checkpoints/last.ckpt`` when it exists."""
    never = any(a == "--resume=never" or (a == "--resume" and b == "never") for a, b in zip(cmd, cmd[1:] + [""]))
    return not never and (model_dir / "checkpoints" / "last.ckpt").is_file()


class Reproduction:
    def __init__(self, profile: dict, out: str | os.PathLike, progress: bool = True, components=None):
        self.components = components  # injected collaborators of `run` (tests); default: the real ones
        self.p = profile
        self.out = Path(out)
        self.progress = progress
        self.data = self.out / "data"
        self.run_dir = self.out / "run"
        self.record = {"profile": profile.get("name"), "steps": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.models_checked = False  # by the train step, else by the run step before it starts
        self.values = {"data": str(self.data), "python": sys.executable,
                       "image_size": profile["data"].get("image_size", 128)}

    # -- the profile's values, checked and named ---------------------------------------
    def where(self, keys=()) -> str:
        """``eval.layers in profile FILE``: profile keys and the file that set each (the profile's
        name for a profile given as a dict); ``profile FILE`` without keys."""
        sources = self.p.get("_sources") or {}
        default = next(iter(sources.values()), None) or repr(self.p.get("name"))
        if not keys:
            return f"profile {default}"
        by_file: dict[str, list[str]] = {}
        for key in keys:  # train.models.alpha.args: set where train.models (else train) was
            parts = key.split(".")
            file = next((sources[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                         if k in sources), default)
            by_file.setdefault(file, []).append(key)
        return "; ".join(f"{', '.join(k)} in profile {f}" for f, k in by_file.items())

    @contextlib.contextmanager
    def naming_profile(self, *keys: str):
        """A ValueError raised inside (by the run's checks, say) starts with ``keys`` and the
        profile file; without ``keys``, with the keys of the run flags it names (`RUN_FLAG_KEYS`)."""
        try:
            yield
        except ProfileValueError:
            raise
        except ValueError as err:
            raise ProfileValueError(f"{self.where(keys or _flag_keys(str(err)))}: {err}") from err

    def eval_split(self) -> str:
        """The split the run step evaluates and the generate step must fill: ``eval.split``, the
        test split where it is empty or absent."""
        return self.p["eval"].get("split") or "test"

    def setting(self, key: str, default, least: int | None = None):
        """The profile's integer ``section.name`` (``default`` where it is absent or null)."""
        section, name = key.split(".")
        value = (self.p.get(section) or {}).get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"-?\d+", str(value).strip()):
            raise ProfileValueError(f"{self.where([key])}: expected an integer, got {value!r}")
        if least is not None and int(value) < least:
            raise ProfileValueError(f"{self.where([key])}: must be >= {least}, got {value!r}")
        return int(value)

    def names(self, key: str, default: list) -> list:
        """The profile's list ``eval.<name>``; a string is a comma list, as on the run's command
        line (``layers: stage4`` was read letter by letter: layers 's', 't', ...)."""
        value = self.p["eval"].get(key.split(".")[1])
        if value is None:
            return list(default)
        if isinstance(value, str):
            from validation.cli import csv_list

            return csv_list(value)
        if not isinstance(value, (list, tuple)):
            raise ProfileValueError(f"{self.where([key])}: expected a list of names, got {value!r}")
        return list(value)

    def mapping(self, key: str) -> dict:
        value = self.p["eval"].get(key.split(".")[1])
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ProfileValueError(f"{self.where([key])}: expected a mapping, got {value!r}")
        return value

    def models(self) -> dict:
        """``train.models``: architecture -> its overrides of the train args (or null)."""
        models = self.p["train"].get("models")
        if not isinstance(models, dict) or not models:
            raise ProfileValueError(f"{self.where(['train.models'])}: expected a mapping of architecture to its "
                                    f"overrides or null, e.g. {{resnet18: null}}; got {models!r}")
        bad = [arch for arch, spec in models.items() if spec is not None and not isinstance(spec, dict)]
        if bad:
            raise ProfileValueError(f"{self.where(['train.models'])}: the overrides of {bad} must be a mapping "
                                    f"(args or command) or null, got {[models[a] for a in bad]}")
        return models

    def model_dirs(self) -> dict[str, Path]:
        return {arch: self.out / "models" / arch for arch in self.models()}

    def checkpoints(self) -> dict[str, Path]:
        """What ``trainers.load_model`` is given: ``train.checkpoint`` (e.g.
        ``"{model_dir}/best.safetensors"``) filled in, or the training run folder itself."""
        pattern = self.p["train"].get("checkpoint")
        with self.naming_profile("train.checkpoint"):
            return {arch: Path(_fill([pattern], model_dir=str(d), arch=arch, **self.values)[0]) if pattern else d
                    for arch, d in self.model_dirs().items()}

    def _time(self, step: str, fn) -> None:
        t0 = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - t0, 1)
        self.record["steps"][step] = info
        write_json(self.out / "reproduce.json", self.record)
        print(f"[reproduce] {step}: {info}", flush=True)

    def _command(self, spec: dict, module: str, keys: dict[str, str], **values) -> tuple[list[str], str]:
        """``command`` (a full argument list) or ``args`` for ``python -m <module>``, and where
        the profile sets it (``keys``: ``command``/``args`` -> the profile key)."""
        name = "command" if spec.get("command") else "args"
        with self.naming_profile(keys[name]):
            if not spec.get(name):
                raise ValueError(f"a {module} step needs 'args' (or 'command')")
            if not isinstance(spec[name], (list, tuple)):
                raise ValueError(f"expected a list of arguments, got {spec[name]!r}")
            cmd = _fill(spec[name], **values)
        return (cmd if name == "command" else [sys.executable, "-m", module] + cmd), self.where([keys[name]])

    # -- steps -------------------------------------------------------------------------
    def _check_existing_dataset(self) -> None:
        """Refuse to reuse a dataset generated with another image size or seed than the profile's."""
        meta_path = self.data / "shapesynth.json"
        if not meta_path.exists():
            return
        cfg = (read_json(meta_path) or {}).get("config", {})
        for key in ("image_size", "seed"):
            want = self.p["data"].get(key)
            if want is not None and key in cfg and cfg[key] != want:
                raise ValueError(f"{self.data} holds a dataset with {key}={cfg[key]}, the profile "
                                 f"{self.p.get('name')!r} wants {key}={want}; use another --out or remove it")

    def generate(self):
        split = self.eval_split()
        need = self.setting("eval.n_images", 200, least=1)
        self._check_existing_dataset()
        if _dataset_ready(self.data, split, need):
            return {"reused": True}
        cmd, source = self._command(self.p["data"], "shapesynth", {"args": "data.args", "command": "data.command"},
                                    **self.values)
        _run_command(cmd, self.out / "logs" / "generate.log", source)
        if not _dataset_ready(self.data, split, need):
            raise RuntimeError(f"{self.data}: generation finished but the {split} split "
                               f"does not hold {need} images; check the profile's data args")
        return {"reused": False, "command": " ".join(cmd)}

    def train(self):
        return self._models(train=True)

    def _data_image_size(self) -> int:
        """The image size of the profile's data: what the generated dataset records (the generate
        step refuses a dataset of another ``data.image_size``), else that setting, else the
        generator's default."""
        meta_path = self.data / "shapesynth.json"
        if meta_path.exists():
            size = ((read_json(meta_path) or {}).get("config") or {}).get("image_size")
            if size is not None:
                return int(size)
        return int(self.p["data"].get("image_size", 128))

    def _models(self, train: bool) -> dict:
        """Each profile model, trained first where it is missing (``train``; otherwise missing is
        an error), then checked: it fits the data and reaches ``min_test_accuracy``."""
        # `{image_size}` and the fit check: the data's own size, which the profile need not repeat
        self.values["image_size"] = self._data_image_size()
        tr = self.p["train"]
        min_acc = tr.get("min_test_accuracy")
        if min_acc is not None:
            try:
                ok = not isinstance(min_acc, bool) and 0 <= float(min_acc) <= 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ProfileValueError(f"{self.where(['train.min_test_accuracy'])}: expected a number in "
                                        f"[0, 1], got {min_acc!r}")
        info = {}
        checkpoints = self.checkpoints()
        for arch, model_dir in self.model_dirs().items():
            ready, meta = _model_ready(checkpoints[arch])
            trained = not ready
            if trained and not train:
                raise RuntimeError(f"{checkpoints[arch]}: no finished {arch} model for the run step; "
                                   f"include the train step (e.g. --steps train,run,analyze,report, or no --steps)")
            status = "reused"
            if trained:
                own = self.models()[arch] or {}
                spec = {**{k: v for k, v in tr.items() if k in ("args", "command")}, **own}
                keys = {k: f"train.models.{arch}.{k}" if k in own else f"train.{k}" for k in ("args", "command")}
                cmd, source = self._command(spec, "trainers", keys, arch=arch, model_dir=str(model_dir), **self.values)
                status = "resumed" if _resumes(cmd, model_dir) else "trained"
                _run_command(cmd, self.out / "logs" / f"train_{arch}.log", source)
                ready, meta = _model_ready(checkpoints[arch])
                if not ready:
                    raise RuntimeError(f"{checkpoints[arch]}: training finished but trainers.load_model "
                                       f"cannot load it (see {self.out / 'logs' / f'train_{arch}.log'})")
            self._check_model_fits(checkpoints[arch], meta, trained)
            acc = (meta or {}).get("test_accuracy")
            info[arch] = {"status": status, "reused": not trained, "test_accuracy": acc}
            if min_acc is not None and (acc is None or float(acc) < float(min_acc)):
                raise RuntimeError(f"{arch}: test accuracy {acc} is below the profile's minimum {min_acc}; "
                                   f"the evaluation would not be faithful (see {model_dir})")
        self.models_checked = True
        return info

    def _check_model_fits(self, checkpoint: Path, meta: dict, trained: bool) -> None:
        """Refuse a model that cannot take the profile's data (another image size or other
        classes), e.g. an older model of another size in ``DIR/models``, before the run starts."""
        from trainers.data import dataset_class_names

        meta = meta or {}
        missing = [k for k in ("image_size", "class_names") if k not in meta]
        if missing:
            raise ValueError(f"{checkpoint}: the model's metadata has no {missing}")
        want_size, want_classes = int(self.values["image_size"]), list(dataset_class_names(self.data))
        found = []
        if int(meta["image_size"]) != want_size:
            found.append(f"image_size={meta['image_size']} (the profile's data: {want_size})")
        if list(meta["class_names"]) != want_classes:
            found.append(f"classes {list(meta['class_names'])} (the data's: {want_classes})")
        if found:
            how = ("training produced it: check the profile's train args" if trained else
                   "use another --out or remove it")
            raise ValueError(f"{checkpoint} holds a model with {' and '.join(found)}; {how}")

    def run(self):
        from validation.pipeline.run import run_eval

        models = None
        if not self.models_checked:  # --steps without train: the same gate before any work
            models = self._models(train=False)
        config = self.run_config()
        workers = self.setting("eval.workers", 1, least=1)
        threads = self.setting("eval.threads", None, least=1)
        # the run's errors name its flags: said here under the profile keys, in both paths
        with self.naming_profile():
            if workers > 1:
                summary = self._run_sharded(config, workers, threads or 1)
            else:
                import torch

                before = torch.get_num_threads()
                try:
                    if threads:
                        torch.set_num_threads(threads)
                    summary = run_eval(config, self.run_dir, components=self.components, progress=self.progress,
                                       conflict_hint=self._conflict_hint(),
                                       range_source=self._n_images_source(config.image_range[1]))
                finally:
                    torch.set_num_threads(before)
        write_json(self.run_dir / "profile.json",
                   {"name": self.p.get("name"), "description": self.p.get("description"),
                    "budget_notes": self.p.get("budget_notes")})
        summary.pop("manifest", None)
        if models is not None:
            summary["models"] = models
        return summary

    def run_config(self):
        """The run's configuration from the profile's ``eval`` section."""
        from validation.cli import all_methods
        from validation.pipeline.run import DEFAULT_METRICS, RunConfig

        ev = self.p["eval"]
        methods = self.names("eval.methods", ["all"])
        metrics = self.names("eval.metrics", ["all"])
        fold = ev.get("fold")
        if fold is not None and not isinstance(fold, bool):  # bool("false") is True
            raise ProfileValueError(f"{self.where(['eval.fold'])}: expected true or false, got {fold!r}")
        for key in ("split", "device"):
            if not isinstance(ev.get(key, ""), str):
                raise ProfileValueError(f"{self.where([f'eval.{key}'])}: expected a name, got {ev[key]!r}")
        return RunConfig(
            data=str(self.data), models=[str(c) for c in self.checkpoints().values()],
            methods=all_methods() if methods == ["all"] else methods,
            metrics=list(DEFAULT_METRICS) if metrics == ["all"] else metrics,
            layers=self.names("eval.layers", ["stage1", "stage2", "stage3", "stage4"]),
            mixes=self.names("eval.mixes", ["identity", "product", "geomean", "invexp"]),
            refine_layers=self.names("eval.refine_layers", []), method_grid=self.mapping("eval.method_grid"),
            image_range=(0, self.setting("eval.n_images", 200, least=1)), split=self.eval_split(),
            chunk_size=self.setting("eval.chunk_size", 16, least=1), seed=self.setting("eval.seed", 0),
            method_options=self.mapping("eval.method_options"), metric_options=self.mapping("eval.metric_options"),
            save_maps=self.setting("eval.save_maps", 8, least=0), device=ev.get("device") or "cpu",
            fold=fold if fold is not None else self._existing_run_fold())

    def _conflict_hint(self) -> str:
        """What to do when DIR/run holds a run of other settings (the run's own hint names its
        --overwrite, which reproduce does not have)."""
        return f"use another --out, or remove {self.run_dir} to compute the run again"

    def _n_images_source(self, n: int) -> str:
        """What set the run's image count, for the error when the split is smaller."""
        if "n_images" in self.p["eval"]:
            return f"the profile's eval.n_images ({n})"
        return f"eval.n_images {n} (its default: the profile sets none)"

    def _existing_run_fold(self) -> bool:
        """Fold, unless this folder holds a run that started unfolded: it resumes as it started
        (a run from before folding existed has no ``fold`` and was unfolded), so an upgrade does not
        stop the main job from reusing its chunks."""
        path = self.run_dir / "run_config.json"
        if not path.exists():
            return True
        old = read_json(path)
        if "fold" not in old:
            print(f"[reproduce] run: {path} is from before models were folded for inference; "
                  f"resuming it unfolded (delete {self.run_dir} to recompute folded)", flush=True)
        return bool({**LEGACY_DEFAULTS, **old}["fold"])

    def _run_sharded(self, config, workers: int, threads: int) -> dict:
        """Split the run over ``workers`` local processes (``run --shard i/n``), then merge."""
        from validation.pipeline.table import merge_run

        self._check_before_workers(config)
        base = [sys.executable, "-m", "validation", "run", "--data", config.data]
        for flag, value in self._worker_flags(config, threads):
            base += [flag] if value is None else [flag, value]
        base += ["--out", str(self.run_dir)]
        for m in config.models:
            base += ["--model", m]
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        procs, failed = [], []
        try:
            for i in range(workers):
                cmd = base + ["--shard", f"{i}/{workers}"] + ([] if (self.progress and i == 0) else ["--no-progress"])
                path = logs / f"run_shard{i}.log"
                log = open(path, "ab")
                procs.append((subprocess.Popen(cmd, stdout=log, stderr=None if i == 0 else subprocess.STDOUT,
                                               preexec_fn=_child_setup(os.getpid())), (log, path, log.tell()), cmd))
            for proc, (_, path, start), cmd in procs:
                if proc.wait() != 0:
                    failed.append((" ".join(cmd), path, start))
        finally:
            _stop([proc for proc, _, _ in procs])
            for _, (log, _, _), _ in procs:
                log.close()
        if failed:
            # the first worker error, with the profile keys of the flags it names, as an unsharded run
            # says it (shard 0's stderr is the terminal's, not in its log)
            errors = [e for _, path, start in failed for e in _worker_errors(path, start)]
            why = f": {self.where(_flag_keys(errors[0]))}: {errors[0]}" if errors else ""
            raise RuntimeError(f"{len(failed)} shard process(es) failed{why} (see {logs}/run_shard*.log): {failed[0][0]}")
        manifest = merge_run(self.run_dir)
        return {"workers": workers, "threads_per_worker": threads, "rows": manifest["rows"],
                "status_counts": manifest["status_counts"]}

    def _check_before_workers(self, config) -> None:
        """The run's checks before any work, made here as the unsharded run makes them (on the
        CPU: the check reads layer names and metadata), so that a bad profile value is the same
        error in both paths: the workers' errors would only reach their log files."""
        from validation.pipeline.run import Components, Runner

        Runner(dataclasses.replace(config, device="cpu"), self.run_dir, self.components or Components(),
               progress=False, conflict_hint=self._conflict_hint(),
               range_source=self._n_images_source(config.image_range[1])).check_inputs()

    def _worker_flags(self, config, threads: int) -> list[tuple[str, str | None]]:
        """The profile's settings as the workers' ``run`` flags (each in `RUN_FLAG_KEYS`); the
        options go through files in ``DIR/run/options``."""
        opts = self.run_dir / "options"
        write_json(opts / "method_options.json", config.method_options)
        write_json(opts / "metric_options.json", config.metric_options)
        write_json(opts / "method_grid.json", config.method_grid)
        a, b = config.image_range
        flags = [("--methods", ",".join(config.methods)), ("--metrics", ",".join(config.metrics)),
                 ("--layers", ",".join(config.layers)), ("--refine-layers", ",".join(config.refine_layers)),
                 ("--mix", ",".join(config.mixes)), ("--images", f"{a}:{b}"), ("--split", config.split),
                 ("--chunk-size", str(config.chunk_size)), ("--seed", str(config.seed)),
                 ("--method-options", str(opts / "method_options.json")),
                 ("--metric-options", str(opts / "metric_options.json")),
                 ("--method-grid", str(opts / "method_grid.json")),
                 ("--save-maps", str(config.save_maps)), ("--threads", str(threads)), ("--device", config.device)]
        return flags + ([] if config.fold else [("--no-fold", None)])

    def recorded_profile(self) -> str | None:
        """The profile this folder's run was built with (``run/profile.json``, else the
        ``reproduce.json`` of a folder from before it existed); None for a folder without a run."""
        if (self.run_dir / "profile.json").exists():
            return (read_json(self.run_dir / "profile.json") or {}).get("name")
        if self.run_dir.exists() and (self.out / "reproduce.json").exists():
            return (read_json(self.out / "reproduce.json") or {}).get("profile")
        return None

    def check_recorded_profile(self, steps) -> None:
        """Analyze and report act on the folder's run: without the run step (which checks the run
        folder against this profile's evaluation settings, refusing another run), a folder built
        with another profile would be analysed and recorded under this profile's name."""
        if "run" in steps or not {"analyze", "report"} & set(steps):
            return
        old, new = self.recorded_profile(), self.p.get("name")
        if old is not None and old != new:
            doing = " and ".join(s for s in ("analyze", "report") if s in steps)
            raise ValueError(f"{self.out} holds a run built with profile {old!r}, not {new!r}: --steps "
                             f"{','.join(steps)} would {doing} it under profile {new!r}; use profile {old!r} "
                             f"(--profile), include the run step, or use another --out")

    def n_boot(self) -> int:
        return self.setting("analyze.n_boot", 1000, least=1)

    def analyze(self):
        from validation.analyze import analyze_run

        analyze_run(self.run_dir, n_boot=self.n_boot())
        return {"tables": str(self.run_dir / "analysis")}

    def report(self):
        from validation.report import write_report

        # without the analyze step (--steps run,report) the report computes the tables itself:
        # with the profile's replicates, not write_report's default
        return {"report": str(write_report(self.run_dir, n_boot=self.n_boot()))}


def reproduce(profile: str, out: str | os.PathLike, steps=None, progress: bool = True,
              components=None) -> dict:
    prof = load_profile(profile)
    steps = list(steps or STEPS)
    bad = sorted(set(steps) - set(STEPS))
    if bad:
        raise ValueError(f"unknown steps {bad}; choose from {', '.join(STEPS)}")
    r = Reproduction(prof, out, progress, components)
    r.check_recorded_profile(steps)
    r.out.mkdir(parents=True, exist_ok=True)
    if (r.out / "reproduce.json").exists():
        r.record["previous"] = read_json(r.out / "reproduce.json").get("steps")
    total = time.perf_counter()
    for step in STEPS:
        if step in steps:
            r._time(step, getattr(r, step))
    r.record["total_seconds"] = round(time.perf_counter() - total, 1)
    write_json(r.out / "reproduce.json", r.record)
    return r.record
