"""TEST DOUBLES, labelled as such: model backends that replay scripted outputs.

They exist only for faults a real tiny model cannot be made to produce on demand (a model that
never stops asking to listen, a malformed answer followed by a good one, exact tool-call
sequences, known-correct answers for scoring checks). Every test about real audio reaching a real
model uses real tiny models instead (test_graph_e2e.py, test_sft.py).
"""

from __future__ import annotations

from echo_agent.backends.base import AudioResolver, DeltaCallback, Generation, GenerationRequest


class ScriptedBackend:
    """Implements the `ModelBackend` protocol. Subclasses decide each reply in `respond`; by default
    the i-th call returns `script[i]` (the last one forever after). Every request is recorded, and
    every audio part is hydrated as a real backend must, so a bad reference fails here."""

    def __init__(self, script: list[Generation] | None = None) -> None:
        self.script = script or []
        self.requests: list[GenerationRequest] = []
        self.audio_seen: list[list[tuple[str, float | None, float | None]]] = []

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def sample_rate(self) -> int:
        return 16000

    def respond(self, request: GenerationRequest) -> Generation:
        return self.script[min(len(self.requests) - 1, len(self.script) - 1)]

    async def generate(
        self, request: GenerationRequest, audio: AudioResolver, on_delta: DeltaCallback | None = None
    ) -> Generation:
        self.requests.append(request)
        parts = [p for m in request.messages for p in m["content"] if p["type"] == "audio"]
        for p in parts:
            assert audio.samples(p, self.sample_rate).size > 0
        self.audio_seen.append([(p["clip"], p["start"], p["end"]) for p in parts])
        gen = self.respond(request)
        if on_delta is not None:
            on_delta(gen.text)
        return gen
