"""Doc audit (metrics/attributions): docs/attributions.md "Errors" promises that an option of the
wrong type raises, naming it. The on/off options ``raw`` and ``channels_last`` took any truthy
value: ``raw="false"`` silently returned raw layer-resolution maps."""
import pytest
import torch
from torch import nn

from validation.attributions import get_explainer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("method", ["gradcam", "relax", "centre"])
@pytest.mark.parametrize("value", ["false", "True", None, 2])
def test_raw_of_the_wrong_type_is_refused_naming_it(method, value):
    layer = {"layer": "features.4"} if method == "gradcam" else {}
    with pytest.raises(ValueError, match=r"raw must be True or False"):
        get_explainer(method, _Net().eval(), raw=value, **layer)


@pytest.mark.parametrize("value", ["no", "yes", 2])
def test_channels_last_of_the_wrong_type_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=r"channels_last must be None, True or False"):
        get_explainer("gradcam", _Net().eval(), layer="features.4", channels_last=value)


def test_bool_values_still_work():
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.rand(2, 3, 16, 16)
    for raw, size in ((True, (8, 8)), (False, (16, 16)), (1, (8, 8)), (0, (16, 16))):
        maps = get_explainer("gradcam", model, layer="features.4", raw=raw, channels_last=False).attribute(x, 0)
        assert tuple(maps.shape[-2:]) == size


# ---------------------------------------------------------------------------------------------
# docs/metrics.md: target is "a (B,) integer tensor, list or one int"; int8 targets were refused
# with "target must be an integer tensor of shape (2,), got (2,) torch.int8"

@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.int64])
def test_every_integer_target_dtype_is_taken(dtype):
    from validation.metrics import average_drop, evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    expected = average_drop(model, x, torch.tensor([0, 2]), maps)
    target = torch.tensor([0, 2], dtype=dtype)
    torch.testing.assert_close(average_drop(model, x, target, maps), expected)
    torch.testing.assert_close(evaluate(model, x, target, maps, "average_drop")["average_drop"], expected)


@pytest.mark.parametrize("target", [torch.tensor([0.0, 1.0]), torch.tensor([True, False])])
def test_float_and_bool_targets_are_still_refused(target):
    from validation.metrics import average_drop

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    with pytest.raises(ValueError, match=r"target must be an integer tensor"):
        average_drop(model, torch.rand(2, 3, 8, 8), target, torch.rand(2, 8, 8))
