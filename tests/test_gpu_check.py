"""bench/gpu_check.py, the prepared GPU check, rehearsed on the CPU at its tiny sizes: every phase reports, phases
1-4 pass (the graph really re-listens, both rollout rates are positive, GRPO and SFT steps run), and the vLLM
phase is skipped with its reason, since vLLM is not installed here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PHASES = ["environment", "graph_run", "rollouts", "training", "vllm"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("out")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--tiny",
        "--json",
        "--budget-s",
        "120",
    ]
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, object] = json.loads(proc.stdout)
    assert json.loads((out / "gpu_check.json").read_text()) == data  # the same report lands under $OUT
    return data


def test_every_phase_reports_and_the_first_four_pass(report: dict[str, object]) -> None:
    phases = report["phases"]
    assert isinstance(phases, dict)
    assert list(phases) == PHASES
    status = {name: phases[name]["status"] for name in PHASES}
    assert status == {**dict.fromkeys(PHASES[:4], "ok"), "vllm": "skipped"}, {
        n: phases[n].get("error") or phases[n].get("reason") for n in PHASES
    }
    assert "not installed" in phases["vllm"]["reason"]
    assert report["ok"] is True
    assert phases["environment"]["placement"] == {"device": "cpu", "dtype": "float32"}


def test_the_graph_run_relistened_and_answered(report: dict[str, object]) -> None:
    run = report["phases"]["graph_run"]  # type: ignore[index]
    assert run["relistened"] and run["answered"]
    assert [(c["start"], c["end"], c["valid"]) for c in run["listens"]] == [(2.0, 3.0, True)]
    assert run["audio_inputs_last_call"] == 2  # the clip and the re-listened slice
    assert run["model"]["param_dtype"] == "float32"


def test_rollout_rates_and_training_steps(report: dict[str, object]) -> None:
    phases = report["phases"]
    assert isinstance(phases, dict)
    rollouts = phases["rollouts"]
    assert rollouts["sequential"]["trajectories_per_s"] > 0
    assert rollouts["batched"]["trajectories_per_s"] > 0
    assert rollouts["sequential"]["trajectories"] == rollouts["batched"]["trajectories"] == rollouts["jobs"]
    assert rollouts["ratio_batched_over_sequential"] > 0
    # Exact arithmetic on the CPU: the same seeds sample the same trajectories on both sides.
    assert rollouts["identical_trajectories"] == f"{rollouts['jobs']}/{rollouts['jobs']}"
    training = phases["training"]
    for name in ("grpo", "sft"):
        assert training[name]["status"] == "ok"
        assert len(training[name]["steps"]) >= 2
        assert all(step["tokens"] > 0 for step in training[name]["steps"])
    assert all(step["update_s"] > 0 for step in training["grpo"]["steps"])
    assert all(step["tokens_per_s"] > 0 for step in training["sft"]["steps"])
