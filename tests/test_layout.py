"""Images reach models in channels_last on CPU: same values, same results, weights untouched."""
import torch

from test_metrics_helpers import resnet18
from validation._layout import fast_layout
from validation.attributions import explain
from validation.metrics._forward import class_probabilities


def test_fast_layout_keeps_values_and_only_changes_strides():
    x = torch.rand(2, 3, 8, 8)
    y = fast_layout(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, y)
    assert fast_layout(torch.rand(3, 8, 8)).is_contiguous()  # not a batch of images: unchanged


def test_forwards_and_maps_agree_with_nchw_and_leave_the_weights_alone():
    model = resnet18(0)
    formats = [p.is_contiguous() for p in model.parameters()]
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        nchw = torch.softmax(model(x), 1)[torch.arange(4), target]  # the plain NCHW forward
    torch.testing.assert_close(class_probabilities(model, x, target), nchw, rtol=1e-4, atol=1e-6)
    cams = explain(model, x, target, method="gradcam", layer="stage4", raw=True)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():  # Grad-CAM re-derived on NCHW tensors
        acts = {}
        h = model.backbone.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
        try:
            score = model(x)[torch.arange(4), target].sum()
        finally:
            h.remove()
        g, = torch.autograd.grad(score, acts["a"])
    expected = (g.mean((2, 3), keepdim=True) * acts["a"]).sum(1).detach()
    torch.testing.assert_close(cams, expected, rtol=1e-4, atol=1e-5)
    assert [p.is_contiguous() for p in model.parameters()] == formats


def test_models_receive_channels_last_images_on_cpu():
    """The layout change must actually reach the model, in the metrics' forwards and the methods'."""
    model = resnet18(0)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        assert not x.is_contiguous(memory_format=torch.channels_last)
        class_probabilities(model, x, torch.tensor([0, 1]))
        explain(model, x, torch.tensor([0, 1]), method="gradcam", layer="stage4")
    finally:
        hook.remove()
    assert len(seen) >= 2 and all(seen)
