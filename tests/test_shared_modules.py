"""DeepLift and guided backprop on models whose nonlinear modules are shared: one ReLU
registered under several names and called twice, a container shared by two parents, a max-pool
called twice, one ReLU under two names of one parent. captum alone fails on the first three
("used more than once"); ours must equal the same network written with a distinct module per use
(captum on it for DeepLift: the independent reference), and leave the model as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from test_attributions_common import images
from validation.attributions import explain
from validation.attributions.captum_methods import DEEPLIFT_NONLINEAR


def _seeded(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


class Shared(nn.Module):
    """conv -> relu -> conv -> relu -> [pool -> pool] -> mean -> linear, with the nonlinear
    modules shared as ``sharing`` says, or one module per use for ``sharing="none"``."""

    def __init__(self, sharing: str):
        super().__init__()
        relu = nn.ReLU()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        if sharing == "aliases":            # one ReLU under four names, called twice
            self.relu, self.relu_alias = relu, relu
            self.first = nn.Sequential(self.conv1, relu)
            self.second = nn.Sequential(self.conv2, relu)
        elif sharing == "containers":       # the stages also registered inside a shared container
            self.first = nn.Sequential(self.conv1, relu)
            self.second = nn.Sequential(self.conv2, relu)
            self.stages = nn.Sequential(self.first, self.second)
        else:
            self.first = nn.Sequential(self.conv1, nn.ReLU())
            self.second = nn.Sequential(self.conv2, nn.ReLU())
        self.pool_twice = sharing != "none"
        self.pool, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
        self.with_pool = False
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.second(self.first(x))
        if self.with_pool:
            h = self.pool(self.pool(h)) if self.pool_twice else self.pool2(self.pool(h))
        return self.head(h.mean((2, 3)))


def _captum_reference(model: nn.Module, x, target, baseline):
    from captum.attr import DeepLift

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeepLift(model).attribute(x.clone().requires_grad_(), baselines=baseline,
                                         target=target).detach().sum(1)


@pytest.mark.parametrize("sharing", ["aliases", "containers"])
@pytest.mark.parametrize("with_pool", [False, True])
def test_deeplift_on_shared_modules_equals_captum_on_the_unshared_network(sharing, with_pool):
    shared, unshared = _seeded(Shared(sharing), 0), _seeded(Shared("none"), 0)
    shared.with_pool = unshared.with_pool = with_pool
    x, t = images(2, 16, seed=3), torch.tensor([1, 4])
    baseline = torch.full_like(x, 0.2)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), unshared(x))     # the same function
    with pytest.raises(RuntimeError):  # "used more than once", or a shape error for the pool
        _captum_reference(copy.deepcopy(shared), x, t, baseline)
    expected = _captum_reference(unshared, x, t, baseline)
    modules, state = list(shared.named_modules(remove_duplicate=False)), copy.deepcopy(shared.state_dict())
    ours = explain(shared, x, t, method="deeplift", baseline=0.2, reduce="sum", raw=True)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    # the reference is not degenerate: the plain gradient rule gives other maps
    assert expected.abs().max() > 1e-3
    # the model is as it was: every registration, the same objects, the same weights
    assert list(shared.named_modules(remove_duplicate=False)) == modules
    torch.testing.assert_close(shared.state_dict(), state, rtol=0, atol=0)
    assert not shared._forward_hooks and not shared._forward_pre_hooks


def test_deeplift_on_shared_relus_sums_to_the_logit_difference():
    """Summation to delta (no max-pool: captum's max-pool rule is not complete), in float64."""
    model = _seeded(Shared("containers"), 1).double()
    x, t = images(2, 16, seed=4).double(), torch.tensor([0, 2])
    attr = explain(model, x, t, method="deeplift", reduce="sum", raw=True)
    with torch.no_grad():
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(attr.sum((1, 2)).double(), delta, rtol=1e-5, atol=1e-7)


def test_the_split_covers_exactly_captums_nonlinear_rules():
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    assert set(DEEPLIFT_NONLINEAR) == set(SUPPORTED_NON_LINEAR)


class _TwoNames(nn.Module):
    """One ReLU registered as `act` and `act2` of the same parent, called through both names."""

    def __init__(self, alias: bool):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.act2 = self.act if alias else nn.ReLU()
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("method, options", [("guidedbackprop", {}), ("guidedgradcam", {"layer": "conv2"}),
                                             ("deeplift", {})])
def test_a_relu_under_two_names_of_one_parent_is_handled_at_each_use(method, options):
    """Guided backprop swapped the ReLUs found by `named_children()`, which lists a module
    registered twice under one parent once: its use through the second name stayed unguided."""
    shared, unshared = _seeded(_TwoNames(True), 2), _seeded(_TwoNames(False), 2)
    x, t = images(2, 16, seed=6), torch.tensor([0, 3])
    ours = explain(shared, x, t, method=method, reduce="sum", raw=True, **options)
    expected = explain(unshared, x, t, method=method, reduce="sum", raw=True, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
    assert expected.abs().max() > 1e-6
    assert shared.act2 is shared.act and type(shared.act) is nn.ReLU  # restored
