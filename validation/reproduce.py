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

    ``extends: NAME_OR_PATH`` starts from that profile: each section of this one is merged into
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
    if "extends" in profile:
        base = {k: v for k, v in load_profile(profile.pop("extends")).items() if k not in ("name", "description")}
        for key, value in profile.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        profile = base
    for key in ("data", "train", "eval"):
        if key not in profile:
            raise ValueError(f"profile {path}: missing section {key!r}")
    profile.setdefault("name", path.stem)
    return profile


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _fill(args, **values) -> list[str]:
    """The arguments with each placeholder ``{name}`` replaced by its value. Other braces stay as
    written: an argument such as ``--synth '{size_bands: [[0.31, 0.39]]}'`` (a YAML mapping) is
    passed on unchanged, where ``str.format`` raised a KeyError on it."""
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"profile: unknown placeholder {{{name}}} in {match.string!r}; "
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


def _run_command(cmd: list[str], log: Path) -> None:
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
        raise RuntimeError(f"command failed (exit {returncode}): {' '.join(cmd)}\n"
                           f"--- last lines of {log} ---\n{tail}")


def _dataset_ready(data: Path, split: str, n_needed: int) -> bool:
    if not data.exists():
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

    def model_dirs(self) -> dict[str, Path]:
        return {arch: self.out / "models" / arch for arch in self.p["train"]["models"]}

    def checkpoints(self) -> dict[str, Path]:
        """What ``trainers.load_model`` is given: ``train.checkpoint`` (e.g.
        ``"{model_dir}/best.safetensors"``) filled in, or the training run folder itself."""
        pattern = self.p["train"].get("checkpoint")
        return {arch: Path(_fill([pattern], model_dir=str(d), arch=arch, **self.values)[0]) if pattern else d
                for arch, d in self.model_dirs().items()}

    def _time(self, step: str, fn) -> None:
        t0 = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - t0, 1)
        self.record["steps"][step] = info
        write_json(self.out / "reproduce.json", self.record)
        print(f"[reproduce] {step}: {info}", flush=True)

    @staticmethod
    def _command(spec: dict, module: str, **values) -> list[str]:
        """``command`` (a full argument list) or ``args`` for ``python -m <module>``."""
        if spec.get("command"):
            return _fill(spec["command"], **values)
        if not spec.get("args"):
            raise ValueError(f"profile: a {module} step needs 'args' (or 'command')")
        return [sys.executable, "-m", module] + _fill(spec["args"], **values)

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
        ev = self.p["eval"]
        need = int(ev.get("n_images", 200))
        self._check_existing_dataset()
        if _dataset_ready(self.data, ev.get("split", "test"), need):
            return {"reused": True}
        cmd = self._command(self.p["data"], "shapesynth", **self.values)
        _run_command(cmd, self.out / "logs" / "generate.log")
        if not _dataset_ready(self.data, ev.get("split", "test"), need):
            raise RuntimeError(f"{self.data}: generation finished but the {ev.get('split', 'test')} split "
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
                spec = {**{k: v for k, v in tr.items() if k in ("args", "command")}, **(tr["models"][arch] or {})}
                cmd = self._command(spec, "trainers", arch=arch, model_dir=str(model_dir), **self.values)
                status = "resumed" if _resumes(cmd, model_dir) else "trained"
                _run_command(cmd, self.out / "logs" / f"train_{arch}.log")
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
        from validation.cli import all_methods
        from validation.pipeline.run import DEFAULT_METRICS, RunConfig, run_eval

        ev = self.p["eval"]
        models = None
        if not self.models_checked:  # --steps without train: the same gate before any work
            models = self._models(train=False)
        methods = ev.get("methods", "all")
        metrics = ev.get("metrics", "all")
        config = RunConfig(
            data=str(self.data), models=[str(c) for c in self.checkpoints().values()],
            methods=all_methods() if methods == "all" else list(methods),
            metrics=list(DEFAULT_METRICS) if metrics == "all" else list(metrics),
            layers=list(ev.get("layers", ["stage1", "stage2", "stage3", "stage4"])),
            mixes=list(ev.get("mixes", ["identity", "product", "geomean", "invexp"])),
            refine_layers=list(ev.get("refine_layers") or []), method_grid=ev.get("method_grid") or {},
            image_range=(0, int(ev.get("n_images", 200))), split=ev.get("split", "test"),
            chunk_size=int(ev.get("chunk_size", 16)), seed=int(ev.get("seed", 0)),
            method_options=ev.get("method_options") or {}, metric_options=ev.get("metric_options") or {},
            save_maps=int(ev.get("save_maps", 8)), device=str(ev.get("device", "cpu")),
            fold=bool(ev["fold"]) if "fold" in ev else self._existing_run_fold())
        workers = int(ev.get("workers", 1))
        if workers > 1:
            summary = self._run_sharded(config, workers, int(ev.get("threads", 1)))
        else:
            import torch

            threads = torch.get_num_threads()
            try:
                if ev.get("threads"):
                    torch.set_num_threads(int(ev["threads"]))
                summary = run_eval(config, self.run_dir, components=self.components, progress=self.progress,
                                   range_source=self._n_images_source(config.image_range[1]))
            finally:
                torch.set_num_threads(threads)
        write_json(self.run_dir / "profile.json",
                   {"name": self.p.get("name"), "description": self.p.get("description"),
                    "budget_notes": self.p.get("budget_notes")})
        summary.pop("manifest", None)
        if models is not None:
            summary["models"] = models
        return summary

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
        from validation.pipeline.run import Components
        from validation.pipeline.table import merge_run

        a, b = config.image_range
        # checked here, not only in the workers, whose errors land in their logs
        n_data = len((self.components or Components()).dataset(config.data, config.split))
        if b > n_data:
            raise ValueError(f"{self._n_images_source(b)} asks for more images than the {config.split} "
                             f"split of {config.data} has ({n_data})")
        opts = self.run_dir / "options"
        write_json(opts / "method_options.json", config.method_options)
        write_json(opts / "metric_options.json", config.metric_options)
        write_json(opts / "method_grid.json", config.method_grid)
        base = [sys.executable, "-m", "validation", "run", "--data", config.data,
                "--methods", ",".join(config.methods), "--metrics", ",".join(config.metrics),
                "--layers", ",".join(config.layers), "--refine-layers", ",".join(config.refine_layers),
                "--mix", ",".join(config.mixes), "--images", f"{a}:{b}", "--split", config.split,
                "--chunk-size", str(config.chunk_size), "--seed", str(config.seed),
                "--method-options", str(opts / "method_options.json"),
                "--metric-options", str(opts / "metric_options.json"),
                "--method-grid", str(opts / "method_grid.json"),
                "--save-maps", str(config.save_maps), "--threads", str(threads), "--device", config.device,
                "--out", str(self.run_dir)]
        if not config.fold:
            base.append("--no-fold")
        for m in config.models:
            base += ["--model", m]
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        procs, failed = [], []
        try:
            for i in range(workers):
                cmd = base + ["--shard", f"{i}/{workers}"] + ([] if (self.progress and i == 0) else ["--no-progress"])
                log = open(logs / f"run_shard{i}.log", "a")
                procs.append((subprocess.Popen(cmd, stdout=log, stderr=None if i == 0 else subprocess.STDOUT,
                                               preexec_fn=_child_setup(os.getpid())), log, cmd))
            for proc, _, cmd in procs:
                if proc.wait() != 0:
                    failed.append(" ".join(cmd))
        finally:
            _stop([proc for proc, _, _ in procs])
            for _, log, _ in procs:
                log.close()
        if failed:
            raise RuntimeError(f"{len(failed)} shard process(es) failed (see {logs}/run_shard*.log): {failed[0]}")
        manifest = merge_run(self.run_dir)
        return {"workers": workers, "threads_per_worker": threads, "rows": manifest["rows"],
                "status_counts": manifest["status_counts"]}

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
        return int((self.p.get("analyze") or {}).get("n_boot", 1000))

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
