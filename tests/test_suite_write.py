"""The real-audio suite's writer: every category in every split, balance, held-out phrasing kept apart by
construction, threads, determinism across workers, the CLI and its error for a missing Debian package.

Everything renders for real from the installed Debian packages (scripts/setup-audio)."""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from echo_agent.benchmarks import load_benchmark
from echo_agent.training.suite import phrasing
from echo_agent.training.suite.core import DOMAINS
from echo_agent.training.suite.write import PRESETS, SplitSpec, domain_module, plan_units, write_split

pytestmark = pytest.mark.skipif(
    os.environ.get("ECHO_SKIP_SUITE_RENDER") == "1", reason="the suite's Debian packages are not installed"
)

N_CATEGORIES = sum(len(domain_module(d).CATEGORIES) for d in DOMAINS)


def _records(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """One block of every category in each preset split (train with threads and open questions)."""
    out = tmp_path_factory.mktemp("suite")
    return {
        name: _records(write_split(out, PRESETS[name], N_CATEGORIES, seed=7 + k, workers=2, progress=False))
        for k, name in enumerate(("train", "test", "test_phrasing", "test_open", "test_threads"))
    }


def test_every_category_is_in_every_split(splits: dict[str, list[dict[str, Any]]]) -> None:
    want = {(d, c) for d in DOMAINS for c in domain_module(d).CATEGORIES}
    for name, records in splits.items():
        first_turns = {(r["task"], r["category"]) for r in records if r["turn"] == 0}
        assert first_turns == want, name


def test_records_load_as_benchmarks_and_match_their_split(
    splits: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    for name, records in splits.items():
        spec = PRESETS[name]
        for r in records:
            assert r["sources"] == spec.sources and r["phrasing"] == spec.phrasing
            if r["choices"]:
                assert r["answer"] in r["choices"] and r["answer_kind"] == "choice"
            else:
                assert r["answer_kind"] != "choice" and r["choice_format"] is None
            for a, b in r["evidence"]:
                assert 0.0 <= a < b <= r["duration"] + 1e-6
            assert r["trace"].endswith(f"<answer>{r['answer']}</answer>")
    assert all(not r["choices"] for r in splits["test_open"])
    assert all(r["choices"] for r in splits["test"])


def _template_regex(template: str) -> re.Pattern[str]:
    """A template's text with every `{slot}` as a wildcard: does a question come from this template?"""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".+?")
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


def test_heldout_phrasing_shares_no_template_and_no_format_with_training(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    # By construction: the banks and format tables keep the two sets apart ...
    train_templates: dict[tuple[str, str], list[str]] = {}
    for d in DOMAINS:
        for category, bank in domain_module(d).BANKS.items():
            assert not set(bank.train) & set(bank.heldout)
            train_templates[d, category] = [*bank.train, *bank.follow_up]
    tables: list[dict[str, Any]] = [phrasing.TIME_FORMATS, phrasing.SPAN_FORMATS, *phrasing.CHOICE_FORMATS.values()]
    train_ids = {k for t in tables for k, (s, _) in t.items() if s == "train"}
    heldout_ids = {k for t in tables for k, (s, _) in t.items() if s == "heldout"}
    assert heldout_ids and not train_ids & heldout_ids
    # ... and what was written keeps them apart: ids, and no held-out question parses as a train template.
    trained = [r for name in ("train", "test", "test_open", "test_threads") for r in splits[name]]
    heldout = splits["test_phrasing"]
    assert {r["template"] for r in heldout}.isdisjoint({r["template"] for r in trained})
    assert {f for r in heldout for f in r["formats"]} <= heldout_ids
    assert {f for r in trained for f in r["formats"]} <= train_ids
    # (Against the category's own train templates: a slot can hold any text, so a loose template of another
    # category, "How many {thing} are there {where}?", would match anything.)
    patterns = {key: [_template_regex(t) for t in ts] for key, ts in train_templates.items()}
    for r in heldout:
        assert not any(p.match(r["question"]) for p in patterns[r["task"], r["category"]]), r["question"]


def test_answers_and_positions_are_balanced(tmp_path: Path) -> None:
    """Two blocks of each category with four balanced choice positions: always picking one position or one
    answer value scores no better than chance."""
    spec = SplitSpec(name="bal", sources="train", phrasing="train")
    records = _records(write_split(tmp_path, spec, N_CATEGORIES * 8, seed=3, workers=2, progress=False))
    by_cat: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        by_cat[f"{r['task']}/{r['category']}"].append(r)
    for cat, rs in by_cat.items():
        k = max(len(r["choices"]) for r in rs)
        positions = collections.Counter(r["choices"].index(r["answer"]) for r in rs)
        assert max(positions.values()) <= len(rs) / k + 2, (cat, positions)
        answers = collections.Counter(r["answer"] for r in rs)
        assert max(answers.values()) <= len(rs) / 2 + 1, (cat, answers)


def test_threads_are_ordered_and_some_load_a_second_clip(splits: dict[str, list[dict[str, Any]]]) -> None:
    threads: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in splits["test_threads"]:
        assert r["thread"] is not None
        threads[r["thread"]].append(r)
    assert len(threads) == N_CATEGORIES
    lengths = collections.Counter(len(t) for t in threads.values())
    assert set(lengths) <= {2, 3, 4} and len(lengths) >= 2
    second_clip = 0
    for turns in threads.values():
        assert [r["turn"] for r in turns] == list(range(len(turns)))
        clips = [r["audio_id"] for r in turns]
        second_clip += len(set(clips)) > 1
        assert len(set(clips)) <= 2 and clips[0] == turns[0]["audio_id"]
        assert len({r["task"] for r in turns}) == 1
    assert second_clip >= 1
    follow = [r for r in splits["test_threads"] if "/follow/" in r["template"]]
    assert follow and all(r["turn"] > 0 for r in follow)


def test_output_is_identical_for_any_number_of_workers(tmp_path: Path) -> None:
    spec = SplitSpec(name="det", sources="heldout", phrasing="train", open_share=0.3, thread_share=0.3)
    a = write_split(tmp_path / "a", spec, N_CATEGORIES, seed=11, workers=1, progress=False)
    b = write_split(tmp_path / "b", spec, N_CATEGORIES, seed=11, workers=2, progress=False)
    assert a.read_bytes() == b.read_bytes()
    wavs = sorted(p.name for p in (tmp_path / "a" / "audio").iterdir())
    assert wavs == sorted(p.name for p in (tmp_path / "b" / "audio").iterdir())
    for name in wavs:
        assert (tmp_path / "a" / "audio" / name).read_bytes() == (tmp_path / "b" / "audio" / name).read_bytes()


def test_plan_units_cycles_categories_and_shares() -> None:
    units = plan_units(PRESETS["train"], 900, seed=5)
    assert collections.Counter((u.domain, u.category) for u in units).most_common()[-1][1] == 900 // N_CATEGORIES
    threads = sum(u.thread for u in units) / len(units)
    opens = sum(u.open_question for u in units) / len(units)
    assert 0.15 < threads < 0.25 and 0.12 < opens < 0.22  # 0.2 of units; open ones among the non-threads


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echo_agent.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_cli_writes_a_split_that_eval_can_load(tmp_path: Path) -> None:
    done = _cli("data", "suite", "--out", str(tmp_path), "--seed", "4", "--split", "test", "--n", "12",
                "--domains", "speech", "music")  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    items = load_benchmark(path)
    assert len(items) == 12 and {it.group.split("/")[0] for it in items} == {"speech", "music"}
    assert all(it.audio.is_file() for it in items)
    manifest = json.loads((tmp_path / "test.manifest.json").read_text())
    assert manifest["records"] == 12 and manifest["audio_bytes"] > 0


def test_cli_names_the_missing_debian_package(tmp_path: Path) -> None:
    """With espeak-ng off PATH and an empty render cache, speech cannot render: one line naming the package."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "ECHO_RENDER_CACHE": str(tmp_path / "cache")}
    done = _cli("data", "suite", "--out", str(tmp_path / "o"), "--seed", "1", "--split", "test", "--n", "1",
                "--domains", "speech", env=env)  # fmt: skip
    assert done.returncode == 2
    assert "apt-get install" in done.stderr and "Traceback" not in done.stderr
