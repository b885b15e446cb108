"""The MMAR converter (`echo_agent.mmar`), `echo-agent data mmar` and `eval --mmar-predictions`.

The exported records are checked against MMAR's published format (the field names and the fixed
`modality` / `category` values of ddlBoJack/MMAR `MMAR-meta.jsonl` and `code/evaluation.py`), and the
predictions are scored by an independent re-implementation of that scorer, which fails on any value MMAR
does not know, as the official script does.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from test_eval_threads import THREADS, suite_record, write_suite

from echo_agent.benchmarks import load_benchmark
from echo_agent.cli import main
from echo_agent.mmar import CATEGORY_MAP, MMAR_CATEGORIES, MMAR_MODALITIES, exportable, mmar_layer, write_mmar
from echo_agent.training import synth as S

MMAU = Path(__file__).resolve().parent / "data" / "mmau" / "mmau-test-mini.json"
MMAR_FIELDS = {"id", "audio_path", "question", "choices", "answer", "modality", "category", "sub-category",
               "language", "source", "url", "timestamp"}  # fmt: skip


def mmar_score(records: list[dict[str, Any]]) -> dict[str, Any]:
    """MMAR's `evaluation.py` behaviour, re-implemented: MMAU's token matcher on `answer_prediction`, counts per
    modality and per category from fixed tables (an unknown value is a KeyError there, and here)."""

    def words(text: str) -> set[str]:
        return set(re.findall(r"\b\w+\b", text.lower()))

    def matches(answer: str, prediction: str, choices: Sequence[str]) -> bool:
        said, gold = words(prediction), words(answer)
        if not said:
            return False
        wrong: set[str] = set()
        for c in choices:
            if words(c) != gold:
                wrong |= words(c) - gold
        return gold <= said and not (said & wrong)

    modality = {m: [0, 0] for m in MMAR_MODALITIES}
    category = {c: [0, 0] for c in MMAR_CATEGORIES}
    correct = total = 0
    for r in records:
        if "answer_prediction" not in r:
            continue
        ok = matches(r["answer"], r["answer_prediction"], r["choices"])
        for table, key in ((modality, r["modality"]), (category, r["category"])):
            table[key][0] += ok
            table[key][1] += 1
        correct += ok
        total += 1
    return {"accuracy": correct / total if total else 0.0, "n": total, "modality": modality, "category": category}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    return write_suite(tmp_path / "data")


def test_suite_as_mmar_records(suite: Path, tmp_path: Path) -> None:
    items = load_benchmark(suite)
    out = tmp_path / "elsewhere" / "deeper" / "suite.mmar.jsonl"  # not beside the suite: paths are rewritten
    done = write_mmar(items, out)
    records = read_jsonl(out)
    assert (done.written, done.skipped_open, done.skipped_after_open) == (9, 1, 0)
    assert len(records) == 9 and "s2" not in {r["id"] for r in records}  # the open question is left out
    by_id = {r["id"]: r for r in records}
    for r in records:
        assert set(r) >= MMAR_FIELDS
        assert r["modality"] in MMAR_MODALITIES and r["category"] in MMAR_CATEGORIES and r["sub-category"]
        assert (out.parent / r["audio_path"]).resolve().is_file()
        assert r["source"] == "echo-suite" and r["suite"]["task"] == r["modality"]
        assert r["language"] == ("en" if r["modality"] == "speech" else None)
        assert r["answer"] in r["choices"]
    assert (by_id["tA-0"]["category"], by_id["tA-0"]["sub-category"]) == ("Perception Layer", "Counting and Statistics")
    assert (by_id["tC-0"]["category"], by_id["tC-0"]["sub-category"]) == ("Semantic Layer", "Content Analysis")
    assert by_id["tC-2"]["thread"] == "tC" and by_id["tC-2"]["turn"] == 2 and "thread" not in by_id["s1"]

    # The export reads back as MMAR, threads and all, grouped by modality.
    again = {i.id: i for i in load_benchmark(out)}
    assert {i.format for i in again.values()} == {"mmar"} and again["tA-0"].group == "sound"
    assert [(again[f"{t}-{n}"].thread, again[f"{t}-{n}"].turn) for t, n, *_ in THREADS] == [
        (t, n) for t, n, *_ in THREADS
    ]
    assert all(i.audio.resolve() == orig.audio.resolve() for orig in items for i in again.values() if i.id == orig.id)


def test_a_thread_is_cut_before_its_first_open_turn(tmp_path: Path) -> None:
    extra = [
        suite_record("tE-0", "a", "sound", "count", "How many?", ["1", "2"], "1", "choice", "tE", 0),
        suite_record("tE-1", "a", "sound", "count", "And now?", [], "2", "number", "tE", 1),
        suite_record("tE-2", "a", "sound", "order", "Which first?", ["beep", "click"], "beep", "choice", "tE", 2),
    ]
    items = load_benchmark(write_suite(tmp_path, extra=extra))
    keep, n_open, n_after = exportable(items)
    assert (n_open, n_after) == (2, 1)
    assert "tE-0" in {i.id for i in keep} and not {"tE-1", "tE-2"} & {i.id for i in keep}
    write_mmar(items, tmp_path / "x.jsonl")
    load_benchmark(tmp_path / "x.jsonl")  # still a valid file: tE is turns 0..0


def test_every_suite_category_has_an_mmar_layer() -> None:
    assert set(S.CATEGORIES) <= set(CATEGORY_MAP)
    for category, (layer, sub) in CATEGORY_MAP.items():
        assert layer in MMAR_CATEGORIES and sub, category
    for domain in ("speech", "music", "sound"):  # the domain modules that exist so far
        try:
            mod = importlib.import_module(f"echo_agent.training.suite.{domain}")
        except ImportError:
            continue
        assert set(mod.CATEGORIES) <= set(CATEGORY_MAP), domain


def test_mmau_records_map_by_their_own_category() -> None:
    items = load_benchmark(MMAU)[:50]
    for item in items:
        layer, sub = mmar_layer(item.record)
        assert layer == {"Reasoning": "Semantic Layer", "Information Extraction": "Perception Layer"}.get(
            item.record["category"], "Perception Layer"
        )
        assert isinstance(sub, str)


def test_cli_data_mmar(suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mmar" / "suite.jsonl"
    assert main(["data", "mmar", str(suite), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and "left out: 1 open questions" in captured.err
    assert len(read_jsonl(out)) == 9
    assert main(["data", "mmar", str(suite), "--out", str(suite)]) == 2  # never over the data file
    assert "overwrite" in capsys.readouterr().err


def test_cli_eval_writes_mmar_predictions_for_the_official_scorer(
    suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path, preds_path = tmp_path / "R.json", tmp_path / "out" / "P.jsonl"
    argv = ["eval", str(suite), "--model", "tiny-random-qwen2-audio", "--max-new-tokens", "6", "--out",
            str(report_path), "--mmar-predictions", str(preds_path), "--concurrency", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "MMAR predictions" in printed and "1 open questions" in printed and "threads: turn 0" in printed
    report = json.loads(report_path.read_text())
    assert report["mmar_predictions"] == str(preds_path) and report["n"] == 10
    assert {k: v["n"] for k, v in report["by_turn"].items()} == {"0": 3, "1": 3, "2": 2}
    mmau_preds = {p["id"]: p for p in json.loads(Path(report["predictions"]).read_text())}
    records = read_jsonl(preds_path)
    assert len(records) == 9
    for r in records:
        assert (preds_path.parent / r["audio_path"]).resolve().is_file()
        assert r["answer_prediction"] == mmau_preds[r["id"]]["model_output"]
        assert r["echo"]["correct"] == mmau_preds[r["id"]]["echo"]["correct"]
    scored = mmar_score(records)
    assert scored["n"] == 9
    ours = sum(bool(mmau_preds[r["id"]]["echo"]["correct"]) for r in records)
    assert scored["accuracy"] == ours / 9  # the official matcher agrees with ours on every MCQ item
    assert sum(n for _, n in scored["modality"].values()) == 9
