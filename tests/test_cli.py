"""The `echo-agent` command line, run as real subprocesses on the tiny random Qwen2-Audio.

The tiny model's output is random text, so these tests check behaviour only: exit codes, the
shape of the output, clean one-line errors, and what the chat checkpoint holds across restarts
(read back directly through LangGraph's `SqliteSaver`).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from conftest import write_beeps
from langgraph.checkpoint.sqlite import SqliteSaver

from echo_agent.agent import Result

_SCRIPT = Path(sys.executable).with_name("echo-agent")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "echo_agent.cli"]
FAST = ["--max-new-tokens", "8"]
SUMMARY = re.compile(r"^(Answer:|No answer)", re.MULTILINE)
TIMEOUT = 120


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    e.update(
        ECHO_AGENT_HOME=str(tmp_path / "home"),
        ECHO_TEST_CWD=str(tmp_path),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # tiny models on a small machine: one torch thread is fastest
        COLUMNS="400",  # rich wraps at 80 columns when stdout is not a terminal
    )
    return e


@pytest.fixture
def other_wav(tmp_path: Path) -> Path:
    return write_beeps(tmp_path / "other.wav", 3.0, [(1.0, 0.5)], freq=440.0, seed=1)


def run_cli(args: list[str], env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=env["ECHO_TEST_CWD"],  # so that nothing a run writes by accident lands in the repository
        timeout=TIMEOUT,
        check=False,
    )


def flat(text: str) -> str:
    return " ".join(text.split())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_state(db: Path, thread: str) -> dict[str, Any]:
    """The thread's latest checkpoint, read in this process through LangGraph's sync SQLite saver."""
    conn = sqlite3.connect(db, check_same_thread=False)
    try:
        saved = SqliteSaver(conn).get_tuple({"configurable": {"thread_id": thread}})
    finally:
        conn.close()
    assert saved is not None, f"no checkpoint for thread {thread} in {db}"
    return dict(saved.checkpoint["channel_values"])


def question_turns(state: dict[str, Any]) -> list[dict[str, Any]]:
    """User turns that hold a question (retry nudges are user turns too, but their text is runtime-made)."""
    return [
        m
        for m in state["conversation"]
        if m["role"] == "user" and any(p["type"] == "text" and p["origin"] == "user" for p in m["content"])
    ]


def turn_text(msg: dict[str, Any]) -> str:
    return "".join(p["text"] for p in msg["content"] if p["type"] == "text")


def audio_clips(msg: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(p["clip"], p["start"], p["end"]) for p in msg["content"] if p["type"] == "audio"]


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, proc.stderr)


class Session:
    """A `chat` process driven line by line through pipes, its stdout read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "chat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=env["ECHO_TEST_CWD"],
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []  # stderr is drained too, so a chatty child never blocks on a full pipe
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.errors.extend(self.proc.stderr)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for_summaries(self, n: int) -> None:
        """Read stdout until `n` answer summaries have been printed."""
        found = 0
        while found < n:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no summary within {TIMEOUT} s; stdout so far:\n{''.join(self.seen)}")
            if line is None:
                rc = self.proc.wait(timeout=TIMEOUT)
                pytest.fail(f"chat exited early ({rc}):\n{''.join(self.seen)}\n{''.join(self.errors)}")
            self.seen.append(line)
            found += bool(SUMMARY.match(line))

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=TIMEOUT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return rc


# ---- ask -------------------------------------------------------------------------------------


