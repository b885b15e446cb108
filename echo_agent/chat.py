"""Chat-session helpers shared by `echo-agent chat` and `echo-agent serve`: how a question line carries its
choices, and what a newly loaded clip is called."""

from __future__ import annotations

import re
from collections.abc import Collection

_CHOICES_RE = re.compile(r"\[([^\[\]]*\|[^\[\]]*)\]\s*$")


def split_choices(line: str) -> tuple[str, list[str]]:
    """`How many beeps? [2 | 3 | 4]` -> ("How many beeps?", ["2", "3", "4"])."""
    m = _CHOICES_RE.search(line)
    if not m:
        return line.strip(), []
    return line[: m.start()].strip(), [c.strip() for c in m.group(1).split("|") if c.strip()]


def next_clip_name(taken: Collection[str]) -> str:
    """The id of a session's next clip: `main` for the first, then `clip2`, `clip3`, ... (the count so far + 1)."""
    return "main" if not taken else f"clip{len(taken) + 1}"
