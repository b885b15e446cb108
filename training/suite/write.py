"""Writing the real-audio suite: splits, units (single items and threads), parallel rendering, the manifest.

A split is a `SplitSpec`: which sources (train or held-out voices/soundfont/kits/beds), which phrasings
(train or held-out templates and formats), how many of its units are open questions and how many are
threads. Unit `i` of a split comes from `SeedSequence([seed, i])` alone and cycles over every (domain,
category) pair, so output is byte-identical for any number of workers and every category is in every split.

A **unit** is one single item or one thread. A thread is 2–4 turns about one scene (turn 1 on is a
follow-up: the same category referring back, or another category of the domain), and one thread in four
loads a second clip mid-way (the chat `/load` case): its later turns are about the new clip. Turns are
records with the same `thread` id and increasing `turn`; `eval` runs them in order in one graph thread.

Answers are balanced per (domain, category) over the split's single items and first turns (`core.balanced`);
follow-up turns draw freely.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .core import DOMAINS, SAMPLE_RATE, Domain, PhrasingSplit, Question, Scene, SourceSplit, SuiteItem

__all__ = ["PRESETS", "SplitSpec", "domain_module", "plan_units", "write_split", "write_splits"]


class SplitSpec(BaseModel):
    """What one split of the suite holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    sources: SourceSplit = "heldout"
    phrasing: PhrasingSplit = "train"
    open_share: float = Field(0.0, ge=0.0, le=1.0, description="share of units that are open questions")
    thread_share: float = Field(0.0, ge=0.0, le=1.0, description="share of units that are threads")
    domains: tuple[Domain, ...] = DOMAINS
    categories: tuple[str, ...] | None = Field(None, description="a subset of the domains' categories")


PRESETS: dict[str, SplitSpec] = {
    # Training never sees held-out sources or held-out phrasings.
    "train": SplitSpec(name="train", sources="train", phrasing="train", open_share=0.2, thread_share=0.2),
    # Choosing runs: held-out sources (what generalisation means here), the same mix as train.
    "dev": SplitSpec(name="dev", sources="heldout", phrasing="train", open_share=0.2, thread_share=0.2),
    # The test splits, one question each: held-out sources; seen sources; held-out phrasing; open; threads.
    "test": SplitSpec(name="test", sources="heldout", phrasing="train"),
    "test_seen": SplitSpec(name="test_seen", sources="train", phrasing="train"),
    "test_phrasing": SplitSpec(name="test_phrasing", sources="heldout", phrasing="heldout"),
    "test_open": SplitSpec(name="test_open", sources="heldout", phrasing="train", open_share=1.0),
    "test_threads": SplitSpec(name="test_threads", sources="heldout", phrasing="train", thread_share=1.0),
}
"""The default splits; `write_splits` gives each its own seed, so no two splits share a clip."""

SPLIT_SEED_OFFSET = {name: k for k, name in enumerate(PRESETS)}


def domain_module(domain: str) -> ModuleType:
    """The module that composes scenes and asks questions for `domain` (imported lazily: each loads sources)."""
    import importlib

    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    return importlib.import_module(f"{__package__}.{domain}")


def _pairs(spec: SplitSpec) -> list[tuple[Domain, str]]:
    pairs = [(d, c) for d in spec.domains for c in domain_module(d).CATEGORIES]
    if spec.categories is not None:
        unknown = set(spec.categories) - {c for _, c in pairs}
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)} for domains {spec.domains}")
        pairs = [(d, c) for d, c in pairs if c in spec.categories]
    if not pairs:
        raise ValueError("no categories to write")
    return pairs


