"""trainers.inference.inference_copy: folded copies compute what the original computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers import build_model
from trainers.inference import FeatureGridCheck, inference_copy
from validation.attributions import explain


def _with_trained_like_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their init, so folding is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def _logits_and_input_grad(model, x, target):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return logits.detach(), grad


@pytest.mark.parametrize("arch,size", [("resnet18", 32), ("vgg11_bn", 64), ("vgg11", 32)])
def test_outputs_and_input_gradients_match_the_original(arch, size):
    torch.manual_seed(0)
    model = _with_trained_like_batchnorm(build_model(arch, image_size=size))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = inference_copy(model)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2, 5])
    want_logits, want_grad = _logits_and_input_grad(model, x, target)
    got_logits, got_grad = _logits_and_input_grad(fast, x, target)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-5 * want_grad.abs().max().item())
    # the original is untouched and still has its batch norm; the copy has none left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    assert sum(note.startswith("batchnorm") for note in fast.inference_folds) == n_bn
    if arch.startswith("vgg"):
        # 32 px: a 1 x 1 feature grid; 64 px: 2 x 2; the head now reads 512 * cells inputs
        cells = (size // 32) ** 2
        assert fast.backbone.classifier[0].in_features == 512 * cells
        assert model.backbone.classifier[0].in_features == 512 * 49


def test_gradcam_maps_at_every_stage_match():
    model = _with_trained_like_batchnorm(build_model("vgg11_bn", image_size=32))
    fast = inference_copy(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 4])
    for layer in ("stage1", "stage2", "stage3", "stage4"):
        want = explain(model, x, target, method="gradcam", layer=layer, raw=True)
        got = explain(fast, x, target, method="gradcam", layer=layer, raw=True)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())


def test_a_training_model_is_copied_in_eval_mode_and_left_training():
    model = build_model("resnet18", image_size=32).train()
    fast = inference_copy(model)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m.training for m in fast.modules())


def test_the_folded_vgg_refuses_another_image_size():
    fast = inference_copy(build_model("vgg11", image_size=64).eval())
    assert isinstance(fast.backbone.avgpool, FeatureGridCheck)
    fast(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"64 px inputs \(2x2 feature grid\).*\(4, 4\) grid"):
        fast(torch.rand(1, 3, 128, 128))


def test_without_an_image_size_only_batchnorm_is_folded():
    torch.manual_seed(0)
    # a bare torchvision VGG, with batch norm statistics far from their init; float64, so the
    # fold's rounding (~1e-16) cannot flip a ReLU or max-pool tie (in float32 some inputs do, which
    # reroutes a few input gradients) and the comparison can be tight
    net = _with_trained_like_batchnorm(build_model("vgg11_bn", image_size=32).backbone).double()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_copy(net)
    assert isinstance(fast.avgpool, nn.AdaptiveAvgPool2d) and fast.avgpool.output_size == (7, 7)
    assert fast.classifier[0].in_features == 512 * 49  # the pool was not folded into the head
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert n_bn == 8  # vgg11_bn: one per convolution
    assert len(fast.inference_folds) == n_bn
    assert all(note.startswith("batchnorm") for note in fast.inference_folds)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 0
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    target = torch.tensor([1, 3, 5])
    want_logits, want_grad = _logits_and_input_grad(net, x, target)
    got_logits, got_grad = _logits_and_input_grad(fast, x, target)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12 * want_grad.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _SharedConvOutput(nn.Module):
    """The conv output feeds the batch norm and a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_only_batchnorm_that_is_a_convolutions_sole_user_is_folded():
    net = _with_trained_like_batchnorm(_SharedConvOutput())
    fast = inference_copy(net)
    assert fast.inference_folds == ["batchnorm bn2 into conv2"]
    assert isinstance(fast.bn, nn.BatchNorm2d) and isinstance(fast.bn2, nn.Identity)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-6)


class _ConvCalledTwice(nn.Module):
    """One convolution module at two call sites, batch norm after one of them only: folding the
    batch norm into the shared weights would change the other call's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class _BatchNormCalledTwice(nn.Module):
    """One batch norm module after two convolutions: it can be folded into neither alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.conv2(x))


@pytest.mark.parametrize("shared", [_ConvCalledTwice, _BatchNormCalledTwice])
def test_modules_called_at_two_places_are_not_folded(shared):
    torch.manual_seed(0)
    net = _with_trained_like_batchnorm(shared())
    fast = inference_copy(net)
    assert fast.inference_folds == [] and isinstance(fast.bn, nn.BatchNorm2d)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-5, atol=1e-6)


def test_an_untraceable_model_is_copied_unfolded():
    class Branchy(_SharedConvOutput):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.bn2(self.conv2(x))
            return x

    net = _with_trained_like_batchnorm(Branchy())
    fast = inference_copy(net)
    assert fast.inference_folds == [] and isinstance(fast.bn2, nn.BatchNorm2d)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x))


@pytest.mark.parametrize("arch", ["convnext_tiny", "swin_t"])
def test_archs_without_batchnorm_are_copied_unchanged(arch):
    model = build_model(arch, image_size=32, stochastic_depth=0.0).eval()
    fast = inference_copy(model)
    assert fast.inference_folds == [] and fast is not model
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_the_copy_leaves_the_global_rng_alone():
    # the folded classifier layer gets its weights from the fold, not from a random initialisation
    model = build_model("vgg11", image_size=32).eval()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    fast = inference_copy(model)
    assert isinstance(fast.backbone.avgpool, FeatureGridCheck)
    assert torch.equal(torch.get_rng_state(), before)
