"""Every command the README and docs show still parses: subcommands and flags exist, and the
complete commands of shell blocks pass argparse as written (types, choices, required flags).
The repository paths and dotted Python names they cite in backticks exist."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
from markdown_blocks import split_markdown

import shapesynth.cli
import trainers.cli
import validation.cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md",
        *sorted((ROOT / "data_cards").glob("*.md"))]
PARSERS = {"shapesynth": shapesynth.cli.build_parser, "shapesynth-train": trainers.cli.build_parser,
           "shapesynth-eval": validation.cli.build_parser}
MODULES = {"shapesynth": "shapesynth", "trainers": "shapesynth-train", "validation": "shapesynth-eval"}
SHELL_FENCES = {"bash", "sh", "shell", "console"}
ELISION = {"...", "…"}


def _shell_text(text: str) -> tuple[list[str], list[str]]:
    """(lines of shell fences with continuations joined, inline code spans of the prose)."""
    blocks, prose = split_markdown(text)
    fenced = "".join(body for lang, body in blocks if lang in SHELL_FENCES)
    spans = [span for line in prose for span in re.findall(r"`([^`]+)`", line)]
    return re.sub(r"\\\n\s*", " ", fenced).splitlines(), spans


def _invocations(line: str):
    """(program, args) for each of our CLIs called on a shell line (after env vars, nohup, nice)."""
    line = line.split(" #")[0].strip()
    if line.startswith("#"):
        return
    for part in re.split(r"&&|;|\|\|?", line):
        try:
            tokens = shlex.split(part)
        except ValueError:  # prose in backticks with an apostrophe: not a command
            continue
        while tokens and (re.match(r"^\w+=", tokens[0]) or tokens[0] in ("nohup", "time", "nice", "-n", "19")):
            tokens = tokens[1:]
        if not tokens:
            continue
        program = tokens[0].split("/")[-1]
        if program.startswith("python") and len(tokens) > 2 and tokens[1] == "-m" and tokens[2] in MODULES:
            yield MODULES[tokens[2]], tokens[3:]
        elif program in PARSERS:
            yield program, tokens[1:]


def _commands():
    for doc in DOCS:
        fenced, spans = _shell_text(doc.read_text())
        for complete, lines in ((True, fenced), (False, spans)):
            for line in lines:
                for program, args in _invocations(line):
                    args = [a for a in args if a != "&"]
                    shown = [a for a in args if a not in ELISION]
                    if not shown:  # the bare program name in prose, or "program ..."
                        continue
                    yield pytest.param(program, shown, complete and shown == args,
                                       id=f"{doc.relative_to(ROOT)}: {program} {' '.join(args)}"[:120])


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


COMMANDS = list(_commands())


def test_the_docs_show_commands_of_every_cli():
    shown = {p.values[0] for p in COMMANDS}
    assert shown == set(PARSERS), f"no documented command found for {set(PARSERS) - shown}"
    assert sum(p.values[2] for p in COMMANDS) >= 15, "the shell blocks' complete commands were not found"


@pytest.mark.parametrize("program, args, complete", COMMANDS)
def test_documented_command_parses(program, args, complete):
    parser = PARSERS[program]()
    sub = _subparser(parser, args[0])
    assert sub is not None, f"{program} has no subcommand {args[0]!r}"
    known = _option_strings(sub)
    flags = [a.strip("[]").split("=")[0] for a in args[1:] if a.strip("[]").startswith("--")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{program} {args[0]} has no option(s) {unknown}"
    if complete:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                parser.parse_args(args)
            except SystemExit as exit_:
                assert not exit_.code, err.getvalue().strip().splitlines()[-1]


FILE_SUFFIXES = ("py", "yaml", "md", "csv", "json", "txt", "png", "jpg", "html")
CITED_PATH = re.compile(r"(?<![\w/])((?:shapesynth|trainers|validation|tests|benchmarks|docs|data_cards|\.ci)/[\w./-]+\."
                        rf"(?:{'|'.join(FILE_SUFFIXES)}))\b")
DOTTED_NAME = re.compile(r"((?:shapesynth|trainers|validation)(?:\.\w+)+)(?:\(.*\))?")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_paths_and_names_exist(doc):
    spans = re.findall(r"`([^`\n]+)`", doc.read_text())
    missing = [p for span in spans for p in CITED_PATH.findall(span) if "*" not in p and not (ROOT / p).exists()]
    unknown = [span for span in spans if (m := DOTTED_NAME.fullmatch(span.strip()))
               and not m.group(1).endswith(tuple(f".{s}" for s in FILE_SUFFIXES)) and not _resolves(m.group(1))]
    assert not missing, f"{doc.name} cites files that do not exist: {missing}"
    assert not unknown, f"{doc.name} cites Python names that do not exist: {unknown}"


def test_split_markdown_reads_fences_like_a_renderer():
    text = ("intro `a`\n```bash\nx \\\n  --y\n```\n- item\n  ```python\n  import os\n  ```\n"
            "```\nplain\n```\nafter `b`\n```sh\nunclosed\n")
    blocks, prose = split_markdown(text)
    assert blocks == [("bash", "x \\\n  --y\n"), ("python", "import os\n"), ("text", "plain\n"), ("sh", "unclosed\n")]
    assert prose == ["intro `a`", "- item", "after `b`"]
    assert _shell_text(text) == (["x  --y", "unclosed"], ["a", "b"])