def _share(seed: int, index: int, what: str, share: float) -> bool:
    """A deterministic coin with P(True) = share, independent of the unit's content stream."""
    h = hashlib.sha256(f"{seed}\x00{index}\x00{what}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


class Unit(BaseModel):
    """Unit `index` of a split: its (domain, category), balance slot, and whether it is open or a thread."""

    model_config = ConfigDict(frozen=True)

    index: int
    domain: Domain
    category: str
    slot: int
    open_question: bool
    thread: bool


def plan_units(spec: SplitSpec, n: int, seed: int) -> list[Unit]:
    """The `n` units of a split, without rendering anything."""
    pairs = _pairs(spec)
    units: list[Unit] = []
    for i in range(n):
        domain, category = pairs[i % len(pairs)]
        thread = _share(seed, i, "thread", spec.thread_share)
        # A thread's first turn may be open too, but mixing both keeps shares simple: threads are MCQ.
        open_q = not thread and _share(seed, i, "open", spec.open_share)
        units.append(
            Unit(index=i, domain=domain, category=category, slot=i // len(pairs), open_question=open_q, thread=thread)
        )
    return units


def _difficulty(scene: Scene) -> str:
    snr = float(scene.meta.get("snr_db", 20.0))
    if snr >= 12.0 and scene.duration <= 20.0:
        return "easy"
    if snr < 6.0 or scene.duration > 25.0:
        return "hard"
    return "medium"


def _record(
    spec: SplitSpec, seed: int, item_id: str, audio_id: str, scene: Scene, q: Question, thread: str | None, turn: int
) -> dict[str, Any]:
    mod = domain_module(scene.domain)
    item = SuiteItem(
        id=item_id,
        audio_id=audio_id,
        question=q.question,
        choices=q.choices,
        answer=q.answer,
        task=scene.domain,
        split=spec.name,
        category=q.category,
        sub_category=mod.SUB_CATEGORIES[q.category],
        difficulty=_difficulty(scene),
        sources=spec.sources,
        phrasing=spec.phrasing,
        template=q.template,
        formats=[*q.formats, *([q.choice_format] if q.choice_format else [])],
        choice_format=q.choice_format,
        answer_kind=q.answer_kind,
        thread=thread,
        turn=turn,
        duration=scene.duration,
        seed=seed,
        evidence=q.evidence,
        trace=q.trace,
        events=scene.events,
        scene=scene.meta,
    )
    return item.model_dump(mode="json", by_alias=True)


AudioFormat = Literal["wav", "flac"]


def _write_audio(out_dir: Path, clip: str, scene: Scene, fmt: AudioFormat) -> str:
    """Write the clip (16-bit PCM; FLAC is lossless and ~60% of the WAV's size); returns its `audio_id`."""
    import soundfile as sf

    audio_id = f"./audio/{clip}.{fmt}"
    path = out_dir / audio_id
    pcm = np.round(scene.audio * 32768.0).clip(-32768, 32767).astype(np.int16)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    sf.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format=fmt.upper())
    tmp.replace(path)
    return audio_id


def _unit_job(args: tuple[Path, SplitSpec, int, Unit, AudioFormat]) -> list[dict[str, Any]]:
    """Worker: render unit `unit` (one scene, or a thread's one or two scenes), write its audio, return records."""
    out_dir, spec, seed, unit, fmt = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, unit.index]))
    mod = domain_module(unit.domain)
    base = f"{spec.name}-{seed}-{unit.index:06d}"
    scene = mod.make_scene(rng, spec.sources, unit.category)
    clip = _write_audio(out_dir, base, scene, fmt)
    ask = mod.ask
    if not unit.thread:
        q = ask(
            rng,
            scene,
            unit.category,
            phrasing=spec.phrasing,
            open_question=unit.open_question,
            slot=unit.slot,
            seed=seed,
        )
        return [_record(spec, seed, base, clip, scene, q, None, 0)]

    turns = int(rng.integers(2, 5))
    second_clip_at = int(rng.integers(1, turns)) if rng.random() < 0.25 else None
    records: list[dict[str, Any]] = []
    current, category = scene, unit.category
    for k in range(turns):
        if k == second_clip_at:
            category = mod.CATEGORIES[int(rng.integers(len(mod.CATEGORIES)))]
            current = mod.make_scene(rng, spec.sources, category)
            clip = _write_audio(out_dir, f"{base}-b", current, fmt)
            q = ask(rng, current, category, phrasing=spec.phrasing, open_question=False, slot=None, seed=seed)
        elif k == 0:
            q = ask(rng, current, category, phrasing=spec.phrasing, open_question=False, slot=unit.slot, seed=seed)
        else:
            # Half the follow-ups stay on the category and refer back; the rest ask something new of the clip.
            if rng.random() < 0.5:
                category = mod.CATEGORIES[int(rng.integers(len(mod.CATEGORIES)))]
                q = ask(rng, current, category, phrasing=spec.phrasing, open_question=False, slot=None, seed=seed)
            else:
                q = ask(
                    rng,
                    current,
                    category,
                    phrasing=spec.phrasing,
                    open_question=False,
                    slot=None,
                    seed=seed,
                    follow_up=True,
                )
        records.append(_record(spec, seed, f"{base}-t{k}", clip, current, q, base, k))
    return records


