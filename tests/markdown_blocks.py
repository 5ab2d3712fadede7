"""One reader of Markdown code fences for the docs tests (test_docs_python, test_docs_commands)."""

from __future__ import annotations

import re
import textwrap

_FENCE = re.compile(r"(\s*)```(\w*)")


def split_markdown(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(fenced blocks as (language, body), prose lines outside any fence).

    A fence without a language is "text". A fence indented (inside a list item) has its
    body dedented by the fence's indentation. An unclosed fence runs to the end of the text.
    """
    blocks, prose = [], []
    lang, indent, body = None, "", []

    def close():
        code = "\n".join(body) + "\n"
        blocks.append((lang, textwrap.dedent(code) if indent else code))

    for line in text.splitlines():
        fence = _FENCE.match(line)
        if fence and lang is None:
            indent, lang, body = fence.group(1), fence.group(2) or "text", []
        elif fence:
            close()
            lang = None
        elif lang is None:
            prose.append(line)
        else:
            body.append(line)
    if lang is not None:
        close()
    return blocks, prose
