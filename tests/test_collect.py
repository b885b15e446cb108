"""Trajectory collection (`echo_agent.training.collect`, `echo-agent collect`) and the `Trajectory` record.

The record's contents are checked on a real tiny Qwen2-Audio that memorised one Echo trace (memorize.py), so
the graph really re-listens and the record really holds an inserted slice. Resume, crash-safety and export run
on the built-in tiny random model, the crash test through the real command line killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_beeps
from memorize import Trace, teach

from echo_agent.agent import EchoAgent, load_backend
from echo_agent.backends.batching import BatchingBackend
from echo_agent.backends.transformers import TransformersBackend
from echo_agent.benchmarks import BenchItem, load_benchmark
from echo_agent.config import AgentConfig, SamplingParams
from echo_agent.errors import ConfigError, EchoError
from echo_agent.graphs.echo import response_text
from echo_agent.graphs.runner import sample_seed
from echo_agent.tiny_models import build_tiny_qwen2_audio
from echo_agent.training.collect import collect, export_parquet, read_parquet, read_trajectories
from echo_agent.training.synth import write_suite
from echo_agent.training.trajectory import Trajectory, model_inputs, sequence_logprobs
from echo_agent.verifier import verify

TRACE = Trace(
    before="<think>Two beeps sit close together near <seg>2.0, 3.0</seg>",
    span=(2.0, 3.0),
    after=" yes, two there, one at 1 s and one at 4.5 s.</think><answer>4</answer>",
)
QUESTION, CHOICES = "How many beeps are there?", ["3", "4", "5"]
CLI = [sys.executable, "-m", "echo_agent.cli"]
RANDOM_MODEL = "tiny-random-qwen2-audio"
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=24)  # what the CLI runs below use


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> tuple[TransformersBackend, list[BenchItem]]:
    """A tiny Qwen2-Audio that answers the beeps question by re-listening to 2.0-3.0 s, and its data file."""
    folder = tmp_path_factory.mktemp("listen")
    wav = write_beeps(folder / "beeps.wav", 6.0, [(1.0, 0.2), (2.3, 0.2), (2.7, 0.2), (4.5, 0.3)])
    data = folder / "data.json"
    record = {"id": "q1", "audio_id": "beeps.wav", "question": QUESTION, "choices": CHOICES, "answer": "4",
              "task": "sound", "category": "count"}  # fmt: skip
    data.write_text(json.dumps([record]))
    backend = TransformersBackend(*build_tiny_qwen2_audio(seed=0))
    teach(backend, wav, QUESTION, CHOICES, TRACE)
    return backend, load_benchmark(data)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_suite(tmp_path_factory.mktemp("suite"), 3, seed=5, progress=False, durations=(10.0, 11.0))


def _random_agent() -> EchoAgent:
    return EchoAgent(BatchingBackend(load_backend(RANDOM_MODEL)), config=AgentConfig(sampling=SAMPLING))  # type: ignore[arg-type]


def _collect(agent: EchoAgent, items: list[BenchItem], out: Path, **kw: Any) -> Any:
    import asyncio

    return asyncio.run(collect(agent, items, out=out, progress=False, **kw))


# -------------------------------------------------------------------------------------------- the record


def test_record_holds_exact_tokens_mask_logprobs_and_reward(
    listener: tuple[TransformersBackend, list[BenchItem]], tmp_path: Path
) -> None:
    backend, items = listener
    agent = EchoAgent(BatchingBackend(backend), config=AgentConfig(sampling=SamplingParams(max_new_tokens=120)))
    out = tmp_path / "traj.jsonl"
    summary = _collect(agent, items, out, samples=2, concurrency=2)
    assert (summary.written, summary.errors, summary.relisten_share) == (2, 0, 1.0)
    records, _ = read_trajectories(out)
    assert sorted(records) == ["q1#0", "q1#1"]
    traj = records["q1#0"]

    # The run re-listened once to the memorised span; the audio inputs are the clip, then that slice.
    assert [(c.start, c.end, c.valid) for c in traj.listens] == [(2.0, 3.0, True)]
    assert [(s.clip, s.start, s.end) for s in traj.audio_spans] == [("main", None, None), ("main", 2.0, 3.0)]
    assert traj.status == "answered" and traj.correct is True

    # Token layout: the inserted slice sits in the response and is masked; the mask-1 tokens are exactly
    # the model's sampled text (the memorised trace, then its end-of-turn token).
    tok = backend.tokenizer
    resp, mask = traj.response_ids, traj.response_mask
    bos, eos = tok.convert_tokens_to_ids("<|audio_bos|>"), tok.convert_tokens_to_ids("<|audio_eos|>")
    start, end = resp.index(bos), resp.index(eos)
    assert end - start - 1 == 25  # 1.0 s of audio at 25 tokens per second
    assert set(mask[start : end + 1]) == {0}
    assert tok.convert_tokens_to_ids("<|AUDIO|>") not in [t for t, m in zip(resp, mask, strict=True) if m]
    sampled = [t for t, m in zip(resp, mask, strict=True) if m]
    assert tok.decode(sampled, skip_special_tokens=True) == TRACE.before + TRACE.after
    assert sampled[-1] == tok.convert_tokens_to_ids("<|im_end|>") and traj.generated_tokens == len(sampled)
    assert len(traj.response_logprobs) == len(resp) == len(mask)
    assert all(lp == 0.0 for lp, m in zip(traj.response_logprobs, mask, strict=True) if not m)
    assert all(lp <= 0.0 for lp in traj.response_logprobs) and any(lp < 0 for lp in traj.response_logprobs)

    # The reward terms are the verifier's on the record's own messages.
    text = response_text(traj.messages, 1)
    verdict = verify(text, traj.choices, traj.gold, sum(c.valid for c in traj.listens))
    assert traj.reward_terms == verdict.terms and traj.reward == verdict.reward == pytest.approx(1.5)

    # Rebuilt inputs are what the model saw on its last call, plus what it sampled then...
    inputs = model_inputs([traj], backend.encoder)
    last = backend.last_prompt
    assert last is not None
    ids = inputs["input_ids"][0].tolist()
    assert ids == traj.prompt_ids + traj.response_ids and ids[: len(last.input_ids)] == last.input_ids
    want = backend.encoder.collate(last.audios)
    assert torch.equal(inputs["input_features"], want["input_features"])
    assert torch.equal(inputs["feature_attention_mask"], want["feature_attention_mask"])
    # ...so the trainer's recomputed log-probs on the sampled ids are the sampling policy's.
    with torch.inference_mode():
        recomputed, entropy = sequence_logprobs(backend.model, inputs, traj.temperature)
    positions = [len(traj.prompt_ids) + i for i, m in enumerate(mask) if m]
    got = [float(recomputed[0, p]) for p in positions]
    assert bool((entropy[0, positions] >= 0).all())
    assert got == pytest.approx([traj.response_logprobs[p - len(traj.prompt_ids)] for p in positions], abs=1e-4)
    # Greedy: both samples are the same run.
    assert records["q1#1"].response_ids == resp


def test_model_inputs_refuse_a_record_whose_audio_changed(
    listener: tuple[TransformersBackend, list[BenchItem]], tmp_path: Path
) -> None:
    backend, items = listener
    agent = EchoAgent(BatchingBackend(backend), config=AgentConfig(sampling=SamplingParams(max_new_tokens=120)))
    _collect(agent, items, tmp_path / "t.jsonl", samples=1)
    traj = next(iter(read_trajectories(tmp_path / "t.jsonl")[0].values()))
    moved = traj.model_copy(update={"audio_spans": [traj.audio_spans[0], traj.audio_spans[1].model_copy(
        update={"start": 2.0, "end": 3.4})]})  # fmt: skip
    with pytest.raises(EchoError, match="encodes differently"):
        model_inputs([moved], backend.encoder)


# ------------------------------------------------------------------------------- resume, determinism, export


def test_resume_drops_a_torn_line_and_reruns_only_missing_keys(suite: Path, tmp_path: Path) -> None:
    items = load_benchmark(suite)
    out = tmp_path / "traj.jsonl"
    agent = _random_agent()
    first = _collect(agent, items, out, samples=2, limit=2, concurrency=4)
    assert (first.written, first.done_before) == (4, 0)
    before, _ = read_trajectories(out)
    assert len({tuple(t.response_ids) for t in before.values()}) == 4  # every sample samples its own run

    # A crash mid-write: the last record torn in half.
    lines = out.read_bytes().splitlines(keepends=True)
    torn_id = json.loads(lines[-1])["id"]
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    again = _collect(agent, items, out, samples=3, limit=2, concurrency=4)
    assert (again.done_before, again.written) == (3, 3)  # the torn key and the two new samples
    after, valid_end = read_trajectories(out)
    assert valid_end == out.stat().st_size
    ids = [json.loads(line)["id"] for line in out.read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"{i.id}#{k}" for i in items[:2] for k in range(3))
    # The rerun of the torn key sampled the same trajectory (seed from (seed, item, sample)).
    assert after[torn_id].response_ids == before[torn_id].response_ids
    assert after[torn_id].response_logprobs == pytest.approx(before[torn_id].response_logprobs, abs=1e-4)

    # Another configuration must not be mixed into the same file.
    other = EchoAgent(agent.backend, config=AgentConfig(sampling=SAMPLING.model_copy(update={"temperature": 0.5})))
    with pytest.raises(ConfigError, match="another configuration"):
        _collect(other, items, out, samples=1)


def test_sample_seeds_depend_only_on_seed_item_and_sample() -> None:
    seeds = {sample_seed(s, i, k) for s in (0, 1) for i in ("a", "b") for k in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, "a", 1) == sample_seed(0, "a", 1)


def test_export_roundtrip(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "traj.jsonl"
    _collect(_random_agent(), load_benchmark(suite), out, samples=1, limit=2)
    records, _ = read_trajectories(out)
    n = export_parquet(out, tmp_path / "traj.parquet")
    assert n == 2
    back = read_parquet(tmp_path / "traj.parquet")
    assert [t.model_dump() for t in back] == [t.model_dump() for t in records.values()]
    import pyarrow.parquet as pq

    assert pq.read_schema(tmp_path / "traj.parquet").names == list(Trajectory.model_fields)


def test_export_loads_as_a_hf_dataset(suite: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "traj.jsonl"
    _collect(_random_agent(), load_benchmark(suite), out, samples=1, limit=1)
    export_parquet(out, tmp_path / "traj.parquet")
    ds = datasets.Dataset.from_parquet(str(tmp_path / "traj.parquet"))
    record = next(iter(read_trajectories(out)[0].values()))
    assert ds[0]["response_ids"] == record.response_ids and ds[0]["response_mask"] == record.response_mask


# ------------------------------------------------------------------------------------------ kill -9, resume


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _start(data: Path, out: Path) -> subprocess.Popen[bytes]:
    cmd = [*CLI, "collect", str(data), "--samples", "3", "--out", str(out), "--model", RANDOM_MODEL,
           "--max-new-tokens", str(SAMPLING.max_new_tokens), "--concurrency", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # stderr (the progress bar) goes to a file: an unread pipe could fill up and stall the run.
    with open(out.with_suffix(".log"), "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _log(out: Path) -> str:
    return out.with_suffix(".log").read_text(errors="replace")[-2000:]


def _kill_after(proc: subprocess.Popen[bytes], out: Path, lines: int, timeout: float = 600.0) -> None:
    """SIGKILL `proc` as soon as `out` has `lines` lines (the deadline only bounds a stuck run)."""
    deadline = time.monotonic() + timeout
    while _lines(out) < lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before writing {lines} lines: {_log(out)}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_sigkill_mid_run_then_rerun_leaves_every_key_exactly_once(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "traj.jsonl"
    run = _start(suite, out)
    _kill_after(run, out, 2)
    assert run.returncode == -signal.SIGKILL
    killed_at = _lines(out)
    assert 0 < killed_at < 9, "the first run should have been killed part-way"
    run = _start(suite, out)
    _kill_after(run, out, killed_at + 2)  # killed again, mid-way through the resumed run
    run = _start(suite, out)
    run.wait(timeout=600)
    assert run.returncode == 0, _log(out)

    ids = [json.loads(line)["id"] for line in out.read_bytes().splitlines()]  # every line whole JSON
    assert out.read_bytes().endswith(b"\n")
    items = load_benchmark(suite)
    assert sorted(ids) == sorted(f"{i.id}#{k}" for i in items for k in range(3))
    # The same keys from one uninterrupted run: identical trajectories.
    clean = tmp_path / "clean.jsonl"
    _collect(_random_agent(), items, clean, samples=3, concurrency=4)
    got, want = read_trajectories(out)[0], read_trajectories(clean)[0]
    assert {k: t.response_ids for k, t in got.items()} == {k: t.response_ids for k, t in want.items()}
    assert {t.config_hash for t in got.values()} == {t.config_hash for t in want.values()}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--samples", "2", "--concurrency", "0"], "--concurrency must be >= 1"),
        (["--samples", "2", "--protocol", "function"], "seg-tag protocol"),
        (["--samples", "2", "--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_collect_rejects_bad_arguments_before_loading_a_model(
    suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    from echo_agent.cli import main

    assert main(["collect", str(suite), "--out", str(tmp_path / "t.jsonl"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "t.jsonl").exists()


# ------------------------------------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 24 KiB tmpfs (room for about three trajectories) and a function that makes it 1 MiB. Mounting
    needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and the file-size-limit case still runs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(disk)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")

    def make_room() -> None:
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)

    try:
        yield disk, make_room
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _collect_cli(data: Path, out: Path, limit_bytes: int | None = None) -> subprocess.CompletedProcess[str]:
    """`echo-agent collect` with 8 runs in flight, so the decoder is busy when a write fails. `limit_bytes` sets
    the process's real file-size limit (RLIMIT_FSIZE: a write past it fails with EFBIG; SIGXFSZ is ignored)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        assert limit_bytes is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = [*CLI, "collect", str(data), "--samples", "3", "--out", str(out), "--model", RANDOM_MODEL,
           "--max-new-tokens", str(SAMPLING.max_new_tokens), "--concurrency", "8"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # stderr is a pipe (read by `run`): a log file would itself hit the file-size limit.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False,
                          preexec_fn=limit if limit_bytes is not None else None)  # fmt: skip