def test_ask_json_prints_one_result_object(beeps_wav: Path, env: dict[str, str]) -> None:
    proc = run_cli(["ask", str(beeps_wav), "How many beeps?", "--choice", "a", "--choice", "b", "--json", *FAST], env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    obj = json.loads(proc.stdout)  # fails on anything but exactly one JSON document
    assert isinstance(obj, dict)
    assert set(obj) == {"answer", "choice", "listens", "verdict", "text", "status", "generated_tokens"}
    result = Result.model_validate(obj)
    assert result.status in ("answered", "no_answer")
    assert (result.answer is None) == (result.status == "no_answer")
    if result.choice is not None:
        assert result.choice in ("a", "b")


def test_ask_streams_then_summarises(beeps_wav: Path, env: dict[str, str]) -> None:
    proc = run_cli(["ask", str(beeps_wav), "How many beeps?", *FAST], env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    listens = re.search(r"^listens: \d+ valid / \d+ total$", out, re.MULTILINE)
    assert listens, out
    # Before the summary: the streamed reasoning, or (with no answer) at least the verifier's retry notice.
    assert out[: listens.start()].strip(), out
    last = out.strip().splitlines()[-1]
    assert SUMMARY.match(last), out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


# ---- clean errors ----------------------------------------------------------------------------


def _text_as_wav(p: Path) -> None:
    p.write_text("this is not audio at all\n" * 20)


def _empty_file(p: Path) -> None:
    p.write_bytes(b"")


def _zero_length_wav(p: Path) -> None:
    sf.write(p, np.zeros(0, dtype=np.float32), 16000)


def _nan_wav(p: Path) -> None:
    x = np.full(1600, 0.1, dtype=np.float32)
    x[800] = np.nan
    sf.write(p, x, 16000, subtype="FLOAT")


def _directory(p: Path) -> None:
    p.mkdir()


BAD_AUDIO = {
    "missing": lambda p: None,
    "directory": _directory,
    "text-renamed-wav": _text_as_wav,
    "empty-file": _empty_file,
    "zero-length-wav": _zero_length_wav,
    "nan-float-wav": _nan_wav,
}


@pytest.mark.parametrize("command", ["ask", "chat"])
@pytest.mark.parametrize("kind", list(BAD_AUDIO))
def test_bad_audio_is_a_one_line_error(kind: str, command: str, tmp_path: Path, env: dict[str, str]) -> None:
    bad = tmp_path / f"bad-{kind}.wav"
    BAD_AUDIO[kind](bad)
    args = (
        ["ask", str(bad), "How many beeps?"]
        if command == "ask"
        else ["chat", str(bad), "--db", str(tmp_path / "x.sqlite")]
    )
    proc = run_cli(args, env, stdin="/quit\n")
    assert_clean_error(proc, bad.name)
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["ask", "{audio}"], "required"),
        (["ask", "{audio}", "q", "--temperature", "-1"], "--temperature"),
        (["ask", "{audio}", "q", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["ask", "{audio}", "q", "--max-new-tokens", "many"], "invalid int"),
        (["ask", "{audio}", "q", "--model", "nonexistent-dir"], "nonexistent-dir"),
        (["chat", "{audio}", "--temperature", "-1"], "--temperature"),
    ],
    ids=["no-command", "unknown-command", "missing-question", "temperature", "zero-tokens", "bad-int", "model", "chat"],
)
def test_bad_arguments_exit_2_without_traceback(
    args: list[str], needle: str, beeps_wav: Path, env: dict[str, str]
) -> None:
    proc = run_cli([a.replace("{audio}", str(beeps_wav)) for a in args], env, stdin="/quit\n")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr and needle in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ---- chat ------------------------------------------------------------------------------------


