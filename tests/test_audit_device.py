"""Device rules checked on a CPU-only machine: a stand-in accelerator.

``Dev`` tensors report the ``meta`` device but hold CPU data, and ``FakeDeviceMode`` applies
CUDA's rules to every op: a non-scalar CPU tensor next to a device tensor raises "Expected all
tensors to be on the same device", a device tensor may be indexed by CPU indices but not a CPU
tensor by device ones, a CPU generator may not draw onto the device, and ``.numpy()`` is refused.
Unlike plain ``meta`` tensors, values are computed, so ``.item()``/``.tolist()``/``nonzero``
work (as they do on CUDA, as syncs) and results can be compared with the CPU's. Code that checks
``x.device.type == "cpu"`` takes its non-CPU branch here, as on a GPU.

This complements the CUDA-only tests (tests/test_device_readiness.py), which never run on a
machine without a GPU; it does not replace them (cuDNN, TF32 and CUDA generators are not modelled).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

python_dispatch = pytest.importorskip("torch.utils._python_dispatch")

from validation.attributions import base as attributions_base, get_explainer  # noqa: E402
from validation.metrics import METRIC_NAMES, evaluate, linear_impute_complementary, road_images  # noqa: E402
from test_attributions_common import build, images  # noqa: E402
from test_metrics_helpers import TinyConv, cam_maps, smooth_images  # noqa: E402

FAKE = torch.device("meta")
aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMixing(RuntimeError):
    pass


class Dev(torch.Tensor):
    """CPU data reporting the stand-in device."""

    @staticmethod
    def __new__(cls, elem):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=FAKE, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with FakeDeviceMode():
            return func(*args, **(kwargs or {}))

    @staticmethod
    def _index(idx):
        # torch builds a list index on self's device outside dispatch (an empty meta tensor here);
        # CUDA takes CPU index tensors, so a CPU one stands in for it
        conv = lambda i: torch._C._VariableFunctions.as_tensor(i) if isinstance(i, list) else i  # noqa: E731
        return tuple(conv(i) for i in idx) if isinstance(idx, tuple) else conv(idx)

    def __getitem__(self, idx):
        return super().__getitem__(Dev._index(idx))

    def __setitem__(self, idx, value):
        return super().__setitem__(Dev._index(idx), value)

    def tolist(self):  # a device-to-host copy, as on CUDA
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy (stand-in device)")


class FakeDeviceMode(python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, Dev)]
        on_cpu = [t for t in tensors if not isinstance(t, Dev)]
        if any(t.device.type == FAKE.type for t in on_cpu):
            raise DeviceMixing(f"{func}: a data-less {FAKE.type} tensor (made outside the stand-in)")
        device = kwargs.get("device")
        to_device = device is not None and torch.device(device).type == FAKE.type
        to_cpu = device is not None and torch.device(device).type == "cpu"
        generator = kwargs.get("generator")
        if generator is not None:
            target = FAKE.type if to_device or (on_device and not to_cpu) else "cpu"
            if generator.device.type != target:
                raise DeviceMixing(f"Expected a '{target}' device type for generator but found "
                                   f"'{generator.device.type}'")
        if on_device and func in INDEX_OPS:
            if not isinstance(args[0], Dev):
                raise DeviceMixing(f"{func}: indices should be either on cpu or on the same device as the "
                                   "indexed tensor (cpu)")
            values = args[2] if len(args) > 2 else None
            if isinstance(values, torch.Tensor) and not isinstance(values, Dev) and values.dim():
                raise DeviceMixing(f"{func}: CPU values put into a device tensor")
        elif on_device and not (func is aten._to_copy.default and (to_device or to_cpu)):
            if any(t.dim() for t in on_cpu):  # CUDA takes 0-dim CPU tensors (scalars) only
                raise DeviceMixing(f"Expected all tensors to be on the same device: {func} got CPU tensor(s) "
                                   f"of shape {[tuple(t.shape) for t in on_cpu if t.dim()]}")
        if to_device:
            kwargs["device"] = torch.device("cpu")
        unwrapped = {}

        def unwrap(t):
            if isinstance(t, Dev):
                unwrapped[id(t.elem)] = t
                return t.elem
            return t

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        wrap_new = (bool(on_device) and not to_cpu) or to_device

        def wrap(o):
            if isinstance(o, torch.Tensor) and not isinstance(o, Dev):
                if id(o) in unwrapped:  # in-place and out= results: the caller's own tensor
                    return unwrapped[id(o)]
                if wrap_new:
                    return Dev(o)
            return o

        return tree_map(wrap, out)


def to_device(t: torch.Tensor) -> Dev:
    return Dev(t.detach().clone())


def model_to_device(model: torch.nn.Module) -> torch.nn.Module:
    with FakeDeviceMode(), torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[name] = torch.nn.Parameter(to_device(p), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = to_device(b)
    return model


def on_device(t) -> bool:
    return isinstance(t, Dev) and t.device.type == FAKE.type


@pytest.fixture
def device_mode(monkeypatch):
    """The stand-in device, with torch.tensor / torch.as_tensor(..., device=<it>) filled with data
    (torch builds those outside dispatch); CPU reference runs are in NCHW, as on a GPU, so the
    values compare to float rounding."""
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def factory(data, *args, device=None, _original=original, **kwargs):
            if device is not None and torch.device(device).type == FAKE.type:
                if isinstance(data, Dev):
                    return data if kwargs.get("dtype") in (None, data.dtype) else data.to(kwargs["dtype"])
                return Dev(_original(data, *args, device="cpu", **kwargs))
            return _original(data, *args, device=device, **kwargs)

        monkeypatch.setattr(torch, name, factory)
    nchw = lambda x: x  # noqa: E731
    monkeypatch.setattr(attributions_base, "fast_layout", nchw)
    monkeypatch.setattr("validation.metrics._forward.fast_layout", nchw)
    return FakeDeviceMode


# ---------------------------------------------------------------------------------------------
# the stand-in applies CUDA's rules (else the tests below would prove nothing)

def test_stand_in_refuses_what_cuda_refuses(device_mode):
    x = to_device(torch.arange(6.0).view(2, 3))
    with device_mode():
        with pytest.raises(DeviceMixing, match="same device"):
            x + torch.ones(2, 3)
        with pytest.raises(DeviceMixing, match="indices should be"):
            torch.arange(3)[to_device(torch.tensor([0, 2]))]
        with pytest.raises(DeviceMixing, match="device type for generator"):
            torch.randn(2, generator=torch.Generator().manual_seed(0), device=x.device)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        # what CUDA allows: 0-dim CPU tensors, CPU indices, explicit transfers, syncs
        y = x * torch.tensor(2.0) + torch.zeros(2, 3, device=x.device)
        assert on_device(y) and y.elem.tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
        assert x[torch.tensor([1])].tolist() == [[3.0, 4.0, 5.0]]
        assert torch.as_tensor([1, 2], device=x.device).tolist() == [1, 2]
        assert not on_device(x.cpu()) and on_device(torch.ones(2).to(x.device))
        assert x.sum().item() == 15.0


# ---------------------------------------------------------------------------------------------
# metrics and methods: results on the input's device, equal to the CPU's

def test_every_metric_stays_on_the_device_and_matches_cpu(device_mode):
    x, maps = smooth_images(3, 3, 24, 24), cam_maps(3, 24, 24)
    gt, target = (cam_maps(3, 24, 24, seed=1) > 0.3).float(), torch.tensor([0, 2, 5])
    model = TinyConv()
    on_cpu = evaluate(model, x, target, maps, METRIC_NAMES, explainer=get_explainer("gradcam", model, layer="conv"),
                      gt=gt, fractions=(0.25, 0.5, 0.75))
    model = model_to_device(TinyConv())
    with device_mode():
        on_dev = evaluate(model, to_device(x), to_device(target), to_device(maps), METRIC_NAMES,
                          explainer=get_explainer("gradcam", model, layer="conv"), gt=to_device(gt),
                          fractions=(0.25, 0.5, 0.75))
    for name in METRIC_NAMES:
        assert on_device(on_dev[name]), name
        torch.testing.assert_close(on_dev[name].elem, on_cpu[name], rtol=0, atol=1e-5, equal_nan=True, msg=name)
        assert on_dev.reasons[name] == on_cpu.reasons[name], name
    assert on_device(on_dev.road_morf) and on_device(on_dev.probability) and on_device(on_dev.prediction)


def test_imputation_stays_on_the_device_and_matches_cpu(device_mode):
    x, maps = smooth_images(2, 3, 20, 16), cam_maps(2, 20, 16)
    removed = maps > 0.3
    removed[0] = False
    removed[0, 0, 0] = True  # a lopsided pair: solved as two single systems (index tensors)
    with device_mode():
        pairs = linear_impute_complementary(to_device(x), to_device(removed))
        perturbed = road_images(to_device(x), to_device(maps), (0.1, 0.5, 0.8))
    assert on_device(pairs) and on_device(perturbed)
    torch.testing.assert_close(pairs.elem, linear_impute_complementary(x, removed), rtol=0, atol=1e-5)
    torch.testing.assert_close(perturbed.elem, road_images(x, maps, (0.1, 0.5, 0.8)), rtol=0, atol=1e-5)


METHODS = [("gradcam", {}), ("gradcampp", {"cell_centres": "model"}), ("layercam", {}), ("shapleycam", {}),
           ("lafam", {}), ("guidedbackprop", {}), ("guidedgradcam", {}),
           ("refinecam", {"mix": "invexp"}), ("deeplift", {"batch_size": 1}), ("inputxgradient", {}),
           ("integratedgradients", {"n_steps": 4, "baseline": torch.full((3, 1, 1), 0.5)}),
           ("lime", {"superpixels": "grid", "grid_cells": 4, "n_samples": 12}),
           ("kernelshap", {"superpixels": "grid", "grid_cells": 4, "n_samples": 12}),
           ("randomcam", {}), ("halfcam", {}), ("all1scam", {}), ("centre", {})]


@pytest.mark.parametrize("method, options", METHODS, ids=[m for m, _ in METHODS])
def test_methods_stay_on_the_device_and_match_cpu(method, options, device_mode):
    x, target = images(2, 32), torch.tensor([1, 4])
    on_cpu = get_explainer(method, build("resnet18"), **options).explain(x, target)
    model = model_to_device(build("resnet18"))
    with device_mode():
        on_dev = get_explainer(method, model, **options).explain(to_device(x), to_device(target))
    assert on_device(on_dev.maps) and on_device(on_dev.degenerate) and on_device(on_dev.target)
    torch.testing.assert_close(on_dev.maps.elem, on_cpu.maps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["official", "pytorch-grad-cam"])
def test_scorecam_stays_on_the_device_and_matches_cpu(variant, device_mode):
    # a small model: Score-CAM runs one forward per channel
    x, target = smooth_images(2, 3, 24, 24), torch.tensor([1, 4])
    on_cpu = get_explainer("scorecam", TinyConv(), layer="conv", variant=variant, batch_size=5).attribute(x, target)
    model = model_to_device(TinyConv())
    with device_mode():
        on_dev = get_explainer("scorecam", model, layer="conv", variant=variant,
                               batch_size=5).attribute(to_device(x), to_device(target))
    assert on_device(on_dev)
    torch.testing.assert_close(on_dev.elem, on_cpu, rtol=0, atol=1e-5)
