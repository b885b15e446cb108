"""Real multi-process training: SFT and GRPO under `accelerate launch` with two CPU processes (gloo).

The launch line is the one the docs give for CPUs:
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m echo_agent.cli train ...
(`accelerate launch --cpu --num_processes 2` starts one process only.) Each rank writes OUT/ranks/rankN.jsonl:
what it trained on at every step and a hash of its final weights. The two ranks must have seen different data,
taken the same collective steps (else gloo fails with "Connection closed by peer") and ended with identical
weights; only rank 0 writes the log, the checkpoints and the final model, and the final path is printed once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from echo_agent.training.synth import write_suite

ACCELERATE = Path(sys.executable).with_name("accelerate")
TINY = {"vocab_size": 400, "hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128,
        "audio_hidden_size": 64, "audio_layers": 1, "freeze_audio_encoder": True}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], tmp: Path, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "echo_agent.cli", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _ranks(out: Path) -> list[list[dict[str, Any]]]:
    files = sorted((out / "ranks").glob("rank*.jsonl"))
    assert [f.name for f in files] == ["rank0.jsonl", "rank1.jsonl"]
    return [[json.loads(line) for line in f.read_text().splitlines()] for f in files]


def _final_digests(ranks: list[list[dict[str, Any]]]) -> list[str]:
    return [next(r["final_weights"] for r in rows if "final_weights" in r) for rows in ranks]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    return write_suite(out, 8, 3, "train", categories=("count", "identify"), progress=False, durations=(10.0, 12.0))


@pytest.fixture(scope="module")
def sft_run(suite: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("sft2")
    config = tmp / "sft.json"
    config.write_text(json.dumps({**TINY, "steps": 60, "batch_size": 2, "lr": 1e-2, "warmup": 5, "log_every": 20,
                                  "save_every": 30}))  # fmt: skip
    proc = _launch(["train", "sft", "--train", str(suite), "--out", str(tmp / "run"), "--config", str(config)], tmp)
    return tmp / "run", proc


def test_two_process_sft_splits_the_data_and_ends_with_identical_weights(
    sft_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, proc = sft_run
    ranks = _ranks(out)
    steps = [[r for r in rows if "step" in r] for rows in ranks]
    assert [len(s) for s in steps] == [60, 60], "both ranks took every step"
    assert all(a["batch"] != b["batch"] for a, b in zip(*steps, strict=True)), "each step, each rank its own batch"
    d0, d1 = _final_digests(ranks)
    assert d0 == d1, "data-parallel ranks end with the same weights"
    lines = proc.stdout.strip().splitlines()  # rank 0's log rows, then the final path, once
    assert lines[-1] == str(out / "final") and lines.count(lines[-1]) == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [20, 40, 60], "rank 0 alone writes the log"
    from echo_agent.backends.transformers import TransformersBackend
    from echo_agent.training.common import weights_digest

    assert weights_digest(TransformersBackend.from_pretrained(out / "final").model) == d0


def test_two_process_grpo_takes_the_same_collective_steps(
    suite: Path, sft_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    init = sft_run[0] / "final"
    out = tmp_path / "grpo"
    args = ["train", "grpo", "--train", str(suite), "--out", str(out), "--init", str(init), "--steps", "3",
            "--items-per-step", "4", "--group-size", "3", "--lr", "1e-3"]  # fmt: skip
    config = tmp_path / "grpo.json"
    # Hot sampling, so groups mix right and wrong answers and some rank has something to learn.
    config.write_text(json.dumps({"temperature": 2.0, "max_new_tokens": 60, "save_every": 2, "updates_per_step": 2}))
    proc = _launch([*args, "--config", str(config)], tmp_path)
    ranks = _ranks(out)
    items = [[r["items"] for r in rows if "items" in r] for rows in ranks]
    assert [len(i) for i in items] == [3, 3]
    for a, b in zip(*items, strict=True):
        assert len(a) == len(b) == 2 and not set(a) & set(b), "each rank rolls out its own half of the questions"
    d0, d1 = _final_digests(ranks)
    assert d0 == d1
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out / "final") and lines.count(lines[-1]) == 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["rollout_errors"] == 0 for r in log)
    from echo_agent.backends.transformers import TransformersBackend
    from echo_agent.training.common import weights_digest

    before = weights_digest(TransformersBackend.from_pretrained(init).model)
    assert (d0 != before) == any("loss" in r for r in log), "the weights moved exactly when some update ran"
