"""Documentation audit of the evaluation pipeline: behaviour the docs and messages promise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from validation.pipeline.run import RunConfig, Runner


def _runner(tmp_path, **kw):
    cfg = dict(data=str(tmp_path / "data"), models=[str(tmp_path / "m")], metrics=["gt_cosine"],
               layers=["stage1", "stage4"], mixes=["identity", "product"])
    cfg.update(kw)
    return Runner(RunConfig(**cfg), tmp_path / "run")


def test_a_method_alias_runs_as_the_registered_method_at_every_layer(tmp_path):
    # `--methods gradcam++` passes the name check; it must run as gradcampp (a layer method,
    # refined), not once as a layer-free "gradcam++" at its default layer
    r = _runner(tmp_path, methods=["gradcam++", "GradCAM", "center"],
                method_grid={"gradcam++": {"max_images": 8}}, method_options={"center": {}})
    labels = [c.label for c in r.configs]
    assert labels == ["gradcampp@stage1", "gradcampp@stage1+product", "gradcampp@stage4",
                      "gradcam@stage1", "gradcam@stage1+product", "gradcam@stage4", "centre"]
    # the centre prior keeps its registry name, so the tables exclude it from the real methods
    assert r.config.method_grid == {"gradcampp": {"max_images": 8}}
    assert "centre" in r.config.method_options
    # the caller's config is left as given: the runner works on a copy
    given = RunConfig(data=str(tmp_path / "data"), models=[str(tmp_path / "m")], metrics=["gt_cosine"],
                      methods=["gradcam++"], method_grid={"gradcam++": {"max_images": 8}})
    assert Runner(given, tmp_path / "run").config.methods == ["gradcampp"]
    assert given.methods == ["gradcam++"] and given.method_grid == {"gradcam++": {"max_images": 8}}


def test_an_empty_grid_is_not_reported_as_no_methods_given(tmp_path):
    # RefineCAM at the only (deepest) layer, no identity: methods were given, the grid is empty
    with pytest.raises(ValueError) as err:
        _runner(tmp_path, methods=["gradcam"], layers=["stage1"], mixes=["product"])
    assert "no methods given" not in str(err.value)
    assert "deeper layer" in str(err.value)
    with pytest.raises(ValueError, match="no methods given"):
        _runner(tmp_path, methods=[])


def test_the_correlation_figure_title_names_the_error_bars_every_panel_draws():
    from matplotlib.container import ErrorbarContainer

    from validation.report import figures as F

    # two models; one metric's method-means correlation rests on one of them
    rows = []
    for level in ("pairs", "method_means"):
        for metric, r in (("road", 0.2), ("arcc", 0.7)):
            one = level == "method_means" and metric == "road"
            rows.append(dict(model="mean+-std", metric=metric, level=level, n_models=1 if one else 2,
                             models_nan="b" if one else "", pearson=r, spearman=0.5, pearson_lo=-0.2,
                             pearson_hi=0.8, spearman_lo=0.3, spearman_hi=0.6, pearson_std=0.1,
                             spearman_std=0.1))
    fig = F.correlation_bars(pd.DataFrame(rows))
    title = fig._suptitle.get_text()
    for ax in fig.axes:
        bars = next(c for c in ax.containers if isinstance(c, ErrorbarContainer))
        spans = [float(np.ptp(seg[:, 1])) for seg in bars.lines[2][0].get_segments()]
        if "bootstrap" in title:  # the interval [-0.2, 0.8], not +- 0.1
            np.testing.assert_allclose(spans, 1.0, atol=1e-9)
        else:
            np.testing.assert_allclose(spans, 0.2, atol=1e-9)


def test_the_seed_help_does_not_promise_chunk_seeds_to_the_built_in_metrics():
    import torch

    from validation._rng import seeded_global_rng
    from validation.cli import build_parser
    from validation.pipeline.run import _default_evaluate, chunk_seed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x, maps, t = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16), torch.tensor([0, 1])
    curves = []
    for seed in (chunk_seed(0, 0), chunk_seed(1, 0)):
        with seeded_global_rng(seed, x.device):
            curves.append(_default_evaluate(model, x, t, maps, ["road"], None, None, {"noise": 0.5}).road_morf)
    assert torch.equal(*curves)  # ROAD's draws do not follow --seed ...
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = next(a.help for a in run._actions if "--seed" in a.option_strings)
    assert "stochastic methods and metrics get a seed" not in text  # ... so the help must not say so
    assert "seed and tie_seed" in text


def test_the_audit_verdict_names_why_no_trivial_map_was_checked():
    from validation import analyze as A
    from validation.audit import verdict_text

    rng = np.random.default_rng(0)
    rows = [dict(model="a", image=i, method=m, layer="-", mix="identity", metric=metric,
                 value=rng.random(), status="ok", reason="")
            for i in range(6) for m in ("gradcam", "lime", "deeplift") for metric in ("gt_cosine", "mine")]
    df = pd.DataFrame(rows)
    _, verdicts = A.table_trivial(df, metrics=["mine"])
    text = verdict_text("mine", A.table_validity(df, n_boot=10), verdicts)
    assert "the run has no trivial maps" in text and "no real method got a finite score" not in text
