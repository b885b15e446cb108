"""Prompt text. The question template is the Echo paper's `inference/prompt.txt`, reworded only
where a session has several clips (the paper has one)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

INSTRUCTION = (
    "Think step-by-step. Refer to the specific audio segments while thinking, and indicate the "
    "corresponding timestamps. Answer in the format of <think>...</think><answer>...</answer>."
)

RETRY_NUDGE = {
    "no_answer": "You did not give a final answer. Answer now, in the format <think>...</think><answer>...</answer>.",
    "bad_format": (
        "Your reply was not in the required format. Reply again with exactly one <think>...</think> "
        "followed by exactly one <answer>...</answer>."
    ),
}


def format_question(
    question: str, choices: Sequence[str] | None, clip_durations: Mapping[str, float], active_clip: str
) -> str:
    """The user-turn text for one question. `choices` renders as a Python list, as in the paper."""
    text = question.strip()
    if choices:
        text += f" Choose the answer from {list(choices)!s}."
    if len(clip_durations) > 1:
        listing = ", ".join(f"'{cid}' ({dur:.1f} s)" for cid, dur in clip_durations.items())
        text += (
            f" Loaded clips: {listing}. <seg>START, END</seg> refers to '{active_clip}'; "
            "write <seg>CLIP: START, END</seg> for another clip."
        )
    return f"{text} {INSTRUCTION}"