def test_chat_resumes_a_thread_in_a_new_process(beeps_wav: Path, tmp_path: Path, env: dict[str, str]) -> None:
    db, thread = tmp_path / "chats" / "chat.sqlite", "t-resume"
    first = run_cli(
        ["chat", str(beeps_wav), "--db", str(db), "--thread", thread, *FAST], env, "How many beeps? [2 | 3]\n/quit\n"
    )
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert SUMMARY.search(first.stdout), first.stdout
    assert db.is_file()

    # A new process, no audio: everything comes from the checkpoint.
    second = run_cli(["chat", "--db", str(db), "--thread", thread, *FAST], env, "And now? \n/quit\n")
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    out = flat(second.stdout)
    assert "you: [audio]How many beeps? Choose the answer from ['2', '3']." in out, second.stdout
    assert "has no history" not in out
    assert out.index("How many beeps?") < out.index(f"thread {thread}")  # history first, then the prompt
    assert SUMMARY.search(second.stdout), second.stdout

    state = saved_state(db, thread)
    turns = question_turns(state)
    assert len(turns) == 2, [turn_text(t) for t in turns]
    assert "How many beeps?" in turn_text(turns[0]) and "['2', '3']" in turn_text(turns[0])
    assert "And now?" in turn_text(turns[1]) and "Choose the answer" not in turn_text(turns[1])
    assert set(state["clips"]) == {"main"}
    assert state["clips"]["main"]["sha256"] == sha256(beeps_wav)
    assert state["clips"]["main"]["path"] == str(beeps_wav.absolute())
    # The clip is sent once, with the first question; the resumed question does not resend it.
    assert audio_clips(turns[0]) == [("main", None, None)]
    assert audio_clips(turns[1]) == []
    whole_clips = [
        p for m in state["conversation"] for p in m["content"] if p["type"] == "audio" and p["start"] is None
    ]
    assert len(whole_clips) == 1
    assert state["introduced"] == ["main"]


@pytest.mark.parametrize("thread", [["--thread", "brand-new"], []], ids=["named-thread", "no-thread"])
def test_chat_without_audio_or_history_is_an_error(thread: list[str], tmp_path: Path, env: dict[str, str]) -> None:
    proc = run_cli(["chat", "--db", str(tmp_path / "chat.sqlite"), *thread, *FAST], env, "hello\n/quit\n")
    assert_clean_error(proc, "no audio: give an audio file, or --thread ID of a session that has one")


def test_chat_survives_kill_and_load_adds_a_clip(
    beeps_wav: Path, other_wav: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    db, thread = tmp_path / "chat.sqlite", "t-kill"
    chat = Session([str(beeps_wav), "--db", str(db), "--thread", thread, *FAST], env)
    try:
        chat.send("How many beeps?\n")
        chat.wait_for_summaries(1)
        chat.send(f"/load {tmp_path / 'missing.wav'}\n/load {beeps_wav}\n/load {other_wav}\n")
        chat.send("Which clip is longer? [main | clip2]\n")
        chat.wait_for_summaries(1)
    finally:
        rc = chat.kill()
    assert rc == -signal.SIGKILL
    assert "Traceback" not in "".join(chat.errors)
    out = flat("".join(chat.seen))
    assert "error: " in out and "missing.wav: no such file" in out  # a bad /load does not end the session
    assert "is already loaded as 'main'" in out
    assert "loaded" in out and "as 'clip2' (3.0 s)" in out

    # Both completed questions were checkpointed before the kill.
    state = saved_state(db, thread)
    turns = question_turns(state)
    assert len(turns) == 2
    assert audio_clips(turns[0]) == [("main", None, None)]
    assert audio_clips(turns[1]) == [("clip2", None, None)]  # only the new clip is sent
    assert "Loaded clips: 'main' (6.0 s), 'clip2' (3.0 s)" in turn_text(turns[1])
    assert {c: r["sha256"] for c, r in state["clips"].items()} == {
        "main": sha256(beeps_wav),
        "clip2": sha256(other_wav),
    }

    resumed = run_cli(["chat", "--db", str(db), "--thread", thread, *FAST], env, "/quit\n")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    out = flat(resumed.stdout)
    assert "you: [audio]How many beeps?" in out
    assert "you: [audio]Which clip is longer?" in out


def test_stage0_init_that_is_not_a_run_folder_is_a_clean_error(tmp_path: Path, env: dict[str, str]) -> None:
    data = tmp_path / "t.json"
    data.write_text("[]")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"init": str(tmp_path / "nowhere"), "steps": 1}))
    proc = run_cli(["train", "audio", "--train", str(data), "--out", str(tmp_path / "o"), "--config", str(cfg)], env)
    assert_clean_error(proc, "nowhere")
    assert not (tmp_path / "o").exists()  # nothing was started
