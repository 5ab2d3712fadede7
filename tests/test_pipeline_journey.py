"""A researcher's journey through the pipeline: their own method registered in the attributions
registry, run, analysed; the statistics recomputed independently from the long table."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import test_pipeline_standins as S
from validation.pipeline.run import Components, RunConfig, run_eval
from validation.pipeline.table import load_results


class TwoConvNet(nn.Module):
    """Two spatial layers (``c1``, ``c2``), so a CAM has a shallow and a deep layer to refine."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            self.c1 = nn.Conv2d(3, 4, 3, padding=1)
            self.c2 = nn.Conv2d(4, 4, 3, padding=1, stride=2)
            self.fc = nn.Linear(4, len(S.CLASSES))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


def _load_two_conv(path):
    return TwoConvNet().eval(), {"arch": "twoconv", "image_size": S.SIZE, "class_names": list(S.CLASSES)}


def test_registered_user_layer_method_runs_at_every_layer_and_is_refined(user_cam, tmp_path):
    """A method registered with ``@register`` that takes a layer is run at each of ``layers`` and
    refined by RefineCAM like the built-in CAMs; it used to run once, as a layer-free method
    (``layer = "-"``), at its class's default layer, whatever ``--layers`` and ``--mix`` said."""
    model = tmp_path / "twoconv.ckpt"
    model.write_bytes(b"stand-in")
    cfg = RunConfig(data="tiny", models=[str(model)], methods=[user_cam, "gradcam", "randomcam"],
                    metrics=["gt_cosine", "complexity"], layers=["c1", "c2"], mixes=["identity", "product"],
                    image_range=(0, 8), chunk_size=4, save_maps=0, fold=False)
    comps = Components(load_model=_load_two_conv, dataset=lambda path, split: S.TinyDataset(),
                       evaluate=S.evaluate, fingerprint=lambda path: "tiny")
    run_eval(cfg, tmp_path / "run", components=comps, progress=False)
    res = load_results(tmp_path / "run")
    assert len(res) and (res.status != "error").all(), res[res.status == "error"].reason.unique()[:3]
    configs = lambda method: sorted(set(zip(*[res.loc[res.method == method, c] for c in ("layer", "mix")])))
    expected = [("c1", "identity"), ("c1", "product"), ("c2", "identity")]
    assert configs("gradcam") == expected
    assert configs(user_cam) == expected
    # the layer named in the table is the one the map was computed at: c1 and c2 maps differ
    cos = res[(res.method == user_cam) & (res.metric == "complexity") & (res.mix == "identity")]
    by_layer = cos.pivot(index="image", columns="layer", values="value")
    assert not np.allclose(by_layer["c1"], by_layer["c2"])


def test_refinecam_expectations_leave_out_and_name_methods_without_a_refined_score():
    """Untrained or shallow models give constant refined maps (every refined ARCC NaN): the claim
    "product is the best aggregator" was then reported as FAILS (best = None != product), a
    verdict on a claim the run could not check; a method without a refined score is now left
    out and named, and the claim is n/a when no method has one (as table c's claim already was)."""
    from test_pipeline_analyze import _paper_like_table
    from validation import analyze as A

    def claims(table):
        exp = A.analyze_frame(table, {"layers": ["layer1", "layer4"]}, n_boot=20)["expectations"]
        return exp.set_index("expectation").loc[["RefineCAM raises ARCC at the shallowest layer (Table 1)",
                                                 "Product is the best aggregator (Table 2)"]]

    table = _paper_like_table()
    assert (claims(table).status == "holds").all()
    hit = (table.method == "layercam") & (table.mix != "identity") & (table.metric == "arcc")
    table.loc[hit, "value"], table.loc[hit, "status"] = np.nan, "nan"
    one = claims(table)
    assert (one.status == "holds").all(), one.to_string()
    assert one.found.str.contains("layercam (left out)", regex=False).all() and one.found.str.contains("gradcampp").all()
    every = (table.mix != "identity") & (table.metric == "arcc")
    table.loc[every, "value"], table.loc[every, "status"] = np.nan, "nan"
    none = claims(table)
    assert (none.status == "n/a").all(), none.to_string()
    assert none.found.str.contains("gradcampp, layercam (left out)", regex=False).all()


def _trivial_rows(n_images=6):
    """Two models, two real configurations and HalfCAM, metric ``peak`` (higher is better).
    m_a: every score finite but HalfCAM's first two images and gradcam's image 0 (NaN);
    m_b: every real map constant (``peak`` NaN throughout), HalfCAM scored."""
    from validation.pipeline.table import make_results_frame

    rows = []
    for model in ("m_a", "m_b"):
        for img in range(n_images):
            for method, layer, value in (("gradcam", "l1", 0.4 + 0.01 * img), ("lime", "-", 0.6),
                                         ("halfcam", "-", 0.5)):
                nan = (model == "m_b" and method != "halfcam") or (
                    model == "m_a" and ((method == "halfcam" and img < 2) or (method == "gradcam" and img == 0)))
                for metric, v in (("peak", np.nan if nan else value), ("gt_cosine", 0.3)):
                    rows.append(dict(image=img, model=model, method=method, layer=layer, mix="identity",
                                     metric=metric, value=v, status="nan" if np.isnan(v) else "ok",
                                     reason="constant_map" if np.isnan(v) else ""))
    return make_results_frame(rows)


def test_trivial_table_counts_nan_and_keeps_models_without_a_real_score():
    """Table b's means leave NaN scores out: how many is now counted (``real_n_nan``,
    ``trivial_n_nan``). A model on which no real configuration has a finite score used to vanish
    from the table, and the verdict over models spoke for the others only ("fooled" on 1 of 2
    models, unsaid); it now stays, unscored, and the verdict says so."""
    from validation import analyze as A

    per_model, verdict = A.table_trivial(_trivial_rows(), metrics=["peak"])
    rows = per_model.set_index("model")
    assert set(rows.index) == {"m_a", "m_b"}
    a, b = rows.loc["m_a"], rows.loc["m_b"]
    # m_a: HalfCAM's mean over its 4 finite images, gradcam's over its 5; both counted
    assert a.trivial_score == pytest.approx(0.5) and a.trivial_n_nan == 2 and a.real_n_nan == 1
    assert a.real_worst == pytest.approx(np.mean([0.4 + 0.01 * i for i in range(1, 6)])) and a.n_real == 2
    assert bool(a.fooled) is True
    # m_b: HalfCAM scored, no real configuration to compare it with
    assert b.trivial_score == pytest.approx(0.5) and b.trivial_n_nan == 0 and b.real_n_nan == 12
    assert b.n_real == 0 and np.isnan(b.real_worst) and pd.isna(b.fooled)
    v = verdict.set_index(["metric", "trivial"]).loc[("peak", "halfcam")]
    assert v.models == 2 and v.models_unscored == 1 and v.verdict == "fooled, 1/2 models unscored"
    assert not A.trivial_verdict_complete(v.verdict)
