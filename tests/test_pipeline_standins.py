"""Small stand-ins for the pipeline's collaborators (model loader, dataset, explainers, metrics).

Imported by the pipeline tests and by the subprocesses of the sharding test; holds no tests.
The run's logic (configurations, chunks, resume, errors, merge) is what those tests check, so
the stand-ins are deliberately simple and fully deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from validation.pipeline.run import Components, RunConfig

SIZE = 16
N_IMAGES = 20
POISON = 5  # the "boom" method fails on this image only
CLASSES = ("zero", "one", "two")


class TinyDataset:
    class_names = CLASSES

    def __init__(self, n=N_IMAGES, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.9
        self.mask = torch.zeros(n, 1, SIZE, SIZE)
        for i in range(n):
            r, c = (i * 3) % (SIZE - 6), (i * 5) % (SIZE - 6)
            self.mask[i, :, r:r + 6, c:c + 6] = 1.0
            self.x[i, :, r:r + 6, c:c + 6] += 0.1 * (i % 3)
        self.x[POISON, 0, 0, 0] = 1.0
        self.label = torch.arange(n) % 3

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"image": self.x[i], "mask": self.mask[i], "region": self.mask[i],
                "label": self.label[i], "index": i}


class TinyNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # as trainers.load_model: loading draws nothing
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def load_model(path):
    seed = sum(Path(path).name.encode())
    return TinyNet(seed).eval(), {"arch": "tiny", "name": Path(path).stem, "test_accuracy": 0.5,
                                  "image_size": SIZE, "class_names": list(CLASSES)}


class Explainer:
    def __init__(self, model, method, layer, mix, seed):
        self.model, self.method, self.layer, self.mix, self.seed = model, method, layer, mix, seed

    def attribute(self, x, target, gt=None):
        if self.method == "boom" and (x[:, 0, 0, 0] == 1.0).any():
            raise RuntimeError("planted failure")
        if self.method == "randomcam":
            g = torch.Generator().manual_seed(self.seed)
            return torch.rand(x.shape[0], *x.shape[-2:], generator=g)
        if self.method in ("flat", "halfcam"):
            return torch.full((x.shape[0], *x.shape[-2:]), 0.5)
        if self.method == "oracle":
            return gt.clone()
        k = {"-": 1, "l1": 2, "l2": 4}[self.layer]
        m = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), k)
        m = torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="nearest")[:, 0]
        if self.mix == "product":
            m = m * m
        m = m - m.amin(dim=(1, 2), keepdim=True)
        return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def explainer(model, cfg, layers, options, seed):
    return Explainer(model, cfg.method, cfg.layer, cfg.mix, seed)


def evaluate(model, x, target, maps, metrics, explainer, gt, options):
    flat_m, flat_g = maps.flatten(1), gt.flatten(1)
    out = {}
    if "gt_cosine" in metrics:
        out["gt_cosine"] = torch.nn.functional.cosine_similarity(flat_m, flat_g, dim=1)
    if "complexity" in metrics:
        out["complexity"] = flat_m.mean(1)
    if "peak" in metrics:  # NaN for constant maps, like the localisation metrics
        peak = flat_m.amax(1)
        out["peak"] = torch.where(flat_m.amin(1) == peak, torch.nan, peak)
    if "fragile" in metrics:  # fails on the poisoned image only
        if (x[:, 0, 0, 0] == 1.0).any():
            raise ArithmeticError("fragile metric failed")
        out["fragile"] = flat_m.amax(1)
    if "recompute" in metrics:  # like Coherency: re-runs the method through the explainer
        again = explainer.attribute(x * maps[:, None], target)
        out["recompute"] = torch.nn.functional.cosine_similarity(again.flatten(1), flat_m, dim=1)
    if "recompute_single" in metrics:  # "recompute" that takes one image at a time: forces the per-image retry
        if x.shape[0] > 1:
            raise ArithmeticError("one image at a time")
        again = explainer.attribute(x * maps[:, None], target)
        out["recompute_single"] = torch.nn.functional.cosine_similarity(again.flatten(1), flat_m, dim=1)
    if "road" in metrics or "arcc" in metrics:  # ARCC returns ROAD's curves too, as evaluate() does
        with torch.no_grad():
            p = torch.softmax(model(x), 1).gather(1, target[:, None])[:, 0]
        if "road" in metrics:
            out["road"] = p * 0 + flat_m.std(1)
        if "arcc" in metrics:
            out["arcc"] = p * flat_m.mean(1)
        spread = flat_m.std(1)
        out["road_morf"] = {f"{f:g}": p * (1 - f) * (1 - spread) for f in (0.2, 0.4)}
        out["road_lerf"] = {f"{f:g}": p * (1 - f / 2) for f in (0.2, 0.4)}
    return out


def components(counter=None, interrupt_after=None):
    calls = {"n": 0}

    def counting_evaluate(*args, **kwargs):
        calls["n"] += 1
        if counter is not None:
            counter.append(1)
        if interrupt_after is not None and calls["n"] > interrupt_after:
            raise KeyboardInterrupt("simulated interruption")
        return evaluate(*args, **kwargs)

    return Components(load_model=load_model, dataset=lambda path, split: TinyDataset(),
                      explainer=explainer, evaluate=counting_evaluate,
                      fingerprint=lambda path: "tiny-fingerprint",
                      layer_methods=("cam", "boom"), refinable=("cam",))


def make_models(folder: Path, names=("alpha", "beta")) -> list[str]:
    """Stand-in model files ``folder/<name>.ckpt`` (`load_model` builds each model from its name)."""
    paths = []
    for name in names:
        p = folder / f"{name}.ckpt"
        p.write_bytes(b"stand-in")
        paths.append(str(p))
    return paths


def config(models, **over) -> RunConfig:
    kw = dict(data="tiny", models=models, methods=["cam", "grad", "boom", "randomcam", "oracle"],
              metrics=["gt_cosine", "complexity", "peak", "road"], layers=["l1", "l2"],
              mixes=["identity", "product"], image_range=(0, N_IMAGES), chunk_size=4, save_maps=3)
    kw.update(over)
    return RunConfig(**kw)


def run_shard_main(models_dir: str, out: str, shard: str):
    """Entry of the sharding test's subprocesses."""
    from validation.pipeline.run import run_eval
    from validation.pipeline.shards import parse_shard

    torch.set_num_threads(1)
    models = [str(Path(models_dir) / f"{n}.ckpt") for n in ("alpha", "beta")]
    run_eval(config(models), out, shard=parse_shard(shard), components=components(), progress=False)
