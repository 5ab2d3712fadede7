"""shapesynth-eval command line: subcommands exist, bad input gives one clear line and exit 2."""

import subprocess
import sys

import torch

import test_pipeline_standins as S
from validation.cli import build_parser, main
from validation.pipeline.run import run_eval


def test_every_subcommand_has_help():
    for cmd in ("run", "merge", "analyze", "audit", "report", "reproduce"):
        done = subprocess.run([sys.executable, "-m", "validation", cmd, "--help"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


def test_run_arguments_parse_into_lists():
    args = build_parser().parse_args(["run", "--data", "d", "--model", "a", "--model", "b", "--methods",
                                      "gradcam,lime", "--n-images", "10", "--shard", "1/2", "--out", "o"])
    assert args.models == ["a", "b"] and args.n_images == 10 and args.shard == "1/2"


def test_bad_shard_and_missing_model_are_one_line_errors(tmp_path, capsys):
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "m"), "--methods", "gradcam",
                 "--metrics", "gt_cosine", "--shard", "2/2", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "--shard" in capsys.readouterr().err
    code = main(["run", "--data", str(tmp_path), "--model", str(tmp_path / "missing.ckpt"), "--methods",
                 "gradcam", "--metrics", "gt_cosine", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "missing.ckpt" in capsys.readouterr().err


def test_merge_command_after_shards(tmp_path, capsys):
    models = S.make_models(tmp_path)
    torch.set_num_threads(1)
    out = tmp_path / "run"
    for i in range(2):
        run_eval(S.config(models, methods=["cam"]), out, shard=(i, 2), components=S.components(), progress=False)
    assert main(["merge", str(out)]) == 0
    assert "merged 10/10 chunks" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "nothing")]) == 2
