"""Shared helpers for the metrics tests (no tests here): tiny models, CAM-like maps, a float64 spsolve reference."""
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve

WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
           (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def spsolve_system(image: np.ndarray, removed: np.ndarray):
    """The float64 system (A, b) of one image's removed pixels, as scipy CSC, plus their indices.

    Row i: sum of in-image neighbour weights * x_i - sum over removed neighbours w * x_j
    = sum over known neighbours w * pixel.
    """
    c, h, w = image.shape
    flat_removed = removed.ravel().astype(bool)
    idx = np.flatnonzero(flat_removed)
    n = len(idx)
    var = -np.ones(h * w, dtype=np.int64)
    var[idx] = np.arange(n)
    ys, xs = np.divmod(idx, w)
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    b = np.zeros((n, c))
    flat = image.reshape(c, -1).astype(np.float64)
    for (dy, dx), weight in WEIGHTS.items():
        yy, xx = ys + dy, xs + dx
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        diag[inside] += weight
        q = yy[inside] * w + xx[inside]
        unknown = flat_removed[q]
        r = np.flatnonzero(inside)
        rows.append(r[unknown]); cols.append(var[q[unknown]]); vals.append(np.full(unknown.sum(), -weight))
        np.add.at(b, r[~unknown], weight * flat[:, q[~unknown]].T)
    rows.append(np.arange(n)); cols.append(np.arange(n)); vals.append(diag)
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return a, b, idx


def spsolve_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Float64 reference: every removed pixel = weighted mean of its in-image 8 neighbours."""
    c, h, w = image.shape
    a, b, idx = spsolve_system(image, removed)
    n = len(idx)
    out = image.reshape(c, -1).astype(np.float64)
    if n:
        out[:, idx] = spsolve(a, b).reshape(n, c).T
    return out.reshape(c, h, w)


def smooth_images(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    return F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)


def cam_maps(b, h, w, seed=0, tie_free=True):
    """Blob-shaped maps like upsampled CAMs (ReLU zeros unless tie_free adds a tiny ramp)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 1, 4, 4, generator=g)
    maps = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    maps = torch.relu(maps - 0.45)
    if tie_free:
        maps = maps + 1e-3 * torch.rand(b, h, w, generator=g)
    return maps / maps.flatten(1).amax(1).view(-1, 1, 1)


class Normalised(torch.nn.Module):
    """Takes [0, 1] images, normalises inside (as trainers.build_model does)."""

    def __init__(self, net):
        super().__init__()
        self.backbone = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)


def resnet18(seed=0, num_classes=6):
    import torchvision
    torch.manual_seed(seed)
    model = Normalised(torchvision.models.resnet18(num_classes=num_classes)).eval()
    # random BatchNorm statistics make the random net output less degenerate
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


class TinyConv(torch.nn.Module):
    """A small conv classifier on [0, 1] images: fast and sensitive to pixel content."""

    def __init__(self, num_classes=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.relu(self.conv(x - 0.5))
        return self.fc(F.adaptive_avg_pool2d(h, 4).flatten(1))