def write_split(
    out_dir: Path,
    spec: SplitSpec,
    n: int,
    seed: int,
    *,
    workers: int = 1,
    progress: bool = True,
    audio_format: AudioFormat = "wav",
) -> Path:
    """Write `n` units of `spec`: `out_dir/<name>.json` (MMAU JSON list), `out_dir/audio/*.wav` and
    `out_dir/<name>.manifest.json` (spec, seed, counts, seconds taken, bytes of audio). Returns the JSON path."""
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    units = plan_units(spec, n, seed)
    jobs = [(out_dir, spec, seed, u, audio_format) for u in units]
    chunks: list[list[dict[str, Any]]] = []
    t0 = time.perf_counter()

    def collect(results: Iterable[list[dict[str, Any]]], advance: Callable[[], None]) -> None:
        for recs in results:
            chunks.append(recs)
            advance()

    def run(advance: Callable[[], None]) -> None:
        if workers <= 1:
            collect(map(_unit_job, jobs), advance)
        else:
            chunk = max(1, min(16, n // (workers * 8)))
            # Workers start from a fresh interpreter, not a fork: a fork of a process whose torch threads hold a
            # lock (any caller that used torch first, such as a test session) can hang in the child's first torch op.
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
                collect(pool.map(_unit_job, jobs, chunksize=chunk), advance)

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns) as bar:
            task = bar.add_task(f"suite {spec.name}", total=n)
            run(lambda: bar.advance(task))
    else:
        run(lambda: None)
    seconds = time.perf_counter() - t0

    records = [r for recs in chunks for r in recs]
    path = out_dir / f"{spec.name}.json"
    # One record per line: a JSON list as MMAU's, without the indentation that doubled a 30,000-item file.
    _atomic_text(path, "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    clips = sorted({r["audio_id"] for r in records})
    audio_bytes = sum((out_dir / c).stat().st_size for c in clips)
    manifest = {
        "spec": spec.model_dump(mode="json"),
        "seed": seed,
        "units": n,
        "records": len(records),
        "clips": len(clips),
        "audio_bytes": audio_bytes,
        "seconds": round(seconds, 2),
        "workers": workers,
        "by_category": _counts(records, lambda r: f"{r['task']}/{r['category']}"),
    }
    _atomic_text(out_dir / f"{spec.name}.manifest.json", json.dumps(manifest, indent=2) + "\n")
    return path


def _counts(records: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[key(r)] = out.get(key(r), 0) + 1
    return dict(sorted(out.items()))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_splits(
    out_dir: Path, sizes: dict[str, int], seed: int, *, workers: int = 1, progress: bool = True
) -> dict[str, Path]:
    """Several preset splits into one folder (one shared `audio/`); split k uses seed `seed * 1000 + k`."""
    unknown = set(sizes) - set(PRESETS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected some of {list(PRESETS)}")
    return {
        name: write_split(
            out_dir, PRESETS[name], n, seed * 1000 + SPLIT_SEED_OFFSET[name], workers=workers, progress=progress
        )
        for name, n in sizes.items()
    }
