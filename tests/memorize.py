"""Teach a tiny random model one Echo trace by teacher forcing, so a graph run can replay it.

A random model never writes `<seg>` on its own. Rather than script its output (a test double),
these tests *train* a real tiny Qwen model on one tool-call trace: the prompt with the full clip,
then `<think>... <seg>S, E</seg>` + the re-listened slice (as audio input) + the rest of the answer.
Loss covers only the tokens the model writes; the inserted audio is masked, as in Echo's training.
Greedy decoding then reproduces the trace, which makes the model stop on `</seg>`, so the graph
really slices audio and feeds it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from echo_agent.backends.base import AudioResolver, GenerationRequest
from echo_agent.backends.transformers import TransformersBackend, collate_audio_features
from echo_agent.messages import Message, Part, audio_part, text_part


@dataclass
class Trace:
    before: str  # assistant text up to and including </seg>
    span: tuple[float, float]
    after: str  # assistant text after the inserted slice (the final answer included)


def memorize(
    backend: TransformersBackend, user: Message, trace: Trace, audio: AudioResolver, steps: int = 300, lr: float = 1e-2
) -> float:
    """Train `backend.model` on the trace; returns the final loss."""
    tok = backend.tokenizer
    assistant: list[Part] = [
        text_part(trace.before, "model"),
        audio_part("main", *trace.span),
        text_part(trace.after, "model"),
    ]
    prompt = backend.encode(GenerationRequest(messages=[user]), audio)
    ids, labels = list(prompt.input_ids), [-100] * len(prompt.input_ids)
    audios = list(prompt.audios)
    for part in assistant:
        if part["type"] == "audio":
            enc = backend.encoder.encode_audio_part(part, audio)
            ids += enc.input_ids
            labels += [-100] * len(enc.input_ids)  # inserted audio is never a target
            audios.append(enc)
        else:
            piece = tok(part["text"], add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    labels.append(ids[-1])
    model = backend.model
    model.train()
    # The audio encoder stays frozen (as in Echo's SFT stage); it is also the costly part to backprop.
    tower = getattr(model, "audio_tower", None) or model.model.audio_tower
    tower.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    input_ids = torch.tensor([ids])
    label_t = torch.tensor([labels])
    feats = collate_audio_features(backend.family, audios)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=label_t, **feats)
        loss = out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return float(loss.item())


def teach(backend: TransformersBackend, wav: object, question: str, choices: list[str], trace: Trace) -> None:
    """Memorise `trace` as the answer to `question` about the clip `wav` (a path), as the graph would ask it."""
    from echo_agent.audio import AudioStore
    from echo_agent.prompts import format_question

    store = AudioStore()
    ref = store.load(wav)  # type: ignore[arg-type]
    text = format_question(question, choices, {"main": ref.duration}, "main")
    user: Message = {"role": "user", "content": [audio_part("main"), text_part(text)]}
    loss = memorize(backend, user, trace, AudioResolver(store, {"main": ref}))
    assert loss < 0.05, f"the tiny model did not memorise the trace (loss {loss:.3f})"
