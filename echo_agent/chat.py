"""Chat-session helpers shared by `echo-agent chat` and `echo-agent serve`: how a question line carries its
choices, what a newly loaded clip is called, and how a thread's clips become durable before its first question."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

    from .graphs.echo import EchoGraph

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


async def save_clips(graph: EchoGraph, config: RunnableConfig, clips: Mapping[str, dict[str, Any]]) -> None:
    """Write `clips` (clip id -> `AudioRef.model_dump()`) into the thread's checkpoint now, before a question runs.

    A question's own first checkpoint holds its input as a pending write, which the next question's input
    discards: a chat killed in that window used to leave a thread without its clip. Here the clips go into the
    `clips` state itself, as if `prepare` had written them, and the pending step is cleared, so the thread is
    durable and resumable from the moment it is created (`chat --thread ID`). Clips merge (`merge_clips`).
    """
    if not clips:
        return
    await graph.aupdate_state(config, {"clips": dict(clips)}, as_node="prepare")
    await graph.aupdate_state(config, None, as_node="__end__")  # nothing left to run: `next` is empty
