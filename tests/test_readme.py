"""The README's Python example runs as written (only the model folder is swapped for a tiny one)."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import torch

from shapesynth import SynthConfig

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL_DIR = "outputs/models/resnet18"


def _python_example() -> str:
    text = README.read_text()
    match = re.search(r"From Python[^\n]*\n\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no 'From Python' example"
    code = match.group(1)
    assert f'"{MODEL_DIR}"' in code, "the example no longer loads the step-2 model folder"
    return code


def test_readme_python_example_runs(tmp_path, save_untrained_model):
    recipe = SynthConfig(image_size=32, size_bands=((0.31, 0.39), (0.16, 0.19)))
    save_untrained_model(tmp_path / "model", data={"synth": recipe.to_dict()})

    code = _python_example().replace(f'"{MODEL_DIR}"', repr(str(tmp_path / "model")))
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)

    scores, maps, masks = namespace["scores"], namespace["maps"], namespace["masks"]
    assert set(scores) == {"average_drop", "road", "arcc", "pointing_game"}
    assert all(v.shape == (8,) for v in scores.values())
    assert maps.shape == masks.shape == (8, 32, 32)
    assert float(masks.sum()) > 0  # the exact masks of the rendered shapes, not empty
    # defined values where no reason is given, and the printed summary names every metric
    for name, values in scores.items():
        defined = torch.tensor([r == "" for r in scores.reasons[name]])
        assert torch.isfinite(values[defined]).all(), name
        assert name in out.getvalue()

    # the printed summary is the mean of each tensor it summarises (the dict's repr, nan allowed)
    printed = out.getvalue().strip().splitlines()[-1]
    summary = eval(printed, {"__builtins__": {}}, {"nan": float("nan")})
    assert set(summary) == set(scores)
    for name, value in summary.items():
        want = scores[name].mean().item()
        assert value == want or (math.isnan(value) and math.isnan(want)), name

    # the pointing game recomputed from the maps and masks: S = mask >= 0.5, a hit when any
    # maximum of the map lies in S (docs/metrics.md, ties="any"); a constant map has no maximum
    # to point with: NaN, reason constant_map
    L, S = maps.flatten(1).numpy(), (masks >= 0.5).flatten(1).numpy()
    assert S.any(1).all()
    for b in range(len(L)):
        got, reason = scores["pointing_game"][b].item(), scores.reasons["pointing_game"][b]
        if L[b].max() == L[b].min():
            assert math.isnan(got) and reason == "constant_map", b
        else:
            assert got == float(S[b][L[b] == L[b].max()].any()) and reason == "", b
