"""State audit: no hidden global random state, and the caller's state put back.

* The pipeline's dry run of the metric options (``_dry_evaluate``) used ``torch.manual_seed(0)``
  inside ``fork_rng(devices=[])``: that also (lazily) reseeds every CUDA generator, which the fork
  does not restore.
* ``trainers.fit`` left the process-wide flags Lightning's Trainer sets from ``deterministic``
  (torch's deterministic algorithms, cuDNN benchmark, ``CUBLAS_WORKSPACE_CONFIG``) as the run set
  them: ``deterministic=False`` (the default) turned a caller's deterministic algorithms off.
* Every registered method, and every metric that runs the model, on a model with BatchNorm and
  Dropout in train mode and frozen parameters: its state is as it came, also when a forward fails.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from validation.attributions.registry import METHODS, available_methods, get_explainer
from validation.metrics import adcc, arcc, average_drop, coherency, evaluate, road


# ---------------------------------------------------------------------------------------------
# the dry run of the metric options draws nothing from the caller's generators, CUDA's included

def test_the_metric_option_dry_run_reseeds_no_cuda_generator(monkeypatch):
    from validation.pipeline import checks

    cuda_seeds = []  # torch.manual_seed reseeds every CUDA device through this (queued if not initialised)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    cpu = torch.get_rng_state()
    checks._dry_evaluate(["average_drop", "road"], {"fractions": [0.2, 0.5]}, (3, 8, 8))
    with pytest.raises(ValueError, match="fractions"):  # it still refuses what the metrics refuse
        checks._dry_evaluate(["road"], {"fractions": [0.5, 2.0]}, (3, 8, 8))
    assert cuda_seeds == []
    assert torch.equal(torch.get_rng_state(), cpu)


# ---------------------------------------------------------------------------------------------
# fit puts the caller's process-wide torch flags back

def _tiny_arch(num_classes, image_size):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, num_classes))


def _cfg(out, **kw):
    from trainers.api import TrainConfig

    return TrainConfig(arch="tiny_state", image_size=32, out=str(out), batch_size=16, max_epochs=1, train_length=16,
                       val_length=16, test_length=12, precision="32-true", num_workers=0, progress_bar=False,
                       curriculum_epochs=0, log_every_n_steps=1, lr=1e-2, stop_at_val_acc=None,
                       synth={"size_bands": [[0.3, 0.4], [0.2, 0.25]]}, **kw)


@pytest.fixture
def caller_flags(monkeypatch):
    from trainers import models

    monkeypatch.setitem(models._BUILDERS, "tiny_state", _tiny_arch)
    monkeypatch.setitem(models._HEADS, "tiny_state", "4")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]


def _flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.mark.parametrize("caller,deterministic", [((False, False, True, None), True),
                                                   ((True, True, True, ":16:8"), False)])
def test_fit_restores_the_callers_deterministic_flags(tmp_path, caller_flags, caller, deterministic):
    from trainers.api import fit

    torch.use_deterministic_algorithms(caller[0], warn_only=caller[1])
    torch.backends.cudnn.benchmark = caller[2]
    if caller[3] is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = caller[3]
    seen = []

    class Spy(__import__("pytorch_lightning").Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(torch.are_deterministic_algorithms_enabled())

    fit(_cfg(tmp_path / "run", deterministic=deterministic), callbacks=[Spy()])
    assert seen == [deterministic]  # the run itself trains as configured
    assert _flags() == caller


def test_a_refused_trainer_option_leaves_the_flags_as_they_were(tmp_path, caller_flags):
    from trainers.api import plan_fit

    torch.use_deterministic_algorithms(True, warn_only=True)
    before = _flags()
    with pytest.raises(ValueError, match="no_such_strategy"):
        plan_fit(_cfg(tmp_path / "run", deterministic=False), trainer_overrides={"strategy": "no_such_strategy"})
    assert _flags() == before


# ---------------------------------------------------------------------------------------------
# every registered method and every metric that runs the model leaves the model as it came

_HOOK_DICTS = sorted(k for k, v in vars(nn.Module()).items() if "hook" in k and isinstance(v, dict))


class _Tiny(nn.Module):
    """BatchNorm and Dropout, one ReLU used twice; ``fail_at``: the forward pass that raises."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8)
        self.relu, self.drop, self.fc = nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 4)
        self.calls, self.fail_at = 0, None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        h = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.drop(h.mean((2, 3))))


def _model():
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        model = _Tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=g))
    model.train()
    model.bn2.eval()
    model.conv1.bias.requires_grad_(False)
    return model


def _state(model):
    return ([(n, type(m), id(m), m.training, tuple(len(getattr(m, k)) for k in _HOOK_DICTS))
             for n, m in model.named_modules()],
            [(n, p.requires_grad, p.grad, p.detach().double().sum().item()) for n, p in model.named_parameters()],
            [(n, b.double().sum().item()) for n, b in model.named_buffers()],
            torch.is_grad_enabled(), torch.get_rng_state().tolist())


_X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
_OPTIONS = {"scorecam": {"batch_size": 8}, "relax": {"n_masks": 8, "batch_size": 8},
            "lime": {"n_samples": 8, "superpixels": "grid", "grid_cells": 2},
            "kernelshap": {"n_samples": 8, "superpixels": "grid", "grid_cells": 2},
            "integratedgradients": {"n_steps": 3}, "refinecam": {"base": "gradcampp", "layers": ("conv1", "conv2")}}


def _attribute(method, model):
    options = dict(_OPTIONS.get(method, {}))
    if METHODS[method].uses_layer:
        options["layer"] = "conv2"
    per_call = {"gt": (_X[:, 0] > 0.5).float()} if method == "oracle" else {}
    return get_explainer(method, model, **options).attribute(_X, [1, 2], **per_call)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_leaves_the_model_as_it_came(method):
    for fail_at, grad in ((None, True), (1, True), (1, False)):
        model = _model()
        model.fail_at = fail_at
        with torch.set_grad_enabled(grad):
            before = _state(model)
            try:
                _attribute(method, model)
            except RuntimeError as err:
                assert fail_at is not None and "boom" in str(err)
            assert _state(model) == before, (method, fail_at, grad)


def _gradcam(model):
    return get_explainer("gradcam", model, layer="conv2")


_MAPS = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3))
_METRICS = {
    "average_drop": lambda m, t: average_drop(m, _X, t, _MAPS),
    "coherency": lambda m, t: coherency(_X, t, _MAPS, _gradcam(m)),
    "adcc": lambda m, t: adcc(m, _X, t, _MAPS, _gradcam(m)),
    "road": lambda m, t: road(m, _X, t, _MAPS, fractions=(0.2, 0.5)),
    "arcc": lambda m, t: arcc(m, _X, t, _MAPS, _gradcam(m), fractions=(0.2, 0.5)),
    "evaluate": lambda m, t: evaluate(m, _X, t, _MAPS, explainer=_gradcam(m), fractions=(0.2, 0.5)),
}


@pytest.mark.parametrize("metric", sorted(_METRICS))
def test_every_model_metric_leaves_the_model_as_it_came(metric):
    for fail_at, target in ((None, [1, 2]), (1, [1, 2]), (2, [1, 2]), (None, [1, 9])):
        model = _model()
        model.fail_at = fail_at
        before = _state(model)
        try:
            _METRICS[metric](model, torch.tensor(target))
        except (RuntimeError, ValueError) as err:
            assert fail_at is not None or target[1] == 9, err
        assert _state(model) == before, (metric, fail_at, target)
