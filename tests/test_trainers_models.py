"""Architecture registry: every arch at 32 px, learning on a fixed tiny set, Swin windows,
offline ImageNet weights, and clear errors."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import models as tvm

from trainers import available_archs, build_model
from trainers.models import IMAGENET_MEAN, IMAGENET_STD, imagenet_weights_file, swin_window_size

ARCHS = ("resnet18", "vgg11", "vgg11_bn", "swin_t", "convnext_tiny")


def test_registry_lists_the_five_archs():
    assert set(available_archs()) == set(ARCHS)


def _tiny_set():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 32, 32, generator=g), torch.arange(6)


# VGG's 120M-parameter head needs a lower lr from scratch (1e-3 overshoots to loss ~60)
LR = {"vgg11": 1e-4, "vgg11_bn": 1e-4}
STEPS = {"vgg11": 5, "vgg11_bn": 5}  # the others fit six images in 1-2 steps


def _without_noise(model):
    """Dropout and stochastic depth off, so the loss measures learning, not noise; batch norm
    stays in training mode (6 steps of running statistics mean little in eval mode)."""
    from torchvision.ops import StochasticDepth

    for m in model.modules():
        if isinstance(m, (torch.nn.Dropout, StochasticDepth)):
            m.p = 0.0
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_on_a_fixed_tiny_set(arch):
    torch.manual_seed(0)
    model = _without_noise(build_model(arch, image_size=32))
    x, y = _tiny_set()
    opt = torch.optim.AdamW(model.parameters(), lr=LR.get(arch, 1e-3), fused=True)
    losses = []
    for _ in range(STEPS.get(arch, 3)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.7 * losses[0], (arch, losses, final)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_contract(arch):
    model = build_model(arch, image_size=32).eval()
    assert model.arch == arch and model.image_size == 32 and model.num_classes == 6
    assert isinstance(model.normalize, torch.nn.Module)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        # normalisation inside: the backbone sees (x - mean) / std with ImageNet's statistics
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch.testing.assert_close(out, model.backbone((x - mean) / std))
    assert out.shape == (2, 6)
    assert list(IMAGENET_MEAN) == pytest.approx([0.485, 0.456, 0.406])
    assert list(IMAGENET_STD) == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("size,window", [(224, 7), (128, 4), (96, 3), (64, 2), (32, 1), (160, 5)])
def test_swin_window_tiles_every_stage(size, window):
    assert swin_window_size(size) == window
    for stage in (4, 8, 16, 32):  # no stage needs padding, so no token attends to padding
        assert (size // stage) % window == 0
    if size <= 128:
        blocks = [m for m in build_model("swin_t", image_size=size).modules()
                  if type(m).__name__ == "ShiftedWindowAttention"]
        assert blocks and all(list(b.window_size) == [window, window] for b in blocks)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown arch 'resnet19'.*resnet18"):
        build_model("resnet19")
    # every refusal names the arch it was asked for
    with pytest.raises(ValueError, match="^convnext_tiny: image_size must be a multiple of 32"):
        build_model("convnext_tiny", image_size=100)
    with pytest.raises(ValueError, match="^vgg11_bn: num_classes must be >= 2, got 1"):
        build_model("vgg11_bn", num_classes=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        build_model("resnet18", image_size=32)(torch.rand(3, 32, 32))


@pytest.mark.parametrize("arch, default", [("swin_t", 0.2), ("convnext_tiny", 0.1)])
def test_stochastic_depth_reaches_every_block(arch, default):
    from torchvision.ops import StochasticDepth

    def rates(model):
        return [m.p for m in model.modules() if isinstance(m, StochasticDepth)]

    # torchvision ramps the rate linearly over the blocks up to the given value at the last one
    assert max(rates(build_model(arch, image_size=32))) == pytest.approx(default)
    assert max(rates(build_model(arch, image_size=32, stochastic_depth=0.3))) == pytest.approx(0.3)
    assert set(rates(build_model(arch, image_size=32, stochastic_depth=0.0))) == {0.0}
    with pytest.raises(ValueError, match=rf"^{arch}: stochastic_depth must be in \[0, 1\)"):
        build_model(arch, image_size=32, stochastic_depth=1.0)
    with pytest.raises(ValueError, match="resnet18 has no stochastic depth"):
        build_model("resnet18", image_size=32, stochastic_depth=0.1)


def test_pretrained_without_weights_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = imagenet_weights_file("resnet18")
    assert expected.parent == tmp_path / "checkpoints"
    with pytest.raises(FileNotFoundError, match=expected.name):
        build_model("resnet18", pretrained=True)


def test_pretrained_reads_the_file_where_torchvision_caches_it(tmp_path, monkeypatch):
    # no mock: TORCH_HOME moves torch's hub folder, and the file name is the one torchvision's
    # load_state_dict_from_url gives the download (the last part of the weights' URL)
    from urllib.parse import urlparse

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = Path(urlparse(tvm.ResNet18_Weights.DEFAULT.url).path).name
    assert imagenet_weights_file("resnet18") == tmp_path / "hub" / "checkpoints" / name
    torch.manual_seed(3)
    imagenet = tvm.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "hub" / "checkpoints" / name)
    model = build_model("resnet18", image_size=32, pretrained=True)
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, imagenet.layer1[0].conv1.weight)


def test_pretrained_loads_local_weights_except_the_head(tmp_path):
    torch.manual_seed(1)
    imagenet = tvm.resnet18(weights=None)  # stands in for the downloaded ImageNet file
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model("resnet18", image_size=32, weights_path=path)
    torch.testing.assert_close(model.backbone.conv1.weight, imagenet.conv1.weight)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.backbone.fc.weight.shape == (6, 512)  # new head for the six classes


def test_pretrained_loads_files_without_batchnorm_counters(tmp_path):
    """torchvision's ImageNet files for resnet18 and vgg11_bn were saved before BatchNorm had a
    num_batches_tracked buffer: such a file is complete, and every weight in it must be loaded."""
    torch.manual_seed(2)
    imagenet = tvm.vgg11_bn(weights=None)
    with torch.no_grad():  # running statistics unlike a fresh model's, so a skipped copy shows
        for m in imagenet.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {k: v for k, v in imagenet.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "vgg11_bn-old.pth"
    torch.save(state, path)
    model = build_model("vgg11_bn", image_size=32, weights_path=path)
    own = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("classifier.6."):
            assert torch.equal(own[key], value), key
    assert own["classifier.6.weight"].shape == (6, 4096)
    # a file that really lacks a weight is still refused
    del state["features.0.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lacks 1 tensors for vgg11_bn, e.g. \['features.0.weight'\]"):
        build_model("vgg11_bn", image_size=32, weights_path=path)


def _bicubic_matrix(old: int, new: int, a: float = -0.75) -> np.ndarray:
    """(new, old) weights of 1-D bicubic resampling as torch does it (Keys kernel a = -0.75,
    half-pixel centres, no antialias, taps clamped at the border), written out independently."""
    def kernel(d):
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0

    m = np.zeros((new, old))
    for i in range(new):
        src = (i + 0.5) * old / new - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), old - 1)] += kernel(src - tap)
    return m


def test_pretrained_swin_resizes_the_position_bias(tmp_path):
    imagenet = tvm.swin_t(weights=None)  # window 7
    path = tmp_path / "swin.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model("swin_t", image_size=64, weights_path=path)  # window 2
    table = model.backbone.features[1][0].attn.relative_position_bias_table
    assert table.shape == ((2 * 2 - 1) ** 2, 3)
    # each head's (2w-1) x (2w-1) grid of biases, resized 13 x 13 -> 3 x 3 bicubically
    source = imagenet.features[1][0].attn.relative_position_bias_table.detach().double().numpy()
    w = _bicubic_matrix(13, 3)
    expected = np.stack([(w @ source[:, h].reshape(13, 13) @ w.T).reshape(9) for h in range(3)], axis=1)
    np.testing.assert_allclose(table.detach().double().numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, source[:9])  # a resize, not a crop of the table
    torch.testing.assert_close(model.backbone.features[0][0].weight, imagenet.features[0][0].weight)


def test_pretrained_refuses_a_wrong_file(tmp_path):
    path = tmp_path / "squeezenet.pth"
    torch.save(tvm.squeezenet1_1(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected tensor"):
        build_model("resnet18", weights_path=path)


def _unreadable_weights(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":  # an interrupted download
        torch.save(tvm.resnet18(weights=None).state_dict(), path)
        path.write_bytes(path.read_bytes()[:4096])
    elif kind == "pickled_module":  # torch.save(model): refused by weights_only=True
        torch.save(tvm.resnet18(weights=None), path)
    else:  # not a torch file at all
        path.write_text("<html>404 Not Found</html>")
    return path


@pytest.mark.parametrize("kind", ["truncated", "pickled_module", "text", "folder"])
def test_an_unreadable_weights_file_is_an_error_naming_it(tmp_path, kind, capsys):
    """Errors name the file (torch's own named neither it nor the model); a folder is called a
    folder, not "missing", which sent a user looking for a file that is there."""
    from trainers.cli import main

    if kind == "folder":
        path = tmp_path / "weights"
        path.mkdir()
        words = " is a folder, not resnet18's ImageNet weights"
    else:
        path = _unreadable_weights(tmp_path, kind)
        words = ": cannot be read as resnet18's ImageNet weights"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}{re.escape(words)}"):
        build_model("resnet18", image_size=32, weights_path=path)
    # bad input, found before training: one line and exit code 2 from the CLI, no traceback
    out = tmp_path / "run"
    assert main(["fit", "--weights-path", str(path), "--image-size", "32", "--out", str(out),
                 "--synth", "{size_bands: [[0.3, 0.4]]}", "--precision", "32-true", "--progress-bar", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shapesynth-train: error: ") and str(path) in err and words in err and err.count("\n") == 1
    assert not out.exists()