def _assert_stopped_cleanly(proc: subprocess.CompletedProcess[str], out: Path, reason: str) -> int:
    """Exit 2 with one `error:` line naming the file and the reason (no traceback, no SIGABRT), and a file that
    ends with a whole record. Returns the records it holds."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    assert f"cannot write to {out}: {reason}" in errors[0] and "rerun the same command to resume" in errors[0]
    records, valid_end = read_trajectories(out)
    data = out.read_bytes()
    assert valid_end == len(data) and data.endswith(b"\n"), "the file must end with a whole record"
    assert len(data.splitlines()) == len(records) >= 1
    assert f"it keeps its {len(records)} whole records" in errors[0]
    return len(records)


def _assert_complete(out: Path, suite: Path, before: bytes) -> None:
    items = load_benchmark(suite)
    ids = [json.loads(line)["id"] for line in out.read_bytes().splitlines()]
    assert sorted(ids) == sorted(f"{i.id}#{k}" for i in items for k in range(3))  # every key exactly once
    assert out.read_bytes().startswith(before)  # the records written before the failure are kept as they were


def test_full_disk_stops_with_a_clear_error_and_the_rerun_resumes(suite: Path, small_disk: tuple[Path, Any]) -> None:
    disk, make_room = small_disk
    out = disk / "traj.jsonl"
    proc = _collect_cli(suite, out)
    kept = _assert_stopped_cleanly(proc, out, "no space left on device")
    assert kept < 9
    before = out.read_bytes()
    again = _collect_cli(suite, out)  # still full: the same clean stop, nothing lost or duplicated
    assert _assert_stopped_cleanly(again, out, "no space left on device") == kept
    assert out.read_bytes() == before
    make_room()
    done = _collect_cli(suite, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["done_before"] == kept
    _assert_complete(out, suite, before)


def test_file_size_limit_stops_with_a_clear_error_and_the_rerun_resumes(suite: Path, tmp_path: Path) -> None:
    out = tmp_path / "traj.jsonl"
    proc = _collect_cli(suite, out, limit_bytes=20_000)
    kept = _assert_stopped_cleanly(proc, out, "file too large")
    before = out.read_bytes()
    done = _collect_cli(suite, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["done_before"] == kept
    _assert_complete(out, suite, before)


def test_record_log_cuts_a_failed_write_back_to_the_last_whole_record(small_disk: tuple[Path, Any]) -> None:
    """The file layer on the real full tmpfs: a write that fits only in part is undone, the error names the file
    and the reason, and after making room the same log (and a reopened one) goes on from the whole records."""
    from pydantic import BaseModel

    from echo_agent.errors import OutputError
    from echo_agent.jsonl import RecordLog

    class Rec(BaseModel):
        key: str
        blob: str

    disk, make_room = small_disk
    path = disk / "log.jsonl"
    appended = 0
    with RecordLog(path, Rec, lambda r: r.key, "record") as log:
        with pytest.raises(OutputError) as failed:
            for i in range(100):  # 24 KiB hold four of these and part of a fifth
                log.append(Rec(key=str(i), blob="x" * 5000))
                appended += 1
        assert 1 <= appended < 100
        assert str(failed.value) == (
            f"cannot write to {path}: no space left on device; it keeps its {appended} whole records: "
            "make room and rerun the same command to resume"
        )
        assert len(path.read_bytes().splitlines()) == appended and path.read_bytes().endswith(b"\n")
        make_room()
        log.append(Rec(key="after", blob="y"))
    with RecordLog(path, Rec, lambda r: r.key, "record") as again:
        assert list(again.done) == [*(str(i) for i in range(appended)), "after"]
