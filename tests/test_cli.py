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


@pytest.mark.parametrize(
    ("thread", "message"),
    [
        (["--thread", "brand-new"], "no such thread: brand-new in {db}"),
        ([], "no audio: give an audio file, or --thread ID of a session that has one"),
    ],
    ids=["named-thread", "no-thread"],
)
def test_chat_without_audio_or_history_is_an_error(
    thread: list[str], message: str, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "chat.sqlite"
    proc = run_cli(["chat", "--db", str(db), *thread, *FAST], env, "hello\n/quit\n")
    assert_clean_error(proc, message.format(db=db))


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


# ---- issue 14: durable threads, one-line errors, quiet --json -------------------------------------


def _has_checkpoint(db: Path, thread: str) -> bool:
    """Whether the thread has a checkpoint yet (read while the chat process writes; a missing table is no)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as conn:
            return conn.execute("SELECT 1 FROM checkpoints WHERE thread_id=? LIMIT 1", (thread,)).fetchone() is not None
    except sqlite3.Error:
        return False


def _kill_when(chat: Session, ready: Any, what: str) -> None:
    """SIGKILL the chat as soon as `ready()` holds (polled every 2 ms; the deadline only bounds a stuck run)."""
    import time

    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert chat.proc.poll() is None, f"chat exited before {what}: {''.join(chat.errors)}"
        assert time.monotonic() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.002)
    assert chat.kill() == -signal.SIGKILL


def test_chat_killed_as_its_thread_is_created_resumes_with_its_clip(
    beeps_wav: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """Issue 14.12: the first question is already waiting on stdin, and the chat is killed the moment its thread
    has a checkpoint, inside the first question's first fraction of a second. The thread holds its clip, and a
    new process resumes it without the audio file."""
    db, thread = tmp_path / "chat.sqlite", "t-early"
    chat = Session([str(beeps_wav), "--db", str(db), "--thread", thread, *FAST], env)
    chat.send("How many beeps? [2 | 3]\n")
    _kill_when(chat, lambda: _has_checkpoint(db, thread), "checkpoint")
    assert "Traceback" not in "".join(chat.errors)
    state = saved_state(db, thread)
    assert {c: r["sha256"] for c, r in state["clips"].items()} == {"main": sha256(beeps_wav)}

    resumed = run_cli(["chat", "--db", str(db), "--thread", thread, *FAST], env, "How many beeps? [2 | 3]\n/quit\n")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr and "has no history" not in resumed.stdout
    assert SUMMARY.search(resumed.stdout), resumed.stdout
    state = saved_state(db, thread)
    turns = question_turns(state)
    assert turns and "How many beeps?" in turn_text(turns[-1])
    # The clip was heard exactly once, with the thread's first question, whichever run that was.
    assert audio_clips(turns[0]) == [("main", None, None)] and all(audio_clips(t) == [] for t in turns[1:])
    assert state["introduced"] == ["main"] and state["clips"]["main"]["sha256"] == sha256(beeps_wav)


def test_a_loaded_clip_is_durable_before_the_next_question(
    beeps_wav: Path, other_wav: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    db, thread = tmp_path / "chat.sqlite", "t-load"
    chat = Session([str(beeps_wav), "--db", str(db), "--thread", thread, *FAST], env)
    chat.send(f"/load {other_wav}\n")

    def has_clip2() -> bool:
        return _has_checkpoint(db, thread) and "clip2" in saved_state(db, thread).get("clips", {})

    _kill_when(chat, has_clip2, "clip2 in the checkpoint")
    resumed = run_cli(["chat", "--db", str(db), "--thread", thread, *FAST], env, "Which is longer? [main | clip2]\n")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    turns = question_turns(saved_state(db, thread))
    assert len(turns) == 1 and audio_clips(turns[0]) == [("main", None, None), ("clip2", None, None)]
    assert "Loaded clips: 'main' (6.0 s), 'clip2' (3.0 s)" in turn_text(turns[0])


def test_load_of_a_path_with_a_nul_byte_is_an_error_and_the_chat_goes_on(
    beeps_wav: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    db = tmp_path / "chat.sqlite"
    proc = run_cli(["chat", str(beeps_wav), "--db", str(db), *FAST], env, "/load bad\x00name.wav\nHow many?\n/quit\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: 'bad\\x00name.wav': a file path cannot contain a NUL byte" in flat(proc.stdout)
    assert SUMMARY.search(proc.stdout), proc.stdout


def test_nul_byte_in_an_argument_is_a_one_line_error(
    beeps_wav: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """argv cannot carry a NUL byte, but `main` is also called in process (tests, embedding)."""
    from echo_agent.cli import main

    for argv, name in [(["ask", f"{beeps_wav}\x00.wav", "q"], "audio"), (["chat", "--db", "x\x00.db"], "--db"),
                       (["eval", str(beeps_wav), "--out", "r\x00.json"], "--out")]:  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {name}: contains a NUL byte\n"
    assert list(tmp_path.iterdir()) == [beeps_wav]


@pytest.mark.parametrize(
    "args",
    [
        ["ask", "{audio}", "q", "--seed", str(2**63)],
        ["ask", "{audio}", "q", "--seed", str(-(2**63) - 1)],
        ["chat", "{audio}", "--seed", str(2**64)],
        ["collect", "{data}", "--samples", "1", "--out", "{out}", "--seed", str(2**70)],
        ["data", "synth", "--out", "{out}", "--n", "1", "--seed", str(2**64)],
        ["data", "synth", "--out", "{out}", "--n", "1", "--seed", "-1"],
        ["train", "sft", "--train", "{data}", "--out", "{out}", "--seed", str(2**63)],
    ],
    ids=["ask-over", "ask-under", "chat", "collect", "synth-over", "synth-negative", "train"],
)
def test_seed_outside_64_bits_is_a_one_line_error(
    args: list[str], beeps_wav: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "audio_id": beeps_wav.name, "question": "q", "choices": ["1", "2"],
                                 "answer": "1", "trace": "<think>x</think><answer>1</answer>"}]))  # fmt: skip
    out = tmp_path / "out"
    subs = {"{audio}": str(beeps_wav), "{data}": str(data), "{out}": str(out)}
    proc = run_cli([subs.get(a, a) for a in args], env, stdin="/quit\n")
    assert_clean_error(proc, "seed")
    assert "922337203685477580" in proc.stderr, proc.stderr  # names the bound: 2**63 - 1 or -(2**63)
    assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize(
    ("snr", "needle"), [(["20", "5"], "got 20 5"), (["nan", "5"], "got nan 5"), (["5", "inf"], "got 5 inf")]
)
def test_synth_snr_range_must_be_min_then_max(snr: list[str], needle: str, tmp_path: Path, env: dict[str, str]) -> None:
    out = tmp_path / "suite"
    proc = run_cli(["data", "synth", "--out", str(out), "--n", "1", "--seed", "0", "--snr", *snr], env)
    assert_clean_error(proc, "--snr MIN MAX", "MIN <= MAX", needle)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle", "prog"),
    [
        ([], "the following arguments are required: command", "echo-agent"),
        (["frobnicate"], "invalid choice: 'frobnicate'", "echo-agent"),
        (["ask", "{audio}"], "the following arguments are required: question", "echo-agent ask"),
        (["ask", "{audio}", "q", "--max-new-tokens", "many"], "invalid int value: 'many'", "echo-agent ask"),
        (["data", "synth", "--n", "1"], "the following arguments are required: --out, --seed", "echo-agent data synth"),
        (["ask", "{audio}", "q", "--no-such-flag"], "unrecognized arguments: --no-such-flag", "echo-agent"),
    ],
    ids=["no-command", "unknown-command", "missing-question", "bad-int", "nested", "unknown-flag"],
)
def test_argument_errors_are_one_line_without_the_usage_block(
    args: list[str], needle: str, prog: str, beeps_wav: Path, env: dict[str, str]
) -> None:
    proc = run_cli([a.replace("{audio}", str(beeps_wav)) for a in args], env)
    assert_clean_error(proc, needle, f"(see {prog} --help)")
    assert "usage:" not in proc.stderr and proc.stdout == ""


def test_help_still_prints_the_usage(env: dict[str, str]) -> None:
    proc = run_cli(["ask", "--help"], env)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: echo-agent ask"), proc.stdout
    assert proc.stderr == ""


def test_ask_json_writes_nothing_on_stderr(beeps_wav: Path, env: dict[str, str]) -> None:
    """No "Loading weights" progress bar: `--json` is read by programs, and stderr is for errors."""
    proc = run_cli(["ask", str(beeps_wav), "How many beeps?", "--json", *FAST], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert Result.model_validate(json.loads(proc.stdout)).status in ("answered", "no_answer")


def test_langgraph_api_folder_is_ignored_by_git() -> None:
    """`langgraph dev` writes its in-memory runtime's state to .langgraph_api/ in the repository."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (".langgraph_api/.langgraph_checkpoint.1.pckl", ".langgraph_api/store.pckl"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=root, check=False)
        assert proc.returncode == 0, f"{path} is not ignored"
